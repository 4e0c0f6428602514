"""The models the gate compares, as float32 tensors by HF name read on demand: a checkpoint's
tensors as views of its memory map, a GGUF's dequantized from its bytes with Q/K rows put back
in HF's order. Nothing holds a whole model; each tensor is read when asked for."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch

from shipkit.apr import read_apr
from shipkit.config import ModelConfig
from shipkit.errors import InputError
from shipkit.quantize.dequant import dequantize
from shipkit.quantize.formats import QType
from shipkit.quantize.gguf_load import gguf_config, model_tensors, open_gguf
from shipkit.quantize.tensor_names import from_interleaved, rope_heads

CPU = torch.device("cpu")
# Values a GGUF tensor is dequantized in per block: blocks that fit the cache dequantized a
# 58M-weight Q4_K tensor 7x faster than one call on the whole tensor here (2 cores, numpy).
DEQUANT_BLOCK_VALUES = 1 << 18


class ModelWeights(Mapping[str, torch.Tensor], abc.ABC):
    """A model's weights by HF name, as float32 tensors in HF's layout, read from the file each
    time one is asked for and not kept: the mapping costs one tensor at a time, never a model."""

    # Whether reading rows again costs about a copy (a mapped checkpoint), not a dequantization.
    cheap_rows = True

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @abc.abstractmethod
    def load(self, name: str, device: torch.device = CPU) -> torch.Tensor:
        """The whole tensor, float32 on `device`."""

    @abc.abstractmethod
    def rows(self, name: str, index: slice | torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
        """Rows `index` of a 2-D weight whose rows are stored in HF's order (the embedding, the LM
        head), float32 on `device`."""


class AprWeights(ModelWeights):
    """A checkpoint's tensors as views of its memory map: on the CPU an F32 tensor is the view
    itself (no copy), a bf16 one is converted when asked for; on CUDA the stored bytes travel and
    are converted there."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__({name: tuple(tensor.shape) for name, tensor in tensors.items()})
        self._tensors = tensors

    def load(self, name: str, device: torch.device = CPU) -> torch.Tensor:
        return self._tensors[name].to(device).float()

    def rows(self, name: str, index: slice | torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu()
        return self._tensors[name][index].to(device).float()


class GgufWeights(ModelWeights):
    """A GGUF's tensors dequantized to float32 when asked for, a block of rows at a time on a
    thread pool (numpy releases the GIL), with Q/K rows put back in HF's order (arch llama)."""

    cheap_rows = False

    def __init__(self, reader: gguf.GGUFReader, config: ModelConfig, path: Path) -> None:
        tensors = model_tensors(reader, config, path)
        # ggml lists ne0 (the columns) first
        super().__init__({name: tuple(int(size) for size in reversed(t.shape)) for name, t in tensors.items()})
        self._tensors, self._config = tensors, config

    def load(self, name: str, device: torch.device = CPU) -> torch.Tensor:
        tensor = self._tensors[name]
        values = torch.from_numpy(_dequantized(tensor.data, QType(tensor.tensor_type), self.shapes[name]))
        heads = rope_heads(name, self._config)
        return (values if heads is None else from_interleaved(values, heads)).to(device)

    def rows(self, name: str, index: slice | torch.Tensor, device: torch.device = CPU) -> torch.Tensor:
        tensor = self._tensors[name]
        data = tensor.data[index.cpu().numpy() if isinstance(index, torch.Tensor) else index]
        shape = (len(data), self.shapes[name][1])
        return torch.from_numpy(_dequantized(data, QType(tensor.tensor_type), shape)).to(device)


@cache
def _dequant_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="dequantize")


def _dequantized(data: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF tensor bytes -> a new float32 array of `shape`, dequantized a block of rows at a time
    (row by row the values are those of one `dequantize` call on the whole tensor)."""
    out = np.empty(shape, dtype=np.float32)
    if len(shape) != 2:
        out[...] = dequantize(data, qtype, shape)
        return out
    rows, columns = shape
    step = max(1, DEQUANT_BLOCK_VALUES // max(1, columns))

    def fill(start: int) -> None:
        stop = min(start + step, rows)
        out[start:stop] = dequantize(data[start:stop], qtype, (stop - start, columns))

    list(_dequant_pool().map(fill, range(0, rows, step)))
    return out


@dataclass
class LoadedModel:
    path: Path
    format: str  # "apr" or "gguf"
    config: ModelConfig
    weights: ModelWeights  # read when asked for
    tokenizer_sha256: str | None = None


def load_model_file(path: str | Path) -> LoadedModel:
    """An `.apr` weights file or a GGUF, checked and mapped; its weights (float32, HF names) are
    read, and dequantized, only when asked for."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix == ".apr":
        checkpoint = read_apr(path)
        if checkpoint.metadata.get("kind") != "weights" or checkpoint.config is None:
            raise InputError(f"{path}: not a weights checkpoint with a model config (give an epoch or best .apr)")
        tokenizer = checkpoint.metadata.get("tokenizer") or {}
        return LoadedModel(path, "apr", checkpoint.config, AprWeights(checkpoint.tensors), tokenizer.get("sha256"))
    if path.suffix == ".gguf":
        reader = open_gguf(path)
        config = gguf_config(reader, path)
        return LoadedModel(path, "gguf", config, GgufWeights(reader, config, path))
    raise InputError(f"{path}: expected an .apr or .gguf file")

