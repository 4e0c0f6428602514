"""`shipkit quantize`: export a weights checkpoint to a llama.cpp GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from shipkit.commands.common import (
    StageChoice,
    StageValue,
    emit,
    flag_spelling,
    json_option,
)
from shipkit.errors import InputError

if TYPE_CHECKING:
    from shipkit.quantize import GgufExport

FILE_TYPE_CHOICE = StageChoice(StageValue("shipkit.quantize.mix", "FILE_TYPES", list), case_sensitive=False)
OVERRIDE_CHOICE = StageChoice(StageValue("shipkit.quantize.mix", "OVERRIDE_TYPES",
                                         lambda qtypes: [qtype.name for qtype in qtypes]), case_sensitive=False)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--q4k", is_flag=True, help="Shorthand for --type Q4_K_M.")
@click.option("--type", "file_type", type=FILE_TYPE_CHOICE,
              default=None, help="GGUF file type (llama.cpp's tensor mix for K-quants).")
@click.option("--imatrix", "imatrix_path", type=click.Path(path_type=Path), default=None,
              help="Importance matrix (llama.cpp's imatrix GGUF, e.g. from `shipkit imatrix`).")
@click.option("--output-tensor-type", type=OVERRIDE_CHOICE, default=None,
              help="GGML type of output.weight (or the tied embedding), as llama-quantize's option.")
@click.option("--token-embedding-type", type=OVERRIDE_CHOICE, default=None,
              help="GGML type of token_embd.weight, as llama-quantize's option.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The .gguf file, or a folder to get <BaseName>-<SizeLabel>-<Type>.gguf.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json [default: <ckpt dir>/tokenizer.json, then <ckpt dir>/../].")
@click.option("--name", "base_name", default=None,
              help="general.name and file-name base [default: the run folder's name].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to quantize; both give the same bytes.")
@click.option("--pre", help="llama.cpp pre-tokenizer name (docs/import.md) [default: the one import "
                            "recorded, else detected from tokenizer.json].")
@json_option
def quantize(checkpoint: Path, q4k: bool, file_type: str | None, imatrix_path: Path | None,
             output_tensor_type: str | None, token_embedding_type: str | None, out_path: Path,
             tokenizer_path: Path | None, base_name: str | None, device: str, pre: str | None,
             as_json: bool) -> None:
    """Write CHECKPOINT (a weights .apr) as a GGUF, quantized bit-identically to llama.cpp."""
    from shipkit.quantize import write_gguf
    from shipkit.quantize.mix import FILE_TYPES

    if q4k and file_type and file_type.upper() != "Q4_K_M":
        raise InputError(f"--q4k and --type {file_type} disagree: give one of them")
    if not q4k and not file_type:
        raise InputError("give --q4k or --type {" + ",".join(FILE_TYPES) + "}")
    with flag_spelling(out_path="--out", device="--device", pre="--pre"):
        result = write_gguf(checkpoint, out_path, "Q4_K_M" if q4k else file_type,
                            tokenizer_path=tokenizer_path, device=device, base_name=base_name, pre=pre,
                            imatrix=imatrix_path, output_tensor_type=output_tensor_type,
                            token_embedding_type=token_embedding_type)
    emit(result.to_dict(), as_json, lambda _: _render(result))


def _render(result: GgufExport) -> str:
    types = ", ".join(f"{count} {name}" for name, count in result.tensor_types.items())
    rate = result.weights / result.seconds / 1e6 if result.seconds else 0.0
    imatrix = f" / imatrix {result.imatrix['file']}" if result.imatrix else ""
    return (f"{result.path}: GGUF {result.file_type} ({result.architecture}){imatrix} / "
            f"{result.tensor_count} tensors ({types}) / {result.nbytes / 2**20:.1f} MiB / "
            f"{result.seconds:.1f} s ({rate:.1f}M weights/s)")


commands = [quantize]
