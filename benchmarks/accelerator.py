"""klein-jax beside diffusers on one accelerator: the real klein shapes with random bfloat16 weights, in one run.

    .venv/bin/python benchmarks/accelerator.py                      # klein-4B, 1024x1024, 4 steps, batch 1 and 4
    .venv/bin/python benchmarks/accelerator.py --model-size 9b      # klein-9B (Qwen3-8B text encoder)
    .venv/bin/python benchmarks/accelerator.py --small              # tiny config, 128x128, on the CPU (CI)

Nothing is downloaded: our modules are built abstractly (klein_jax.loading.abstract_module) and filled with random
values (large tensors drawn on the device); diffusers' reference classes (Flux2Transformer2DModel,
AutoencoderKLFlux2, transformers' Qwen3ForCausalLM with all its layers, as diffusers runs it) are built with random
weights on the CUDA device; both use the demo tokenizer. Cases: text-to-image at each --batch-sizes, and
image-to-image at batch 1 with one reference of the output size (unless --no-reference). klein-jax runs every case
in one child process, then diffusers in another (eager, then with torch.compile of its transformer on CUDA), so the
two frameworks never share a device. Reported per case and pipeline: the stage times (text encode, reference
encode, denoise, decode; ours from the stepwise programs), the end-to-end latency of a call returning a float32
array (ours: the fused program the server runs), images/s, peak device memory (host RSS on a CPU; ours is the
process peak up to that case, cases run smallest first), transformer TFLOP/s (model FLOPs of shared/spec/klein.md
§7.1 over the denoise time) and its share of the device's bfloat16 peak (PEAK_TFLOPS, or --peak-tflops), and the
compile time (ours: the programs of the fused path, as the server compiles them; torch.compile: its first call's
excess over a steady call). Times are medians of --repeats runs after a warm-up. The JSON goes to --json PATH and
stdout; the markdown table replaces the section between this model size's markers in docs/benchmarks.md
(--no-doc: leave it).

Levers (issue #15) in the same run: `--variants default attention=xla quantization=fp8` times klein-jax once per
variant, each in its own child process, as its own rows ("klein-jax (attention=xla)"): an attention backend
(klein_jax/models/attention.py BACKENDS: cuDNN against XLA on a GPU, Pallas against XLA on a TPU) and fp8 weights;
"+" joins several settings in one variant (`attention=cudnn+quantization=fp8`). `default` is what ships.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from klein_jax.buckets import ReferenceBuckets
from klein_jax.configs import (FLUX2_VAE, KLEIN_4B, KLEIN_9B, QWEN3_4B, QWEN3_8B, TINY_TEXT_ENCODER, TINY_TRANSFORMER,
                               TextEncoderConfig, TransformerConfig, VAEConfig)
from klein_jax.demo import DEMO_REFERENCE_BUCKETS, DEMO_VAE

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
# Dense bfloat16 peak TFLOP/s by device name (jax device_kind), first match wins: vendors' data sheets.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H[12]00 NVL", 835.0),
    (r"H200", 989.0),  # SXM
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),  # SXM
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
    (r"TPU v5 ?(lite|e)", 197.0),  # v5e reports "TPU v5 lite"
    (r"TPU v5p?$", 459.0),  # v5p reports "TPU v5"
    (r"TPU v6 ?(lite|e)", 918.0),  # v6e (Trillium) reports "TPU v6 lite"
)
STAGES = ("text_encode_ms", "reference_encode_ms", "denoise_ms", "decode_ms")


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model and output size: our configs, and how diffusers' reference text encoder differs (depth, tie)."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    width: int
    height: int
    reference_text_layers: int  # diffusers runs every layer of the checkpoint's Qwen3 (36), we run the 27 read
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"
    reference_buckets: ReferenceBuckets | None = None  # None: the default buckets

    @property
    def configs(self) -> tuple[TransformerConfig, VAEConfig, TextEncoderConfig]:
        return self.transformer, self.vae, self.text_encoder


SETUPS = {
    "4b": Setup("4b", KLEIN_4B, FLUX2_VAE, QWEN3_4B, 1024, 1024, 36),  # Qwen/Qwen3-4B ties its embeddings
    "9b": Setup("9b", KLEIN_9B, FLUX2_VAE, QWEN3_8B, 1024, 1024, 36, tie_word_embeddings=False),  # Qwen3-8B does not
    # The demo model (16-pixel tokens, small reference buckets) in float32: XLA's CPU bfloat16 matmuls are slow.
    "small": Setup("small", TINY_TRANSFORMER, DEMO_VAE, TINY_TEXT_ENCODER, 128, 128, 4, dtype="float32",
                   reference_buckets=DEMO_REFERENCE_BUCKETS),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """A request shape: batch size and reference count (0: text-to-image, 1: image-to-image)."""

    batch: int
    references: int

    @property
    def name(self) -> str:
        return "image-to-image" if self.references else "text-to-image"

    def to_arg(self) -> str:
        return f"{self.batch}:{self.references}"

    @classmethod
    def from_arg(cls, text: str) -> "Case":
        batch, references = text.split(":")
        return cls(int(batch), int(references))


@dataclasses.dataclass(frozen=True)
class Variant:
    """A klein-jax configuration to time: KleinPipeline's `attention=` and `quantization=` (None: the defaults)."""

    attention: str | None = None
    quantization: str | None = None

    @property
    def label(self) -> str:
        settings = [f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None]
        return "klein-jax" + (f" ({', '.join(settings)})" if settings else "")

    def to_arg(self) -> str:
        return "+".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items() if v is not None) or "default"

    @classmethod
    def from_arg(cls, text: str) -> "Variant":
        """`default`, or settings joined by "+": `attention=NAME` (BACKENDS), `quantization=fp8`."""
        from klein_jax.models.attention import BACKENDS
        from klein_jax.quantization import QUANTIZATIONS

        choices = {"attention": BACKENDS, "quantization": QUANTIZATIONS}
        settings = {}
        for item in ([] if text == "default" else text.split("+")):
            key, _, value = item.partition("=")
            if key not in choices or value not in choices[key] or key in settings:
                raise argparse.ArgumentTypeError(
                    f"variant {text!r}: expected 'default' or settings joined by '+', each attention=NAME "
                    f"({', '.join(BACKENDS)}) or quantization={'|'.join(QUANTIZATIONS)}, each at most once")
            settings[key] = value
        return cls(**settings)


# ----------------------------------------------------------------------------------------- FLOPs and peaks


def transformer_flops(config, *, batch: int, target_tokens: int, reference_tokens: int = 0,
                      text_tokens: int = 512) -> float:
    """Model FLOPs of one transformer forward (shared/spec/klein.md §7.1): per block 2·(4 + 3·mlp_ratio)·D²·L
    (= 26·D²·L) for the linears and 4·L²·D for QKᵀ and AV, plus the input and output projections."""
    D, L = config.inner_dim, text_tokens + target_tokens + reference_tokens
    blocks = config.num_layers + config.num_single_layers
    per_block = 2 * (4 + 3 * config.mlp_ratio) * D * D * L + 4 * L * L * D
    image = target_tokens + reference_tokens
    projections = 2 * D * (config.in_channels * image + config.joint_attention_dim * text_tokens
                           + config.in_channels * image)  # x_embedder, context_embedder, proj_out
    return batch * (blocks * per_block + projections)


def peak_tflops(device_kind: str) -> float | None:
    """The device's dense bfloat16 peak from PEAK_TFLOPS, or None for an unknown device (a CPU)."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_kind):
            return tflops
    return None


# ------------------------------------------------------------------------------------------ child: klein-jax


def _random_module(name: str, config, dtype, seed: int):
    """Our module with random weights in the scheme of klein_jax.loading.modules.random_params (kernels N(0, 1/fan_in),
    embeddings N(0, 1), scales 1, the rest 0). Tensors of up to 1M values are slices of one host block (fast to
    place); larger ones are drawn on the device (one small program per shape: drawing 9B values on the host, or
    compiling one program per tensor, would take minutes)."""
    import jax
    import numpy as np

    from klein_jax.loading import abstract_module, expected_params, fill_module

    block = np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32)
    abstract = abstract_module(name, config, dtype)
    params = {}
    for i, (path, (shape, dt)) in enumerate(expected_params(abstract).items()):
        kind, size = str(path[-1]), math.prod(shape)
        scale = 1 / math.sqrt(math.prod(shape[:-1])) if kind == "kernel" else 1.0
        if kind not in ("kernel", "embedding"):
            params[path] = (np.ones if kind in ("scale", "running_var") else np.zeros)(shape, dt)
        elif size <= block.size:
            params[path] = (np.roll(block, 7919 * i)[:size].reshape(shape) * np.float32(scale)).astype(dt)
        else:
            params[path] = _normal_program()(jax.random.key(1000 * seed + i, impl="rbg"), np.float32(scale),
                                             shape, dt)
    return fill_module(abstract, params)


@functools.cache
def _normal_program():
    """draw(key, scale, shape, dtype): N(0, scale²) values drawn on the device (one program per shape and dtype)."""
    import jax

    return jax.jit(lambda key, scale, shape, dtype: (jax.random.normal(key, shape) * scale).astype(dtype),
                   static_argnums=(2, 3))


def _reference_image(setup: Setup):
    import numpy as np
    import PIL.Image

    pixels = np.random.default_rng(0).integers(0, 256, (setup.height, setup.width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _host_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_memory() -> tuple[int, str]:
    """(bytes, kind): JAX's peak device memory since the process started, or the peak host RSS on a CPU."""
    import jax

    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return (peak, "device") if peak else (_host_rss_bytes(), "host RSS")


def run_ours(setup: Setup, cases: list[Case], steps: int, repeats: int,
             variant: Variant = Variant()) -> dict[str, list[dict]]:
    """Child process: builds our pipeline in `variant`'s configuration, then per case warms up (compiling) and times
    the stepwise and fused paths; returns {case: [result]}."""
    import jax
    import jax.numpy as jnp

    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.pipeline import KleinPipeline

    start = time.perf_counter()
    dtype = jnp.dtype(setup.dtype)
    modules = [_random_module(name, config, dtype, seed=i)
               for i, (name, config) in enumerate(zip(("transformer", "vae", "text_encoder"), setup.configs))]
    pipe = KleinPipeline(*modules, demo_prompt_tokenizer(setup.text_encoder.vocab_size), is_distilled=True,
                         dtype=dtype, name=f"random-{setup.name}", reference_buckets=setup.reference_buckets,
                         attention=variant.attention, quantization=variant.quantization)
    build_s = time.perf_counter() - start
    about = {"pipeline": variant.label, "variant": variant.to_arg(), "build_s": build_s,
             "device_kind": jax.devices()[0].device_kind,
             "backend": jax.default_backend(), "framework": f"jax {jax.__version__}"}
    return {case.to_arg(): [{**about, **_time_ours(pipe, setup, case, steps, repeats)}] for case in cases}


def _time_ours(pipe, setup: Setup, case: Case, steps: int, repeats: int) -> dict:
    """One case: a fused and a stepwise warm-up call (compiling what this case needs), then --repeats of each."""
    kwargs = dict(width=setup.width, height=setup.height, num_inference_steps=steps, seed=0, output_type="np")
    args = ([PROMPT] * case.batch, [_reference_image(setup)] * case.references or None)
    stepwise = dict(kwargs, on_step=lambda i, n: None)
    compiled_s = pipe.sampler.compile_seconds
    pipe(*args, **kwargs)  # compiles the text encoder, (reference encoder,) fused generate program
    compile_s = pipe.sampler.compile_seconds - compiled_s
    pipe(*args, **stepwise)  # and the noise, step and decode programs, for the stage times
    stages: dict[str, list[float]] = {k: [] for k in (*STAGES, "end_to_end_ms")}
    for _ in range(repeats):
        pipe(*args, **stepwise)
        for name in STAGES:
            stages[name].append(pipe.last_timings.get(name, 0.0))
        begin = time.perf_counter()
        pipe(*args, **kwargs)
        stages["end_to_end_ms"].append(1000 * (time.perf_counter() - begin))
    peak, kind = _peak_memory()
    return {**{k: statistics.median(v) for k, v in stages.items()}, "compile_s": compile_s,
            "peak_memory_bytes": peak, "memory_kind": kind}


# ------------------------------------------------------------------------------------------ child: diffusers


def _qwen3_config(config, setup: Setup):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=setup.reference_text_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, max_position_embeddings=40960,
        tie_word_embeddings=setup.tie_word_embeddings)


def build_diffusers(setup: Setup, device: str, folder: pathlib.Path):
    """diffusers' Flux2KleinPipeline of the reference classes with random weights built on `device` in setup.dtype."""
    import inspect

    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from klein_jax.demo_tokenizer import build_demo_tokenizer, save_tokenizer_folder

    transformer, vae, text = setup.configs
    accepted = inspect.signature(AutoencoderKLFlux2.__init__).parameters
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, setup.dtype))  # initialise in it: a float32 copy of 9B would not fit
    try:
        with torch.device(device), torch.no_grad():
            modules = dict(
                transformer=Flux2Transformer2DModel(**transformer.to_dict()).eval(),
                vae=AutoencoderKLFlux2(**{k: v for k, v in vae.to_dict().items() if k in accepted}).eval(),
                text_encoder=Qwen3ForCausalLM(_qwen3_config(text, setup)).eval())
    finally:
        torch.set_default_dtype(default)
    tokenizer = AutoTokenizer.from_pretrained(save_tokenizer_folder(folder, build_demo_tokenizer(text.vocab_size)))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")  # klein.md §5.3
    pipe = Flux2KleinPipeline(scheduler=scheduler, tokenizer=tokenizer, is_distilled=True, **modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StageClock:
    """Wraps the diffusers pipeline's stage methods to record when each starts and ends (device synchronised)."""

    def __init__(self, pipe, sync):
        self.sync, self.spans = sync, {}
        for owner, method, stage in ((pipe, "encode_prompt", "text"), (pipe, "prepare_latents", "latents"),
                                     (pipe, "prepare_image_latents", "reference"), (pipe.vae, "decode", "decode")):
            setattr(owner, method, self._timed(stage, getattr(owner, method)))

    def _timed(self, stage, fn):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.spans[stage] = (start, time.perf_counter())
            return out
        return wrapper

    def stages_ms(self) -> dict[str, float]:
        """Stage times of the last call: the loop runs from the last latent preparation to the decode."""
        ms = {name: 1000 * (end - start) for name, (start, end) in self.spans.items()}
        loop_start = max(self.spans[s][1] for s in ("latents", "reference") if s in self.spans)
        return {"text_encode_ms": ms["text"], "reference_encode_ms": ms.get("reference", 0.0),
                "denoise_ms": 1000 * (self.spans["decode"][0] - loop_start), "decode_ms": ms["decode"]}


def _time_diffusers(clock: StageClock, call, repeats: int) -> dict:
    """Warm-up call (its time is returned as first_call_s), then --repeats timed calls: median stage times."""
    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    stages: dict[str, list[float]] = {k: [] for k in (*STAGES, "end_to_end_ms")}
    for _ in range(repeats):
        clock.spans.clear()
        begin = time.perf_counter()
        call()
        stages["end_to_end_ms"].append(1000 * (time.perf_counter() - begin))
        for name, value in clock.stages_ms().items():
            stages[name].append(value)
    return {**{k: statistics.median(v) for k, v in stages.items()}, "first_call_s": first_s}


def run_diffusers(setup: Setup, cases: list[Case], steps: int, repeats: int,
                  torch_compile: bool) -> dict[str, list[dict]]:
    """Child process: every case with diffusers eager, then with torch.compile of its transformer (on CUDA unless
    disabled; one static-shape graph per case); returns {case: [eager, compiled]}."""
    import diffusers
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and setup.name != "small":
        return {c.to_arg(): [{"pipeline": "diffusers", "skipped": "no CUDA device for torch"}] for c in cases}
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as folder:
        pipe = build_diffusers(setup, device, pathlib.Path(folder))
    clock = StageClock(pipe, sync)
    about = {"device_kind": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
             "framework": f"torch {torch.__version__}, diffusers {diffusers.__version__}"}
    results: dict[str, list[dict]] = {c.to_arg(): [] for c in cases}
    for mode in ("eager", "torch.compile"):
        if mode == "torch.compile":
            if not (cuda and torch_compile):
                reason = "disabled" if cuda else "torch.compile is run on CUDA only"
                for c in cases:
                    results[c.to_arg()].append({"pipeline": "diffusers torch.compile", "skipped": reason})
                break
            pipe.transformer.compile(dynamic=False)
        for case in cases:
            results[case.to_arg()].append({"pipeline": f"diffusers {mode}", **about,
                                           **_time_diffusers_case(pipe, clock, setup, case, steps, repeats, mode)})
    return results


def _time_diffusers_case(pipe, clock: StageClock, setup: Setup, case: Case, steps: int, repeats: int,
                         mode: str) -> dict:
    """One case; torch.compile's compile time is its first call's excess over a steady call. A failure (torch.compile
    "where it works") is reported as skipped."""
    import torch

    cuda = torch.cuda.is_available()
    image = [_reference_image(setup)] * case.references or None

    def call():
        with torch.no_grad():
            pipe(image=image, prompt=[PROMPT] * case.batch, width=setup.width, height=setup.height,
                 num_inference_steps=steps, output_type="np", text_encoder_out_layers=setup.text_encoder.out_layers,
                 generator=torch.Generator(pipe.device).manual_seed(0))
        clock.sync()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        timed = _time_diffusers(clock, call, repeats)
    except Exception as e:
        return {"skipped": f"{type(e).__name__}: {e}"[:300]}
    compile_s = timed["first_call_s"] - timed["end_to_end_ms"] / 1000 if mode == "torch.compile" else None
    peak, kind = (torch.cuda.max_memory_allocated(), "device") if cuda else (_host_rss_bytes(), "host RSS")
    return {**timed, "compile_s": compile_s, "peak_memory_bytes": peak, "memory_kind": kind}


# ------------------------------------------------------------------------------------------------ parent


def _child(args, role: str, variant: Variant = Variant()) -> dict[str, list[dict]]:
    """Runs one child process over every case (ours in `variant`); its last stdout line is the JSON {case:
    [results]}."""
    command = [sys.executable, __file__, "--child", role, "--cases", ",".join(c.to_arg() for c in args.cases),
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--variants", variant.to_arg()]
    command += ["--small"] if args.setup.name == "small" else ["--model-size", args.setup.name]
    command += ["--no-torch-compile"] if args.no_torch_compile else []
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="") if args.setup.name == "small" else None
    print(f"running {variant.label if role == 'ours' else 'diffusers'} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    print(done.stderr[-3000:], file=sys.stderr)
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    name = variant.label if role == "ours" else "diffusers"
    return {c.to_arg(): [{"pipeline": name, "skipped": f"failed (exit {done.returncode}): {last}"}] for c in args.cases}


def _derive(result: dict, case: Case, flops: float, steps: int, peak: float | None) -> dict:
    """Adds images/s, transformer TFLOP/s and % of peak to a timed result."""
    if "skipped" in result:
        return result
    tflops = flops * steps / (result["denoise_ms"] / 1000) / 1e12
    return {**result, "images_per_s": case.batch / (result["end_to_end_ms"] / 1000),
            "transformer_tflop_per_s": tflops, "percent_of_peak": None if peak is None else 100 * tflops / peak}


def run(args) -> dict:
    """Every case in a klein-jax child process per variant, then in a diffusers one; returns the JSON report."""
    setup = args.setup
    pixels_per_token = 2 * setup.vae.spatial_scale
    target = (setup.width // pixels_per_token) * (setup.height // pixels_per_token)
    report = {"schema": 1, "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv[1:]),
              "model_size": setup.name, "dtype": setup.dtype, "width": setup.width, "height": setup.height,
              "steps": args.steps, "repeats": args.repeats, "host": reporting.host(), "cpu_count": os.cpu_count(),
              "variants": [v.to_arg() for v in args.variants], "load_average_start": os.getloadavg()}
    results = {case.to_arg(): [] for case in args.cases}
    for variant in args.variants:
        for key, more in _child(args, "ours", variant).items():
            results[key] += more
    if not args.skip_diffusers:
        for key, more in _child(args, "diffusers").items():
            results[key] += more
    kinds = [r["device_kind"] for rs in results.values() for r in rs if "device_kind" in r]
    report["device_kind"] = kinds[0] if kinds else ""
    report["peak_tflops"] = args.peak_tflops or peak_tflops(report["device_kind"])
    report["cases"] = []
    for case in args.cases:
        flops = transformer_flops(setup.transformer, batch=case.batch, target_tokens=target,
                                  reference_tokens=target * case.references)
        report["cases"].append({
            "name": case.name, "batch": case.batch, "references": case.references,
            "transformer_tflop_per_forward": flops / 1e12,
            "results": [_derive(r, case, flops, args.steps, report["peak_tflops"]) for r in results[case.to_arg()]]})
    report["load_average_end"] = os.getloadavg()
    return report


# ---------------------------------------------------------------------------------------------- markdown


def markdown(report: dict) -> str:
    """The report as a short paragraph and one table."""
    load = reporting.format_load(report["load_average_start"])
    peak = report["peak_tflops"]
    lines = [
        f"Measured by `benchmarks/accelerator.py` ({report['date']}, `{report['command'] or '(defaults)'}`) on "
        f"{report['device_kind'] or 'an unknown device'} "
        f"({'dense bfloat16 peak unknown' if peak is None else f'dense bfloat16 peak {peak:.0f} TFLOP/s'}); host "
        f"{report['host']}, load average {load} at the start. Random {report['dtype']} weights, "
        f"{report['width']}x{report['height']}, {report['steps']} steps, median of {report['repeats']} runs after a "
        "warm-up. Times in ms; klein-jax's memory is its process's peak up to that case (cases run in this order).",
        "",
        "| case | batch | pipeline | text encode | reference encode | denoise | decode | end-to-end | images/s | "
        "transformer TFLOP/s | % of peak | peak memory (GiB) | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        for r in case["results"]:
            head = f"| {case['name']} | {case['batch']} | {r['pipeline']} |"
            if "skipped" in r:
                lines.append(f"{head} {r['skipped']} |" + " |" * 9)
                continue
            memory = f"{r['peak_memory_bytes'] / 2**30:.2f}" + (" (host RSS)" if r["memory_kind"] != "device" else "")
            lines.append(
                f"{head} {r['text_encode_ms']:.1f} | {r['reference_encode_ms']:.1f} | {r['denoise_ms']:.1f} | "
                f"{r['decode_ms']:.1f} | {r['end_to_end_ms']:.1f} | {r['images_per_s']:.2f} | "
                f"{r['transformer_tflop_per_s']:.3g} | {reporting.cell(r['percent_of_peak'], '.1f')} | {memory} | "
                f"{reporting.cell(r['compile_s'], '.1f')} |")
    return "\n".join(lines)


def write_doc(text: str, name: str) -> None:
    """Replaces the section between this model size's markers in docs/benchmarks.md (appends one if missing)."""
    reporting.write_section(DOC, f"accelerator-{name}", text, heading="")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-size", choices=("4b", "9b"), default="4b")
    p.add_argument("--small", action="store_true", help="the tiny test config at 128x128 on the CPU (fast; CI)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="text-to-image batch sizes")
    p.add_argument("--no-reference", action="store_true", help="leave out the image-to-image case (batch 1)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-diffusers", action="store_true", help="time klein-jax only")
    p.add_argument("--no-torch-compile", action="store_true", help="diffusers eager only")
    p.add_argument("--peak-tflops", type=float, help="the device's bfloat16 peak, for a device not in PEAK_TFLOPS")
    p.add_argument("--json", type=pathlib.Path, help="also write the JSON report to this file")
    p.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md as is")
    p.add_argument("--variants", type=Variant.from_arg, nargs="+", default=[Variant()],
                   help="klein-jax configurations, each its own rows: 'default' or settings joined by '+' "
                        "(attention=xla|chunked|fused|cudnn|pallas, quantization=fp8)")
    p.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    p.add_argument("--cases", type=lambda text: [Case.from_arg(c) for c in text.split(",")], help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        p.error("--steps, --repeats and --batch-sizes must be positive")
    setup = SETUPS["small" if args.small else args.model_size]
    if args.child == "ours":
        print(json.dumps(run_ours(setup, args.cases, args.steps, args.repeats, args.variants[0])))
        return 0
    if args.child == "diffusers":
        print(json.dumps(run_diffusers(setup, args.cases, args.steps, args.repeats, not args.no_torch_compile)))
        return 0
    if len(set(args.variants)) != len(args.variants):
        p.error("--variants: each variant at most once")
    args.setup = setup
    cases = [Case(b, 0) for b in set(args.batch_sizes)] + ([] if args.no_reference else [Case(1, 1)])
    args.cases = sorted(cases, key=lambda c: (c.batch, c.references))  # smallest first: JAX's peak is cumulative
    report = run(args)
    text = markdown(report)
    reporting.emit(report, text, args.json)
    if not args.no_doc:
        write_doc(text, setup.name)
        print(f"wrote {DOC}", file=sys.stderr)
    failed = [r for c in report["cases"] for r in c["results"] if str(r.get("skipped", "")).startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
