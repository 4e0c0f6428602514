"""The run folder: every file a stage reads from or writes to RUN_DIR, named in one place.

    RUN_DIR/
      .train.lock                      the writer's lock (flock), holding its pid
      tokenizer.json                   the tokenizer the run was trained on (copied from TOKENS_DIR)
      ckpt/epoch-NNN.apr               train: weights after epoch NNN
      ckpt/epoch-NNN.metadata.json     train: that epoch's record, tensor count and sha256
      ckpt/epoch-NNN.resume.apr        train: resume state of the newest epoch only
      ckpt/best.apr                    the released checkpoint: train's lowest val loss, or `import`
      ckpt/tokenizer.json              import: the upstream tokenizer files, beside its checkpoint
      evidence/training-summary.json   train
      evidence/parity.json             parity
      evidence/release.json            card (the release manifest)
      evidence/gates.json              gates
      release/hf/                      export: the safetensors repo's files
      release/gguf/*.gguf              quantize: the GGUF repo's files
      release/card/README.md           card: the safetensors repo's card
      release/card/loss.png            card: its loss plot
      release/card/gguf/README.md      card: the GGUF repo's card

`RunDir(root)` gives each as a Path; its upper-case class attributes are the same names relative
to RUN_DIR, as POSIX text: what evidence records and gate messages print, whatever the OS.
A checkpoint's tokenizer is looked up beside it, then one folder up (`find_tokenizer`), so a
checkpoint under RUN_DIR/ckpt finds an import's tokenizer first and a trained run's second.
Format of each file: docs/pipeline.md; evidence: docs/evidence.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import sha256_file

# The tokenizers library's file name, which HF folders, token folders and run folders share.
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_SUFFIX = ".apr"
RESUME_SUFFIX = ".resume.apr"
EPOCH_METADATA_SUFFIX = ".metadata.json"
_RESUME_NAME = re.compile(rf"epoch-(\d+){re.escape(RESUME_SUFFIX)}")


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder (see the module docstring)."""

    root: Path

    CKPT: ClassVar[str] = "ckpt"
    BEST: ClassVar[str] = f"{CKPT}/best.apr"
    TOKENIZER: ClassVar[str] = TOKENIZER_FILE
    # A dotfile, so ship's output digests skip it.
    LOCK: ClassVar[str] = ".train.lock"
    EVIDENCE: ClassVar[str] = "evidence"
    RELEASE_HF: ClassVar[str] = "release/hf"
    RELEASE_GGUF: ClassVar[str] = "release/gguf"
    CARD_DIR: ClassVar[str] = "release/card"
    CARD: ClassVar[str] = f"{CARD_DIR}/README.md"
    LOSS_PLOT: ClassVar[str] = f"{CARD_DIR}/loss.png"
    GGUF_CARD: ClassVar[str] = f"{CARD_DIR}/gguf/README.md"

    # -- names relative to RUN_DIR --------------------------------------------------------------

    @classmethod
    def epoch_file(cls, epoch: int, suffix: str = WEIGHTS_SUFFIX) -> str:
        """`ckpt/epoch-NNN<suffix>`: epoch `epoch`'s weights (or, by suffix, its record or resume state)."""
        return f"{cls.CKPT}/epoch-{epoch:03d}{suffix}"

    @classmethod
    def evidence_file(cls, name: str) -> str:
        """`evidence/<name>.json`, the evidence file of schema `name`."""
        return f"{cls.EVIDENCE}/{name}.json"

    def relative(self, path: Path) -> str:
        """`path` (inside RUN_DIR) relative to it, as POSIX text."""
        return path.relative_to(self.root).as_posix()

    # -- paths ----------------------------------------------------------------------------------

    @property
    def ckpt(self) -> Path:
        return self.root / self.CKPT

    @property
    def best(self) -> Path:
        return self.root / self.BEST

    def epoch(self, epoch: int) -> Path:
        return self.root / self.epoch_file(epoch)

    def epoch_metadata(self, epoch: int) -> Path:
        return self.root / self.epoch_file(epoch, EPOCH_METADATA_SUFFIX)

    def resume(self, epoch: int) -> Path:
        return self.root / self.epoch_file(epoch, RESUME_SUFFIX)

    def resume_epochs(self) -> list[int]:
        """The epochs that have a resume file, in ascending order."""
        names = (path.name for path in self.ckpt.glob(f"epoch-*{RESUME_SUFFIX}"))
        return sorted(int(match.group(1)) for name in names if (match := _RESUME_NAME.fullmatch(name)))

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    def evidence(self, name: str) -> Path:
        return self.root / self.evidence_file(name)

    @property
    def release_hf(self) -> Path:
        return self.root / self.RELEASE_HF

    @property
    def release_gguf(self) -> Path:
        return self.root / self.RELEASE_GGUF

    @property
    def card_dir(self) -> Path:
        return self.root / self.CARD_DIR

    @property
    def card(self) -> Path:
        return self.root / self.CARD

    @property
    def loss_plot(self) -> Path:
        return self.root / self.LOSS_PLOT

    @property
    def gguf_card(self) -> Path:
        return self.root / self.GGUF_CARD


def find_tokenizer(checkpoint: Path, metadata: dict[str, Any], given: str | Path | None = None) -> Path:
    """The tokenizer of the APR checkpoint `checkpoint` (whose metadata is `metadata`): `given`
    if not None, else the file the metadata names (`tokenizer.json` by default) beside the
    checkpoint, then one folder up (RUN_DIR/ckpt/x.apr -> RUN_DIR). Its sha256 must equal the one
    the metadata records, when it records one. Every stage that needs a checkpoint's tokenizer
    asks this, so they all read the same file.
    Raises InputError when no candidate exists, IntegrityError for a malformed metadata entry or
    a tokenizer other than the recorded one."""
    # Imported here: the APR package imports torch, and the CLI reads this module's names at start-up.
    from shipkit.apr import checked_tokenizer_name

    name = checked_tokenizer_name(metadata)
    candidates = [Path(given)] if given is not None else [checkpoint.parent / name, checkpoint.parent.parent / name]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise InputError(f"no tokenizer found at {' or '.join(map(str, candidates))} (pass tokenizer_path)")
    expected = (metadata.get("tokenizer") or {}).get("sha256")
    if expected and sha256_file(found) != expected:  # empty or absent: not recorded
        raise IntegrityError(f"{found}: sha256 differs from the tokenizer recorded in {checkpoint.name}")
    return found
