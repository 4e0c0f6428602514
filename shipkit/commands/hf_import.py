"""`shipkit import`: an existing HF checkpoint folder → APR."""

from __future__ import annotations

from pathlib import Path

import click

from shipkit.apr.format import CONVERSION_DTYPES
from shipkit.commands.common import emit, json_option


@click.command("import")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="The .apr file to write; the tokenizer files are copied beside it.")
@click.option("--base-model", help="Upstream repo id for the card (default: the folder name).")
@click.option("--license", "license_", help="Upstream license (default: from the folder's README).")
@click.option("--pre", help="llama.cpp pre-tokenizer name, for a tokenizer shipkit does not recognise "
                            "(docs/import.md) [default: detected from tokenizer.json].")
@click.option("--dtype", type=click.Choice(list(CONVERSION_DTYPES)), default=None,
              help="Store the weights in this dtype [default: the checkpoint's own, e.g. bfloat16].")
@json_option
def import_command(
    hf_dir: Path, out_path: Path, base_model: str | None, license_: str | None, pre: str | None,
    dtype: str | None, as_json: bool,
) -> None:
    """Import a safetensors checkpoint folder (Llama, Mistral, Qwen2, Qwen3) as an APR file,
    streamed tensor by tensor."""
    from shipkit.fsutil import check_file_target
    from shipkit.hf_import import import_hf

    check_file_target(out_path, "--out")
    report = import_hf(hf_dir, out_path, base_model=base_model, license=license_, pre=pre,
                       dtype=None if dtype is None else CONVERSION_DTYPES[dtype])
    result = {
        "apr": str(report.apr_path),
        "tokenizer": str(report.tokenizer_path),
        "architecture": report.architecture,
        "tensors": report.tensor_count,
        "parameters": report.parameters,
        "source": report.source,
        "pre": report.pre,
        "dtypes": report.dtypes,
    }
    emit(result, as_json, lambda r: (
        f"{r['apr']}: {r['architecture']} / {r['tensors']} tensors / {r['parameters']:,} parameters "
        f"in {', '.join(r['dtypes'])} "
        f"(from {r['source']['base_model']}, license {r['source']['license']}; pre-tokenizer {r['pre']})"
    ))


commands = [import_command]
