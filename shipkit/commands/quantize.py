"""`shipkit quantize`: export a weights checkpoint to a llama.cpp GGUF file."""

from __future__ import annotations

from pathlib import Path

import click

from shipkit.commands.common import emit, json_option
from shipkit.errors import InputError
from shipkit.quantize import GgufExport, write_gguf
from shipkit.quantize.mix import FILE_TYPES


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--q4k", is_flag=True, help="Shorthand for --type Q4_K_M.")
@click.option("--type", "file_type", type=click.Choice(list(FILE_TYPES), case_sensitive=False),
              default=None, help="GGUF file type (llama.cpp's tensor mix for K-quants).")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The .gguf file, or a folder to get <BaseName>-<SizeLabel>-<Type>.gguf.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json [default: <ckpt dir>/../tokenizer.json, then <ckpt dir>/].")
@click.option("--name", "base_name", default=None,
              help="general.name and file-name base [default: the run folder's name].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to quantize; both give the same bytes.")
@click.option("--pre", help="llama.cpp pre-tokenizer name (docs/import.md) [default: the one import "
                            "recorded, else detected from tokenizer.json].")
@json_option
def quantize(checkpoint: Path, q4k: bool, file_type: str | None, out_path: Path,
             tokenizer_path: Path | None, base_name: str | None, device: str, pre: str | None,
             as_json: bool) -> None:
    """Write CHECKPOINT (a weights .apr) as a GGUF, quantized bit-identically to llama.cpp."""
    if q4k and file_type and file_type.upper() != "Q4_K_M":
        raise InputError(f"--q4k and --type {file_type} disagree: give one of them")
    if not q4k and not file_type:
        raise InputError("give --q4k or --type {" + ",".join(FILE_TYPES) + "}")
    result = write_gguf(checkpoint, out_path, "Q4_K_M" if q4k else file_type,
                        tokenizer_path=tokenizer_path, device=device, base_name=base_name, pre=pre)
    emit(result.to_dict(), as_json, lambda _: _render(result))


def _render(result: GgufExport) -> str:
    types = ", ".join(f"{count} {name}" for name, count in result.tensor_types.items())
    rate = result.weights / result.seconds / 1e6 if result.seconds else 0.0
    return (f"{result.path}: GGUF {result.file_type} ({result.architecture}) / "
            f"{result.tensor_count} tensors ({types}) / {result.nbytes / 2**20:.1f} MiB / "
            f"{result.seconds:.1f} s ({rate:.1f}M weights/s)")


commands = [quantize]
