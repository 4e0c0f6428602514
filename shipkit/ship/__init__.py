"""`shipkit ship`: the whole release, one or more models, from one TOML file (or the embedded default).

Per model, under `OUT/<name>/`:

    train path:   corpus → tokens (+ audit) → run (train) → validate → export → [imatrix]
                  → quantize → parity → card → gates → push
    import path:  run/ckpt/best.apr (import) → corpus → tokens (with the model's tokenizer)
                  → validate → export → [imatrix] → quantize → parity → card → gates → push

`quant_types` is the GGUF ladder (shipkit.ladder); with `imatrix` set, the importance matrix is
computed on the train split into `OUT/<name>/imatrix/`, every file is quantized with it, and it
is released as `release/gguf/imatrix.gguf`. One parity run measures every released GGUF.

Every stage that finishes records a fingerprint of what it was asked to do (its settings and
the outputs of the stages it reads) and the sha256 of every file it wrote in
`OUT/ship-state.json`. A re-run skips a stage whose fingerprint is unchanged and whose outputs
still hash the same, so an interrupted ship resumes where it stopped; an interrupted training
run continues from its last epoch.

Nothing is written or deleted outside OUT: model names are plain folder names, every deletion is
checked to lie inside OUT, and a symbolic link under OUT/<name> that leads outside OUT is refused
before any stage runs.

What lives where: `config` (ship.toml → ModelSpec / ShipConfig, every value checked),
`preflight` (the checks before any stage runs; containment in OUT), `ledger`
(`OUT/ship-state.json`: fingerprints and output hashes), `stages` (what each stage does for one
model), `runner` (the stages in order through the ledger, gates, push, the summary; `ship`).
"""

from shipkit.ship.config import (
    DEFAULT_MODEL_NAME,
    DEFAULT_OUT,
    ModelSpec,
    ShipConfig,
    default_config,
    load_ship_config,
)
from shipkit.ship.ledger import StageLedger
from shipkit.ship.runner import ModelResult, ShipReport, StageResult, ship

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_OUT",
    "ModelResult",
    "ModelSpec",
    "ShipConfig",
    "ShipReport",
    "StageLedger",
    "StageResult",
    "default_config",
    "load_ship_config",
    "ship",
]
