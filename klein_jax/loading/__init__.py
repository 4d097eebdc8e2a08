"""Loading klein checkpoints at run time: our Orbax format, diffusers folders and hub ids, BFL single files.

  source.py       resolve a source (folder, hub id; hub.py downloads only what is read) and read its configs
  safetensors.py  lazy tensor readers;  keymap.py + keymaps/  torch names and layouts -> our parameter paths
  weights.py      a diffusers-layout component -> our parameters;  checkpoint.py  our Orbax format
  modules.py      modules by component name, and the one way to fill or read an nnx module's state
  components.py   load_components: everything KleinPipeline needs, from any source
"""

from klein_jax.loading.components import Components, load_components
from klein_jax.loading.keymap import WeightMappingError
from klein_jax.loading.modules import (
    COMPONENTS,
    abstract_module,
    dtype_name,
    expected_params,
    fill_module,
    module_params,
    parse_dtype,
    random_module,
)
from klein_jax.loading.safetensors import CheckpointError
from klein_jax.loading.source import (
    CONFIG_FILE,
    DEFAULT_OUT_LAYERS,
    FORMAT_VERSION,
    MANIFEST,
    OUT_LAYERS_KEY,
    PARAMS_DIR,
    SOURCE_ERRORS,
    ConversionError,
    Source,
    open_source,
)
from klein_jax.loading.weights import check_component, component_params, load_component

__all__ = [
    "COMPONENTS", "CONFIG_FILE", "DEFAULT_OUT_LAYERS", "FORMAT_VERSION", "MANIFEST", "OUT_LAYERS_KEY", "PARAMS_DIR",
    "SOURCE_ERRORS", "CheckpointError", "Components", "ConversionError", "Source", "WeightMappingError",
    "abstract_module", "check_component", "component_params", "dtype_name", "expected_params", "fill_module",
    "load_component", "load_components", "module_params", "open_source", "parse_dtype", "random_module",
]
