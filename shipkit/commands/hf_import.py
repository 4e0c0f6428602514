"""`shipkit import`: an existing HF checkpoint folder → APR."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from shipkit.commands.common import emit, flag_spelling, json_option
from shipkit.config import WEIGHT_DTYPE_NAMES

if TYPE_CHECKING:
    from shipkit.hf_import import ImportReport


@click.command("import")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="The .apr file to write; the tokenizer files are copied beside it.")
@click.option("--base-model", help="Upstream repo id for the card (default: the folder name).")
@click.option("--license", "license_", help="Upstream license (default: from the folder's README).")
@click.option("--pre", help="llama.cpp pre-tokenizer name, for a tokenizer shipkit does not recognise "
                            "(docs/import.md) [default: detected from tokenizer.json].")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPE_NAMES), default=None,
              help="Store the weights in this dtype [default: the checkpoint's own, e.g. bfloat16].")
@json_option
def import_command(
    hf_dir: Path, out_path: Path, base_model: str | None, license_: str | None, pre: str | None,
    dtype: str | None, as_json: bool,
) -> None:
    """Import a safetensors checkpoint folder (Llama, Mistral, Qwen2, Qwen3) as an APR file,
    streamed tensor by tensor."""
    from shipkit.apr.format import CONVERSION_DTYPES
    from shipkit.fsutil import check_file_target
    from shipkit.hf_import import import_hf

    check_file_target(out_path, "--out")
    with flag_spelling(pre="--pre"):
        report = import_hf(hf_dir, out_path, base_model=base_model, license=license_, pre=pre,
                           dtype=None if dtype is None else CONVERSION_DTYPES[dtype])
    emit(report, as_json, _render)


def _render(report: ImportReport) -> str:
    return (f"{report.apr_path}: {report.architecture} / {report.tensor_count} tensors / "
            f"{report.parameters:,} parameters in {', '.join(report.dtypes)} "
            f"(from {report.source['base_model']}, license {report.source['license']}; "
            f"pre-tokenizer {report.pre})")


commands = [import_command]
