"""The user documentation agrees with the code: docs/api.md with the OpenAPI document, the README's figures with
their sources, every command line of README.md and docs/ with the commands' parsers, every path with the tree."""

import contextlib
import io
import pathlib
import re
import shlex

import jax.numpy as jnp
import pytest
from flax import nnx

from klein_jax.aspect_ratios import ASPECT_RATIOS
from klein_jax.configs import FLUX2_VAE, KLEIN_4B, KLEIN_9B, QWEN3_4B, QWEN3_8B
from klein_jax.models.text_encoder import Qwen3TextEncoder
from klein_jax.models.transformer import Flux2Transformer
from klein_jax.models.vae import Flux2VAE
from klein_jax.notebook_utils import count_parameters, human_bytes
from server.openapi import build_openapi
from server.settings import DEFAULT_MODEL_ID, Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API_MD = ROOT / "docs" / "api.md"
USER_DOCS = [README, *(ROOT / "docs" / f"{n}.md" for n in ("architecture", "deployment", "api", "troubleshooting"))]
METHODS = ("get", "post", "put", "patch", "delete")


# ------------------------------------------------------------------------------------------- docs/api.md


@pytest.fixture(scope="module")
def openapi():
    return build_openapi([DEFAULT_MODEL_ID], Settings(api_keys=("key",)))


def api_sections() -> dict[tuple[str, str], str]:
    """("POST", "/v1/generate") -> the text of its `## \\`POST /v1/generate\\`` section of docs/api.md."""
    parts = re.split(r"^## `([A-Z]+) (/\S*)`\n", API_MD.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {(method, path): body for method, path, body in zip(parts[1::3], parts[2::3], parts[3::3])}


def subsection(body: str, title: str) -> str:
    match = re.search(rf"^### {title}\n(.*?)(?=^### |\Z)", body, re.DOTALL | re.MULTILINE)
    return match.group(1) if match else ""


def first_cells(text: str) -> list[str]:
    """The first cell of every table row (header and separator rows excluded)."""
    cells = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    return [c for c in cells if c and not set(c) <= set("-") and c not in ("field", "status", "header", "route",
                                                                          "`aspect_ratio`")]


def test_api_md_lists_exactly_the_routes(openapi):
    want = {(m.upper(), path) for path, item in openapi["paths"].items() for m in item if m in METHODS}
    assert set(api_sections()) == want
    overview = API_MD.read_text().split("\n## ")[0]
    assert set(re.findall(r"^\| `([A-Z]+) (/\S*)` \|", overview, re.MULTILINE)) == want


def test_api_md_lists_exactly_the_statuses_of_each_route(openapi):
    for (method, path), body in api_sections().items():
        want = set(openapi["paths"][path][method.lower()]["responses"])
        got = first_cells(subsection(body, "Responses"))
        assert len(got) == len(set(got)), (method, path, got)
        assert set(got) == want, (method, path)


def test_api_md_lists_exactly_the_form_fields(openapi):
    content = openapi["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/x-www-form-urlencoded"}
    assert all(f"`{media_type}`" in API_MD.read_text() for media_type in content)
    fields = {name: schema for c in content.values() for name, schema in c["schema"]["properties"].items()}
    rows = {line.split("|")[1].strip().strip("`"): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in subsection(api_sections()[("POST", "/v1/generate")], "Form fields").splitlines()
            if line.startswith("| `") and line.count("|") == 6}  # the 5-column fields table, not the sizes
    assert set(rows) == set(fields)
    required = set(content["multipart/form-data"]["schema"]["required"])
    for name, (kind, is_required, default, _meaning) in rows.items():
        assert (is_required == "yes") == (name in required), name
        if "default" in fields[name]:
            assert default == f"`{fields[name]['default']}`", name
        if "maxLength" in fields[name]:
            assert f"{fields[name]['minLength']} to {fields[name]['maxLength']} characters" in kind, name
    assert "multipart only" in rows["images"][0]  # the urlencoded body has no files
    assert "images" not in content["application/x-www-form-urlencoded"]["schema"]["properties"]


def test_api_md_lists_exactly_the_response_headers(openapi):
    headers = first_cells(subsection(api_sections()[("POST", "/v1/generate")], "Response headers"))
    assert {h.strip("`") for h in headers} == set(openapi["components"]["headers"])
    ok = openapi["paths"]["/v1/generate"]["post"]["responses"]["200"]["headers"]
    assert set(ok) <= {h.strip("`") for h in headers}
    assert "`text-to-image`, `image-to-image` or `multi-reference`" in API_MD.read_text()
    assert openapi["components"]["headers"]["X-Klein-Workflow"]["enum"] == [
        "text-to-image", "image-to-image", "multi-reference"]


def test_api_md_aspect_ratios():
    rows = re.findall(r"^\| `(\w+)` \| (\d+) x (\d+) \|$", API_MD.read_text(), re.MULTILINE)
    assert {name: (int(w), int(h)) for name, w, h in rows} == ASPECT_RATIOS


# --------------------------------------------------------------------------------------------- README figures


@pytest.fixture(scope="module")
def model_sizes():
    """Parameter counts of the real configs, from abstract modules (nothing allocated)."""
    def count(cls, config):
        return count_parameters(nnx.eval_shape(
            lambda: cls(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))

    sizes = {
        "klein-4B transformer": count(Flux2Transformer, KLEIN_4B),
        "klein-9B transformer": count(Flux2Transformer, KLEIN_9B),
        "Qwen3-4B text encoder (27 layers)": count(Qwen3TextEncoder, QWEN3_4B),
        "Qwen3-8B text encoder (27 layers)": count(Qwen3TextEncoder, QWEN3_8B),
        "FLUX.2 VAE": count(Flux2VAE, FLUX2_VAE),
    }
    sizes["klein-4B pipeline"] = sum(sizes[k] for k in ("klein-4B transformer", "Qwen3-4B text encoder (27 layers)",
                                                        "FLUX.2 VAE"))
    sizes["klein-9B pipeline"] = sum(sizes[k] for k in ("klein-9B transformer", "Qwen3-8B text encoder (27 layers)",
                                                        "FLUX.2 VAE"))
    return sizes


def between(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker}:begin -->\n(.*?)<!-- {marker}:end -->", text, re.DOTALL)
    assert match, f"README.md has no {marker} markers"
    return match.group(1)


def test_readme_model_sizes_are_computed(model_sizes):
    assert model_sizes["klein-4B transformer"] == 3_875_544_576  # shared/spec/klein.md §1.2
    assert model_sizes["klein-9B transformer"] == 9_078_581_248
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in between(README.read_text(), "sizes").splitlines()
            if line.startswith("| ") and not line.startswith("| module")]
    want = {name: [f"{n / 1e9:.3f} B", human_bytes(2 * n), human_bytes(4 * n)] for name, n in model_sizes.items()}
    assert {row[0]: row[1:] for row in rows} == want


def test_readme_flops_follow_the_formula():
    """26·D²·L + 4·L²·D per block, L = 4096 + 512, plus ~0.03 TFLOP of embeddings (shared/spec/klein.md §7.1)."""
    text = README.read_text()
    L = 4096 + 512
    for config, quoted in ((KLEIN_4B, 34.82), (KLEIN_9B, 75.52)):
        D, blocks = config.inner_dim, config.num_layers + config.num_single_layers
        analytic = (26 * D * D * L + 4 * L * L * D) * blocks / 1e12
        assert f"{quoted} TFLOP" in text or f"{quoted}\nTFLOP" in text, quoted
        assert abs(analytic - quoted) < 0.1, (analytic, quoted)


def test_readme_benchmark_figures_are_in_their_sources():
    """Every number of the measured-figures table appears in the doc its row links to (no invented numbers)."""
    rows = [line for line in between(README.read_text(), "figures").splitlines()
            if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) >= 4
    for row in rows:
        what, measured, command, details = (c.strip() for c in row.split("|")[1:-1])
        source = ROOT / re.fullmatch(r"\[.*\]\((.*)\)", details).group(1)
        text = source.read_text(encoding="utf-8")
        script = re.fullmatch(r"`\.venv/bin/python (benchmarks/\S+\.py)`", command).group(1)
        assert (ROOT / script).is_file() and script in text, (script, source)
        for number in re.findall(r"\d[\d,.]*\d|\d", measured):
            assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text), f"{number} ({what}) not in {source}"


# ------------------------------------------------------------------------------------ commands and paths


def command_lines(path: pathlib.Path) -> list[str]:
    """Shell-like lines of the fenced blocks of a markdown file, backslash continuations joined."""
    lines = []
    for block in re.findall(r"^```(?:bash|ini|dockerfile)?\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def parsers():
    from convert.cli import build_parser as convert_parser
    from klein_jax.cli import build_parser as generate_parser
    from server.__main__ import build_parser as serve_parser

    return {"klein-convert": convert_parser(), "klein-generate": generate_parser(), "klein-serve": serve_parser()}


_NOT_A_COMMAND_AFTER = {"-u", "-t", "--name", "--now", "enable", "restart", "start", "stop", "status"}  # unit/image


def invocations(line: str, names) -> list[tuple[str, list[str]]]:
    """(command name, its arguments) for every klein-* command in a shell line."""
    try:
        tokens = shlex.split(line.removeprefix("ExecStart="), comments=True)
    except ValueError:  # not shell (e.g. a JSON array in a container file)
        return []
    found = []
    for i, token in enumerate(tokens):
        name = token.rsplit("/", 1)[-1]
        if name in names and not (i and tokens[i - 1] in _NOT_A_COMMAND_AFTER):
            args = []
            for arg in tokens[i + 1:]:
                if arg in ("&&", "||", "|", ";", "&"):
                    break
                args.append(arg)
            found.append((name, args))
    return found


def test_documented_command_lines_parse():
    """Every klein-* command line in the fenced blocks of README.md and docs/{architecture,deployment,api,
    troubleshooting}.md parses with the command's own parser; every flag in their inline code exists."""
    by_name, parsed = parsers(), 0
    for path in USER_DOCS:
        for line in command_lines(path):
            for name, args in invocations(line, by_name):
                if not args or "--help" in args:
                    continue
                error = io.StringIO()
                try:
                    with contextlib.redirect_stderr(error):
                        by_name[name].parse_args(args)
                except SystemExit as e:
                    pytest.fail(f"{path.name}: {line!r}: {error.getvalue().strip().splitlines()[-1]} (exit {e.code})")
                parsed += 1
        for fragment in re.findall(r"`((?:\S*/)?klein-(?:serve|convert|generate) [^`]*)`", path.read_text()):
            for name, args in invocations(fragment, by_name):
                flags = {a.split("=")[0] for a in args if a.startswith("--")}
                unknown = flags - set(by_name[name]._option_string_actions)
                assert not unknown, f"{path.name}: {fragment!r}: {name} has no {sorted(unknown)}"
    assert parsed >= 10, parsed


def test_paths_in_the_docs_exist():
    pattern = re.compile(r"(?<![\w/.-])((?:docs|notebooks|benchmarks|tests|convert|klein_jax|server)/[\w./-]*\w)")
    for path in USER_DOCS:
        text = path.read_text()
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            if not link.startswith("http"):
                assert (path.parent / link).exists(), f"{path.name}: broken link {link}"
        for mentioned in pattern.findall(text):
            assert (ROOT / mentioned).exists(), f"{path.name} mentions {mentioned}, which does not exist"
