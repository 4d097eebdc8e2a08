"""The klein modules by component name, built abstractly, and the one way to fill or read an nnx module's state.

Every loader (Orbax restore, diffusers/hub conversion, the random demo weights) builds the module with
`abstract_module` (nnx.eval_shape: shapes only, nothing initialised) and sets its variables with `fill_module`;
`module_params` reads them back (export, notebooks, tests). All three speak the storage layout: a fused projection
(klein_jax/models/fused.py) appears as the diffusers layers it fuses, so key maps, checkpoints and exports never see
the fused kernels; fill_module fuses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, MutableMapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from klein_jax.configs import TextEncoderConfig, TransformerConfig, VAEConfig
from klein_jax.loading.keymap import KeyRule, Path
from klein_jax.loading.keymaps.text_encoder import text_encoder_rules
from klein_jax.loading.keymaps.transformer import transformer_rules
from klein_jax.loading.keymaps.vae import vae_rules
from klein_jax.loading.host_memory import release_freed_memory
from klein_jax.models.fused import from_storage, storage_shapes, to_storage
from klein_jax.models.text_encoder import Qwen3TextEncoder
from klein_jax.models.transformer import Flux2Transformer
from klein_jax.models.vae import Flux2VAE

COMPONENTS = ("transformer", "vae", "text_encoder")
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ComponentKind:
    """What a component is made of: its module class, config class and key map (diffusers names -> ours)."""

    model: type
    config: type
    rules: Callable[[Any], tuple[KeyRule, ...]]


KINDS = {
    "transformer": ComponentKind(Flux2Transformer, TransformerConfig, transformer_rules),
    "vae": ComponentKind(Flux2VAE, VAEConfig, vae_rules),
    "text_encoder": ComponentKind(Qwen3TextEncoder, TextEncoderConfig, text_encoder_rules),
}


def parse_dtype(dtype: Any) -> Any:
    """"bfloat16" | "float32" (or the jnp dtype itself) -> the jnp dtype."""
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: Any) -> str:
    """jnp dtype or name -> "bfloat16" | "float32"."""
    return jnp.dtype(parse_dtype(dtype)).name


def abstract_module(name: str, config: Any, dtype: Any):
    """The component's module with abstract (shape-only) parameters of `dtype`: nothing is initialised."""
    model, dtype = KINDS[name].model, parse_dtype(dtype)
    return nnx.eval_shape(lambda: model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))


def expected_params(module) -> dict[Path, tuple[tuple[int, ...], Any]]:
    """path -> (shape, dtype) of every variable of an nnx module (abstract ones from nnx.eval_shape too), fused
    projections as their parts (the storage layout)."""
    _, state = nnx.split(module)
    return storage_shapes(module, {tuple(path): (tuple(v.get_value().shape), v.get_value().dtype)
                                   for path, v in nnx.to_flat_state(state)})


def fill_module(module, params: MutableMapping[Path, Any]):
    """`module` (usually abstract) with every variable set from `params` (path -> host or device array, the storage
    layout of expected_params; fused projections are fused here).

    Values are cast to each variable's dtype; entries are popped as they are placed, so host copies are freed early
    (and handed back to the system after each fused layer: host_memory). A missing path is a KeyError naming it.
    """
    params = from_storage(module, params, after_each=release_freed_memory)
    graphdef, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    for path, variable in flat:
        try:
            value = params.pop(tuple(path))
        except KeyError:
            raise KeyError(f"no value for {'.'.join(map(str, path))}") from None
        variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def replace_value(variable: nnx.Variable, value: Any) -> None:
    """Stores a transformed value in a filled module's variable, in place (klein_jax/quantization.py's fp8 kernels):
    module state changes here only."""
    variable.set_value(value)


def module_params(module) -> dict[Path, np.ndarray]:
    """Every variable of an nnx module (parameters and BN statistics) as host numpy arrays, in the storage layout."""
    _, state = nnx.split(module)
    return to_storage(module, {tuple(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)})


def random_params(module, rng: np.random.Generator) -> dict[Path, np.ndarray]:
    """float32 random values for every variable of `module` (abstract or not): kernels N(0, 1/fan_in), embeddings
    N(0, 1), norm scales and BN variances 1, biases and BN means 0 (the demo model's weights)."""
    out = {}
    for path, (shape, _) in expected_params(module).items():
        name = str(path[-1])
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "embedding":
            value = rng.standard_normal(shape)
        elif name in ("scale", "running_var"):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        out[path] = value.astype(np.float32)
    return out


def random_module(name: str, config: Any, rng: np.random.Generator, dtype: Any = "float32"):
    """The component `name` with random_params weights, built abstractly (no initialiser is compiled)."""
    abstract = abstract_module(name, config, dtype)
    return fill_module(abstract, random_params(abstract, rng))
