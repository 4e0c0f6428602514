"""`shipkit audit`: how much of the val split the train split already contains."""

from __future__ import annotations

from pathlib import Path

import click

from shipkit.commands.common import StageValue, emit, json_option
from shipkit.errors import IntegrityError
from shipkit.fsutil import check_file_target


@click.command()
@click.argument("tokens_dir", type=click.Path(path_type=Path))
@click.option("--window", type=click.IntRange(min=1), default=StageValue("shipkit.audit", "AuditConfig.window"),
              show_default=True, help="Length of the token windows compared between val and train.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the JSON report [default: TOKENS_DIR/audit.json].")
@json_option
def audit(tokens_dir: Path, window: int, out: Path | None, as_json: bool) -> None:
    """Leakage audit of TOKENS_DIR; exit 1 if any val document is also in train."""
    from shipkit.audit import AuditConfig, audit_tokens

    if out is not None:
        check_file_target(out, "--out")
    report = audit_tokens(tokens_dir, AuditConfig(window=window), out)
    emit(report, as_json, _render)
    if report["val_docs_in_train"]:
        raise IntegrityError(
            f"{tokens_dir}: {report['val_docs_in_train']} val document(s) also in train; "
            "rebuild the corpus with `shipkit corpus build`, which splits after dedup"
        )


def _render(report: dict) -> str:
    sampled = "" if report["sample_rate"] == 1.0 else f", on a {report['sample_rate']:.3f} hash sample"
    return (
        f"val docs with an exact duplicate in train: {report['val_docs_in_train']}/{report['val_docs']} "
        f"({report['exact_duplicate_fraction']:.2%})\n"
        f"val {report['window']}-token windows found in train: "
        f"{report['val_windows_in_train']}/{report['val_windows_checked']} "
        f"({report['window_overlap_fraction']:.2%}{sampled})"
    )


commands = [audit]
