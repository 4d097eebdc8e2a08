"""Buffer donation in the sampler's programs: XLA's memory analysis with and without it, and the stepwise run time.

    .venv/bin/python benchmarks/donation.py [--repeats 5] [--write]

klein_jax/sampler.py donates the latents of the step program (StepPlan), the one program whose input matches its
output in shape and dtype. Memory: `compiled.memory_analysis()` (argument, output, temporary and aliased bytes) of
the klein-4B step program at 1024x1024, abstract bfloat16 weights (nothing allocated), batch 1 and 4, with the
sampler's donation and with none; and the decode program with its latents donated too, which XLA cannot use (the
images differ in shape). Run: the medium float32 config of benchmarks/pipeline_stages.py, 512x512, 4 steps, on the
stepwise path (one step program per step), with and without donation, alternated; median of --repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time
import warnings

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@contextlib.contextmanager
def donated(arguments: dict):
    """klein_jax.sampler.DONATED_ARGUMENTS replaced by `arguments` while programs are lowered inside the block."""
    from klein_jax import sampler

    saved = dict(sampler.DONATED_ARGUMENTS)
    sampler.DONATED_ARGUMENTS.clear()
    sampler.DONATED_ARGUMENTS.update(arguments)
    try:
        yield
    finally:
        sampler.DONATED_ARGUMENTS.clear()
        sampler.DONATED_ARGUMENTS.update(saved)


def memory_rows() -> list[dict]:
    """memory_analysis of the klein-4B step and decode programs at 1024x1024, with and without donation."""
    from klein_jax.buckets import ReferenceBuckets
    from klein_jax.configs import FLUX2_VAE, KLEIN_4B, QWEN3_4B
    from klein_jax.loading import abstract_module
    from klein_jax.sampler import DONATED_ARGUMENTS, DecodePlan, GeneratePlan, Sampler, StepPlan

    modules = [abstract_module(name, config, "bfloat16")
               for name, config in (("transformer", KLEIN_4B), ("vae", FLUX2_VAE), ("text_encoder", QWEN3_4B))]
    sampler = Sampler(*modules, dtype="bfloat16", text_length=QWEN3_4B.max_sequence_length,
                      slot_tokens=ReferenceBuckets.default(16).slot_tokens)
    cases = []
    for batch in (1, 4):
        step = StepPlan(GeneratePlan(batch, (64, 64), 0, 4, False, external_noise=False))
        cases += [(step, "none", {}), (step, "sampler's (latents)", dict(DONATED_ARGUMENTS))]
    decode = DecodePlan(1, (64, 64))
    cases += [(decode, "none", {}), (decode, "latents (unusable)", {DecodePlan: (1,)})]
    rows = []
    for plan, label, arguments in cases:
        with donated(arguments), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Some donated buffers were not usable": the decode case shows it
            start = time.perf_counter()
            stats = sampler.lower(plan).compile().memory_analysis()
        rows.append({"plan": plan.describe(16), "donated": label, "compile_s": time.perf_counter() - start,
                     **{k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def run_times(repeats: int) -> dict:
    """Stepwise denoise ms of the medium config with and without donation (the same weights, alternated)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pipeline_stages import configs

    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.loading import random_module
    from klein_jax.pipeline import KleinPipeline
    from klein_jax.sampler import DONATED_ARGUMENTS

    setup = configs()["medium"]
    rng = np.random.default_rng(0)
    modules = [random_module(name, config, rng) for name, config in
               (("transformer", setup.transformer), ("vae", setup.vae), ("text_encoder", setup.text_encoder))]
    kwargs = dict(width=setup.width, height=setup.height, num_inference_steps=4, seed=0, output_type="np",
                  on_step=lambda i, n: None)
    pipes, images = {}, {}
    for label, arguments in (("donated", dict(DONATED_ARGUMENTS)), ("not donated", {})):
        with donated(arguments):
            pipes[label] = KleinPipeline(*modules, demo_prompt_tokenizer(setup.text_encoder.vocab_size),
                                         is_distilled=True, dtype="float32", name=label)
            images[label] = pipes[label](PROMPT, **kwargs)  # compiles
    times = {label: [] for label in pipes}
    for _ in range(repeats):
        for label, pipe in pipes.items():
            pipe(PROMPT, **kwargs)
            times[label].append(pipe.last_timings["denoise_ms"])
    return {"denoise_ms": {label: statistics.median(t) for label, t in times.items()},
            "max_abs_diff": float(np.max(np.abs(images["donated"] - images["not donated"]))),
            "load_average": os.getloadavg()}


def markdown(rows: list[dict], run: dict | None, command: str, load: tuple) -> str:
    lines = [f"Measured by `benchmarks/donation.py` ({time.strftime('%Y-%m-%d %H:%M')}, `{command or '(defaults)'}`), "
             f"on {reporting.host()} (shared), load average {reporting.format_load(load)} at the start. "
             "Memory: XLA's memory_analysis of klein-4B programs at 1024x1024, abstract bfloat16 weights; "
             "\"peak\" is argument + output + temp - alias.", "",
             "| program | donated | argument (GiB) | output (MiB) | temp (GiB) | alias (MiB) | peak (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r["argument"] + r["output"] + r["temp"] - r["alias"]
        lines.append(f"| {r['plan']} | {r['donated']} | {r['argument'] / GIB:.3f} | {r['output'] / 2**20:.2f} | "
                     f"{r['temp'] / GIB:.3f} | {r['alias'] / 2**20:.2f} | {peak / GIB:.3f} |")
    if run:
        ms = run["denoise_ms"]
        lines += ["", f"Run: medium float32 config, 512x512, 4 steps, stepwise path, CPU: denoise "
                      f"{ms['donated']:.0f} ms donated, {ms['not donated']:.0f} ms not (median, alternated; load "
                      f"average {reporting.format_load(run['load_average'])} at the end); images max abs "
                      f"diff {run['max_abs_diff']:.1e}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed stepwise runs per form (0: memory only)")
    p.add_argument("--write", action="store_true", help="replace the 'Buffer donation' table in docs/benchmarks.md")
    args = p.parse_args(argv)
    load = os.getloadavg()
    rows = memory_rows()
    run = run_times(args.repeats) if args.repeats else None
    text = markdown(rows, run, " ".join(sys.argv[1:] if argv is None else argv), load)
    print(text)
    if args.write:
        reporting.write_section(DOC, "donation", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
