"""`shipkit export`, `shipkit card`, `shipkit push`: the release commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from shipkit.commands.common import emit, flag_spelling, json_option
from shipkit.config import WEIGHT_DTYPE_NAMES
from shipkit.layout import RunDir

if TYPE_CHECKING:
    from shipkit.card import CardReport
    from shipkit.export import ExportReport
    from shipkit.push import PushReport


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--hf", "out_dir", required=True, type=click.Path(path_type=Path),
              help="The Hugging Face folder to write (config, safetensors, tokenizer files).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tokenizer.json (default: the one the checkpoint names, beside it or one folder up).")
@click.option("--max-shard-bytes", type=click.IntRange(min=1), default=None,
              help="Split model.safetensors into shards of at most this many bytes (default 5e9).")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPE_NAMES), default=None,
              help="The weights' dtype in the export [default: the checkpoint's own].")
@json_option
def export(checkpoint: Path, out_dir: Path, tokenizer_path: Path | None, max_shard_bytes: int | None,
           dtype: str | None, as_json: bool) -> None:
    """Export an APR checkpoint as a Hugging Face transformers folder, streamed tensor by tensor."""
    from shipkit.apr.format import CONVERSION_DTYPES
    from shipkit.export import DEFAULT_MAX_SHARD_BYTES, export_hf

    with flag_spelling(out_dir="--hf"):
        report = export_hf(checkpoint, out_dir, tokenizer_path=tokenizer_path,
                           max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES,
                           dtype=None if dtype is None else CONVERSION_DTYPES[dtype])
    emit(report, as_json, _render_export)


def _render_export(report: ExportReport) -> str:
    return (f"{report.out_dir}: {report.tensor_count} {report.dtype} tensors in {report.shards} "
            f"safetensors file(s), {len(report.files)} files")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", default=None,
              help="ORG/NAME of the safetensors repo the card is for (default: shipkit-local/RUN_DIR name).")
@click.option("--gguf-repo", "gguf_repo_id", default=None, help="ORG/NAME of the GGUF repo (default: REPO-GGUF).")
@click.option("--license", "license_", default=None,
              help="License id for the front matter (default: the upstream one for imports, else apache-2.0).")
@click.option("--dataset", "datasets", multiple=True, help="Hub dataset id the model was trained on (repeatable).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"The released checkpoint, relative to RUN_DIR (default {RunDir.BEST}).")
@click.option("--templates", "templates_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="A folder of *.j2 card templates, each replacing shipkit's template of the same name.")
@json_option
def card(run_dir: Path, repo_id: str | None, gguf_repo_id: str | None, license_: str | None,
         datasets: tuple[str, ...], checkpoint: Path | None, templates_dir: Path | None, as_json: bool) -> None:
    """Render the model cards (and loss plot) of RUN_DIR's release from its evidence."""
    from shipkit.card import render_card
    from shipkit.fsutil import check_folder_target

    check_folder_target(run_dir, "RUN_DIR")
    report = render_card(run_dir, repo_id=repo_id, gguf_repo_id=gguf_repo_id, license=license_, datasets=datasets,
                         checkpoint=checkpoint or RunDir.BEST, templates_dir=templates_dir)
    emit(report, as_json, _render_card)


def _render_card(report: CardReport) -> str:
    return "\n".join([f"{role} card: {path}" for role, path in report.cards.items()]
                     + ([f"loss plot: {report.plot}"] if report.plot else [])
                     + [f"release manifest: {report.manifest}"])


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", required=True, help="ORG/NAME of the safetensors repo (as given to `shipkit card`).")
@click.option("--gguf-repo", default=None, help="ORG/NAME of the GGUF repo (default: the one the card names).")
@click.option("--private", is_flag=True, help="Create the repos private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--dry-run", is_flag=True, help="Print the plan (files, sizes, sha256, repos, gates); push nothing.")
@click.option("--allow-failed-gates", is_flag=True, help="Push even though the parity gate did not pass.")
@json_option
def push(run_dir: Path, repo: str, gguf_repo: str | None, private: bool, revision: str | None, dry_run: bool,
         allow_failed_gates: bool, as_json: bool) -> None:
    """Push RUN_DIR's release to the Hub (one commit per repo), then verify every file remotely."""
    from shipkit.push import push_release

    with flag_spelling(gguf_repo="--gguf-repo"):
        report = push_release(run_dir, repo, gguf_repo=gguf_repo, private=private, revision=revision,
                              dry_run=dry_run, allow_failed_gates=allow_failed_gates)
    emit(report, as_json, render_push)
    if report.refusals:  # a dry run prints the whole plan first, then fails like the push would
        raise report.refusals[0]


def render_push(report: PushReport) -> str:
    lines = [f"{'plan' if report.dry_run else 'pushed'}: run {report.run_id}",
             f"commit message: {report.commit_message}"]
    lines += [f"gate {name}: {verdict}{' (WAIVED)' if name in report.waived else ''}"
              for name, verdict in report.gates.items()]
    lines += [f"refused: {error}" for error in report.refusals[1:]]
    for plan in report.repos:
        where = f"{plan.repo_id} ({'private' if report.private else 'public'}, {report.revision or 'main'})"
        lines.append(f"repo {where}" + (f" commit {plan.commit_oid}" if plan.commit_oid else ""))
        width = max(len(f.path_in_repo) for f in plan.files)
        lines += [f"  {f.path_in_repo:<{width}}  {f.size:>12,} B  {f.sha256}" for f in plan.files]
    if not report.dry_run:
        lines.append(f"verified {report.verified_files}/{report.total_files} files")
    return "\n".join(lines)


commands = [export, card, push]
