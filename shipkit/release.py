"""The release folder and its manifest: what goes to which Hub repo, with sizes and sha256.

    RUN_DIR/release/hf/        `shipkit export` output   -> the safetensors repo
    RUN_DIR/release/gguf/      *.gguf files              -> the GGUF repo
    RUN_DIR/release/card/      README.md + loss.png      -> the safetensors repo
                               gguf/README.md            -> the GGUF repo

The manifest records every released file (its repo, path in the repo, size, sha256), each card's
sha256, the checkpoint it came from and the sha256 of the evidence files in
`evidence/release.json`. The card quotes it and `shipkit push` uploads exactly these files,
refusing any whose bytes changed since.
Format: docs/release.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.apr import inspect_apr
from shipkit.errors import InputError
from shipkit.evidence import evidence_path, read_evidence, write_evidence
from shipkit.fsutil import sha256_file

RELEASE_EVIDENCE = "release"
HF_DIR = Path("release/hf")
GGUF_DIR = Path("release/gguf")
CARD_DIR = Path("release/card")
CARD_FILE = "README.md"
LOSS_PLOT = "loss.png"
GGUF_CARD = Path("gguf/README.md")  # under CARD_DIR
DEFAULT_CHECKPOINT = Path("ckpt/best.apr")
EVIDENCE_INPUTS = ("training-summary", "parity")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release: `local` is relative to RUN_DIR."""

    path_in_repo: str
    local: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path_in_repo": self.path_in_repo, "local": self.local, "size": self.size, "sha256": self.sha256}


def default_gguf_repo(repo_id: str) -> str:
    return f"{repo_id}-GGUF"


def build_manifest(
    run_dir: str | Path,
    *,
    repo_id: str,
    gguf_repo_id: str | None = None,
    checkpoint: str | Path = DEFAULT_CHECKPOINT,
) -> dict[str, Any]:
    """The manifest of `release/hf`, `release/gguf` and the loss plot, without the cards' sha256
    (`write_manifest` adds them once the cards are written).

    Raises InputError when `release/hf` is missing or empty, or the checkpoint is not in RUN_DIR.
    """
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    checkpoint_path = run_dir / checkpoint
    if not checkpoint_path.is_file():
        raise InputError(f"{checkpoint_path}: checkpoint not found (the release is built from it)")
    index = inspect_apr(checkpoint_path)
    producer = index.metadata.get("producer", {})
    hf_files = _folder_files(run_dir, HF_DIR, required=True)
    plot = run_dir / CARD_DIR / LOSS_PLOT
    if plot.is_file():
        hf_files.append(_release_file(run_dir, plot, LOSS_PLOT))
    repos = [{"role": "hf", "repo_id": repo_id, "card": (CARD_DIR / CARD_FILE).as_posix(), "files": hf_files}]
    gguf_files = _folder_files(run_dir, GGUF_DIR, required=False, suffix=".gguf")
    if gguf_files:
        gguf_repo_id = gguf_repo_id or default_gguf_repo(repo_id)
        check_repo_id(gguf_repo_id)
        repos.append({"role": "gguf", "repo_id": gguf_repo_id, "card": (CARD_DIR / GGUF_CARD).as_posix(),
                      "files": gguf_files})
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id_of(producer),
        "checkpoint": {"path": Path(checkpoint).as_posix(), "sha256": sha256_file(checkpoint_path),
                       "tensor_count": len(index.tensors)},
        "source": producer.get("source"),
        "evidence": {name: _evidence_sha256(run_dir, name) for name in EVIDENCE_INPUTS},
        "repos": [{**repo, "files": [f.to_dict() for f in repo["files"]]} for repo in repos],
    }


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Record each repo's card sha256 and write `evidence/release.json` (schema-checked)."""
    for repo in manifest["repos"]:
        repo["card_sha256"] = sha256_file(Path(run_dir) / repo["card"])
    return write_evidence(run_dir, RELEASE_EVIDENCE, manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    return read_evidence(run_dir, RELEASE_EVIDENCE)


def manifest_files(manifest: dict[str, Any], role: str) -> list[ReleaseFile]:
    repo = repo_entry(manifest, role)
    if repo is None:
        return []
    return [ReleaseFile(f["path_in_repo"], f["local"], f["size"], f["sha256"]) for f in repo["files"]]


def repo_entry(manifest: dict[str, Any], role: str) -> dict[str, Any] | None:
    return next((repo for repo in manifest["repos"] if repo["role"] == role), None)


def run_id_of(producer: dict[str, Any]) -> str:
    """A trained checkpoint's run id; an imported one is named after its upstream model."""
    if producer.get("run_id"):
        return producer["run_id"]
    source = producer.get("source") or {}
    if source.get("base_model"):
        return f"import:{source['base_model']}"
    raise InputError("checkpoint metadata: producer has neither run_id nor source.base_model")


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise InputError(f"repo id {repo_id!r}: expected ORG/NAME")


def _folder_files(run_dir: Path, folder: Path, *, required: bool, suffix: str | None = None) -> list[ReleaseFile]:
    root = run_dir / folder
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")) if root.is_dir() else []
    if suffix is not None:
        paths = [p for p in paths if p.name.endswith(suffix)]
    if required and not paths:
        raise InputError(f"{root}: no files to release (run `shipkit export CKPT --hf {root}` first)")
    return [_release_file(run_dir, path, path.relative_to(root).as_posix()) for path in paths]


def _release_file(run_dir: Path, path: Path, path_in_repo: str) -> ReleaseFile:
    return ReleaseFile(path_in_repo, path.relative_to(run_dir).as_posix(), path.stat().st_size, sha256_file(path))


def _evidence_sha256(run_dir: Path, name: str) -> str | None:
    path = evidence_path(run_dir, name)
    return sha256_file(path) if path.is_file() else None
