"""A stand-in for huggingface_hub.snapshot_download, serving a local folder as one hub repository."""

import fnmatch
import pathlib

from klein_jax.loading import hub


def serve_folder_as_hub_repo(remote: pathlib.Path, repo_id: str, cache: pathlib.Path, monkeypatch) -> list[tuple]:
    """Patch the hub download klein_jax.loading.hub calls: `repo_id` is served from `remote` into `cache`, only the
    files matching allow_patterns; any other id fails as the hub's 404 does. Returns the calls as
    (repo_id, revision, allow_patterns) tuples."""
    calls = []

    def snapshot_download(repo, *, revision=None, allow_patterns=None):
        calls.append((repo, revision, list(allow_patterns)))
        if repo != repo_id:
            raise OSError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/{repo}")
        for f in remote.rglob("*"):
            rel = f.relative_to(remote).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (cache / rel).parent.mkdir(parents=True, exist_ok=True)
                (cache / rel).write_bytes(f.read_bytes())
        return str(cache)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    return calls
