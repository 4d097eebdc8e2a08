"""klein-generate (klein_jax/cli.py) run in-process on a converted tiny checkpoint."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from klein_jax.cli import main


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The session's converted tiny distilled checkpoint (tests/conftest.py)."""
    return tiny_checkpoint.klein


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_a_png_and_prints_seed_and_stage_times(model, tmp_path, capsys):
    out_file = tmp_path / "images" / "fox.png"
    code, out, err = run(capsys, "--model", model, "--prompt", "a red fox", "--width", 48, "--height", 32,
                         "--seed", 7, "--dtype", "float32", "--out", out_file, "--compilation-cache", "none")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "seed: 7"
    for stage in ("load", "compile", "text encode", "denoise", "decode", "png"):
        assert any(line.startswith(f"{stage}: ") and line.endswith(" s") for line in lines), (stage, out)
    assert lines[-1] == f"wrote {out_file} (48x32, text-to-image, 4 steps)"
    assert "4/4" in err  # the step progress bar
    image = PIL.Image.open(out_file)
    assert image.format == "PNG" and image.size == (48, 32) and image.mode == "RGB"
    assert np.asarray(image).std() > 1


@pytest.mark.parametrize("argv, message", [
    (["--width", "50", "--height", "32"], "width=50 must be a positive multiple of 4"),
    (["--width", "48", "--height", "32", "--steps", "0"], "num_inference_steps=0"),
    (["--width", "48", "--height", "32", "--image", "missing.png"], "cannot read image missing.png"),
    (["--width", "48", "--height", "32", "--seed", "-5"], "seed=-5"),
])
def test_bad_input_exits_1_with_one_line(model, capsys, argv, message):
    code, out, err = run(capsys, "--model", model, "--prompt", "a cat", "--compilation-cache", "none", *argv)
    assert code == 1
    assert err.startswith("klein-generate: error: ") and message in err and "Traceback" not in err
    assert out == ""


def test_missing_model_exits_1(tmp_path, capsys):
    code, _, err = run(capsys, "--model", tmp_path / "nowhere", "--prompt", "a cat", "--compilation-cache", "none")
    assert code == 1 and "klein-generate: error: source not found" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_image_is_refused_before_the_model_loads(tmp_path, capsys):
    code, _, err = run(capsys, "--model", tmp_path / "nowhere", "--prompt", "a cat", "--compilation-cache", "none",
                       "--image", tmp_path / "missing.png")
    assert code == 1 and "cannot read image" in err and "source not found" not in err


@pytest.mark.parametrize("flag, env, want", [
    (["--compilation-cache", "{tmp}/xla"], None, "{tmp}/xla"),
    ([], "{tmp}/from-env", "{tmp}/from-env"),
    (["--compilation-cache", "none"], "{tmp}/from-env", None),
])
def test_the_entry_point_sets_the_compilation_cache(tmp_path, capsys, monkeypatch, flag, env, want):
    import klein_jax.compilation_cache

    enabled = []
    monkeypatch.setattr(klein_jax.compilation_cache, "enable_compilation_cache", enabled.append)
    if env is not None:
        monkeypatch.setenv("KLEIN_COMPILATION_CACHE", env.format(tmp=tmp_path))
    code, _, _ = run(capsys, "--model", tmp_path / "nowhere", "--prompt", "a cat",
                     *[a.format(tmp=tmp_path) for a in flag])
    assert code == 1  # no model there: the cache is set before loading
    assert enabled == ([] if want is None else [want.format(tmp=tmp_path)])


def test_empty_prompt_exits_1(model, capsys):
    code, _, err = run(capsys, "--model", model, "--prompt", " ", "--width", "48", "--height", "32",
                       "--compilation-cache", "none")
    assert code == 1 and "prompt is empty" in err


@pytest.mark.parametrize("argv", [
    ["--model", "m"],  # no --prompt
    ["--prompt", "a cat"],  # neither --model nor --demo
    ["--model", "m", "--demo", "--prompt", "a cat"],
    ["--model", "m", "--prompt", "a cat", "--aspect-ratio", "huge"],
    ["--model", "m", "--prompt", "a cat", "--width", "64"],
    ["--model", "m", "--prompt", "a cat", "--aspect-ratio", "square", "--width", "64"],
    ["--model", "m", "--prompt", "a cat", "--seed", "seven"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: klein-generate" in capsys.readouterr().err


def test_help_and_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "klein_jax", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: klein-generate")
    for flag in ("--model", "--prompt", "--image", "--aspect-ratio", "--width", "--height", "--seed", "--steps",
                 "--out"):
        assert flag in result.stdout
