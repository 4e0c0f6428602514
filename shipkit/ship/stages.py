"""The work of each ledger stage for one model, on its folders under `OUT/<name>/`:

    corpus/    the corpus (train and val splits)
    tokens/    the token shards (+ the tokenizer, trained or the imported model's)
    imatrix/   the importance matrix, when ship.toml asks for one (the release gets a copy)
    run/       the run folder (shipkit.layout.RunDir): checkpoint, evidence, release

Each stage method runs its stage and returns the one line the log and the report show; when it
runs and what it is fingerprinted by is shipkit.ship.runner's business.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shipkit.errors import GateFailed, InputError, IntegrityError
from shipkit.evidence import PASS, TRAINING_EVIDENCE
from shipkit.fsutil import atomic_write
from shipkit.ladder import IMATRIX_FILE, LadderEntry
from shipkit.layout import RunDir
from shipkit.ship.config import QUANT_TYPE, ModelSpec
from shipkit.ship.preflight import require_inside


class ModelStages:
    """One model's stages: `spec` run in `out / spec.name`."""

    def __init__(self, spec: ModelSpec, out: Path) -> None:
        self.spec, self.out = spec, out
        self.root = out / spec.name
        self.corpus_dir = self.root / "corpus"
        self.tokens_dir = self.root / "tokens"
        self.run_dir = self.root / "run"
        # ship's own work folder, like corpus and tokens: the release gets a copy in release/gguf
        self.imatrix_dir = self.root / "imatrix"
        self.files = RunDir(self.run_dir)
        self.checkpoint = self.files.best

    def import_model(self) -> str:
        from shipkit.hf_import import import_hf
        from shipkit.tokenize import copy_tokenizer

        report = import_hf(self.spec.hf_dir, self.checkpoint, base_model=self.spec.base_model,
                           license=self.spec.license, pre=self.spec.pre)
        copy_tokenizer(report.tokenizer_path, self.run_dir)
        return f"{report.architecture}, {report.tensor_count} tensors, {report.parameters:,} parameters"

    def _remove(self, path: Path) -> None:
        """Delete a stage's old output, after checking that it lies inside OUT."""
        require_inside(self.out, path)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)

    def corpus(self) -> str:
        from shipkit.corpus import CorpusConfig, build_corpus, default_source

        sources = [Path(s) for s in self.spec.corpus] or [default_source()]
        self._remove(self.corpus_dir)
        manifest = build_corpus(sources, self.corpus_dir, CorpusConfig(
            val_fraction=self.spec.val_fraction, text_column=self.spec.text_column, glob=self.spec.glob))
        splits = manifest["splits"]
        return f"train {splits['train']['docs']} docs, val {splits['val']['docs']} docs"

    def tokens(self) -> str:
        from shipkit.audit import audit_tokens
        from shipkit.tokenize import TokenizerConfig, encode_corpus, train_tokenizer

        self._remove(self.tokens_dir)
        if self.spec.source == "import":
            manifest = encode_corpus(self.corpus_dir, self.tokens_dir, self.files.tokenizer)
        else:
            train_tokenizer(self.corpus_dir, self.tokens_dir, TokenizerConfig(vocab_size=self.spec.vocab_size))
            manifest = encode_corpus(self.corpus_dir, self.tokens_dir)
        audit = audit_tokens(self.tokens_dir)
        totals = manifest["splits"]
        if audit["val_docs_in_train"]:
            raise GateFailed(f"{self.tokens_dir}: {audit['val_docs_in_train']} val documents also in train")
        return (f"train {totals['train']['tokens']:,} tokens, val {totals['val']['tokens']:,} tokens; "
                f"audit: 0 val docs in train, {audit['window_overlap_fraction']:.2%} of val "
                f"{audit['window']}-token windows seen in train")

    def train(self) -> str:
        from shipkit.train import resume, run_dir_lock, train
        from shipkit.train.presets import apply_overrides, get_preset

        if self._interrupted_training():
            evidence = resume(self.run_dir, data_dir=self.tokens_dir, device=self.spec.device,
                              compile_model=self.spec.compile)
        else:
            with run_dir_lock(self.run_dir):  # never delete a run another `shipkit train` is writing
                self._remove(self.run_dir)
            config = apply_overrides(get_preset(self.spec.preset), self.spec.overrides)
            evidence = train(config, self.tokens_dir, self.run_dir, device=self.spec.device,
                             compile_model=self.spec.compile, predictions=self.spec.predict)
        summary, verdict = evidence["summary"], evidence["summary"]["memorization"]
        early = " (stopped early)" if summary["stop_reason"] == "early_stop" else ""
        turn = f", turned at epoch {verdict['turn_epoch']}" if verdict["turn_epoch"] else ""
        return (f"{summary['epochs_completed']} epochs{early}, best val loss {summary['best_val_loss']:.4f} "
                f"(epoch {summary['best_epoch']}), verdict {verdict['verdict']}{turn}")

    def _interrupted_training(self) -> bool:
        """A run of this ship that stopped mid-way (its evidence still says "running") and left
        a resume file; anything else is trained again from scratch."""
        from shipkit.evidence import evidence_path, read_evidence

        if not evidence_path(self.run_dir, TRAINING_EVIDENCE).is_file():
            return False
        if not self.files.resume_epochs():
            return False
        return read_evidence(self.run_dir, TRAINING_EVIDENCE)["summary"]["status"] == "running"

    def validate(self) -> str:
        from shipkit.apr import validate_apr

        report = validate_apr(self.checkpoint)
        if not report.ok:
            raise IntegrityError(f"{self.checkpoint}: {report.problems[0]}")
        return f"APR v{report.version} / {report.tensor_count} tensors / checksum VALID"

    def export(self) -> str:
        from shipkit.export import export_hf

        # the new folder replaces the old one only once complete; nothing but the export in it
        report = export_hf(self.checkpoint, self.files.release_hf, keep_other_files=False)
        return f"{len(report.files)} files, {report.shards} safetensors file(s)"

    def imatrix(self) -> str:
        from shipkit.imatrix import compute_imatrix

        settings = self.spec.imatrix_settings
        assert settings is not None  # the stage runs only when ship.toml asks for an imatrix
        try:
            result = compute_imatrix(self.checkpoint, self.tokens_dir, self.imatrix_dir / IMATRIX_FILE,
                                     n_tokens=settings.n_tokens, ctx=settings.ctx, device=self.spec.device)
        except InputError as error:  # e.g. a ctx beyond an imported model's context
            raise InputError(f"model {self.spec.name}: field imatrix: {error}") from None
        calibration = result.calibration
        return (f"{calibration.tokens:,} train tokens in {calibration.chunks} chunks of {calibration.ctx}, "
                f"{result.tensor_count} matrices")

    def quantize(self) -> str:
        from shipkit.quantize import write_gguf

        out = self.files.release_gguf
        made, imatrix = [], None
        if self.spec.imatrix_settings is not None:
            imatrix = self._release_imatrix(out)
            made.append(imatrix.name)
        else:
            self._remove(self.imatrix_dir)  # an earlier ship's; this release has none
        for entry in self.spec.ladder:  # each replaces its old file only once complete
            result = write_gguf(self.checkpoint, self._gguf_path(entry), entry.type,
                                device=_quant_device(self.spec.device), base_name=self.spec.name,
                                imatrix=imatrix, output_tensor_type=entry.output,
                                token_embedding_type=entry.token_embedding)
            made.append(Path(result.path).name)
        for stale in out.iterdir():  # the folder holds exactly this release's GGUF files
            if stale.name not in made:
                self._remove(stale)
        return ", ".join(made)

    def _release_imatrix(self, out: Path) -> Path:
        """The imatrix stage's file, copied into the release beside the GGUFs quantized with it
        (the same name, which each GGUF's quantize.imatrix.file records)."""
        released = out / IMATRIX_FILE
        with open(self.imatrix_dir / IMATRIX_FILE, "rb") as source, atomic_write(released, "wb") as handle:
            shutil.copyfileobj(source, handle)
        return released

    def _gguf_path(self, entry: LadderEntry) -> Path:
        """The release's file of `entry`: the quantizer's default name, with any overrides
        spelled after its type (shipkit.ladder)."""
        from shipkit.apr import inspect_apr
        from shipkit.config import ModelConfig
        from shipkit.quantize.gguf_export import default_file_name

        config = ModelConfig.from_dict(inspect_apr(self.checkpoint).metadata["config"])
        return self.files.release_gguf / entry.file_name(default_file_name(self.spec.name, config, entry.type))

    def parity(self) -> str:
        """One parity run over every released GGUF (the base model's forward is shared); the
        Q4_K_M file is the primary one, which parity.json's top-level fields describe."""
        from shipkit.parity import ParityOptions, run_parity

        primary, *others = sorted(self.spec.ladder, key=lambda entry: entry.label != QUANT_TYPE)
        extra = {"extra_quants": tuple(self._gguf_path(entry) for entry in others)} if others else {}
        evidence = run_parity(ParityOptions(
            base=self.checkpoint, quant=self._gguf_path(primary), tokens_dir=self.tokens_dir,
            n_tokens=self.spec.parity_tokens, ctx=self.spec.parity_ctx, engines=tuple(self.spec.parity_engines),
            device=self.spec.device, contract=Path(self.spec.contract) if self.spec.contract else None,
            run_dir=self.run_dir, **extra))
        failed = [line["name"] for line in evidence.get("files", []) if line["verdict"] != PASS]
        return f"verdict {evidence['verdict']}" + (f" (failed: {', '.join(failed)})" if failed else "")

    def card(self) -> str:
        from shipkit.card import render_card

        report = render_card(self.run_dir, repo_id=self.repo(), gguf_repo_id=self.spec.gguf_repo,
                             license=self.spec.license, datasets=self.spec.datasets,
                             templates_dir=self.spec.card_templates or None)
        return ", ".join(str(Path(path).relative_to(self.run_dir)) for path in report.cards.values())

    def repo(self) -> str:
        """The model's Hub repo: ship.toml's `repo`, else one under the local namespace."""
        from shipkit.card import LOCAL_NAMESPACE

        return self.spec.repo or f"{LOCAL_NAMESPACE}/{self.spec.name}"


def _quant_device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"

