"""Loading the klein components (transformer, VAE, text encoder, tokenizer, configs) from any source.

A klein-convert folder is restored straight into the abstract modules (Orbax); a diffusers folder or hub id is
converted in memory, tensor by tensor, through the key maps. This is what KleinPipeline.from_pretrained runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
from flax import nnx

from klein_jax.configs import Variant
from klein_jax import sharding
from klein_jax.loading import checkpoint
from klein_jax.loading.host_memory import release_freed_memory
from klein_jax.loading.modules import COMPONENTS, abstract_module, dtype_name, expected_params, parse_dtype
from klein_jax.loading.source import PARAMS_DIR, ConversionError, Source, open_source
from klein_jax.loading.weights import check_component, load_component
from klein_jax.models.text_encoder import Qwen3TextEncoder
from klein_jax.models.transformer import Flux2Transformer
from klein_jax.models.vae import Flux2VAE
from klein_jax.scheduler import check_scheduler_config
from klein_jax.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Components:
    """Everything KleinPipeline needs: the loaded modules (each with its `.config`), tokenizer and defaults."""

    transformer: Flux2Transformer
    vae: Flux2VAE
    text_encoder: Qwen3TextEncoder
    tokenizer: PromptTokenizer
    scheduler_config: dict[str, Any]
    variant: Variant  # from model_index.json's _class_name and is_distilled
    dtype: Any

    @property
    def is_distilled(self) -> bool:
        return self.variant.is_distilled


def _load_module(source: Source, name: str, config: Any, dtype: Any, mesh):
    abstract = abstract_module(name, config, dtype)
    shardings = None if mesh is None else sharding.param_shardings(name, expected_params(abstract), mesh)
    if source.kind == "converted":
        module = checkpoint.restore_module(source.folder / name / PARAMS_DIR, abstract, sharding=shardings)
    else:
        check_component(source, name, config, dtype)
        module = load_component(name, config, source.tensors(name), dtype, shardings=shardings)
        release_freed_memory()  # the read buffers (restore_params and fill_module trim as they go)
    if mesh is None:
        return module
    graphdef, state = nnx.split(module)  # fused projections (built from placed parts) onto their own table rows
    module = nnx.merge(graphdef, sharding.shard_state(state, name, mesh))
    release_freed_memory()  # the fused layers' parts
    return module


def load_components(source: str | os.PathLike, dtype: Any = "bfloat16", *,
                    transformer_file: str | os.PathLike | None = None, revision: str | None = None,
                    mesh=None) -> Components:
    """Loads a klein-convert folder, a diffusers pipeline folder or a hub id into modules of `dtype`.

    mesh: a jax.sharding.Mesh (klein_jax.sharding.make_mesh): every parameter is placed shard by shard as
    klein_jax.sharding.PARTITION_RULES says, straight from the checkpoint. Raises one of SOURCE_ERRORS (ValueErrors
    with a readable message) for a bad source, ValueError for a model axis that does not divide the model.
    """
    dtype = parse_dtype(dtype)
    src = open_source(source, transformer_file=transformer_file, revision=revision)
    configs = {name: src.config(name) for name in COMPONENTS}
    scheduler_config = src.scheduler_config
    try:
        check_scheduler_config(scheduler_config)
    except ValueError as e:
        raise ConversionError(f"{src.folder / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    tokenizer = src.tokenizer()
    for name in COMPONENTS if mesh is not None else ():
        sharding.check_model_axis(name, configs[name], mesh)
    modules = {}
    for name in COMPONENTS:
        start = time.perf_counter()
        modules[name] = _load_module(src, name, configs[name], dtype, mesh)
        count = sum(int(np.prod(s)) for s, _ in expected_params(modules[name]).values())
        log.info("loaded %s: %.3gM params %s in %.1f s", name, count / 1e6, dtype_name(dtype),
                 time.perf_counter() - start)
    return Components(
        transformer=modules["transformer"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        tokenizer=tokenizer, scheduler_config=scheduler_config, variant=src.variant, dtype=dtype,
    )
