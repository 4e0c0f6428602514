"""The pipeline of `shipkit ship`: each model's stages in order through the ledger, then its gates
and push, and the summary `OUT/ship-summary.json` (what each stage does: shipkit.ship.stages).

A stage's fingerprint is its settings and the outputs of the stages it reads; the ledger
(shipkit.ship.ledger) skips a stage whose fingerprint is unchanged and whose outputs still hash
the same. Gates and push are not ledger stages: they run every time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.errors import InputError
from shipkit.evidence import (
    DISCHARGED,
    PARITY_EVIDENCE,
    RELEASE_EVIDENCE,
    TRAINING_EVIDENCE,
)
from shipkit.fsutil import sha256_file, write_json
from shipkit.ladder import headline_engine, ladder_rows
from shipkit.ship.config import SUMMARY_FILE, ModelSpec, ShipConfig
from shipkit.ship.ledger import StageLedger, sha256_json
from shipkit.ship.preflight import check_before_stages
from shipkit.ship.stages import ModelStages


@dataclass
class StageResult:
    stage: str
    skipped: bool
    detail: str


@dataclass
class ModelResult:
    name: str
    run_dir: Path
    stages: list[StageResult]
    summary: dict[str, Any]


@dataclass
class ShipReport:
    out: Path
    models: list[ModelResult]


class ModelShipper:
    """Runs one model's stages in order through the ledger."""

    def __init__(self, spec: ModelSpec, config: ShipConfig, ledger: StageLedger,
                 log: Callable[[str], None]) -> None:
        self.spec, self.config, self.ledger, self.log = spec, config, ledger, log
        self.work = ModelStages(spec, config.out)
        self.stages: list[StageResult] = []

    def stage(self, name: str, settings: dict[str, Any], reads: list[str], outputs: list[Path],
              action: Callable[[], str]) -> None:
        key = f"{self.spec.name}/{name}"
        fingerprint = sha256_json({"settings": settings,
                                   "reads": {r: self.ledger.outputs_digest(f"{self.spec.name}/{r}") for r in reads}})
        if self.ledger.is_done(key, fingerprint):
            self.stages.append(StageResult(name, True, "unchanged, skipped"))
            self.log(f"[{self.spec.name}] {name}: unchanged, skipped")
            return
        self.log(f"[{self.spec.name}] {name} …")
        detail = action()
        self.ledger.record(key, fingerprint, outputs)
        self.stages.append(StageResult(name, False, detail))
        self.log(f"[{self.spec.name}] {name}: {detail}")

    def run(self) -> ModelResult:
        spec, work, files = self.spec, self.work, self.work.files
        if spec.source == "import":
            self.stage("import", {"hf_dir": spec.hf_dir, "hf": _folder_digest(Path(spec.hf_dir)),
                                  "base_model": spec.base_model, "license": spec.license, "pre": spec.pre},
                       [], [work.checkpoint.parent, files.tokenizer], work.import_model)
        self.stage("corpus", self._corpus_settings(), [], [work.corpus_dir], work.corpus)
        tokenizer_reads = ["import"] if spec.source == "import" else []
        self.stage("tokens", {"vocab_size": spec.vocab_size, "source": spec.source},
                   ["corpus", *tokenizer_reads], [work.tokens_dir], work.tokens)
        if spec.source == "train":
            self.stage("train", {"preset": spec.preset, "overrides": spec.overrides, "predict": spec.predict,
                                 "device": spec.device}, ["tokens"],
                       [files.ckpt, files.evidence(TRAINING_EVIDENCE)], work.train)
        weights_stage = "train" if spec.source == "train" else "import"
        self.stage("validate", {}, [weights_stage], [work.checkpoint], work.validate)
        self.stage("export", {}, [weights_stage], [files.release_hf], work.export)
        imatrix = spec.imatrix_settings
        if imatrix is not None:
            self.stage("imatrix", {**imatrix.to_dict(), "device": spec.device}, [weights_stage, "tokens"],
                       [work.imatrix_dir], work.imatrix)
        # settings without an imatrix as before it existed, so an older ship's quantize stays done
        self.stage("quantize", {"types": spec.quant_types, **({"imatrix": True} if imatrix else {})},
                   [weights_stage, *(["imatrix"] if imatrix else [])], [files.release_gguf], work.quantize)
        self.stage("parity", {"tokens": spec.parity_tokens, "ctx": spec.parity_ctx,
                              "engines": spec.parity_engines, "contract": _file_digest(spec.contract)},
                   ["quantize", "tokens"], [files.evidence(PARITY_EVIDENCE)], work.parity)
        self.stage("card", {"repo": work.repo(), "gguf_repo": spec.gguf_repo, "license": spec.license,
                            "datasets": spec.datasets,
                            "templates": _folder_digest(Path(spec.card_templates)) if spec.card_templates else None},
                   ["export", "quantize", "parity"],
                   [files.card_dir, files.evidence(RELEASE_EVIDENCE)], work.card)
        gates = self._gates()
        push = self._push()
        return ModelResult(spec.name, work.run_dir, self.stages, self._summary(gates, push))

    def _corpus_settings(self) -> dict[str, Any]:
        spec = self.spec
        sources = [str(Path(s).resolve()) for s in spec.corpus] or ["<stdlib>"]
        return {"sources": sources, "text_column": spec.text_column, "glob": spec.glob,
                "val_fraction": spec.val_fraction}

    def _gates(self) -> dict[str, Any]:
        from shipkit.gates import run_gates

        self.log(f"[{self.spec.name}] gates …")
        scoreboard = run_gates(self.work.run_dir, contract=self.spec.contract)
        self.stages.append(StageResult("gates", False, scoreboard["summary"]))
        self.log(f"[{self.spec.name}] gates: {scoreboard['summary']}")
        return scoreboard

    def _push(self) -> dict[str, Any]:
        from shipkit.push import push_release

        dry_run = not self.config.push
        report = push_release(self.work.run_dir, self.work.repo(),
                              gguf_repo=self.spec.gguf_repo, dry_run=dry_run,
                              allow_failed_gates=self.config.allow_failed_gates)
        if dry_run and report.refusals and not self.config.allow_failed_gates:
            raise report.refusals[0]
        detail = ("dry run: " if dry_run else "") + (
            f"{report.total_files} files planned" if dry_run else f"verified {report.verified_files}/{report.total_files} files")
        self.stages.append(StageResult("push", False, detail))
        self.log(f"[{self.spec.name}] push: {detail}")
        return report.to_dict()

    def _summary(self, gates: dict[str, Any], push: dict[str, Any]) -> dict[str, Any]:
        from shipkit.evidence import read_evidence

        run_dir = self.work.run_dir
        parity = read_evidence(run_dir, PARITY_EVIDENCE)
        training = None
        if self.work.files.evidence(TRAINING_EVIDENCE).is_file():
            training = read_evidence(run_dir, TRAINING_EVIDENCE)["summary"]
        files = [{"repo": repo["repo_id"], "path": f["path_in_repo"], "size": f["size"], "sha256": f["sha256"]}
                 for repo in push["repos"] for f in repo["files"]]
        return {
            "best_val_loss": training["best_val_loss"] if training else None,
            "memorization": training["memorization"]["verdict"] if training else None,
            "parity": {"verdict": parity["verdict"], **_parity_headline(parity), **_parity_ladder(parity)},
            "gates": gates["summary"],
            "gates_verdict": gates["verdict"],
            "gates_open": [{key: gate[key] for key in ("id", "status", "detail")}
                           for gate in gates["gates"] if gate["status"] != DISCHARGED],
            "files": files,
            "push": "dry run" if push["dry_run"] else f"verified {push['verified_files']}/{push['total_files']}",
        }


SUMMARY_METRICS = ("kl_mean", "same_top_pct", "ppl_ratio")


def _parity_headline(parity: dict[str, Any]) -> dict[str, Any]:
    """The headline engine's metrics from evidence/parity.json (torch where it ran)."""
    metrics = parity["engines"][headline_engine(parity["engines"])]["metrics"]
    return {key: metrics.get(key) for key in SUMMARY_METRICS}


def _parity_ladder(parity: dict[str, Any]) -> dict[str, Any]:
    """Of a ladder's parity run, each file's verdict and headline (nothing for one file)."""
    if "files" not in parity:
        return {}
    return {"files": [{"name": row["name"], "verdict": row["verdict"], "bits_per_weight": row["bits_per_weight"],
                       **{key: row[key] for key in SUMMARY_METRICS}}
                      for row in ladder_rows(parity)]}


def _file_digest(path: str | None) -> str | None:
    return sha256_file(path) if path else None


def _folder_digest(folder: Path) -> str:
    if not folder.is_dir():
        raise InputError(f"{folder}: hf_dir not found")
    return sha256_json({str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()})


def ship(config: ShipConfig, *, log: Callable[[str], None] = print) -> ShipReport:
    """Run every model of `config` to its release (or dry run); see shipkit.ship's docstring.

    Raises InputError, before any stage runs, when OUT is a file, a model's input is missing, or
    a model's folder holds a symbolic link leading outside OUT or would swallow one of its inputs."""
    check_before_stages(config)
    config.out.mkdir(parents=True, exist_ok=True)
    ledger = StageLedger(config.out)
    results = [ModelShipper(spec, config, ledger, log).run() for spec in config.models]
    write_json(config.out / SUMMARY_FILE,
               {r.name: {"run_dir": str(r.run_dir), **r.summary} for r in results})
    return ShipReport(config.out, results)

