"""The layering of docs/architecture.md: klein_jax imports neither convert nor server, and one function fills modules."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every module an `import` or `from ... import` names in a file, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "klein_jax").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_depends_on_neither_converter_nor_server(path):
    outward = {m for m in _imported_modules(path) if m.split(".")[0] in ("convert", "server")}
    assert not outward, f"{path.relative_to(ROOT)} imports {sorted(outward)}"


def test_one_function_fills_module_state():
    """Setting an nnx module's variables happens in klein_jax/loading/modules.py only."""
    fillers = [p.relative_to(ROOT).as_posix() for package in ("klein_jax", "convert", "server")
               for p in (ROOT / package).rglob("*.py") if ".set_value(" in p.read_text(encoding="utf-8")]
    assert fillers == ["klein_jax/loading/modules.py"]


def test_the_detector_sees_a_lazy_import(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from convert.cli import main\n    import server.app\n")
    assert {"convert.cli", "server.app"} <= _imported_modules(module)
