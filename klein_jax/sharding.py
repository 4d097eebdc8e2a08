"""The device mesh (axes `data` and `model`) and where every parameter and activation lives on it.

The only module that names mesh axes. `data` splits the batch; `model` splits the transformer's and the text
encoder's weights Megatron-style: a column-parallel projection (its output features split, so whole attention heads
or MLP units land on one device) feeds a row-parallel one (its input features split), so each attention and each MLP
needs one all-reduce of its output. Which parameter is split how is one table, PARTITION_RULES (parameter path regex ->
PartitionSpec, first match wins, as big_vision and maxtext write it); the models name no axis. The large tensors
outside the blocks (the Qwen3 token embedding, the transformer's modulations) are split too; norms, the small
projections and the whole VAE are replicated: the VAE's activations (the large part of its cost) follow the batch.

A model axis that does not divide a head count or an MLP width is an error, not a silent fallback to replicated
weights: a fallback would need up to model-axis times the memory the user planned for (check_model_axis).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from klein_jax.quantization import QuantizedArray

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

_COLUMN = P(None, MODEL)  # kernel (in, out): output features split
_ROW = P(MODEL, None)  # kernel (in, out): input features split; the matmul's partial sums are all-reduced
_DOUBLE = r"transformer/transformer_blocks/\d+"
_SINGLE = r"transformer/single_transformer_blocks/\d+"
_QWEN = r"text_encoder/layers/\d+"


class Gathered:
    """Stored split over `model` along its last dimension that the axis divides (replicated if none does), and
    gathered whole inside each program before use (`gathered`): a weight's memory split without splitting its
    computation, for the VAE, whose convolutions would otherwise all-gather their activations layer by layer."""

    def __repr__(self) -> str:
        return "GATHERED"


GATHERED = Gathered()

# "component/path/of/the/parameter" (nnx state paths joined by "/") -> how it is split; first match wins.
PARTITION_RULES: tuple[tuple[str, P | Gathered], ...] = (
    # Fused projections (klein_jax/models/fused.py), the model's layout: the group axis G is split, so each device
    # holds whole heads and MLP units of q|k|v, gate|value and attn|mlp alike (no all-to-all, one all-reduce).
    (_SINGLE + r"/attn/to_out/grouped_kernel", P(MODEL, None, None)),  # (G, C, out): row-parallel
    (r"transformer/.*/grouped_kernel", P(None, MODEL, None)),  # (in, G, C): column-parallel
    # The parts of the fused layers as stored (checkpoint tensors, placed shard by shard at load): split along the
    # side that is not grouped (the model width D), so that each device fuses its own rows (columns) of every part
    # and one all-to-all per layer moves the fused kernel onto the rows above (klein_jax/models/fused.py).
    (_DOUBLE + r"/attn/(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)/kernel", _ROW),
    (_DOUBLE + r"/(ff|ff_context)/linear_in/kernel", _ROW),
    (_SINGLE + r"/attn/to_qkv_mlp_proj/kernel", _ROW),
    (_SINGLE + r"/attn/to_out/kernel", _COLUMN),
    # Flux2TransformerBlock's unfused layers: the attention and MLP output projections row-parallel.
    (_DOUBLE + r"/attn/(to_out|to_add_out)/kernel", _ROW),
    (_DOUBLE + r"/(ff|ff_context)/linear_out/kernel", _ROW),
    # Qwen3 decoder layers: q/k/v and gate/up column, o/down row.
    (_QWEN + r"/self_attn/(q_proj|k_proj|v_proj)/kernel", _COLUMN),
    (_QWEN + r"/self_attn/o_proj/kernel", _ROW),
    (_QWEN + r"/mlp/(gate_proj|up_proj)/kernel", _COLUMN),
    (_QWEN + r"/mlp/down_proj/kernel", _ROW),
    # Large tensors outside the blocks, split so that no device holds them whole (0.7 + 0.3 GiB of klein-4B): the
    # Qwen3 token embedding (vocab, hidden) over hidden (a lookup gives each device its slice of every row), the
    # transformer's shared modulations, text input and output modulation row-wise: their inputs are replicated, so
    # each device uses its slice and one all-reduce leaves the output whole (split column-wise, the output's D-split
    # spread into the residual stream: an all-gather before every block matmul and collective-permutes in every
    # modulation split, benchmarks/fused_projections.py).
    (r"text_encoder/embed_tokens/embedding", _COLUMN),
    (r"transformer/(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation|norm_out)"
     r"/linear/kernel", _ROW),
    (r"transformer/(context_embedder|time_guidance_embed/timestep_embedder/linear_2)/kernel", _ROW),
    # The VAE (0.16 GiB; 1.1 GiB of 8 devices' memory if replicated): split at rest, whole in its programs.
    (r"vae/.*", GATHERED),
    # Everything else: norms, the timestep embedding's first layer, x_embedder, proj_out.
    (r".*", P()),
)
_RULES = tuple((re.compile(pattern), spec) for pattern, spec in PARTITION_RULES)

# Config fields that the model axis must divide, per component: each names a count that is split across devices.
SPLIT_SIZES: dict[str, tuple[str, ...]] = {
    "transformer": ("num_attention_heads", "mlp_hidden_dim"),
    "text_encoder": ("num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size"),
}

Path = tuple[Any, ...]


# ------------------------------------------------------------------------------------------------- the mesh


def parse_mesh(text: str) -> dict[str, int]:
    """"data=D,model=M" (either part may be left out: size 1) -> {"data": D, "model": M}."""
    sizes = dict.fromkeys(AXES, 1)
    seen: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value.isdigit():
            raise ValueError(f"mesh {text!r}: {part!r} is not AXIS=SIZE; write e.g. 'data=2,model=4'")
        if name not in AXES:
            raise ValueError(f"mesh {text!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        if name in seen:
            raise ValueError(f"mesh {text!r}: axis {name!r} is given twice")
        if int(value) < 1:
            raise ValueError(f"mesh {text!r}: axis {name!r} has size {value}; sizes are at least 1")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def make_mesh(mesh: str | Mesh | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, model) mesh of `mesh`: None (one device), "data=D,model=M" (the first D*M devices) or a Mesh.

    A Mesh must have exactly the axes `data` and `model`; it is used with automatic (GSPMD) sharding.
    """
    if isinstance(mesh, Mesh):
        if sorted(mesh.axis_names) != sorted(AXES):
            raise ValueError(f"mesh axes {mesh.axis_names} must be exactly {AXES}")
        return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    if mesh is not None and not isinstance(mesh, str):
        raise ValueError(f"mesh must be None, a 'data=D,model=M' string or a jax.sharding.Mesh, got {mesh!r}")
    sizes = parse_mesh(mesh) if mesh else dict.fromkeys(AXES, 1)
    devices = list(jax.devices() if devices is None else devices)
    needed = sizes[DATA] * sizes[MODEL]
    if needed > len(devices):
        raise ValueError(f"mesh {describe_sizes(sizes)} needs {needed} devices; {len(devices)} "
                         f"{devices[0].platform if devices else ''} device(s) are available")
    return jax.make_mesh((sizes[DATA], sizes[MODEL]), AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices[:needed])


def describe_sizes(sizes: Mapping[str, int]) -> str:
    """{"data": 2, "model": 4} -> "data=2,model=4"."""
    return ",".join(f"{axis}={sizes[axis]}" for axis in AXES)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """{"data": D, "model": M}."""
    return {axis: int(mesh.shape[axis]) for axis in AXES}


# --------------------------------------------------------------------------------------------- parameters


def partition_spec(component: str, path: Path) -> P | Gathered:
    """The table's entry for one parameter: the first PARTITION_RULES row matching "component/path"."""
    name = "/".join([component, *map(str, path)])
    return next(spec for regex, spec in _RULES if regex.fullmatch(name))


def placement_spec(component: str, path: Path, shape: Sequence[int], model: int) -> P:
    """How one parameter of `shape` lies on a mesh whose model axis has `model` devices (GATHERED resolved)."""
    spec = partition_spec(component, path)
    if not isinstance(spec, Gathered):
        return spec
    split = next((dim for dim in reversed(range(len(shape))) if shape[dim] % model == 0), None)
    return P() if model == 1 or split is None else P(*[MODEL if dim == split else None for dim in range(split + 1)])


def check_model_axis(component: str, config: Any, mesh: Mesh) -> None:
    """ValueError unless the model axis divides every head count and MLP width the component splits."""
    size = mesh.shape[MODEL]
    bad = [f"{field}={getattr(config, field)}" for field in SPLIT_SIZES.get(component, ())
           if getattr(config, field) % size]
    if bad:
        raise ValueError(f"{component}: {', '.join(bad)} cannot be split over model={size}; choose a model axis "
                         f"that divides {' and '.join(bad)}")


def param_shardings(component: str, expected: Mapping[Path, tuple[tuple[int, ...], Any]],
                    mesh: Mesh) -> dict[Path, NamedSharding]:
    """path -> NamedSharding of every parameter of a component (expected: path -> (shape, dtype))."""
    out = {}
    for path, (shape, _) in expected.items():
        spec = placement_spec(component, path, shape, mesh.shape[MODEL])
        for dim, axis in enumerate(spec):
            if axis is not None and shape[dim] % mesh.shape[axis]:
                raise ValueError(f"{component}: {'.'.join(map(str, path))} has {shape[dim]} along dimension {dim}, "
                                 f"which does not split over {axis}={mesh.shape[axis]}")
        out[path] = NamedSharding(mesh, spec)
    return out


def shard_state(state, component: str, mesh: Mesh):
    """A copy of an nnx state with every variable placed by the table (already placed arrays are not copied)."""
    from flax import nnx

    flat = nnx.to_flat_state(state)
    shapes = {tuple(path): (variable.get_value().shape, variable.get_value().dtype) for path, variable in flat}
    shardings = param_shardings(component, shapes, mesh)
    return nnx.from_flat_state([(path, variable.replace(put(variable.get_value(), shardings[tuple(path)])))
                                for path, variable in flat])


def gathered(state, mesh: Mesh):
    """Inside a traced program: `state` (a GATHERED component's) whole on every device, all-gathered from its shards."""
    whole = replicated(mesh)
    return jax.tree.map(lambda value: jax.lax.with_sharding_constraint(value, whole), state)


# -------------------------------------------------------------------------------------------- activations


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    """Dimension 0 (the batch) split over `data` when it divides the batch; replicated otherwise."""
    return NamedSharding(mesh, P(DATA) if batch % mesh.shape[DATA] == 0 else P())


def replicated(mesh: Mesh) -> NamedSharding:
    """The same whole array on every device of the mesh."""
    return NamedSharding(mesh, P())


def padded_batch(mesh: Mesh, batch: int) -> int:
    """The batch size rounded up to a multiple of the data axis, so that every data shard holds rows."""
    return -(-batch // mesh.shape[DATA]) * mesh.shape[DATA]


def put(value, sharding: jax.sharding.Sharding, cast: Callable[[np.ndarray], np.ndarray] | None = None) -> jax.Array:
    """`value` placed with `sharding`; an array already placed so is returned as it is.

    Host values are sliced on the host and each device receives only its own slice, so a memory-mapped tensor is
    never read whole (with several processes, every process holds the same value and places its own devices'
    slices). `cast` converts each slice (e.g. to the module's dtype). An abstract value (jax.ShapeDtypeStruct, as
    nnx.eval_shape makes) gets the sharding and nothing is allocated: programs can then be lowered without weights.
    """
    if isinstance(value, QuantizedArray):  # an fp8 kernel: its values as the kernel, its scale along the outputs
        return value.place(put, sharding)
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    if isinstance(value, jax.Array):
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            return value
        if sharding.is_fully_addressable or not value.is_fully_addressable:
            return jax.device_put(value, sharding)  # resharded device to device
    # Host values, and process-local arrays bound for a multi-process mesh (every process holds the same value).
    host = value if isinstance(value, np.ndarray) else np.asarray(value)
    convert = cast or np.asarray
    return jax.make_array_from_callback(host.shape, sharding, lambda index: convert(host[index]))


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-process) array as a numpy array on this host."""
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def bytes_per_device(arrays) -> dict[jax.Device, int]:
    """Bytes each device holds of a pytree of arrays (its addressable shards)."""
    total: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(arrays):
        for shard in leaf.addressable_shards:
            total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
    return total
