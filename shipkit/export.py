"""Export an APR checkpoint as a Hugging Face model folder that transformers loads as is.

The folder holds `config.json` (`ModelConfig.to_hf`, which transformers v4 and v5 both read), the weights as
`model.safetensors` (or shards plus `model.safetensors.index.json`), the tokenizer files and
`generation_config.json`. An imported model's tokenizer files (tokenizer_config.json with its chat
template, special_tokens_map.json, chat_template.jinja) are written back as they came. Tensor names
are already HF's (see `shipkit.model`), so the weights are copied byte for byte in the checkpoint's
dtype (or converted to `dtype`), streamed one tensor at a time from the memory-mapped checkpoint.
The folder is written whole beside OUT_DIR and swapped in when complete, so a kill or a full disk
mid-export leaves the previous export loadable. Format details: docs/release.md.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from shipkit.apr import AprCheckpoint, read_apr
from shipkit.apr.convert import write_safetensors
from shipkit.apr.format import CONVERSION_DTYPES
from shipkit.errors import InputError
from shipkit.fsutil import (
    atomic_write,
    check_folder_target,
    is_temp_name,
    replaced_folder,
    write_json,
)
from shipkit.layout import TOKENIZER_FILE, find_tokenizer
from shipkit.tokenizer_contract import (
    CARRIED_FILES,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
)

# transformers' own save_pretrained default shard limit ("5GB", decimal).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Every name an export may write; an earlier export's files under these names are not carried over.
EXPORT_FILE_NAMES = frozenset({CONFIG_FILE, GENERATION_CONFIG_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX,
                               TOKENIZER_FILE, *CARRIED_FILES, SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE})


@dataclass
class ExportReport:
    out_dir: Path
    files: list[str]
    shards: int
    tensor_count: int
    total_bytes: int  # tensor bytes over all shards (the index's metadata.total_size)
    dtype: str  # the weights' dtype, as config.json names it ("bfloat16")

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "files": self.files, "shards": self.shards,
                "tensors": self.tensor_count, "tensor_bytes": self.total_bytes, "dtype": self.dtype}


def export_hf(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    keep_other_files: bool = True,
    dtype: torch.dtype | None = None,
) -> ExportReport:
    """Write `out_dir` as an HF folder from the APR weights file `ckpt_path`, the weights in
    `dtype` (default: the checkpoint's own, which must then be one dtype).

    The tokenizer is `tokenizer_path` or the one the APR metadata names, found beside the
    checkpoint and then in its parent (`shipkit.layout.find_tokenizer`, as quantize finds it); its
    sha256 must equal the one recorded in the checkpoint. The new folder replaces `out_dir` only
    once complete (shipkit.fsutil.replaced_folder); files of an existing `out_dir` that export
    does not write (a README.md, a .git) are kept unless `keep_other_files` is False.
    Raises InputError for a missing file, a non-weights checkpoint, mixed weight dtypes without
    `dtype` or an `out_dir` that is a file, IntegrityError for a corrupt checkpoint, a
    mismatched tokenizer or a full disk.
    """
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    if max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
    check_folder_target(out_dir, "out_dir")
    checkpoint = read_apr(ckpt_path)
    if checkpoint.metadata.get("kind") != "weights" or checkpoint.config is None:
        raise InputError(f"{ckpt_path}: not a weights checkpoint with a model config (kind "
                         f"{checkpoint.metadata.get('kind')!r}); export best.apr or epoch-NNN.apr")
    tokenizer_src = find_tokenizer(ckpt_path, checkpoint.metadata, tokenizer_path)
    dtype = dtype or _common_dtype(checkpoint.tensors, ckpt_path)
    with replaced_folder(out_dir) as staging:
        files, total_bytes = _write_folder(checkpoint, tokenizer_src, dtype, staging, max_shard_bytes)
        if keep_other_files:
            _keep_other_files(out_dir, staging)
    shards = sum(name.endswith(".safetensors") for name in files)
    return ExportReport(out_dir=out_dir, files=sorted(files), shards=shards,
                        tensor_count=len(checkpoint.tensors), total_bytes=total_bytes,
                        dtype=dtype_name(dtype))


def _write_folder(checkpoint: AprCheckpoint, tokenizer_src: Path, dtype: torch.dtype, folder: Path,
                  max_shard_bytes: int) -> tuple[list[str], int]:
    """Every file of the export into the empty `folder`; returns (file names, tensor bytes)."""
    config = checkpoint.config
    tokenizer = Tokenizer.from_file(str(tokenizer_src))
    bos, eos = _token_text(tokenizer, config.bos_token_id), _token_text(tokenizer, config.eos_token_id)
    weight_files, total_bytes = _write_weights(checkpoint.tensors, dtype, folder, max_shard_bytes)
    write_json(folder / CONFIG_FILE, config.to_hf(dtype_name(dtype)))
    write_json(folder / GENERATION_CONFIG_FILE, {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.eos_token_id,
    })
    carried = [TOKENIZER_FILE, *(name for name in CARRIED_FILES
                                 if name != TOKENIZER_FILE and (tokenizer_src.parent / name).is_file())]
    for name in carried:
        source = tokenizer_src if name == TOKENIZER_FILE else tokenizer_src.parent / name
        payload = source.read_bytes()
        with atomic_write(folder / name, "wb", size=len(payload)) as handle:
            handle.write(payload)
    if TOKENIZER_CONFIG_FILE not in carried:
        # A tokenizer shipkit trained: describe it as the tokens stage uses it (no BOS, EOT-separated).
        special = {"bos_token": bos, "eos_token": eos, "pad_token": eos, "unk_token": eos}
        write_json(folder / SPECIAL_TOKENS_MAP_FILE, special)
        write_json(folder / TOKENIZER_CONFIG_FILE, {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **special,
        })
        carried += [SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE]
    return [CONFIG_FILE, GENERATION_CONFIG_FILE, *weight_files, *sorted(set(carried))], total_bytes


def _keep_other_files(old_dir: Path, new_dir: Path) -> None:
    """Carry what an existing OUT_DIR holds besides export's own files into the new folder, as
    hard links (a copy across file systems); an earlier export's own files are left behind."""
    if not old_dir.is_dir():
        return
    for entry in old_dir.iterdir():
        if entry.name in EXPORT_FILE_NAMES or SHARD_NAME.fullmatch(entry.name) or is_temp_name(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new_dir / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new_dir / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new_dir / entry.name)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _write_weights(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, out_dir: Path, max_shard_bytes: int
) -> tuple[list[str], int]:
    """Greedy sharding in checkpoint order (a tensor larger than the limit gets a shard alone),
    each shard streamed tensor by tensor (`shipkit.apr.convert.write_safetensors`)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
    if len(shards) == 1:
        return [SAFETENSORS_FILE], _write_shard(out_dir / SAFETENSORS_FILE, shards[0], dtype)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {}
    total_bytes = 0
    for name, shard in zip(names, shards):
        total_bytes += _write_shard(out_dir / name, shard, dtype)
        weight_map |= {tensor_name: name for tensor_name in shard}
    write_json(out_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    return [*names, SAFETENSORS_INDEX], total_bytes


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    # transformers refuses safetensors without {"format": "pt"} metadata.
    return write_safetensors(path, tensors, {"format": "pt"}, dtype=dtype)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    text = tokenizer.id_to_token(token_id)
    if text is None:
        raise InputError(f"tokenizer: has no token with id {token_id} (the config's bos/eos id)")
    return text


def _common_dtype(tensors: dict[str, torch.Tensor], where: Path) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        names = sorted(map(dtype_name, dtypes))
        raise InputError(f"{where}: mixed floating dtypes {names}; config.json names one, so pass "
                         f"dtype ({', '.join(CONVERSION_DTYPES)})")
    return dtypes.pop()


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype, as config.json's `torch_dtype` spells it ("bfloat16")."""
    return str(dtype).removeprefix("torch.")
