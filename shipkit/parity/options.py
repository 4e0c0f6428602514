"""What a parity run is asked to compare and how: `ParityOptions`, the engine names and the
defaults. It imports nothing heavy, so the CLI can build its options without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shipkit.contract import ENGINES

TORCH, LLAMA_CPP = ENGINES  # the contract's names for the two runtimes
# Val tokens the tokenizer check compares by default: the whole val split of the default ship
# (~272k tokens) and well over 200 documents of a typical code corpus.
DEFAULT_TOKEN_BUDGET = 1 << 20


@dataclass
class ParityOptions:
    """What `shipkit parity` compares and how; defaults are the CLI's. `quant` is the primary
    file (the engine agreement and the tokenizer check read it); `extra_quants` are further
    GGUFs of the same base scored in the same run, sharing its forward (a quant ladder)."""

    base: Path
    quant: Path
    tokens_dir: Path
    n_tokens: int = 65536
    ctx: int = 512
    engines: tuple[str, ...] = (TORCH, LLAMA_CPP)
    device: str = "auto"
    threads: int = 1  # llama.cpp threads spin-wait, so extra threads on busy cores slow it down
    contract: Path | None = None
    run_dir: Path | None = None
    tokenizer_tokens: int = DEFAULT_TOKEN_BUDGET  # val text tokens the tokenizer check compares
    extra_quants: tuple[Path, ...] = ()

    @property
    def quants(self) -> tuple[Path, ...]:
        """Every GGUF scored, the primary first."""
        return (self.quant, *self.extra_quants)
