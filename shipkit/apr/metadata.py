"""What an APR file's metadata claims, checked against itself and the tensor table: its kind,
model config (a weights file's tensors must be exactly that model's), tokenizer and producer
records."""

from __future__ import annotations

from typing import Any

from shipkit.apr import format as fmt
from shipkit.apr.index import AprIndex, TensorInfo
from shipkit.config import ModelConfig, shown, weight_shapes
from shipkit.errors import IntegrityError, ShipkitError


def metadata_problems(index: AprIndex, expect_tensors: int | None) -> list[str]:
    """What the metadata claims, checked against itself and the tensor table, so that no later
    stage divides by, allocates for, or opens a path from a lie that the checksums cover."""
    problems = []
    metadata = index.metadata
    kind = metadata.get("kind")
    if kind not in fmt.KINDS:
        problems.append(f"metadata kind: {shown(kind)} is not one of {', '.join(fmt.KINDS)}")
    config, config_problem = _config_of(metadata)
    if config_problem:
        problems.append(config_problem)
    if kind == "weights" and config is not None:
        problems += _weights_problems(index.tensors, config)
    problems += [problem for problem in (_tokenizer_problem(metadata), _producer_problem(metadata))
                 if problem]
    count = len(index.tensors)
    if expect_tensors is not None and count != expect_tensors:
        problems.append(f"tensor count: expected {expect_tensors} tensors, file has {count}")
    return problems


def _config_of(metadata: dict[str, Any]) -> tuple[ModelConfig | None, str | None]:
    """(the metadata's model config or None if it has none, the reason it does not construct)."""
    config = metadata.get("config")
    if config is None:
        return None, None
    try:
        return ModelConfig.from_dict(config), None
    except ShipkitError as error:
        return None, f"metadata config: invalid ({error})"


def _weights_problems(tensors: list[TensorInfo], config: ModelConfig) -> list[str]:
    """The tensors are exactly the config's model's weights: names, shapes and a floating dtype."""
    expected = weight_shapes(config)
    if len(tensors) != len(expected):
        return [f"tensor count: the config implies {len(expected)} tensors, file has {len(tensors)}"]
    problems = []
    for info in tensors:
        if info.name not in expected:
            problems.append(f"tensor {info.name}: not a weight of the config's {config.architecture} model")
        elif info.shape != expected[info.name]:
            problems.append(f"tensor {info.name}: shape {list(info.shape)}, the config implies "
                            f"{list(expected[info.name])}")
        elif info.dtype not in fmt.WEIGHT_DTYPES:
            problems.append(f"tensor {info.name}: dtype {info.dtype} is not a weight dtype "
                            f"({', '.join(fmt.WEIGHT_DTYPES)})")
    return problems


NOT_RECORDED = (None, "")  # a tokenizer sha256 left out (readers then skip the comparison)


def _tokenizer_problem(metadata: dict[str, Any]) -> str | None:
    recorded = metadata.get("tokenizer")
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        return f"metadata tokenizer: expected an object, got {shown(recorded)}"
    name = recorded.get("file", fmt.DEFAULT_TOKENIZER_FILE)
    why = fmt.file_name_problem(name)
    if why:
        return (f"metadata tokenizer.file: {shown(name)} {why} (a plain file name, looked up "
                "beside the checkpoint and in its parent)")
    digest = recorded.get("sha256")
    if digest not in NOT_RECORDED and not (isinstance(digest, str) and len(digest) == fmt.SHA256_HEX_CHARS
                                           and not digest.strip("0123456789abcdef")):
        return f"metadata tokenizer.sha256: {shown(digest)} is not {fmt.SHA256_HEX_CHARS} lowercase hex digits"
    pre = recorded.get("pre")  # llama.cpp's pre-tokenizer name, recorded by import
    if pre is not None and not isinstance(pre, str):
        return f"metadata tokenizer.pre: expected a name, got {shown(pre)}"
    return None


def _producer_problem(metadata: dict[str, Any]) -> str | None:
    producer = metadata.get("producer")
    if producer is None:
        return None
    if not isinstance(producer, dict):
        return f"metadata producer: expected an object, got {shown(producer)}"
    # An import records its upstream as an object, `shipkit convert` the source file's name.
    if not isinstance(producer.get("source", {}), (dict, str)):
        return f"metadata producer.source: expected an object or a name, got {shown(producer['source'])}"
    return None


def checked_tokenizer_name(metadata: dict[str, Any]) -> str:
    """The tokenizer file name a checkpoint's metadata records (`tokenizer.json` if none): a
    plain file name, to be looked up beside the checkpoint and in its parent only. Raises
    IntegrityError for a path (`/`, `..`) or a malformed `tokenizer` entry."""
    problem = _tokenizer_problem(metadata)
    if problem:
        raise IntegrityError(problem)
    return (metadata.get("tokenizer") or {}).get("file", fmt.DEFAULT_TOKENIZER_FILE)
