"""The release folder and its manifest: what goes to which Hub repo, with sizes and sha256.

    RUN_DIR/release/hf/        `shipkit export` output   -> the safetensors repo
    RUN_DIR/release/gguf/      *.gguf files              -> the GGUF repo; imatrix.gguf, if there,
                                                            is the importance matrix they were quantized with
    RUN_DIR/release/card/      README.md + loss.png      -> the safetensors repo
                               gguf/README.md            -> the GGUF repo

The manifest records every released file (its repo, path in the repo, size, sha256), each card's
sha256, the checkpoint it came from, the sha256 of the evidence files and the released importance
matrix's calibration record in `evidence/release.json`. The card quotes it and `shipkit push` uploads exactly these files,
refusing any whose bytes changed since.
Format: docs/release.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.apr import inspect_apr
from shipkit.errors import InputError
from shipkit.evidence import (
    PARITY_EVIDENCE,
    RELEASE_EVIDENCE,
    TRAINING_EVIDENCE,
    evidence_path,
    read_evidence,
    write_evidence,
)
from shipkit.fsutil import sha256_file
from shipkit.ladder import IMATRIX_FILE
from shipkit.layout import RunDir

# A repo holds its card as README.md (what the Hub shows as the model card) at its root, and the
# safetensors repo the loss plot beside it, as in release/card.
CARD_IN_REPO = Path(RunDir.CARD).name
LOSS_PLOT_IN_REPO = Path(RunDir.LOSS_PLOT).name
EVIDENCE_INPUTS = (TRAINING_EVIDENCE, PARITY_EVIDENCE)
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
    checkpoint: str | Path = RunDir.BEST,
) -> dict[str, Any]:
    """The manifest of `release/hf`, `release/gguf` and the loss plot, without the cards' sha256
    (`write_manifest` adds them once the cards are written).

    Raises InputError when `release/hf` is missing or empty, or the checkpoint is not in RUN_DIR.
    """
    run_dir = Path(run_dir)
    files = RunDir(run_dir)
    check_repo_id(repo_id)
    checkpoint_path = run_dir / checkpoint
    if not checkpoint_path.is_file():
        raise InputError(f"{checkpoint_path}: checkpoint not found (the release is built from it)")
    index = inspect_apr(checkpoint_path)
    producer = index.metadata.get("producer", {})
    hf_files = _folder_files(files, files.release_hf, required=True)
    if files.loss_plot.is_file():
        hf_files.append(_release_file(files, files.loss_plot, LOSS_PLOT_IN_REPO))
    repos = [{"role": "hf", "repo_id": repo_id, "card": RunDir.CARD, "files": hf_files}]
    gguf_files = _folder_files(files, files.release_gguf, required=False, suffix=".gguf")
    if gguf_files:
        gguf_repo_id = gguf_repo_id or default_gguf_repo(repo_id)
        check_repo_id(gguf_repo_id)
        repos.append({"role": "gguf", "repo_id": gguf_repo_id, "card": RunDir.GGUF_CARD, "files": gguf_files})
    imatrix = next((f for f in gguf_files if f.path_in_repo == IMATRIX_FILE), None)
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id_of(producer),
        "checkpoint": {"path": Path(checkpoint).as_posix(), "sha256": sha256_file(checkpoint_path),
                       "tensor_count": len(index.tensors)},
        "source": producer.get("source"),
        "evidence": {name: _evidence_sha256(run_dir, name) for name in EVIDENCE_INPUTS},
        "repos": [{**repo, "files": [f.to_dict() for f in repo["files"]]} for repo in repos],
        "imatrix": None if imatrix is None else _imatrix_entry(files, imatrix),
    }


def _imatrix_entry(files: RunDir, released: ReleaseFile) -> dict[str, Any]:
    """The released importance matrix and what it was computed on, read from the file itself
    (`shipkit imatrix` records its calibration there; a foreign file's fields are None)."""
    from shipkit.imatrix import load_imatrix

    matrix = load_imatrix(files.root / released.local)
    return {**released.to_dict(), "entries": len(matrix.importance), "chunks": matrix.chunk_count,
            "datasets": matrix.datasets, "calibration": matrix.calibration}


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


def model_ggufs(manifest: dict[str, Any]) -> list[ReleaseFile]:
    """The GGUF repo's model files: every released .gguf but the importance matrix."""
    return [f for f in manifest_files(manifest, "gguf") if f.path_in_repo != IMATRIX_FILE]


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


def _folder_files(files: RunDir, root: Path, *, required: bool, suffix: str | None = None) -> list[ReleaseFile]:
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")) if root.is_dir() else []
    if suffix is not None:
        paths = [p for p in paths if p.name.endswith(suffix)]
    if required and not paths:
        raise InputError(f"{root}: no files to release (run `shipkit export CKPT --hf {root}` first)")
    return [_release_file(files, path, path.relative_to(root).as_posix()) for path in paths]


def _release_file(files: RunDir, path: Path, path_in_repo: str) -> ReleaseFile:
    return ReleaseFile(path_in_repo, files.relative(path), path.stat().st_size, sha256_file(path))


def _evidence_sha256(run_dir: Path, name: str) -> str | None:
    path = evidence_path(run_dir, name)
    return sha256_file(path) if path.is_file() else None
