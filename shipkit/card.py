"""Model cards rendered from evidence: one for the safetensors repo, one for the GGUF repo.

Every number on a card comes from the evidence JSON (`training-summary`, `parity`, and the
release manifest `release`, which this stage writes from the files in `release/`). Templates are
jinja2 with strict undefined handling: a field the template needs and the evidence lacks stops
the render with an error naming the field, so a card never shows a blank or an invented value.
The YAML front matter is built with huggingface_hub's `ModelCardData`, so it is what the Hub
expects; `model-index` is left out when there is nothing to put in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from shipkit.errors import InputError, IntegrityError
from shipkit.evidence import evidence_path, read_evidence
from shipkit.fsutil import atomic_write, write_text
from shipkit.release import (
    CARD_DIR,
    DEFAULT_CHECKPOINT,
    GGUF_CARD,
    LOSS_PLOT,
    build_manifest,
    manifest_files,
    repo_entry,
    write_manifest,
)

DEFAULT_LICENSE = "apache-2.0"  # shipkit's own license, for models trained from scratch
LOCAL_NAMESPACE = "shipkit-local"  # placeholder owner of a card rendered without --repo
PARITY_PASS = "PASS"
TEMPLATES = {"hf": "model-card.md.j2", "gguf": "gguf-card.md.j2"}
BASE_TAGS = ["shipkit", "text-generation", "code"]
EVAL_TASK = "text-generation"
PLOT_SIZE_INCHES = (6.4, 3.6)
PLOT_DPI = 100


@dataclass
class CardReport:
    cards: dict[str, Path]  # role -> README path
    plot: Path | None
    manifest: Path


class EvidenceDict(dict):
    """A dict that knows where it sits in the evidence, so a missing key can be named."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        super().__init__(data)
        self._evidence_where = where


class EvidenceUndefined(jinja2.StrictUndefined):
    """Strict undefined whose error names the full evidence path, e.g. `parity.engines.torch`."""

    @property
    def _undefined_message(self) -> str:
        owner = self._undefined_obj
        if isinstance(owner, EvidenceDict):
            return f"evidence field {owner._evidence_where}.{self._undefined_name} is missing"
        return f"card template: {super()._undefined_message}"


def wrap_evidence(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return EvidenceDict({key: wrap_evidence(item, f"{where}.{key}") for key, item in value.items()}, where)
    if isinstance(value, list):
        return [wrap_evidence(item, f"{where}[{index}]") for index, item in enumerate(value)]
    return value


def render_card(
    run_dir: str | Path,
    *,
    repo_id: str | None = None,
    gguf_repo_id: str | None = None,
    license: str | None = None,
    datasets: Sequence[str] = (),
    checkpoint: str | Path = DEFAULT_CHECKPOINT,
) -> CardReport:
    """Write `release/card/{README.md, loss.png, gguf/README.md}` and `evidence/release.json`.

    Reads `evidence/training-summary.json` (optional only for an imported checkpoint),
    `evidence/parity.json`, and hashes `release/hf` and `release/gguf`. `license` defaults to the
    upstream license of an imported model, else apache-2.0; `repo_id` to
    `shipkit-local/<RUN_DIR name>` (render again with the real repo before pushing). `gguf_repo_id`
    defaults to `<repo_id>-GGUF`. Raises InputError for missing
    evidence or a field a template needs, IntegrityError when the parity evidence measured a GGUF
    file other than the released ones.
    """
    run_dir = Path(run_dir)
    repo_id = repo_id or f"{LOCAL_NAMESPACE}/{run_dir.resolve().name}"
    card_dir = run_dir / CARD_DIR
    parity = read_evidence(run_dir, "parity")
    training = None
    if evidence_path(run_dir, "training-summary").is_file() or not _is_import(run_dir, checkpoint):
        training = read_evidence(run_dir, "training-summary")
    plot = None
    if training is not None and training["epochs"]:
        plot = write_loss_plot(training["epochs"], card_dir / LOSS_PLOT)
    else:
        (card_dir / LOSS_PLOT).unlink(missing_ok=True)
    manifest = build_manifest(run_dir, repo_id=repo_id, gguf_repo_id=gguf_repo_id, checkpoint=checkpoint)
    gguf_files = manifest_files(manifest, "gguf")
    if gguf_files and parity["quant"]["sha256"] not in {f.sha256 for f in gguf_files}:
        raise IntegrityError(f"evidence/parity.json: measured {parity['quant']['path']} (sha256 "
                             f"{parity['quant']['sha256'][:12]}…), which is not one of the released GGUF files; "
                             "re-run `shipkit parity` on the released file")
    source = manifest["source"] or {}
    context = {
        "training": None if training is None else wrap_evidence(training, "training-summary"),
        "parity": wrap_evidence(parity, "parity"),
        "release": wrap_evidence(manifest, "release"),
        "source": wrap_evidence(source, "release.source") if source else None,
        "repo_id": repo_id,
        "gguf_repo_id": repo_entry(manifest, "gguf")["repo_id"] if gguf_files else None,
        "model_name": repo_id.split("/")[1],
        "loss_plot": LOSS_PLOT if plot is not None else None,
        "waived": parity["verdict"] != PARITY_PASS,
    }
    license = license or source.get("license") or DEFAULT_LICENSE
    env = _environment()
    texts = {}
    for role in ("hf", "gguf"):
        if repo_entry(manifest, role) is None:
            continue
        front_matter = _front_matter(role, context, training, parity, license, list(datasets), source)
        try:
            body = env.get_template(TEMPLATES[role]).render(**context, files=manifest_files(manifest, role))
        except jinja2.UndefinedError as error:
            raise InputError(f"{TEMPLATES[role]}: {error}") from None
        texts[role] = f"---\n{front_matter}---\n\n{body.strip()}\n"
    (card_dir / GGUF_CARD).unlink(missing_ok=True)
    cards = {}
    for role, text in texts.items():
        cards[role] = run_dir / repo_entry(manifest, role)["card"]
        write_text(cards[role], text)
    # Written last: a render that fails leaves the previous manifest, which push checks files against.
    return CardReport(cards=cards, plot=plot, manifest=write_manifest(run_dir, manifest))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("shipkit", "templates"),
        undefined=EvidenceUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["num"] = _format_number
    env.filters["size"] = _format_size
    return env


def _format_number(value: Any, digits: int = 4) -> str:
    """Integers with thousands separators; floats with `digits` decimals, or significant digits
    when very small or large; null (a metric the evidence could not measure) as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def _format_size(nbytes: int) -> str:
    """Exact bytes, with a binary-unit reading beside them from 1 KiB up."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes:,} B ({nbytes / scale:.1f} {unit})"
    return f"{nbytes:,} B"


def _front_matter(role: str, context: dict[str, Any], training: dict[str, Any] | None, parity: dict[str, Any],
                  license: str, datasets: list[str], source: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    dataset_type = datasets[0] if datasets else "custom"
    if role == "hf":
        data = ModelCardData(
            license=license,
            library_name="transformers",
            pipeline_tag=EVAL_TASK,
            tags=BASE_TAGS,
            datasets=datasets or None,
            base_model=source.get("base_model"),
            model_name=context["model_name"],
            eval_results=_training_results(training, dataset_type) or None,
        )
    else:
        data = ModelCardData(
            license=license,
            library_name="gguf",
            pipeline_tag=EVAL_TASK,
            tags=["gguf", "llama.cpp", *BASE_TAGS],
            datasets=datasets or None,
            base_model=context["repo_id"],
            base_model_relation="quantized",
            quantized_by="shipkit",
            model_name=context["gguf_repo_id"].split("/")[1],
            eval_results=_parity_results(parity, dataset_type) or None,
        )
    return data.to_yaml() + "\n"


def _training_results(training: dict[str, Any] | None, dataset_type: str) -> list[Any]:
    """Val loss and perplexity of the released (best) epoch."""
    from huggingface_hub import EvalResult

    if training is None or training["summary"]["best_epoch"] is None:
        return []
    best = next(e for e in training["epochs"] if e["epoch"] == training["summary"]["best_epoch"])
    dataset = {"task_type": EVAL_TASK, "dataset_type": dataset_type, "dataset_split": "validation",
               "dataset_name": f"held-out validation split ({training['corpus']['val_eval_tokens']} tokens)"}
    return [
        EvalResult(**dataset, metric_type="loss", metric_name="val loss (nats/token)", metric_value=best["val_loss"]),
        EvalResult(**dataset, metric_type="perplexity", metric_name="val perplexity", metric_value=best["val_ppl"]),
    ]


def _parity_results(parity: dict[str, Any], dataset_type: str) -> list[Any]:
    """Per engine: mean KL, same-top-1 agreement and the perplexity ratio against the base model."""
    from huggingface_hub import EvalResult

    dataset = {"task_type": EVAL_TASK, "dataset_type": dataset_type, "dataset_split": "validation",
               "dataset_name": f"held-out validation split ({parity['tokens']['positions_scored']} positions)"}
    names = {"kl_mean": "mean KL divergence vs base", "same_top_pct": "same top-1 token vs base (%)",
             "ppl_ratio": "perplexity ratio vs base"}
    results = []
    for engine, section in sorted(parity["engines"].items()):
        for metric, name in names.items():
            value = section["metrics"][metric]
            if value is not None:
                results.append(EvalResult(**dataset, metric_type=metric, metric_name=f"{name} [{engine}]",
                                          metric_value=value))
    return results


def write_loss_plot(epochs: list[dict[str, Any]], path: Path) -> Path:
    """Train and val loss per epoch as a PNG (matplotlib Agg; no timestamp, so reruns match)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    axes = figure.subplots()
    numbers = [e["epoch"] for e in epochs]
    axes.plot(numbers, [e["train_loss"] for e in epochs], marker="o", label="train loss (epoch mean)")
    axes.plot(numbers, [e["val_loss"] for e in epochs], marker="s", label="val loss (end of epoch)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss (nats/token)")
    axes.set_xticks(numbers)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", metadata={"Software": None})
    return path


def _is_import(run_dir: Path, checkpoint: str | Path) -> bool:
    from shipkit.apr import inspect_apr

    path = run_dir / checkpoint
    return path.is_file() and bool(inspect_apr(path).metadata.get("producer", {}).get("source"))
