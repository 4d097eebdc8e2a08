"""`lax.scan` over the transformer blocks against the unrolled loop: compile time and run time (issue #15).

    .venv/bin/python benchmarks/scan_blocks.py [--aspect-ratios square] [--max-references 4] [--repeats 3] [--write]

Compile: the programs `KleinPipeline.compile` builds for klein-serve (text encoder, reference encoders, one generate
program per aspect ratio and reference token bucket, batch 1) plus the stepwise programs of klein-generate
(StepPlan, DecodePlan, NoisePlan at 1024x1024), lowered and compiled for the real klein-4B shapes with abstract
bfloat16 weights (nnx.eval_shape: nothing is allocated), and XLA's size of each optimised program. Run: the medium
float32 config of benchmarks/pipeline_stages.py at 512x512, 4 steps, the fused program and the stepwise path, both
forms from the same random weights (the images are compared). Each form runs in its own child process, so that no
in-process cache is shared.

The scanned form lives here only (see docs/benchmarks.md for why): `ScannedBlocks` holds the blocks of one kind
stacked along a leading axis (stacked once, when the form is built, as a product version would at load) and runs
them with `jax.lax.scan`, merging one block's parameters per iteration. It takes the place of the whole nnx.List of
blocks, so Flux2Transformer's loop runs it as a single "block"; LoRA, KV caches and the sharding table are not
carried over (the plain text-to-image and image-to-image programs are the ones compared).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
FORMS = ("unrolled", "scanned")
# The programs that run the transformer; the others (text encoder, VAE, noise) are the same in both forms, so the
# scanned form does not compile them again and the table counts their unrolled times in both columns.
TRANSFORMER_PLANS = ("GeneratePlan", "StepPlan", "KVCachePlan")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


# --------------------------------------------------------------------------------------------- the scanned form


def _stack(*leaves):
    import jax
    import jax.numpy as jnp

    if isinstance(leaves[0], jax.ShapeDtypeStruct):  # abstract weights stay abstract
        return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return jnp.stack(leaves)


def scanned_blocks(blocks, carried: int):
    """An nnx module running `blocks` (one kind) with lax.scan; `carried`: how many leading arguments a block returns
    updated (2 for double-stream blocks: img, txt; 1 for single-stream ones). The last output (the keys and values)
    comes back stacked."""
    import jax
    from flax import nnx

    class ScannedBlocks(nnx.Module):
        def __init__(self):
            splits = [nnx.split(b) for b in blocks]
            self.stacked = nnx.merge(splits[0][0], jax.tree.map(_stack, *(state for _, state in splits)))

        def __call__(self, *args):
            graphdef, state = nnx.split(self.stacked)
            carry, rest = args[:carried], args[carried:]
            if rest[-1] is not None:
                raise NotImplementedError("cached keys and values are not carried over to the scanned form")

            def body(carry, layer_state):
                *carry, kv = nnx.merge(graphdef, layer_state)(*carry, *rest)
                return tuple(carry), kv

            carry, kv = jax.lax.scan(body, tuple(carry), state)
            return (*carry, kv)

    return ScannedBlocks()


def to_scanned(transformer) -> None:
    """Replaces both block lists of a Flux2Transformer (concrete or abstract) by their scanned form, in place."""
    from flax import nnx

    transformer.transformer_blocks = nnx.List([scanned_blocks(list(transformer.transformer_blocks), 2)])
    transformer.single_transformer_blocks = nnx.List([scanned_blocks(list(transformer.single_transformer_blocks), 1)])


# ------------------------------------------------------------------------------------------------- children


def _pipeline(modules, text_config, **kwargs):
    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.pipeline import KleinPipeline

    return KleinPipeline(*modules, demo_prompt_tokenizer(text_config.vocab_size), is_distilled=True, **kwargs)


def _recording(sampler, kinds: tuple[str, ...] | None) -> list[dict]:
    """Wraps sampler.program so that each compilation is recorded: plan kind, description, wall and CPU seconds
    (the process's CPU time over all threads: less sensitive to a contended machine than the wall time), HLO size.
    Plans of other kinds than `kinds` (None: all) are skipped."""
    records, program = [], sampler.program

    def recorded(plan):
        if kinds is not None and type(plan).__name__ not in kinds:
            return None
        known, before, cpu = len(sampler._programs), sampler.compile_seconds, time.process_time()
        compiled = program(plan)
        if len(sampler._programs) > known:
            records.append({"kind": type(plan).__name__, "plan": plan.describe(sampler.pixels_per_token),
                            "compile_s": sampler.compile_seconds - before, "compile_cpu_s": time.process_time() - cpu,
                            "hlo_chars": len(compiled.as_text() or "")})
        return compiled

    sampler.program = recorded
    return records


def compile_child(form: str, aspect_ratios: list[str], max_references: int) -> dict:
    """Compiles the klein-4B server programs (abstract bfloat16 weights) and the stepwise ones at 1024x1024."""
    from klein_jax.configs import FLUX2_VAE, KLEIN_4B, QWEN3_4B
    from klein_jax.loading import abstract_module
    from klein_jax.sampler import DecodePlan, GeneratePlan, NoisePlan, StepPlan

    modules = [abstract_module(name, config, "bfloat16")
               for name, config in (("transformer", KLEIN_4B), ("vae", FLUX2_VAE), ("text_encoder", QWEN3_4B))]
    if form == "scanned":
        to_scanned(modules[0])
    pipe = _pipeline(modules, QWEN3_4B, dtype="bfloat16", name=f"abstract-4b-{form}")
    records = _recording(pipe.sampler, TRANSFORMER_PLANS if form == "scanned" else None)
    pipe.compile("all" if aspect_ratios == ["all"] else aspect_ratios, max_references=max_references, batch_sizes=(1,))
    plan = GeneratePlan(1, (64, 64), 0, pipe.default_steps, False, external_noise=False)
    for stepwise in (StepPlan(plan), DecodePlan(1, (64, 64)), NoisePlan(1, 64 * 64)):
        pipe.sampler.program(stepwise)
    return {"programs": records}


def run_child(form: str, repeats: int) -> dict:
    """Times the medium float32 config (fused program and stepwise path) and returns its image's checksum input."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pipeline_stages import configs

    from klein_jax.loading import random_module

    setup = configs()["medium"]
    rng = np.random.default_rng(0)
    modules = [random_module(name, config, rng) for name, config in
               (("transformer", setup.transformer), ("vae", setup.vae), ("text_encoder", setup.text_encoder))]
    if form == "scanned":
        to_scanned(modules[0])
    pipe = _pipeline(modules, setup.text_encoder, dtype="float32", name=f"medium-{form}")
    kwargs = dict(width=setup.width, height=setup.height, num_inference_steps=4, seed=0, output_type="np")
    compiled = pipe.sampler.compile_seconds
    image = pipe(PROMPT, **kwargs)
    pipe(PROMPT, **kwargs, on_step=lambda i, n: None)
    compile_s = pipe.sampler.compile_seconds - compiled
    fused, denoise = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe(PROMPT, **kwargs)
        fused.append(1000 * (time.perf_counter() - start))
        pipe(PROMPT, **kwargs, on_step=lambda i, n: None)
        denoise.append(pipe.last_timings["denoise_ms"])
    np.save(os.environ["SCAN_BLOCKS_IMAGE"], image)
    return {"fused_ms": statistics.median(fused), "stepwise_denoise_ms": statistics.median(denoise),
            "compile_s": compile_s, "load_average": os.getloadavg()}


# ---------------------------------------------------------------------------------------------------- parent


def _child(args, role: str, form: str, image_path: pathlib.Path) -> dict:
    command = [sys.executable, __file__, "--child", role, "--form", form, "--repeats", str(args.repeats),
               "--max-references", str(args.max_references), "--aspect-ratios", ",".join(args.aspect_ratios)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", SCAN_BLOCKS_IMAGE=str(image_path))
    print(f"{role} {form} ...", file=sys.stderr, flush=True)
    return reporting.child_json(command, f"{role} {form}", env=env)


def run(args) -> dict:
    import tempfile

    import numpy as np

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv[1:]),
              "host": reporting.host(), "repeats": args.repeats,
              "compile": {}, "run": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = {}
        for form in FORMS:
            load = os.getloadavg()
            report["compile"][form] = {**_child(args, "compile", form, pathlib.Path(tmp) / "unused.npy"),
                                       "load_average": load}
        if args.repeats:
            for form in FORMS:
                images[form] = pathlib.Path(tmp) / f"{form}.npy"
                report["run"][form] = _child(args, "run", form, images[form])
            report["max_abs_diff"] = float(np.max(np.abs(np.load(images["scanned"]) - np.load(images["unrolled"]))))
    return report


def _kinds(programs: list[dict]) -> dict[str, list]:
    """kind -> [count, wall s, CPU s, HLO chars], summed over the kind's programs."""
    out: dict[str, list] = {}
    for p in programs:
        row = out.setdefault(p["kind"], [0, 0.0, 0.0, 0])
        for i, value in enumerate((1, p["compile_s"], p["compile_cpu_s"], p["hlo_chars"])):
            row[i] += value
    return out


def markdown(report: dict) -> str:
    compile_ = report["compile"]
    loads = "; ".join(f"{form} {reporting.format_load(compile_[form]['load_average'])}" for form in FORMS)
    lines = [f"Measured by `benchmarks/scan_blocks.py` ({report['date']}, `{report['command'] or '(defaults)'}`) on "
             f"{report['host']} (shared), load average at the start of each form's "
             f"compile run: {loads}. Compile: klein-4B shapes, abstract bfloat16 weights, batch 1; "
             "\"optimised HLO\" is the compiled program's text size (thousands of characters).", "",
             "| programs | count | compile CPU s unrolled / scanned | ratio | compile wall s unrolled / scanned | "
             "optimised HLO k chars unrolled / scanned |", "|---|---|---|---|---|---|"]
    unrolled, scanned = (_kinds(compile_[form]["programs"]) for form in FORMS)
    for kind, row in unrolled.items():
        scanned.setdefault(kind, row)  # a program without the transformer: the same in both forms
    for kinds in (unrolled, scanned):
        rows = list(kinds.items())
        kinds["transformer programs"] = [sum(r[i] for k, r in rows if k in TRANSFORMER_PLANS) for i in range(4)]
        kinds["all"] = [sum(r[i] for _, r in rows) for i in range(4)]
    for kind, (n, wall_u, cpu_u, hlo_u) in unrolled.items():
        _, wall_s, cpu_s, hlo_s = scanned[kind]
        lines.append(f"| {kind} | {n} | {cpu_u:.1f} / {cpu_s:.1f} | {cpu_u / cpu_s:.2f}x | {wall_u:.1f} / "
                     f"{wall_s:.1f} | {hlo_u // 1000} / {hlo_s // 1000} |")
    if report["run"]:
        run_ = report["run"]
        lines += ["", "Run: the medium float32 config (D=256, 2+4 blocks), 512x512, 4 steps, CPU, median of "
                  f"{report['repeats']} runs after a "
                  f"warm-up; scanned vs unrolled images: max abs diff {report['max_abs_diff']:.1e}.", "",
                  "| form | fused program (ms) | stepwise denoise (ms) | compile (s) | load average |",
                  "|---|---|---|---|---|"]
        for form in FORMS:
            r = run_[form]
            lines.append(f"| {form} | {r['fused_ms']:.0f} | {r['stepwise_denoise_ms']:.0f} | {r['compile_s']:.1f} | "
                         f"{reporting.format_load(r['load_average'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--aspect-ratios", type=lambda text: text.split(","), default=["square"],
                   help="comma-separated API aspect ratios whose programs compile ('all' for all 8)")
    p.add_argument("--max-references", type=int, default=4, help="reference counts compiled (as klein-serve's)")
    p.add_argument("--repeats", type=int, default=3, help="timed medium-config runs per form (0: compile only)")
    p.add_argument("--json", type=pathlib.Path, help="also write the JSON report here")
    p.add_argument("--write", action="store_true", help="replace the 'lax.scan over blocks' table in "
                                                        "docs/benchmarks.md")
    p.add_argument("--child", choices=("compile", "run"), help=argparse.SUPPRESS)
    p.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "compile":
        print(json.dumps(compile_child(args.form, args.aspect_ratios, args.max_references)))
        return 0
    if args.child == "run":
        print(json.dumps(run_child(args.form, args.repeats)))
        return 0
    report = run(args)
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.write:
        reporting.write_section(DOC, "scan-blocks", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
