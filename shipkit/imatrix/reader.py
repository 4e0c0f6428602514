"""Read an importance matrix (shipkit's, or llama-imatrix's GGUF or legacy .dat file) into the
per-column weights llama-quantize hands to ggml, every field checked before it is used."""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from shipkit.errors import InputError, IntegrityError
from shipkit.imatrix.format import (
    CALIBRATION_KEY_PREFIX,
    CALIBRATION_KEY_TYPES,
    CALIBRATION_SPLIT,
    CHUNK_COUNT_KEY,
    CHUNK_SIZE_KEY,
    COUNTS_SUFFIX,
    DATASETS_KEY,
    GGUF_MAGIC,
    LEGACY_FLOAT_BYTES,
    LEGACY_INT,
    REQUIRED_KEYS,
    SUMS_SUFFIX,
    split_sha256,
)
from shipkit.quantize.gguf_load import open_gguf
from shipkit.tokenize import read_manifest

# The weights llama-quantize quantizes with an imatrix entry when one exists: every 2-D matrix of
# the decoder layers (llama-imatrix collects each of them; token_embd is looked up, not multiplied).
LAYER_PREFIX = "blk."
SHOWN_NAME_CHARS = 64  # a name quoted in an error stays one readable line


@dataclass
class ImportanceMatrix:
    """An imatrix file, read. `importance` maps a GGUF weight name to the float32 array
    llama-quantize passes to ggml for it: sums / count per matrix, 1.0 where the count is 0."""

    path: Path
    importance: dict[str, np.ndarray]
    calibration: dict[str, Any]  # Calibration's fields; None where the file does not say
    datasets: list[str]  # imatrix.datasets
    chunk_count: int  # imatrix.chunk_count (the legacy trailer's, 0 when absent)
    chunk_size: int  # imatrix.chunk_size (0 in a legacy file)

    def check_model(self, shapes: Mapping[str, tuple[int, ...]], source: str | os.PathLike[str] | None = None
                    ) -> None:
        """Refuse an imatrix for another model: `shapes` (GGUF name -> numpy shape (rows, cols),
        or (n,)) of every tensor the quantized file holds, from `source`. Every entry must name
        one of them with its number of columns, and every decoder matrix must have an entry.
        Raises InputError naming the first tensor that differs."""
        where = str(source) if source is not None else "the model"
        for name in sorted(self.importance):
            if name not in shapes:
                raise InputError(f"{self.path}: an imatrix for another model: tensor {_shown(name)} "
                                 f"is not in {where}")
            columns = _importance_length(shapes[name])
            if self.importance[name].size != columns:
                raise InputError(f"{self.path}: an imatrix for another model: tensor {name} has "
                                 f"{self.importance[name].size} columns, in {where} it has {columns}")
        for name, shape in sorted(shapes.items()):
            if name.startswith(LAYER_PREFIX) and len(shape) >= 2 and name not in self.importance:
                raise InputError(f"{self.path}: an imatrix for another model: no entry for {where}'s "
                                 f"tensor {name}")

    def check_not_val(self, tokens_dir: str | os.PathLike[str]) -> None:
        """Refuse an imatrix that cannot be shown to be computed off the val split of
        `tokens_dir` (the split the parity gate scores): one without shipkit's calibration
        record, or whose calibration split is that val split."""
        val_sha256 = split_sha256(read_manifest(tokens_dir), "val")
        recorded = self.calibration.get("split_sha256")
        if recorded is None:
            raise InputError(f"{self.path}: records no calibration split (not written by `shipkit "
                             f"imatrix`), so it cannot be shown not to be computed on the val split of {tokens_dir}")
        if recorded == val_sha256 or self.calibration.get("split") != CALIBRATION_SPLIT:
            raise InputError(f"{self.path}: computed on the val split of {tokens_dir} (sha256 "
                             f"{val_sha256[:12]}…), the split the parity gate scores; compute it on "
                             "the train split (`shipkit imatrix`)")


def load_imatrix(path: str | os.PathLike[str]) -> ImportanceMatrix:
    """Read a GGUF imatrix (shipkit's or llama-imatrix's) or a legacy .dat one.

    Raises InputError (one line naming the file and, where there is one, the tensor) for a
    missing, truncated or garbled file, a GGUF that is not an imatrix, a sums tensor without its
    counts (or the other way round), shapes that do not match, or a non-finite or negative value.
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read below
            raise InputError(f"{path}: not a regular file, so not an imatrix")
        with open(path, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as error:
        raise InputError(f"{path}: {error.strerror}") from None
    return _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)


def _load_gguf(path: Path) -> ImportanceMatrix:
    try:
        reader = open_gguf(path)
    except IntegrityError as error:  # a garbled file handed in is bad input here
        raise InputError(str(error)) from None
    _check_data_section(reader, path)
    missing = [key for key in REQUIRED_KEYS if key not in reader.fields]
    if missing:
        kind = _value(reader, path, gguf.Keys.General.TYPE, gguf.GGUFValueType.STRING)
        raise InputError(f"{path}: not an importance matrix GGUF (general.type {kind!r}, no {missing[0]} key)")
    datasets = _value(reader, path, DATASETS_KEY, gguf.GGUFValueType.ARRAY)
    chunk_count = _value(reader, path, CHUNK_COUNT_KEY, gguf.GGUFValueType.UINT32)
    chunk_size = _value(reader, path, CHUNK_SIZE_KEY, gguf.GGUFValueType.UINT32)
    pairs: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        for suffix in (SUMS_SUFFIX, COUNTS_SUFFIX):
            if tensor.name.endswith(suffix):
                pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = tensor
    if not pairs:
        raise InputError(f"{path}: an imatrix GGUF with no {SUMS_SUFFIX}/{COUNTS_SUFFIX} tensors")
    importance, max_count = {}, 0.0
    for name, pair in sorted(pairs.items()):
        for suffix, other in ((SUMS_SUFFIX, COUNTS_SUFFIX), (COUNTS_SUFFIX, SUMS_SUFFIX)):
            if suffix not in pair:
                raise InputError(f"{path}: tensor {_shown(name + other)} has no {suffix} tensor beside it")
        sums, counts = (_f32_values(path, pair[suffix]) for suffix in (SUMS_SUFFIX, COUNTS_SUFFIX))
        importance[name] = _normalised(path, name, sums, counts)
        max_count = max(max_count, float(counts.max()))
    calibration = _recorded_calibration(reader, path) or {
        **dict.fromkeys(CALIBRATION_KEY_TYPES), "source": ", ".join(datasets) or None,
        "tokens": int(max_count), "chunks": chunk_count, "ctx": chunk_size}
    return ImportanceMatrix(path, importance, calibration, datasets, chunk_count, chunk_size)


def _check_data_section(reader: gguf.GGUFReader, path: Path) -> None:
    """llama.cpp reads the tensor data as one section (ggml/src/gguf.cpp): each tensor where the
    padded sizes of those before it end, and the last one's padding too, so a file cut anywhere
    in that section is one llama-quantize cannot read."""
    end = reader.data_offset
    for tensor in reader.tensors:
        if tensor.data_offset != end:
            raise InputError(f"{path}: tensor {_shown(tensor.name)} at byte {tensor.data_offset:,}, "
                             f"where llama.cpp reads it at {end:,}")
        end += -(-int(tensor.n_bytes) // reader.alignment) * reader.alignment
    size = path.stat().st_size
    if size < end:
        raise InputError(f"{path}: truncated: its tensor data ends at byte {end:,}, the file at {size:,}")


def _value(reader: gguf.GGUFReader, path: Path, key: str, kind: gguf.GGUFValueType) -> Any:
    """The value of `key` (None if absent) after checking it has type `kind` (ARRAY: of strings,
    or empty, which gguf-py types as a bare ARRAY)."""
    field = reader.fields.get(key)
    if field is None:
        return None
    allowed = ([[kind, gguf.GGUFValueType.STRING], [kind]] if kind == gguf.GGUFValueType.ARRAY else [[kind]])
    if field.types not in allowed:
        shown = "/".join(value_type.name for value_type in field.types)
        raise InputError(f"{path}: key {key} is {shown}, expected {'/'.join(t.name for t in allowed[0])}")
    try:
        value = field.contents()
    except UnicodeDecodeError:
        raise InputError(f"{path}: key {key} is not UTF-8 text") from None
    return list(value) if kind == gguf.GGUFValueType.ARRAY else value


def _recorded_calibration(reader: gguf.GGUFReader, path: Path) -> dict[str, Any] | None:
    """shipkit's calibration record (None if the file has none)."""
    if not any(key.startswith(CALIBRATION_KEY_PREFIX) for key in reader.fields):
        return None
    return {field: _value(reader, path, CALIBRATION_KEY_PREFIX + field, kind)
            for field, kind in CALIBRATION_KEY_TYPES.items()}


def _f32_values(path: Path, tensor: Any) -> np.ndarray:
    if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
        raise InputError(f"{path}: tensor {_shown(tensor.name)} is {tensor.tensor_type.name}; "
                         "an imatrix holds F32 tensors")
    values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if values.size == 0:
        raise InputError(f"{path}: tensor {_shown(tensor.name)} holds no values")
    return values


def _normalised(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """What llama-quantize computes (tools/quantize/quantize.cpp, load_imatrix): per matrix j,
    sums / (float)lround(count_j) in float32, or 1.0 for every column where the count is 0."""
    if sums.size % counts.size:
        raise InputError(f"{path}: tensor {_shown(name)}: {sums.size} sums do not split into "
                         f"{counts.size} matrices (one count each)")
    for suffix, values in ((SUMS_SUFFIX, sums), (COUNTS_SUFFIX, counts)):
        _check_values(path, name + suffix, values)
    # lround of a non-negative float, exact in float64, then the int64 -> float conversion.
    counts = np.floor(counts.astype(np.float64) + 0.5).astype(np.float32)[:, None]
    per_matrix = sums.reshape(counts.size, -1)
    importance = np.ones_like(per_matrix)
    np.divide(per_matrix, counts, out=importance, where=counts > 0)
    return importance.reshape(-1)


def _check_values(path: Path, name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise InputError(f"{path}: tensor {_shown(name)} holds a non-finite value")
    if (values < 0).any():
        raise InputError(f"{path}: tensor {_shown(name)} holds a negative value (sums of squares "
                         "and counts are never negative)")


def _load_legacy(path: Path) -> ImportanceMatrix:
    """llama.cpp's legacy .dat imatrix (layout in shipkit.imatrix.format), read with every
    length checked against the file's size; its values are sum/count × ncall, so llama-quantize
    divides them by ncall (keeps them as they are where ncall is 0)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < LEGACY_INT.size:
            raise InputError(f"{path}: {size} bytes: neither a GGUF nor a legacy imatrix .dat file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(memoryview(data), path)
            try:
                return cursor.read_legacy()
            finally:
                cursor.data.release()


class _Cursor:
    """Reads a legacy .dat file front to back, refusing any read past its end."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.path, self.offset = data, path, 0

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or count > self.remaining():
            raise InputError(f"{self.path}: truncated legacy imatrix: {what} needs {count:,} bytes at byte "
                             f"{self.offset:,}, {self.remaining():,} are left")
        start, self.offset = self.offset, self.offset + count
        return bytes(self.data[start:self.offset])

    def int32(self, what: str) -> int:
        return LEGACY_INT.unpack(self.take(LEGACY_INT.size, what))[0]

    def read_legacy(self) -> ImportanceMatrix:
        entry_count = self.int32("the entry count")
        # an entry takes at least a name length, a 1-byte name, ncall, nval and one value
        if entry_count < 1 or entry_count > self.remaining() // (4 * LEGACY_INT.size + 1):
            raise InputError(f"{self.path}: neither a GGUF nor a legacy imatrix .dat file "
                             f"(it would hold {entry_count:,} entries)")
        importance: dict[str, np.ndarray] = {}
        for index in range(entry_count):
            name = self._name(index)
            if name in importance:
                raise InputError(f"{self.path}: tensor {_shown(name)} appears twice")
            ncall = self.int32(f"ncall of {name}")
            value_count = self.int32(f"the value count of {name}")
            if value_count < 1:
                raise InputError(f"{self.path}: tensor {name}: {value_count} values")
            values = np.frombuffer(self.take(value_count * LEGACY_FLOAT_BYTES, f"the values of {name}"), "<f4")
            _check_values(self.path, name, values)
            importance[name] = (values / np.float32(ncall) if ncall > 0 else values).astype(np.float32)
        chunk_count, datasets = self._trailer()
        calibration = {**dict.fromkeys(CALIBRATION_KEY_TYPES), "source": ", ".join(datasets) or None,
                       "chunks": chunk_count}
        return ImportanceMatrix(self.path, importance, calibration, datasets, chunk_count, 0)

    def _name(self, index: int) -> str:
        length = self.int32(f"the name length of entry {index}")
        if length < 1:
            raise InputError(f"{self.path}: entry {index} has a name of {length} bytes")
        try:
            return self.take(length, f"the name of entry {index}").decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: the name of entry {index} is not UTF-8 text") from None

    def _trailer(self) -> tuple[int, list[str]]:
        """The optional chunk count and dataset name; nothing may follow them."""
        if not self.remaining():
            return 0, []
        chunk_count = self.int32("the chunk count")
        length = self.int32("the dataset name length") if self.remaining() else 0
        dataset = self.take(max(length, 0), "the dataset name").decode("utf-8", "replace")
        if self.remaining():
            raise InputError(f"{self.path}: {self.remaining():,} bytes after the legacy imatrix's end")
        return chunk_count, [dataset] if dataset else []


def _importance_length(shape: tuple[int, ...]) -> int:
    """The importance entries llama-quantize expects for a weight of numpy `shape`: its columns
    times its matrices (ne[0] × ne[2]; one matrix for a 2-D weight)."""
    return int(np.prod(shape[:-2], dtype=np.int64)) * shape[-1] if shape else 0


def _shown(name: str) -> str:
    return name if len(name) <= SHOWN_NAME_CHARS else name[:SHOWN_NAME_CHARS] + "…"
