"""`shipkit imatrix`: the importance matrix of a checkpoint on the train split, in llama.cpp's format."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from shipkit.commands.common import emit, flag_spelling, json_option
from shipkit.imatrix.options import DEFAULT_CTX, DEFAULT_N_TOKENS

if TYPE_CHECKING:
    from shipkit.imatrix import ImatrixResult


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--tokens", "tokens_dir", type=click.Path(path_type=Path), required=True,
              help="Token folder; only its train split is read (the parity gate scores val).")
@click.option("--n-tokens", type=int, default=DEFAULT_N_TOKENS, show_default=True,
              help="Train tokens to run, from the split's start (rounded down to whole chunks).")
@click.option("--ctx", type=int, default=DEFAULT_CTX, show_default=True,
              help="Chunk length; each chunk is run on its own, as llama-imatrix's -c.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the model runs.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True,
              help="The imatrix .gguf to write (its calibration record goes beside it as .json).")
@json_option
def imatrix(checkpoint: Path, tokens_dir: Path, n_tokens: int, ctx: int, device: str, out_path: Path,
            as_json: bool) -> None:
    """Write the importance matrix of CHECKPOINT (a weights .apr) for `llama-quantize --imatrix`
    and `shipkit quantize --imatrix`."""
    from shipkit.imatrix import compute_imatrix

    with flag_spelling(out_path="--out", ctx="--ctx", n_tokens="--n-tokens", device="--device"):
        result = compute_imatrix(checkpoint, tokens_dir, out_path, n_tokens=n_tokens, ctx=ctx, device=device)
    emit(result, as_json, _render)


def _render(result: ImatrixResult) -> str:
    calibration = result.calibration
    return (f"{result.path}: imatrix of {result.tensor_count} tensors / {calibration.chunks} chunks "
            f"x {calibration.ctx} = {calibration.tokens:,} train tokens (sha256 "
            f"{calibration.tokens_sha256[:12]}…) / {result.seconds:.1f} s on {result.device}; "
            f"calibration record {result.evidence_path}")


commands = [imatrix]
