"""Meshes (klein_jax/sharding.py): the mesh description, the partitioning table, and generation over 1-8 devices.

Several CPU devices exist only if XLA_FLAGS asks for them before JAX starts, so the generation tests run
tests/sharding_worker.py in subprocesses: one process with 8 devices runs every mesh (RUNS); two processes with 2
devices each run one mesh as a jax.distributed job. The worker's programs are compiled without LLVM's expensive passes
(the same flags for every run, so the comparison is unaffected) to keep the module near a minute on 2 cores.
"""

import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
from flax import nnx
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from klein_jax import sharding
from klein_jax.configs import KLEIN_4B, QWEN3_4B, TINY_TRANSFORMER
from klein_jax.images import numpy_to_pil
from klein_jax.loading import abstract_module, expected_params
from lora_support import kohya_tensors, write_tensors
from sharding_worker import LORA_FILE, SHARDABLE_TRANSFORMER, build_test_model, run_name

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# FORMAT:MESH[:EXTRAS]: every device count 1, 2, 4, 8 with data only, model only and both; both checkpoint formats;
# guidance and a reference (full) and a LoRA adapter (lora) on a mesh of both axes.
LORA_RUN = "klein:data=2,model=2:lora"
RUNS = ("klein::full+lora", "klein:data=2", "klein:model=2", LORA_RUN, "klein:model=4", "klein:data=8",
        "klein:model=8", "klein:data=2,model=4:full", "diffusers:data=4,model=2")
TOLERANCE = 1e-5  # float32, max abs (shared/spec/interfaces.md, "Several devices")


def _env(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def _load(path: pathlib.Path) -> dict:
    with np.load(path) as data:
        out = {k: data[k] for k in data.files}
    out["placement"] = json.loads(str(out["placement"]))
    return out


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("shardable")
    build_test_model(folder)
    write_tensors(folder / LORA_FILE, kohya_tensors(seed=4, config=SHARDABLE_TRANSFORMER))
    return folder


@pytest.fixture(scope="module")
def runs(model_folder, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("runs")
    done = subprocess.run([sys.executable, str(WORKER), str(model_folder), str(out), *RUNS], env=_env(8),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return {run: _load(out / f"{run_name(run)}-p0.npz") for run in RUNS}


# ------------------------------------------------------------------------------------------ the mesh description


@pytest.mark.parametrize("text, sizes", [
    ("data=2,model=4", {"data": 2, "model": 4}),
    ("model=8", {"data": 1, "model": 8}),
    (" data = 4 ", {"data": 4, "model": 1}),
])
def test_parse_mesh(text, sizes):
    assert sharding.parse_mesh(text) == sizes


@pytest.mark.parametrize("text, message", [
    ("data=2,tensor=2", "unknown axis 'tensor'"),
    ("data2", "'data2' is not AXIS=SIZE"),
    ("data=two", "is not AXIS=SIZE"),
    ("data=2,,model=2", "'' is not AXIS=SIZE"),
    ("data=2,data=1", "axis 'data' is given twice"),
    ("model=0", "sizes are at least 1"),
])
def test_bad_mesh_descriptions_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh(text)


def test_make_mesh():
    one = sharding.make_mesh(None)
    assert sharding.mesh_sizes(one) == {"data": 1, "model": 1} and one.devices.size == 1
    with pytest.raises(ValueError, match=r"data=2,model=4 needs 8 devices; 1 cpu device\(s\) are available"):
        sharding.make_mesh("data=2,model=4")
    with pytest.raises(ValueError, match=r"mesh axes \('batch',\) must be exactly \('data', 'model'\)"):
        sharding.make_mesh(jax.make_mesh((1,), ("batch",)))
    with pytest.raises(ValueError, match="must be None, a 'data=D,model=M' string"):
        sharding.make_mesh(8)


# ------------------------------------------------------------------------------------------- the partitioning table


@pytest.mark.parametrize("component, path, spec", [
    # the fused layers' parts as stored: split along the model width D, fused per device at load
    ("transformer", ("transformer_blocks", 3, "attn", "to_q", "kernel"), P("model", None)),
    ("transformer", ("transformer_blocks", 3, "attn", "add_v_proj", "kernel"), P("model", None)),
    ("transformer", ("transformer_blocks", 3, "attn", "to_add_out", "kernel"), P("model", None)),
    ("transformer", ("transformer_blocks", 0, "ff_context", "linear_in", "kernel"), P("model", None)),
    ("transformer", ("transformer_blocks", 0, "ff", "linear_out", "kernel"), P("model", None)),
    ("transformer", ("single_transformer_blocks", 19, "attn", "to_qkv_mlp_proj", "kernel"), P("model", None)),
    ("transformer", ("single_transformer_blocks", 19, "attn", "to_out", "kernel"), P(None, "model")),
    ("transformer", ("single_transformer_blocks", 19, "attn", "to_qkv_mlp_proj", "grouped_kernel"),
     P(None, "model", None)),
    ("transformer", ("single_transformer_blocks", 19, "attn", "to_out", "grouped_kernel"), P("model", None, None)),
    ("transformer", ("transformer_blocks", 3, "attn", "to_qkv", "grouped_kernel"), P(None, "model", None)),
    ("transformer", ("transformer_blocks", 3, "attn", "norm_q", "scale"), P()),
    ("transformer", ("double_stream_modulation_img", "linear", "kernel"), P("model", None)),
    ("transformer", ("context_embedder", "kernel"), P("model", None)),
    ("transformer", ("time_guidance_embed", "timestep_embedder", "linear_2", "kernel"), P("model", None)),
    ("transformer", ("time_guidance_embed", "timestep_embedder", "linear_1", "kernel"), P()),
    ("transformer", ("x_embedder", "kernel"), P()),
    ("text_encoder", ("layers", 26, "self_attn", "k_proj", "kernel"), P(None, "model")),
    ("text_encoder", ("layers", 26, "self_attn", "o_proj", "kernel"), P("model", None)),
    ("text_encoder", ("layers", 0, "mlp", "up_proj", "kernel"), P(None, "model")),
    ("text_encoder", ("layers", 0, "mlp", "down_proj", "kernel"), P("model", None)),
    ("text_encoder", ("embed_tokens", "embedding"), P(None, "model")),  # (vocab, hidden) over hidden
    ("vae", ("decoder", "up_blocks", 0, "resnets", 0, "conv1", "kernel"), sharding.GATHERED),
    ("vae", ("decoder", "conv_norm_out", "scale"), sharding.GATHERED),
])
def test_partition_table(component, path, spec):
    assert sharding.partition_spec(component, path) == spec


def test_klein_4b_splits_every_block_matmul():
    """Column/row pairs: per double block the fused q|k|v of each stream and two fused MLP inputs (column, their group
    axis) and two attention and two MLP outputs (row); per single block one of each; per Qwen3 layer 5 column and 2
    row. Outside the blocks: the three shared modulations, norm_out, context_embedder and the timestep MLP's output
    (row) and the token embedding (its hidden axis). As stored, every part of a fused layer is split (along D)."""
    abstract = abstract_module("transformer", KLEIN_4B, "bfloat16")
    specs = [sharding.partition_spec("transformer", path) for path, _ in nnx.to_flat_state(nnx.state(abstract))]
    assert (specs.count(P(None, "model", None)), specs.count(P("model", None, None))) == (5 * 4 + 20, 20)
    assert specs.count(P("model", None)) == 5 * 4 + 6
    stored = [sharding.partition_spec("transformer", path) for path in expected_params(abstract)]
    assert (stored.count(P(None, "model")), stored.count(P("model", None))) == (20, 5 * 12 + 20 + 6)
    params = expected_params(abstract_module("text_encoder", QWEN3_4B, "bfloat16"))
    specs = [sharding.partition_spec("text_encoder", path) for path in params]
    assert (specs.count(P(None, "model")), specs.count(P("model", None))) == (27 * 5 + 1, 27 * 2)


def test_a_model_axis_that_splits_a_head_is_an_error():
    eight = AbstractMesh((1, 8), ("data", "model"))
    sharding.check_model_axis("transformer", KLEIN_4B, eight)  # 24 heads, MLP 9216
    sharding.check_model_axis("text_encoder", QWEN3_4B, eight)  # 32 heads, 8 kv heads, MLP 9728
    with pytest.raises(ValueError, match=r"transformer: num_attention_heads=2 cannot be split over model=8"):
        sharding.check_model_axis("transformer", TINY_TRANSFORMER, eight)
    with pytest.raises(ValueError, match=r"num_key_value_heads=8 cannot be split over model=16"):
        sharding.check_model_axis("text_encoder", QWEN3_4B, AbstractMesh((1, 16), ("data", "model")))
    shapes = {("layers", 0, "mlp", "up_proj", "kernel"): ((32, 60), np.float32)}
    with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj.kernel has 60 along dimension 1, which does not "
                                         r"split over model=8"):
        sharding.param_shardings("text_encoder", shapes, eight)


# ---------------------------------------------------------------------------------------- entry points, batcher


def test_klein_generate_takes_a_mesh(capsys):
    from klein_jax.cli import main

    assert main(["--demo", "--prompt", "a cat", "--mesh", "data=2", "--compilation-cache", "none"]) == 1
    assert "klein-generate: error: mesh data=2,model=1 needs 2 devices; 1 cpu device(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--prompt", "a cat", "--mesh", "tensor=2"])
    assert exit_info.value.code == 2 and "unknown axis 'tensor'" in capsys.readouterr().err


def test_klein_serve_takes_a_mesh(capsys, monkeypatch):
    from server.__main__ import build_parser

    assert build_parser().parse_args(["--demo", "--mesh", "data=2,model=4"]).mesh == "data=2,model=4"
    monkeypatch.setenv("KLEIN_MESH", "model=2")
    assert build_parser().parse_args(["--demo"]).mesh == "model=2"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--demo", "--mesh", "data=2,data=2"])
    assert exit_info.value.code == 2 and "axis 'data' is given twice" in capsys.readouterr().err


def test_the_batcher_fills_batches_to_a_multiple_of_the_data_axis():
    from server_support import FakePipeline

    from server.metrics import Metrics
    from server.worker import DeviceWorker

    pipe = FakePipeline()
    pipe.batch_multiple = 4  # KleinPipeline.batch_multiple: its mesh's data axis
    worker = DeviceWorker({"m": pipe}, max_queue=16, max_batch=1, batch_wait_s=0.5, metrics=Metrics(),
                          warm_up=lambda: None)
    worker.start()
    assert worker.ready.wait(5)
    reference = PIL.Image.new("RGB", (64, 64))

    async def go():
        texts = [worker.submit("m", pipe.prepare(f"p{i}", width=64, height=32, seed=i)) for i in range(5)]
        edits = [worker.submit("m", pipe.prepare(f"e{i}", [reference], seed=i)) for i in range(2)]
        await asyncio.gather(*(job.future for job in texts + edits))

    asyncio.run(go())
    worker.stop()
    # --max-batch 1, but a batch of 1 would leave 3 of the 4 data shards idle; references batch up to 4 as well
    assert [len(batch) for batch in pipe.batches] == [4, 1, 2]


# -------------------------------------------------------------------------------------- generation on 1-8 devices


def _max_abs(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b).max())


@pytest.mark.parametrize("run", RUNS[1:])
def test_every_mesh_gives_the_one_device_images(runs, run):
    single, result = runs[RUNS[0]], runs[run]
    assert single["images"].std() > 0.1  # real images, not a constant
    assert _max_abs(result["images"], single["images"]) <= TOLERANCE
    if "full_images" in result:  # guidance (text encoder at batch 1) and a reference image
        assert _max_abs(single["full_images"], single["images"]) > 0.05
        assert _max_abs(result["full_images"], single["full_images"]) <= TOLERANCE
    data = sharding.parse_mesh(run.split(":")[1])["data"]
    assert result["batch_size"] == max(2, data)  # two prompts, padded to a multiple of the data axis


def test_a_lora_adapter_on_a_mesh_gives_the_one_device_images(runs):
    single, result = runs[RUNS[0]], runs[LORA_RUN]
    assert _max_abs(single["lora_images"], single["images"]) > 0.05  # the adapter changes the images
    assert _max_abs(result["lora_images"], single["lora_images"]) <= TOLERANCE


def _padded(spec, ndim: int) -> list:
    return [None if axis is None else str(axis) for axis in spec] + [None] * (ndim - len(spec))


@pytest.mark.parametrize("run", RUNS[1:])
def test_each_device_holds_only_its_shard(runs, run):
    sizes = sharding.parse_mesh(run.split(":")[1])
    devices, model = sizes["data"] * sizes["model"], sizes["model"]
    single, placement = runs[RUNS[0]]["placement"], runs[run]["placement"]
    for component, info in placement.items():
        expected_bytes = 0
        for path, spec in info["specs"].items():
            (shape,) = single[component]["shards"][path]  # one device holds the whole array
            key = tuple(int(p) if p.isdigit() else p for p in path.split("."))
            want = sharding.placement_spec(component, key, shape, model)
            assert _padded(spec, len(shape)) == _padded(want, len(shape)), (component, path)
            shard = [n // model if axis == "model" else n for n, axis in zip(shape, _padded(want, len(shape)))]
            assert info["shards"][path] == [shard] * devices, (component, path)
            expected_bytes += 4 * int(np.prod(shard))  # float32
        assert list(info["bytes"].values()) == [expected_bytes] * devices, component
        whole = sum(single[component]["bytes"].values())
        assert expected_bytes < whole if model > 1 else expected_bytes == whole, component
    shards = placement["transformer"]["shards"]
    # q|k|v fused (docs/sharding.md): (64, 8 groups, 3 x 8) split over the groups, whole heads on each device
    assert shards["transformer_blocks.0.attn.to_qkv.grouped_kernel"] == [[64, 8 // model, 24]] * devices
    assert shards["single_transformer_blocks.0.attn.to_out.grouped_kernel"] == [[8 // model, (64 + 192) // 8, 64]] * devices
    assert placement["text_encoder"]["shards"]["layers.0.mlp.down_proj.kernel"] == [[64 // model, 32]] * devices


# ------------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_one_process_images(model_folder, runs, tmp_path):
    """A jax.distributed job of two local processes with 2 CPU devices each, one data=2,model=2 mesh over both."""
    run, port = "klein:data=2,model=2", _free_port()
    processes = [subprocess.Popen([sys.executable, str(WORKER), str(model_folder), str(tmp_path), run,
                                   "--distributed", f"127.0.0.1:{port}", "2", str(index)],
                                  env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for index in range(2)]
    try:
        errors = [process.communicate(timeout=300)[1] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, error in zip(processes, errors):
        assert process.returncode == 0, error[-4000:]
    single = runs[RUNS[0]]
    for index in range(2):
        result = _load(tmp_path / f"{run_name(run)}-p{index}.npz")
        assert int(result["devices"]) == 4  # both processes see the 4 devices of the job
        assert _max_abs(result["images"], single["images"]) <= TOLERANCE
        shards = result["placement"]["transformer"]["shards"]
        assert shards["transformer_blocks.0.attn.to_qkv.grouped_kernel"] == [[64, 4, 24]] * 2  # this process's 2 devices
    served = _load(tmp_path / f"{run_name(run)}-p0.npz")["served_images"]  # Leader.run_batch, process 1 following
    want = np.stack([np.asarray(image) for image in numpy_to_pil(single["images"])])
    assert served.shape == want.shape and np.abs(served.astype(int) - want).max() <= 1  # a rounding step at most


# ------------------------------------------------------------------------------------ the VAE: split at rest

_VAE_CHILD = """
import json, re
import jax, jax.numpy as jnp
from flax import nnx
from klein_jax import sharding
from klein_jax.configs import TINY_VAE
from klein_jax.models.vae import Flux2VAE
from klein_jax.sampler import _Graphs, _decode, _vae
mesh = sharding.make_mesh("model=2")
graph, state = nnx.split(Flux2VAE(TINY_VAE, rngs=nnx.Rngs(0)))
state = sharding.shard_state(state, "vae", mesh)
latents = jax.ShapeDtypeStruct((1, 16, TINY_VAE.packed_channels), jnp.float32, sharding=sharding.replicated(mesh))
graphs = _Graphs(None, graph, None, mesh)
out = {"whole": [list(leaf.shape) for leaf in jax.tree.leaves(state) if leaf.addressable_shards[0].data.shape == leaf.shape],
       "params": sorted({str(list(leaf.shape)) for leaf in jax.tree.leaves(state)})}
for name, merge in (("gathered", lambda s: _vae(graphs, s)), ("merged as stored", lambda s: nnx.merge(graph, s))):
    hlo = jax.jit(lambda s, x: _decode(merge(s), x, (4, 4))).lower(state, latents).compile().as_text()
    out[name] = {op: [str([int(n) for n in dims.split(",") if n]) for dims in re.findall(rf"= f32\\[([\\d,]*)\\]\\S* {op}(?:-start)?\\(", hlo)]
                 for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all")}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def vae_collectives() -> dict:
    done = subprocess.run([sys.executable, "-c", _VAE_CHILD], env=_env(2), capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_vae_is_split_at_rest_and_its_decode_gathers_only_weights(vae_collectives):
    """model=2: every VAE tensor with an even dimension held as halves; the decode all-gathers weights (parameter
    shapes) and moves no activation; merging the stored halves without the gather (a deliberate bug) splits the
    convolutions instead."""
    assert all(n % 2 for shape in vae_collectives["whole"] for n in shape)  # only odd-shaped tensors (3 channels)
    gathered, params = vae_collectives["gathered"], set(vae_collectives["params"])
    assert gathered["all-gather"] and set(gathered["all-gather"]) <= params
    assert gathered["all-reduce"] == gathered["collective-permute"] == gathered["all-to-all"] == []
    stored = vae_collectives["merged as stored"]
    assert stored["all-reduce"] or not set(stored["all-gather"]) <= params
