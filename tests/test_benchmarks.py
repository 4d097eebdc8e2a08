"""The benchmark scripts run end to end at small sizes (so that they cannot rot) and report what they promise.

Speed is not asserted: the numbers only have to exist, be positive and be consistent with each other.
"""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

from klein_jax.configs import KLEIN_4B, KLEIN_9B, TINY_TRANSFORMER

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.append(str(ROOT / "benchmarks"))  # the scripts import benchmarks/reporting.py, as they do when run

import reporting


def load_script(name: str):
    """A benchmarks/ script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


accelerator = load_script("accelerator")
cold_start = load_script("cold_start")
pipeline_stages = load_script("pipeline_stages")
transformer_forward = load_script("transformer_forward")
image_time = load_script("image_time")


# ------------------------------------------------------------------------------------------- accelerator.py


def test_transformer_flops_are_the_spec_figures():
    """shared/spec/klein.md §7.1: 34.82 / 75.52 TFLOP per forward at 1024x1024, 76.70 with one 1024x1024 reference."""
    flops = accelerator.transformer_flops
    assert flops(KLEIN_4B, batch=1, target_tokens=4096) / 1e12 == pytest.approx(34.82, abs=0.005)
    assert flops(KLEIN_9B, batch=1, target_tokens=4096) / 1e12 == pytest.approx(75.52, abs=0.01)
    assert flops(KLEIN_4B, batch=1, target_tokens=4096, reference_tokens=4096) / 1e12 == pytest.approx(76.70, abs=0.05)
    assert flops(KLEIN_4B, batch=4, target_tokens=4096) == 4 * flops(KLEIN_4B, batch=1, target_tokens=4096)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", None), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v4", None), ("cpu", None),
])
def test_peak_tflops_by_device_name(kind, peak):
    assert accelerator.peak_tflops(kind) == peak


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("accelerator") / "report.json"
    code = accelerator.main(["--small", "--repeats", "1", "--no-doc", "--json", str(path), "--peak-tflops", "0.5"])
    assert code == 0
    return json.loads(path.read_text())


def test_small_run_times_every_case_for_both_pipelines(small_report):
    assert small_report["model_size"] == "small" and small_report["dtype"] == "float32"
    assert (small_report["width"], small_report["height"], small_report["steps"]) == (128, 128, 4)
    cases = [(c["name"], c["batch"], c["references"]) for c in small_report["cases"]]
    assert cases == [("text-to-image", 1, 0), ("image-to-image", 1, 1), ("text-to-image", 4, 0)]
    for case in small_report["cases"]:
        pipelines = [r["pipeline"] for r in case["results"]]
        assert pipelines == ["klein-jax", "diffusers eager", "diffusers torch.compile"], pipelines
        assert case["results"][2]["skipped"] == "torch.compile is run on CUDA only"
        for r in case["results"][:2]:
            assert "skipped" not in r, r
            for key in ("text_encode_ms", "denoise_ms", "decode_ms", "end_to_end_ms", "peak_memory_bytes"):
                assert r[key] > 0, (case["name"], r["pipeline"], key, r[key])
            assert (r["reference_encode_ms"] > 0) == (case["references"] > 0), r
            assert r["memory_kind"] == "host RSS"


def test_small_run_derives_throughput_and_flops(small_report):
    for case in small_report["cases"]:
        target = (128 // 16) ** 2
        flops = accelerator.transformer_flops(TINY_TRANSFORMER, batch=case["batch"], target_tokens=target,
                                              reference_tokens=target * case["references"])
        assert case["transformer_tflop_per_forward"] == pytest.approx(flops / 1e12)
        for r in case["results"][:2]:
            assert r["images_per_s"] == pytest.approx(case["batch"] / (r["end_to_end_ms"] / 1000))
            tflops = 4 * flops / (r["denoise_ms"] / 1000) / 1e12
            assert r["transformer_tflop_per_s"] == pytest.approx(tflops)
            assert r["percent_of_peak"] == pytest.approx(100 * tflops / 0.5)  # --peak-tflops 0.5
        ours = case["results"][0]
        assert ours["compile_s"] > 0 and ours["backend"] == "cpu"
    assert small_report["peak_tflops"] == 0.5


def test_small_run_markdown_has_a_row_per_result(small_report):
    text = accelerator.markdown(small_report)
    rows = [line for line in text.splitlines() if line.startswith("| text-to-image") or
            line.startswith("| image-to-image")]
    assert len(rows) == 9
    assert all(line.count("|") == 14 for line in rows), rows


def test_variants_are_timed_as_their_own_rows(tmp_path):
    path = tmp_path / "report.json"
    code = accelerator.main(["--small", "--repeats", "1", "--no-doc", "--json", str(path), "--skip-diffusers",
                             "--batch-sizes", "1", "--no-reference",
                             "--variants", "default", "attention=chunked+quantization=fp8"])
    assert code == 0
    report = json.loads(path.read_text())
    assert report["variants"] == ["default", "attention=chunked+quantization=fp8"]
    [case] = report["cases"]
    assert [r["pipeline"] for r in case["results"]] == ["klein-jax", "klein-jax (attention=chunked, quantization=fp8)"]
    for r in case["results"]:
        assert "skipped" not in r, r
        assert r["denoise_ms"] > 0 and r["end_to_end_ms"] > 0 and r["compile_s"] > 0
    rows = [line for line in accelerator.markdown(report).splitlines() if line.startswith("| text-to-image")]
    assert [row.split(" | ")[2] for row in rows] == ["klein-jax", "klein-jax (attention=chunked, quantization=fp8)"]


@pytest.mark.parametrize("text, expected", [
    ("default", accelerator.Variant()),
    ("attention=cudnn", accelerator.Variant(attention="cudnn")),
    ("quantization=fp8+attention=pallas", accelerator.Variant(attention="pallas", quantization="fp8")),
])
def test_variant_arguments_round_trip(text, expected):
    variant = accelerator.Variant.from_arg(text)
    assert variant == expected
    assert accelerator.Variant.from_arg(variant.to_arg()) == variant


@pytest.mark.parametrize("text", ["attention=flash", "quantization=int8", "attention=xla+attention=cudnn",
                                  "attention", "", "default+attention=xla"])
def test_bad_variants_are_refused_with_the_choices(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accelerator.build_parser().parse_args(["--variants", text])
    assert exit_info.value.code == 2
    assert "attention=NAME" in capsys.readouterr().err


def test_a_variant_named_twice_is_refused(capsys):
    with pytest.raises(SystemExit):
        accelerator.main(["--small", "--variants", "default", "default", "--no-doc"])
    assert "each variant at most once" in capsys.readouterr().err


def test_write_doc_replaces_only_its_own_section(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n<!-- accelerator-4b:begin -->\nold 4b\n<!-- accelerator-4b:end -->\n\n"
                   "<!-- cold-start:begin -->\nold cold\n<!-- cold-start:end -->\n\noutro\n")
    monkeypatch.setattr(accelerator, "DOC", doc)
    monkeypatch.setattr(cold_start, "DOC", doc)
    accelerator.write_doc("new 4b", "4b")
    accelerator.write_doc("new 9b", "9b")
    cold_start.write_doc("new cold")
    text = doc.read_text()
    assert "old 4b" not in text and "old cold" not in text and "intro" in text and "outro" in text
    assert "<!-- accelerator-4b:begin -->\nnew 4b\n<!-- accelerator-4b:end -->" in text
    assert "<!-- cold-start:begin -->\nnew cold\n<!-- cold-start:end -->" in text
    assert text.rstrip().endswith("<!-- accelerator-9b:begin -->\nnew 9b\n<!-- accelerator-9b:end -->")


def test_write_section_replaces_appends_under_a_heading_or_refuses(tmp_path):
    doc = tmp_path / "lora.md"
    doc.write_text("intro\n<!-- a:start -->\nold\n<!-- a:end -->\noutro  \n")
    reporting.write_section(doc, "a", "new", opening="start")
    assert doc.read_text() == "intro\n<!-- a:start -->\nnew\n<!-- a:end -->\noutro  \n"
    with pytest.raises(SystemExit, match="has no <!-- b:begin --> ... <!-- b:end --> section"):
        reporting.write_section(doc, "b", "text")
    reporting.write_section(doc, "b", "text", heading="## B")
    assert doc.read_text() == ("intro\n<!-- a:start -->\nnew\n<!-- a:end -->\noutro\n\n"
                               "## B\n\n<!-- b:begin -->\ntext\n<!-- b:end -->\n")
    assert reporting.read_section(doc, "b") == "\ntext\n" and reporting.read_section(doc, "c") is None


def test_markdown_table_writes_empty_cells_with_one_space():
    assert reporting.table(("a", "b", "c"), [["1", "", "-"]]) == "| a | b | c |\n|---|---|---|\n| 1 | | - |"


# --------------------------------------------------------------------------------------- pipeline_stages.py


def test_interleaved_rounds_take_turns_and_ratio_each_round():
    """The pipelines run in turn, one image each per round; the speed-up is the median of the rounds' own ratios, so
    a round where the machine slowed down for both does not move it (the ratio of the medians would: 3.6x here)."""
    calls = []

    def runner(name, seconds):
        times = iter(seconds)

        def run():
            calls.append(name)
            t = next(times)
            return {"end_to_end_ms": t, "denoise_ms": t / 2}, name

        return run

    medians, images = pipeline_stages.interleaved(
        {"ours": runner("ours", [1.0, 1.0, 3.0]), "diffusers": runner("diffusers", [1.2, 3.6, 3.6])}, 3)
    assert calls == ["ours", "diffusers"] * 3
    assert images == {"ours": "ours", "diffusers": "diffusers"}
    assert medians["ours"]["end_to_end_ms"] == 1000.0 and medians["diffusers"]["end_to_end_ms"] == 3600.0
    assert medians["diffusers"]["denoise_ms"] == 1800.0
    assert medians["ours"]["ratio_to_first"] == 1.0
    assert math.isclose(medians["diffusers"]["ratio_to_first"], 1.2)


def test_stage_table_names_its_dtype_and_each_dtype_has_its_section():
    stages = {"text_encode_ms": 10.0, "denoise_ms": 400.0, "decode_ms": 300.0, "png_ms": 30.0, "total_ms": 740.0,
              "end_to_end_ms": 700.0}
    row = dict(name="medium", size="512x512", tokens=1024, max_abs=0.03, load_average=(1.0, 1.0, 1.0),
               ours=dict(stages, compile_s=5.0), diffusers=dict(stages, ratio_to_first=0.61))
    text = pipeline_stages.table([row], 3, "bfloat16")
    assert "CPU, bfloat16 (both pipelines)" in text and "| 0.61x |" in text
    assert "float32 (both pipelines)" in pipeline_stages.table([row], 3)
    assert set(pipeline_stages.SECTIONS) == {"float32", "bfloat16"}
    assert len(set(pipeline_stages.SECTIONS.values())) == 2
    doc = (pipeline_stages.DOC).read_text()
    for name in pipeline_stages.SECTIONS.values():
        assert f"<!-- {name}:begin -->" in doc and f"<!-- {name}:end -->" in doc


# ----------------------------------------------------------------------------------- transformer_forward.py


def test_transformer_forward_times_one_compiled_forward(tmp_path):
    """The tiny transformer, random weights filled tensor by tensor (no whole-model init program: the real 4B's
    drew 27.9 GB at once and did not fit 24 GiB), one JSON line with XLA's FLOP count."""
    out = tmp_path / "forward.jsonl"
    argv = ["--config", "tiny", "--width", "64", "--height", "64", "--text-len", "16", "--iters", "1",
            "--dtype", "float32", "--out", str(out)]
    assert transformer_forward.main(argv) == 0
    (line,) = out.read_text().splitlines()
    result = json.loads(line)
    assert result["tokens"] == (64 // 16) ** 2 + 16 and result["dtype"] == "float32"
    assert result["step_ms"] > 0 and result["tflop"] > 0 and result["compile_s"] > 0


# -------------------------------------------------------------------------------------------- image_time.py


def test_image_time_times_a_converted_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "image.json"
    argv = ["--model", str(tiny_checkpoint.klein), "--dtype", "float32", "--width", "64", "--height", "64",
            "--steps", "2", "--json", str(path), "--no-doc"]
    assert image_time.main(argv) == 0
    figures = json.loads(path.read_text())
    assert figures["finite"] and figures["steps"] == 2 and figures["peak_rss_gib"] > 0
    assert 0 < figures["compile_s"] < figures["first_call_s"] and figures["load_s"] > 0
    assert all(figures[name] > 0 for name in image_time.STAGES)
    assert figures["denoise_ms"] / 1000 < figures["second_call_s"]
    table = image_time.markdown(figures)
    assert "in float32, 64x64, 2 steps" in table and "is finite" in table
    assert "<!-- image-time:begin -->" in image_time.DOC.read_text()


# -------------------------------------------------------------------------------------------- cold_start.py


def test_cold_start_times_the_demo_server_empty_and_warm(tmp_path):
    path = tmp_path / "cold.json"
    code = cold_start.main(["--runs", "1", "--no-doc", "--json", str(path), "--", "--aspect-ratios", "square",
                            "--max-batch", "1"])
    assert code == 0
    report = json.loads(path.read_text())
    assert report["server_args"] == ["--demo", "--aspect-ratios", "square", "--max-batch", "1"]
    assert set(report["states"]) == {"empty", "warm"}
    for state in report["states"].values():
        assert len(state["runs"]) == 1
        assert 0 < state["first_answer_s"] <= state["ready_s"]
        assert state["programs"] == 2  # the text encoder and the square generate program, batch 1
        assert state["compile_s"] > 0 and math.isfinite(state["compile_s"])
    assert "| empty |" in cold_start.markdown(report) and "| warm |" in cold_start.markdown(report)
