"""Model cards rendered from evidence: one for the safetensors repo, one for the GGUF repo.

Every number on a card comes from the evidence JSON (`training-summary`, `parity`, and the
release manifest `release`, which this stage writes from the files in `release/`). Templates are
jinja2 with strict undefined handling: a field the template needs and the evidence lacks stops
the render with an error naming the field, so a card never shows a blank or an invented value.
The templates are shipkit's own (the repository's templates/ folder, installed as the package
`shipkit.templates`); a user's folder can replace any of them by file name.
The YAML front matter is built with huggingface_hub's `ModelCardData`, so it is what the Hub
expects; `model-index` is left out when there is nothing to put in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from shipkit.errors import InputError, IntegrityError
from shipkit.evidence import (
    PARITY_EVIDENCE,
    PASS,
    RELEASE_EVIDENCE,
    TRAINING_EVIDENCE,
    evidence_path,
    read_evidence,
)
from shipkit.fsutil import atomic_write, write_text
from shipkit.ladder import ladder_rows, recommend
from shipkit.layout import RunDir
from shipkit.release import (
    LOSS_PLOT_IN_REPO,
    ReleaseFile,
    build_manifest,
    manifest_files,
    model_ggufs,
    repo_entry,
    write_manifest,
)

DEFAULT_LICENSE = "apache-2.0"  # shipkit's own license, for models trained from scratch
LOCAL_NAMESPACE = "shipkit-local"  # placeholder owner of a card rendered without --repo
TEMPLATES = {"hf": "model-card.md.j2", "gguf": "gguf-card.md.j2"}
TEMPLATE_GLOB = "*.j2"
PACKAGE_DIR = Path(__file__).resolve().parent
BASE_TAGS = ["shipkit", "text-generation", "code"]
EVAL_TASK = "text-generation"
PLOT_SIZE_INCHES = (6.4, 3.6)
PLOT_DPI = 100


@dataclass
class CardReport:
    """What `render_card` wrote: the cards by role, the loss plot (None when there is no
    training summary to plot) and the release manifest."""

    cards: dict[str, Path]  # role -> README path
    plot: Path | None
    manifest: Path

    def to_dict(self) -> dict[str, Any]:
        return {"cards": {role: str(path) for role, path in self.cards.items()},
                "plot": None if self.plot is None else str(self.plot), "manifest": str(self.manifest)}


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
    checkpoint: str | Path = RunDir.BEST,
    templates_dir: str | Path | None = None,
) -> CardReport:
    """Write `release/card/{README.md, loss.png, gguf/README.md}` and `evidence/release.json`.

    Reads `evidence/training-summary.json` (optional only for an imported checkpoint),
    `evidence/parity.json`, and hashes `release/hf` and `release/gguf`. `license` defaults to the
    upstream license of an imported model, else apache-2.0; `repo_id` to
    `shipkit-local/<RUN_DIR name>` (render again with the real repo before pushing). `gguf_repo_id`
    defaults to `<repo_id>-GGUF`. `templates_dir`: a folder whose `*.j2` files replace shipkit's
    templates of the same name (see `card_environment`). Raises InputError for missing evidence,
    a field a template needs or a bad `templates_dir`, IntegrityError when the parity evidence
    measured a GGUF file other than the released ones.
    """
    env, overrides = card_environment(templates_dir)
    run_dir = Path(run_dir)
    repo_id = repo_id or f"{LOCAL_NAMESPACE}/{run_dir.resolve().name}"
    files = RunDir(run_dir)
    parity = read_evidence(run_dir, PARITY_EVIDENCE)
    training = None
    if evidence_path(run_dir, TRAINING_EVIDENCE).is_file() or not _is_import(run_dir, checkpoint):
        training = read_evidence(run_dir, TRAINING_EVIDENCE)
    plot = None
    if training is not None and training["epochs"]:
        plot = write_loss_plot(training["epochs"], files.loss_plot)
    else:
        files.loss_plot.unlink(missing_ok=True)
    manifest = build_manifest(run_dir, repo_id=repo_id, gguf_repo_id=gguf_repo_id, checkpoint=checkpoint)
    gguf_files = manifest_files(manifest, "gguf")
    if gguf_files:
        _check_parity_covers(parity, model_ggufs(manifest))
    source = manifest["source"] or {}
    recommended = recommend(parity)
    context = {
        "training": None if training is None else wrap_evidence(training, TRAINING_EVIDENCE),
        "parity": wrap_evidence(parity, PARITY_EVIDENCE),
        "release": wrap_evidence(manifest, RELEASE_EVIDENCE),
        "source": wrap_evidence(source, "release.source") if source else None,
        "repo_id": repo_id,
        "gguf_repo_id": repo_entry(manifest, "gguf")["repo_id"] if gguf_files else None,
        "model_name": repo_id.split("/")[1],
        "loss_plot": LOSS_PLOT_IN_REPO if plot is not None else None,
        "waived": parity["verdict"] != PASS,
        # a measured ladder: its table and pick (shipkit.ladder), and the file the usage example loads
        "ladder": ladder_rows(parity),
        "recommended": recommended,
        "usage_file": _usage_file(parity, recommended),
    }
    license = license or source.get("license") or DEFAULT_LICENSE
    texts = {}
    for role in ("hf", "gguf"):
        if repo_entry(manifest, role) is None:
            continue
        front_matter = _front_matter(role, context, training, parity, license, list(datasets), source)
        name = TEMPLATES[role]
        try:
            body = env.get_template(name).render(**context, files=manifest_files(manifest, role))
        except jinja2.TemplateError as error:  # a missing evidence field, or a user template's include
            raise InputError(f"{overrides.get(name, name)}: {error}") from None
        texts[role] = f"---\n{front_matter}---\n\n{body.strip()}\n"
    files.gguf_card.unlink(missing_ok=True)
    cards = {}
    for role, text in texts.items():
        cards[role] = run_dir / repo_entry(manifest, role)["card"]
        write_text(cards[role], text)
    # Written last: a render that fails leaves the previous manifest, which push checks files against.
    return CardReport(cards=cards, plot=plot, manifest=write_manifest(run_dir, manifest))


def _check_parity_covers(parity: dict[str, Any], released: list[ReleaseFile]) -> None:
    """The parity evidence measured the released GGUF files: its primary file is one of them, and
    every one of them was measured (a ladder's files, or the one file of a one-file run)."""
    where = RunDir.evidence_file(PARITY_EVIDENCE)
    if parity["quant"]["sha256"] not in {f.sha256 for f in released}:
        raise IntegrityError(f"{where}: measured {parity['quant']['path']} (sha256 "
                             f"{parity['quant']['sha256'][:12]}…), which is not one of the released GGUF files; "
                             "re-run `shipkit parity` on the released file")
    measured = {line["sha256"] for line in parity.get("files", [])} or {parity["quant"]["sha256"]}
    unmeasured = [f.path_in_repo for f in released if f.sha256 not in measured]
    if unmeasured:
        raise IntegrityError(f"{where}: does not measure the released {', '.join(unmeasured)}; every released "
                             "GGUF is gated: re-run `shipkit parity` with all of them")


def _usage_file(parity: dict[str, Any], recommended: dict[str, Any] | None) -> str:
    """The GGUF the card's usage example loads: the recommended file of a ladder, else the one
    parity measured first."""
    if recommended is not None and recommended["name"] is not None:
        return recommended["name"]
    return Path(parity["quant"]["path"]).name


def card_environment(templates_dir: str | Path | None = None) -> tuple[jinja2.Environment, dict[str, Path]]:
    """The jinja2 environment cards render in, and the templates `templates_dir` overrides (name ->
    file). A `*.j2` file in `templates_dir` replaces shipkit's template of the same name (relative
    path, e.g. `_parity.md.j2`); every other template is shipkit's own. A file there that replaces
    none may exist only as a partial one of the folder's templates includes.

    Raises InputError, naming the folder or the file, when the folder is missing, not a folder or
    holds no `*.j2` file, or a template in it is not UTF-8, does not parse, includes a template that
    exists nowhere, or replaces nothing and is included by nothing (a misspelt name).
    """
    builtin = jinja2.FileSystemLoader(builtin_templates_dir())
    if templates_dir is None:
        return _environment(builtin), {}
    folder = Path(templates_dir)
    overrides = _template_files(folder)
    env = _environment(jinja2.ChoiceLoader([jinja2.FileSystemLoader(folder), builtin]))
    _check_overrides(env, folder, overrides, _builtin_names(builtin))
    return env, overrides


def _environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=loader,
        undefined=EvidenceUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["num"] = _format_number
    env.filters["size"] = _format_size
    return env


def builtin_templates_dir() -> Path:
    """The folder of shipkit's own card templates, found beside the shipkit that is running: in
    a wheel it is the package `shipkit.templates` (shipkit/templates/); in a source tree it is the
    top-level templates/ folder, whether the tree is installed editable (which maps
    `shipkit.templates` there) or only on sys.path (which maps nothing). Found by place rather
    than by importing `shipkit.templates`, so a second checkout on sys.path never renders with
    the templates of another, installed one."""
    for folder in (PACKAGE_DIR / "templates", PACKAGE_DIR.parent / "templates"):
        if (folder / TEMPLATES["hf"]).is_file():
            return folder
    raise IntegrityError(f"{PACKAGE_DIR}: shipkit's card templates are missing (neither templates/ beside "
                         "nor above the package holds them); reinstall shipkit")


def _builtin_names(loader: jinja2.BaseLoader) -> list[str]:
    # The folder also holds the package's __init__.py (and its bytecode): only templates count.
    return [name for name in loader.list_templates() if Path(name).match(TEMPLATE_GLOB)]


def _template_files(folder: Path) -> dict[str, Path]:
    """Template name (path relative to `folder`, as jinja2 names it) -> file, for each `*.j2`."""
    if not folder.exists():
        raise InputError(f"{folder}: card templates folder not found")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give the folder holding your *.j2 card templates)")
    files = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob(TEMPLATE_GLOB))
             if path.is_file()}
    if not files:
        raise InputError(f"{folder}: no {TEMPLATE_GLOB} card templates in it")
    return files


def _check_overrides(env: jinja2.Environment, folder: Path, overrides: dict[str, Path],
                     builtin_names: list[str]) -> None:
    """Compile each override and check the templates it includes exist, before any file is written."""
    included: set[str] = set()
    dynamic_include = False  # an include by a computed name: which partials are used is unknown
    for name, path in overrides.items():
        try:
            source = path.read_text(encoding="utf-8")
            env.compile(source, name, str(path))
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text (card templates are UTF-8)") from None
        except jinja2.TemplateSyntaxError as error:
            raise InputError(f"{path}:{error.lineno}: card template does not parse: {error.message}") from None
        for reference in jinja2.meta.find_referenced_templates(env.parse(source)):
            if reference is None:
                dynamic_include = True
            elif reference not in overrides and reference not in builtin_names:
                raise InputError(f"{path}: includes {reference!r}, which is neither in {folder} nor one "
                                 f"of shipkit's card templates ({', '.join(builtin_names)})")
            else:
                included.add(reference)
    for name, path in overrides.items():
        if name not in builtin_names and name not in included and not dynamic_include:
            raise InputError(f"{path}: replaces none of shipkit's card templates ({', '.join(builtin_names)}) "
                             "and no template includes it; name it after the template it replaces")


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
