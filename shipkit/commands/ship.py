"""`shipkit ship`: the whole release in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from shipkit.commands.common import emit, json_option


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="A ship TOML (examples/ship.toml). Default: the embedded tiny release on the stdlib corpus.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: ship-out, or the config's [ship] out).")
@click.option("--repo", default=None, help="Push the default model to ORG/NAME (with a token); else a dry run.")
@click.option("--gguf-repo", default=None, help="The GGUF repo of the default model (default: REPO-GGUF).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device of the default model's training, quantization and parity.")
@click.option("--allow-failed-gates", is_flag=True, help="Release even when a gate failed; the card states the waiver.")
@json_option
def ship(config_path: Path | None, out: Path | None, repo: str | None, gguf_repo: str | None, device: str,
         allow_failed_gates: bool, as_json: bool) -> None:
    """Corpus → tokens → train/import → validate → export → quantize → parity → card → gates → push."""
    from shipkit.ship import DEFAULT_OUT, default_config, load_ship_config
    from shipkit.ship import ship as run_ship

    if config_path is not None:
        config = load_ship_config(config_path)
        if out is not None:
            config.out = out
    else:
        config = default_config(out or DEFAULT_OUT, repo=repo, gguf_repo=gguf_repo,
                                push=repo is not None and _have_token(), device=device)
    config.allow_failed_gates = config.allow_failed_gates or allow_failed_gates
    report = run_ship(config, log=lambda line: click.echo(line, err=as_json))
    result = {model.name: {"run_dir": str(model.run_dir), **model.summary} for model in report.models}
    emit(result, as_json, _render)


def _have_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _render(result: dict[str, Any]) -> str:
    lines = []
    for name, model in result.items():
        lines.append(f"\n== {name} ({model['run_dir']})")
        if model["best_val_loss"] is not None:
            lines.append(f"best val loss {model['best_val_loss']:.4f}, memorization {model['memorization']}")
        parity = model["parity"]
        lines.append(f"parity {parity['verdict']}: KL mean {parity['kl_mean']:.5f}, "
                     f"same top-1 {parity['same_top_pct']:.2f}%, PPL ratio {parity['ppl_ratio']:.4f}")
        lines.append(f"gates: {model['gates']}")
        lines += [f"  {gate['status']} {gate['id']}: {gate['detail']}" for gate in model["gates_open"]]
        lines.append(f"push: {model['push']}")
        names = [f"{file['repo']}/{file['path']}" for file in model["files"]]
        width = max(map(len, names), default=0)
        for name, file in zip(names, model["files"]):
            lines.append(f"  {name:<{width}}  {file['size']:>12,} B  sha256 {file['sha256']}")
    return "\n".join(lines).lstrip("\n")


commands = [ship]
