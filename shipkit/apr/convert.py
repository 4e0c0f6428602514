"""safetensors <-> APR conversion, so existing weights can be checked and carried.

safetensors holds only string metadata; the APR metadata travels through it as one JSON string
under `METADATA_KEY`, so APR -> safetensors -> APR keeps it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch

from shipkit import __version__
from shipkit.apr.reader import read_apr
from shipkit.apr.writer import write_apr
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import atomic_write
from shipkit.model import ModelConfig

METADATA_KEY = "shipkit.apr_metadata"
APR_SUFFIX = ".apr"
SAFETENSORS_SUFFIX = ".safetensors"


def convert_checkpoint(source: str | os.PathLike[str], destination: str | os.PathLike[str], *,
                       config_path: str | os.PathLike[str] | None = None) -> int:
    """Convert `source` to `destination` by their extensions (.safetensors <-> .apr); return the
    tensor count. `config_path` (a ModelConfig JSON) replaces the metadata's `config`."""
    source, destination = Path(source), Path(destination)
    direction = (source.suffix, destination.suffix)
    if direction not in {(SAFETENSORS_SUFFIX, APR_SUFFIX), (APR_SUFFIX, SAFETENSORS_SUFFIX)}:
        raise InputError(f"convert: {source.name} -> {destination.name}: give one .safetensors "
                         "and one .apr file")
    if not source.is_file():
        raise InputError(f"{source}: no such file")
    if source.suffix == APR_SUFFIX:
        checkpoint = read_apr(source)
        tensors, metadata = checkpoint.tensors, checkpoint.metadata
    else:
        tensors, metadata = _read_safetensors(source)
    if config_path is not None:
        metadata = {**metadata, "config": load_config(config_path).to_dict()}
    if destination.suffix == APR_SUFFIX:
        write_apr(destination, tensors, metadata)
    else:
        encoded = safetensors.torch.save(
            dict(tensors), metadata={"format": "pt", METADATA_KEY: json.dumps(metadata)}
        )
        with atomic_write(destination, "wb") as handle:
            handle.write(encoded)
    return len(tensors)


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    """A ModelConfig from a JSON file of its fields (`ModelConfig.to_dict()`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise InputError(f"{path}: no such file") from error
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: must hold a JSON object of ModelConfig fields")
    return ModelConfig.from_dict(data)


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            stored = handle.metadata() or {}
    except (safetensors.SafetensorError, OSError) as error:
        raise IntegrityError(f"{path.name}: not a readable safetensors file ({error})") from error
    if METADATA_KEY in stored:
        try:
            return tensors, json.loads(stored[METADATA_KEY])
        except ValueError as error:
            raise IntegrityError(f"{path.name}: metadata {METADATA_KEY} is not JSON") from error
    return tensors, {"kind": "weights",
                     "producer": {"shipkit_version": __version__, "source": path.name}}
