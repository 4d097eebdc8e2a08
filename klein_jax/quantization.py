"""fp8 (e4m3) weight-only quantization of the flow transformer's matmul kernels, one scale per output channel.

A quantized kernel is a `QuantizedArray`: float8_e4m3fn values and a float32 scale (amax over the kernel's
contracting axes / 448, e4m3's largest value), stored in place of the kernel's value, so the parameter keeps its
path (the sharding table, LoRA's targets and the modules see the same layers). A module reads it as every flax
layer reads its kernel, `kernel[...]`, which dequantizes to the compute dtype inside the traced program (XLA can
fuse the convert and multiply into the matmul's operand). Quantized kernels take half the bytes of bfloat16 ones.
LoRA factors stay in the pipeline dtype and add on top of the dequantized layer (klein_jax/lora/apply.py).

Which kernels: any parameter of rank >= 2 whose path matches the component's FP8_KERNELS row (`kernel`, or a name
ending in `_kernel` such as a fused layer's `grouped_kernel`), whatever its module (nnx.Linear, nnx.LinearGeneral,
nnx.Einsum, or any that reads the kernel with `[...]`); the contracting axes come from the module (contracting_axes).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from klein_jax.models.fused import OUTPUT, GroupedLinear

log = logging.getLogger(__name__)

FP8 = "fp8"
QUANTIZATIONS = (FP8,)
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448

# component -> regexes of the kernels stored as fp8 ("path/of/the/kernel", nnx state path joined by "/"): the
# transformer's attention and MLP projections (double and single blocks) and its three shared modulations. Its
# input embedders (x_embedder, context_embedder, time_guidance_embed) and output layers (norm_out, proj_out) stay in
# the pipeline dtype: 1.4% of klein-4B's transformer weights, at the model's edges, where diffusers' fp8 layerwise
# casting also keeps `norm*` and `proj_out` (hooks/layerwise_casting.py DEFAULT_SKIP_MODULES_PATTERN). Norms, the
# VAE and the text encoder are not quantized.
FP8_KERNELS: dict[str, tuple[str, ...]] = {
    "transformer": (
        r"(transformer_blocks|single_transformer_blocks)/\d+/.+/(\w+_)?kernel",
        r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)/.+/(\w+_)?kernel",
    ),
}


def check_quantization(value: Any) -> str | None:
    """None or one of QUANTIZATIONS; anything else is a ValueError naming the choices."""
    if value is None or (isinstance(value, str) and value in QUANTIZATIONS):
        return value
    raise ValueError(f"quantization {value!r} is not one of None, {', '.join(map(repr, QUANTIZATIONS))}")


@struct.dataclass
class QuantizedArray:
    """A kernel as fp8 values times a float32 scale; `[...]` gives the kernel in `compute_dtype`."""

    values: jax.Array  # float8_e4m3fn, the kernel's shape
    scale: jax.Array  # float32, the kernel's shape with its contracting axes of size 1
    compute_dtype: Any = struct.field(pytree_node=False)  # the kernel's dtype before quantization

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def dtype(self):
        """The stored dtype (float8_e4m3fn)."""
        return self.values.dtype

    def dequantize(self) -> jax.Array:
        """values * scale in float32 (exact: e4m3 has 4 significant bits), rounded once to compute_dtype."""
        return (self.values.astype(jnp.float32) * self.scale).astype(self.compute_dtype)

    def __getitem__(self, index) -> jax.Array:
        return self.dequantize()[index]

    def place(self, put: Callable[[Any, NamedSharding], Any], where: NamedSharding) -> "QuantizedArray":
        """Placed with the kernel's sharding: the values as it says, the scale split only along its output axes."""
        spec = tuple(where.spec) + (None,) * (self.ndim - len(where.spec))
        scale_spec = PartitionSpec(*(None if size == 1 else axis for size, axis in zip(self.scale.shape, spec)))
        return self.replace(values=put(self.values, where), scale=put(self.scale, NamedSharding(where.mesh, scale_spec)))


def quantize(kernel: jax.Array, contracting: tuple[int, ...]) -> QuantizedArray:
    """fp8 values and a float32 scale per output channel: amax over the contracting axes maps to 448."""
    kernel32 = kernel.astype(jnp.float32)
    amax = jnp.max(jnp.abs(kernel32), axis=contracting, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)  # an all-zero channel keeps scale 1
    values = (kernel32 / scale).astype(FP8_DTYPE)  # |values| <= 448 up to float32 rounding, far below e4m3's NaN (464)
    return QuantizedArray(values, scale, jnp.dtype(kernel.dtype))


def contracting_axes(module: nnx.Module, ndim: int) -> tuple[int, ...]:
    """The axes of `module`'s kernel that its matmul sums over (the input features); the rest are output channels.

    A module that declares `contracting_axes` (a tuple of kernel axes) is taken at its word; GroupedLinear: (in,)
    of its (in, G, C) output-side kernel, (G, C) of its (G, C, out) input-side one; nnx.Einsum: the kernel letters
    the input also has; nnx.LinearGeneral: all but the out_features axes; otherwise the first axis (nnx.Linear's
    (in, out), and kernels laid out (in, ...)). Any choice dequantizes exactly (the scale multiplies
    the kernel before the matmul); one that misses a contracting axis only keeps more scales.
    """
    declared = getattr(module, "contracting_axes", None)
    if declared is not None:
        return tuple(declared)
    if isinstance(module, GroupedLinear):
        return (0,) if module.side == OUTPUT else (0, 1)
    if isinstance(module, nnx.Einsum):
        operands = module.einsum_str.replace(" ", "").split("->")[0]
        inputs, kernel = operands.split(",")
        return tuple(i for i, letter in enumerate(kernel) if letter in inputs)
    if isinstance(module, nnx.LinearGeneral):
        return tuple(range(ndim - len(module.out_features)))
    return (0,)


def _quantize_value(value, contracting: tuple[int, ...]) -> QuantizedArray:
    fn = functools.partial(quantize, contracting=contracting)
    return jax.eval_shape(fn, value) if isinstance(value, jax.ShapeDtypeStruct) else fn(value)


def _selected(patterns: list[re.Pattern], path: tuple, value) -> bool:
    return (not isinstance(value, QuantizedArray) and len(value.shape) >= 2
            and any(p.fullmatch("/".join(map(str, path))) for p in patterns))


def quantize_module(module, component: str, quantization: str | None):
    """Stores, in place, the kernels FP8_KERNELS[component] selects as QuantizedArrays and returns `module`
    (quantization None: unchanged). Each kernel's array is dropped as its QuantizedArray is made, so the peak stays
    one kernel above the unquantized module; an abstract module (nnx.eval_shape) gets abstract QuantizedArrays."""
    if check_quantization(quantization) is None:
        return module
    from klein_jax.loading.modules import replace_value  # lazily: loading imports sharding, which imports this

    patterns = [re.compile(p) for p in FP8_KERNELS.get(component, ())]
    before, count = parameter_bytes(module), 0
    for path, node in list(nnx.iter_graph(module)):
        if not isinstance(node, nnx.Module):
            continue
        for name, variable in vars(node).items():
            if isinstance(variable, nnx.Param) and _selected(patterns, (*path, name), variable.get_value()):
                value = variable.get_value()
                replace_value(variable, _quantize_value(value, contracting_axes(node, len(value.shape))))
                count += 1
    log.info("quantized %s: %d kernels to %s, %.3g GB -> %.3g GB", component, count, quantization, before / 1e9,
             parameter_bytes(module) / 1e9)
    return module


def parameter_bytes(module) -> int:
    """Bytes of every array of a module (abstract ones too), QuantizedArrays as their values and scales."""
    leaves = jax.tree.leaves(nnx.state(module))
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
