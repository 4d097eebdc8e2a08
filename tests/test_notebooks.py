"""Every notebook runs top to bottom on the tiny demo model and shows at least one image."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
TOPICS = ("text_to_image", "edit_and_multi_reference", "convert_and_inspect", "http_api", "train_lora")


def test_notebooks_exist():
    assert [p.stem.split("_", 1)[1] for p in NOTEBOOKS] == list(TOPICS), [p.name for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent JAX compilation cache for the kernels of this session (tests/test_readme.py shares it): the
    notebooks use the same demo shapes, so a program compiled by one is loaded by the next."""
    folder = tmp_path_factory.getbasetemp() / "jax-compile-cache"
    folder.mkdir(exist_ok=True)
    previous = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)  # the kernels inherit the environment
    yield folder
    if previous is None:
        del os.environ["JAX_COMPILATION_CACHE_DIR"]
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = previous


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_stripped_with_the_switch_on_top(path):
    book = nbformat.read(path, as_version=4)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "commit notebooks stripped"
    switch = code[0].source
    assert 'MODEL_ID = "black-forest-labs/FLUX.2-klein-4B"' in switch and "USE_DEMO_MODEL = None" in switch, switch
    assert not any(line.lstrip().startswith(("!", "%")) for cell in code for line in cell.source.splitlines())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_an_image(path, tmp_path, compile_cache):
    book = nbformat.read(path, as_version=4)
    # USE_DEMO_MODEL = None: no weights are on a CI machine, so the notebook must pick the demo model by itself.
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} displayed no image"
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors


def test_notebook_utils_values():
    from PIL import Image

    from klein_jax.notebook_utils import human_bytes, image_grid, markdown_table, weights_on_disk

    assert [human_bytes(n) for n in (999, 1000, 7_751_089_152, 168_092_742)] == ["999 B", "1.00 KB", "7.75 GB",
                                                                                  "168.09 MB"]
    assert markdown_table(["a", "b"], [(1, "x")]) == "| a | b |\n|---|---|\n| 1 | x |"
    grid = image_grid([Image.new("RGB", (10, 6), "red"), Image.new("RGB", (4, 8), "blue"),
                       Image.new("RGB", (10, 8), "green")], cols=2, pad=2)
    assert grid.size == (2 * 10 + 2, 2 * 8 + 2)  # cells of the largest width and height
    assert grid.getpixel((0, 0)) == (255, 0, 0) and grid.getpixel((12, 0)) == (0, 0, 255)
    assert grid.getpixel((0, 10)) == (0, 128, 0) and grid.getpixel((21, 17)) == (255, 255, 255)
    assert weights_on_disk("no-such-owner/no-such-model-for-klein-tests") is None
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])
