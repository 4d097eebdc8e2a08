"""Small helpers shared by the notebooks: pick real weights or the demo model, lay images out in a grid, and
describe parameters (shapes, dtypes, counts, bytes) as markdown tables."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)


def weights_on_disk(model_id: str) -> str | None:
    """Local folder of `model_id` (a path, or a hub id already in the Hugging Face cache), else None. No download."""
    import pathlib

    if pathlib.Path(model_id).is_dir():
        return model_id
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: both mean "no weights here"
        return None


def load_pipeline_or_demo(model_id: str, *, use_demo: bool | None = None, dtype: str = "bfloat16"):
    """`KleinPipeline.from_pretrained(model_id)` when its weights are on disk, else the tiny demo model.

    use_demo: True forces the demo model, False forces the real weights (downloading them), None decides by what is
      on disk.
    """
    from klein_jax.demo import build_demo_pipeline
    from klein_jax.pipeline import KleinPipeline

    if use_demo is None:
        local = weights_on_disk(model_id)
        use_demo = local is None
        model_id = local or model_id
    if use_demo:
        log.info("using the tiny random demo model (images are noise); set USE_DEMO_MODEL = False for %s", model_id)
        return build_demo_pipeline()
    return KleinPipeline.from_pretrained(model_id, dtype=dtype)


def image_grid(images: Sequence[Image.Image], cols: int | None = None, *, pad: int = 4) -> Image.Image:
    """Images laid out row-major in a grid of `cols` columns (all in one row by default)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cell_w + (cols - 1) * pad, rows * cell_h + (rows - 1) * pad), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (c * (cell_w + pad), r * (cell_h + pad)))
    return grid


def parameters(module) -> list[tuple[str, tuple[int, ...], str]]:
    """(dotted path, shape, dtype) of every variable of an nnx module, concrete or abstract (nnx.eval_shape)."""
    from klein_jax.loading import expected_params

    return [(".".join(map(str, path)), shape, str(dtype)) for path, (shape, dtype) in expected_params(module).items()]


def count_parameters(module) -> int:
    """Number of values in every variable of an nnx module (BN statistics included)."""
    import math

    return sum(math.prod(shape) for _, shape, _ in parameters(module))


def human_bytes(nbytes: float) -> str:
    """1234567 -> '1.23 MB' (powers of 1000, as the memory table of shared/spec/klein.md)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (display it with IPython.display.Markdown)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
