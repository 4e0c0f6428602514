"""Write an importance matrix in llama.cpp's GGUF imatrix format, atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

from shipkit.fsutil import (
    check_file_target,
    write_gguf_atomically,
)
from shipkit.imatrix.format import (
    CALIBRATION_KEY_PREFIX,
    CALIBRATION_KEY_TYPES,
    CHUNK_COUNT_KEY,
    CHUNK_SIZE_KEY,
    COUNTS_SUFFIX,
    DATASETS_KEY,
    IMATRIX_TYPE,
    SUMS_SUFFIX,
    Calibration,
)


def write_imatrix_file(path: Path, sums: Mapping[str, np.ndarray], count: int, calibration: Calibration) -> None:
    """`sums` (GGUF weight name -> (n_cols,) sums of squared inputs) and the `count` of tokens
    behind every one of them, as llama-imatrix lays them out: names in byte order, each
    `NAME.in_sum2` (1, n_cols) then `NAME.counts` (1, 1), both F32. Written through a temp file
    beside `path` and renamed over it, so a failed write leaves any previous file whole."""
    check_file_target(path, "path")
    writer = gguf.GGUFWriter(None, arch="")  # no general.architecture: llama-imatrix writes none
    writer.add_type(IMATRIX_TYPE)
    writer.add_array(DATASETS_KEY, [calibration.dataset_name()])
    writer.add_uint32(CHUNK_COUNT_KEY, calibration.chunks)
    writer.add_uint32(CHUNK_SIZE_KEY, calibration.ctx)
    for field, value in calibration.to_dict().items():
        if value is not None:
            writer.add_key_value(CALIBRATION_KEY_PREFIX + field, value, CALIBRATION_KEY_TYPES[field])
    for name in sorted(sums):
        writer.add_tensor(name + SUMS_SUFFIX, np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
        writer.add_tensor(name + COUNTS_SUFFIX, np.full((1, 1), count, dtype=np.float32))

    def write_body() -> None:
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()

    write_gguf_atomically(writer, path, write_body, path.name)
