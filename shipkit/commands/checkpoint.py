"""`shipkit validate`, `shipkit inspect`, `shipkit convert`: the APR checkpoint commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from shipkit.commands.common import emit, json_option
from shipkit.config import WEIGHT_DTYPE_NAMES
from shipkit.errors import IntegrityError

if TYPE_CHECKING:
    from shipkit.apr import AprIndex, ValidationReport
    from shipkit.apr.convert import ConversionReport

GIB = 1 << 30


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--expect-tensors", type=click.IntRange(min=0), default=None,
              help="Fail unless the file holds exactly this many tensors.")
@json_option
def validate(file: Path, expect_tensors: int | None, as_json: bool) -> None:
    """Check every byte of an APR checkpoint; exit 1 and name each defect if any."""
    from shipkit.apr import validate_apr

    report = validate_apr(file, expect_tensors=expect_tensors)
    emit(report, as_json, _render_report)
    if not report.ok:
        more = len(report.problems) - 1
        raise IntegrityError(f"{file.name}: INVALID: {report.problems[0]}"
                             + (f" (and {more} more problem(s), listed above)" if more else ""))


def _render_report(report: ValidationReport) -> str:
    name = report.path.name
    if report.ok:
        return (f"{name}: APR v{report.version} / {report.tensor_count} tensors / "
                f"{report.nbytes / GIB:.2f} GiB / checksum VALID")
    return "\n".join(f"{name}: {problem}" for problem in report.problems)


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_option
def inspect(file: Path, as_json: bool) -> None:
    """Show an APR checkpoint's metadata and tensor table (name, dtype, shape, bytes)."""
    from shipkit.apr import inspect_apr

    emit(inspect_apr(file), as_json, _render_index)


def _render_index(index: AprIndex) -> str:
    lines = [f"{index.path.name}: APR v{index.version} / {len(index.tensors)} tensors / "
             f"{index.file_size} bytes / root digest {index.root_digest:016x}"]
    for key, value in sorted(index.metadata.items()):
        lines.append(f"  {key}: {json.dumps(value, sort_keys=True)}")
    width = max((len(info.name) for info in index.tensors), default=4)
    lines.append(f"  {'name':<{width}}  {'dtype':<5}  {'shape':<20}  bytes")
    for info in index.tensors:
        shape = "x".join(map(str, info.shape)) or "scalar"
        lines.append(f"  {info.name:<{width}}  {info.dtype:<5}  {shape:<20}  {info.nbytes}")
    return "\n".join(lines)


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("destination", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="JSON ModelConfig to store in the APR metadata (safetensors has none).")
@click.option("--dtype", type=click.Choice(WEIGHT_DTYPE_NAMES), default=None,
              help="Store every floating-point tensor in this dtype [default: each keeps its own].")
def convert(source: Path, destination: Path, config_path: Path | None, dtype: str | None) -> None:
    """Convert between safetensors and APR, by file extension (.safetensors / .apr), tensor by tensor."""
    from shipkit.apr.convert import convert_checkpoint
    from shipkit.apr.format import CONVERSION_DTYPES

    report = convert_checkpoint(source, destination, config_path=config_path,
                                dtype=None if dtype is None else CONVERSION_DTYPES[dtype])
    emit(report, as_json=False, render=_render_conversion)


def _render_conversion(report: ConversionReport) -> str:
    return f"{report.source.name} -> {report.destination.name}: {report.tensor_count} tensors"


commands = [validate, inspect, convert]
