"""Small helpers shared by the notebooks: pick real weights or the demo model, and lay images out in a grid."""

from __future__ import annotations

import logging
from collections.abc import Sequence

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

    use_demo: True forces the demo model, False forces the real weights (downloading them), None decides by what is on disk.
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
