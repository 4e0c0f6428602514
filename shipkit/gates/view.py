"""What every gate reads and returns: the run folder loaded once (`RunView`: the contract, the
checkpoint's metadata and tensor shapes, each evidence file, whether usable or not), the card
front matter and released GGUFs several categories read, and the `Gate` a check produces with
its evidence as `ref`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipkit.apr import inspect_apr
from shipkit.config import ModelConfig
from shipkit.contract import Contract
from shipkit.errors import ShipkitError
from shipkit.evidence import (
    PARITY_EVIDENCE,
    RELEASE_EVIDENCE,
    TRAINING_EVIDENCE,
    evidence_path,
    read_evidence,
)
from shipkit.layout import RunDir

# The evidence files the gates quote, relative to RUN_DIR.
TRAINING = RunDir.evidence_file(TRAINING_EVIDENCE)
PARITY = RunDir.evidence_file(PARITY_EVIDENCE)
RELEASE = RunDir.evidence_file(RELEASE_EVIDENCE)
IMPORTED = "imported model: not trained here"


@dataclass
class Gate:
    id: str
    category: str
    status: str
    detail: str
    evidence: list[dict[str, Any]] = field(default_factory=list)  # {file, field, value}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "category": self.category, "status": self.status, "detail": self.detail,
                "evidence": self.evidence}


def ref(file: str, field_name: str, value: Any) -> dict[str, Any]:
    """One piece of evidence: `file` (relative to RUN_DIR), the field read, the value found."""
    return {"file": file, "field": field_name, "value": value}


@dataclass
class Loaded:
    """A JSON file that may be absent (`data` None, `problem` None) or unusable (`problem`)."""

    data: dict[str, Any] | None
    problem: str | None = None


@dataclass
class RunView:
    run_dir: Path
    files: RunDir
    contract: Contract
    checkpoint: str  # relative to run_dir
    training: Loaded
    parity: Loaded
    release: Loaded
    metadata: dict[str, Any] | None  # the checkpoint's APR metadata, None when unreadable
    checkpoint_problem: str | None
    tensor_shapes: list[tuple[int, ...]]

    @property
    def source(self) -> dict[str, Any] | None:
        """`producer.source` of an imported checkpoint, else None."""
        source = ((self.metadata or {}).get("producer") or {}).get("source")
        return {"file": source} if isinstance(source, str) else source  # convert records a file name

    @property
    def config(self) -> ModelConfig | None:
        try:
            return ModelConfig.from_dict(self.metadata["config"]) if self.metadata else None
        except (KeyError, TypeError, ShipkitError):
            return None


def _load_evidence(run_dir: Path, name: str) -> Loaded:
    if not evidence_path(run_dir, name).is_file():
        return Loaded(None)
    try:
        return Loaded(read_evidence(run_dir, name))
    except ShipkitError as error:
        return Loaded(None, str(error))


def load_run(run_dir: Path, contract: Contract, checkpoint: str) -> RunView:
    metadata, problem, shapes = None, None, []
    path = run_dir / checkpoint
    if not path.is_file():
        problem = f"{checkpoint} not found (train into RUN_DIR, or `shipkit import` to RUN_DIR/{RunDir.BEST})"
    else:
        try:
            index = inspect_apr(path)
            metadata, shapes = index.metadata, [info.shape for info in index.tensors]
        except ShipkitError as error:
            problem = str(error)
    return RunView(run_dir, RunDir(run_dir), contract, checkpoint, _load_evidence(run_dir, TRAINING_EVIDENCE),
                   _load_evidence(run_dir, PARITY_EVIDENCE), _load_evidence(run_dir, RELEASE_EVIDENCE), metadata,
                   problem, shapes)


def card_front_matter(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The card's front matter as a dict (parsed with huggingface_hub), or the reason it is not."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return None, "not found: run `shipkit card RUN_DIR`"
    try:
        return ModelCard.load(path).data.to_dict(), None
    except (ValueError, OSError) as error:
        return None, f"does not parse as a model card ({error})"


def released_ggufs(files: RunDir) -> list[Path]:
    """The .gguf files in release/gguf, sorted: what the parity and release gates check."""
    folder = files.release_gguf
    return sorted(folder.glob("*.gguf")) if folder.is_dir() else []
