"""The release gates: every claim a release makes, checked against the files and evidence that
back it, with a status per gate and the evidence it rests on.

Statuses: DISCHARGED (the evidence proves it), PARTIAL (the evidence is incomplete but nothing
contradicts it), FAILED (something contradicts it, or a required artefact is missing). Gates
never raise on a failed check; the scoreboard is the result. Gate by gate: docs/gates.md.

One file per gate category, each with a `<category>_gates(view)` returning that category's gates:
- `train`: TRAIN: completed, val loss decreasing, convergence, memorization, wraps, `[train]`
  thresholds.
- `checkpoint`: CHECKPOINT: valid, tensor count, sha256, parameters, architecture.
- `parity`: PARITY: evidence of this release under this contract, engines, checks, agreement,
  tensors, tokenizer, one line per released GGUF, and the imatrix calibration.
- `card`: CARD: exists, required fields, numbers equal to the evidence, evidence current.
- `release`: RELEASE: license, a GGUF per contract quant type, the HF folder.
- `falsifiers`: FALSIFIERS: the predictions recorded before training.
Beside them:
- `view`: `RunView`, the run folder, contract and checkpoint as the gates read them (loaded
  once), and `Gate`, what each check returns.
- `scoreboard`: `evaluate_gates` / `run_gates` (evidence/gates.json), a recorded scoreboard
  against one evaluated now (`shipkit push`), and the table `shipkit gates` prints.

Where to add a gate: a function returning a `Gate` in its category's file, called from that
file's `<category>_gates`; a threshold it needs goes in the contract, its row in docs/gates.md.
A new category is a new file whose `<category>_gates` joins `GATE_GROUPS` in `scoreboard`.
"""

from shipkit.gates.scoreboard import (
    evaluate_gates,
    recorded_contract,
    render_scoreboard,
    run_gates,
    scoreboard_changes,
)

__all__ = ["evaluate_gates", "recorded_contract", "render_scoreboard", "run_gates", "scoreboard_changes"]
