"""Compute an importance matrix: run a checkpoint over the train split of a tokens folder and
sum, per input column of every decoder matrix, the squared input activations.

What llama.cpp's llama-imatrix does for a text (tools/imatrix/imatrix.cpp), on shipkit's token
stream instead: the split's tokens in order, cut into `ctx`-token chunks (a partial last chunk is
dropped), each chunk run on its own from position 0 with its first token replaced by BOS when the
tokenizer adds one, every token of every chunk counted. The matrices are those llama-imatrix
collects by default: each decoder layer's attn_q/k/v/output and ffn_gate/up/down; not
output.weight, which it leaves out unless told `--process-output`, and not token_embd, which is
looked up rather than multiplied.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shipkit.apr import AprCheckpoint, read_apr
from shipkit.config import EMBEDDING_WEIGHT, LAYER_PREFIX, ModelConfig
from shipkit.device import resolve_device
from shipkit.errors import InputError, IntegrityError
from shipkit.fsutil import check_file_target, sha256_file, write_json
from shipkit.imatrix.format import CALIBRATION_SPLIT, Calibration, split_sha256
from shipkit.imatrix.options import DEFAULT_CTX, DEFAULT_N_TOKENS, check_sizes
from shipkit.imatrix.writer import write_imatrix_file
from shipkit.layout import TOKENIZER_FILE
from shipkit.model import decoder_layer, rope_tables
from shipkit.quantize.tensor_names import gguf_name
from shipkit.tokenize import (
    MANIFEST_NAME,
    REENCODE,
    read_manifest,
    read_tokens,
)
from shipkit.tokenizer_contract import read_contract

BATCH_TOKENS = 8192  # tokens per forward: bounds the activations a layer holds at once
# tokens whose residual stream is held while the layers stream past (256 MiB at d = 1024,
# 1 GiB at d = 4096); the weights are read once per group
GROUP_TOKENS = 1 << 16
FILE_SUFFIX = ".gguf"


@dataclass
class ImatrixResult:
    path: Path
    evidence_path: Path  # the calibration record and result as JSON, beside the file
    calibration: Calibration
    tensor_count: int
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "evidence_path": str(self.evidence_path),
                "calibration": self.calibration.to_dict(), "tensor_count": self.tensor_count,
                "device": self.device, "seconds": round(self.seconds, 3)}


def compute_imatrix(checkpoint: str | Path, tokens_dir: str | Path, out_path: str | Path, *,
                    n_tokens: int = DEFAULT_N_TOKENS, ctx: int = DEFAULT_CTX, device: str = "cpu"
                    ) -> ImatrixResult:
    """Write the importance matrix of `checkpoint` (a weights .apr) on the first `n_tokens` of
    the train split of `tokens_dir` (whole `ctx`-token chunks) to `out_path` (.gguf), and its
    calibration record to the .json beside it.

    Raises InputError for bad sizes, a checkpoint that is not a weights file, a tokens folder of
    another tokenizer or too few tokens; IntegrityError for a corrupt checkpoint or token shard.
    """
    started = time.perf_counter()
    out_path, tokens_dir = Path(out_path), Path(tokens_dir)
    _check_request(out_path, n_tokens, ctx)
    target = resolve_device(device)
    apr = _weights_checkpoint(Path(checkpoint))
    config = apr.config
    assert config is not None  # _weights_checkpoint refuses a file without one
    manifest = read_manifest(tokens_dir)
    _check_tokens_fit(apr, config, manifest, tokens_dir, ctx)
    bos_id = _chunk_bos(apr, config, tokens_dir)
    chunks = calibration_chunks(tokens_dir, manifest, n_tokens, ctx, bos_id)
    sums = column_sums(config, apr.tensors, torch.from_numpy(chunks), target)
    calibration = Calibration(
        source=tokens_dir.resolve().name, manifest_sha256=sha256_file(tokens_dir / MANIFEST_NAME),
        split=CALIBRATION_SPLIT, split_sha256=split_sha256(manifest, CALIBRATION_SPLIT),
        train_sha256=split_sha256(manifest, "train"), val_sha256=split_sha256(manifest, "val"),
        tokens=int(chunks.size), chunks=len(chunks), ctx=ctx,
        tokens_sha256=hashlib.sha256(chunks.astype("<u4").tobytes()).hexdigest(), bos_id=bos_id)
    write_imatrix_file(out_path, sums, int(chunks.size), calibration)
    result = ImatrixResult(out_path, out_path.with_suffix(".json"), calibration, len(sums), target.type,
                           time.perf_counter() - started)
    write_json(result.evidence_path, result.to_dict())
    return result


def _check_request(out_path: Path, n_tokens: int, ctx: int) -> None:
    if out_path.suffix != FILE_SUFFIX:
        raise InputError(f"out_path {out_path}: give a {FILE_SUFFIX} file (its calibration record "
                         "is written beside it as .json)")
    check_file_target(out_path, "out_path")
    check_sizes(n_tokens, ctx)


def _weights_checkpoint(path: Path) -> AprCheckpoint:
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    checkpoint = read_apr(path)
    if checkpoint.metadata.get("kind") != "weights" or checkpoint.config is None:
        raise InputError(f"{path}: not a weights checkpoint with a model config (give an epoch or best .apr)")
    return checkpoint


def _check_tokens_fit(apr: AprCheckpoint, config: ModelConfig, manifest: dict[str, Any],
                      tokens_dir: Path, ctx: int) -> None:
    recorded = (apr.metadata.get("tokenizer") or {}).get("sha256")
    if recorded and recorded != manifest["tokenizer"]["sha256"]:
        raise InputError(f"{tokens_dir}: tokenized with a different tokenizer than {apr.path} was trained with")
    if manifest["vocab_size"] > config.vocab_size:
        raise InputError(f"{tokens_dir}: token ids up to {manifest['vocab_size'] - 1}, beyond the "
                         f"{config.vocab_size}-token vocabulary of {apr.path}")
    if ctx > config.max_position_embeddings:
        raise InputError(f"ctx {ctx}: longer than the {config.max_position_embeddings} positions "
                         f"of {apr.path}")


def _chunk_bos(apr: AprCheckpoint, config: ModelConfig, tokens_dir: Path) -> int | None:
    """The BOS llama.cpp writes over each chunk's first token, None where the tokenizer adds no
    BOS (shipkit's own tokenizer, Qwen2's): add_bos_token as the GGUF will carry it."""
    pre = (apr.metadata.get("tokenizer") or {}).get("pre")  # import's --pre, for this same tokenizer
    contract = read_contract(tokens_dir / TOKENIZER_FILE, pre=pre, model_config=config.to_dict())
    return contract.bos_id if contract.add_bos else None


def calibration_chunks(tokens_dir: Path, manifest: dict[str, Any], n_tokens: int, ctx: int,
                       bos_id: int | None) -> np.ndarray:
    """(chunks, ctx) int64: the first whole chunks of the train split within `n_tokens`, each
    first token replaced by `bos_id` if given. Each shard read is checked against the
    manifest's sha256 first, so the recorded split hash vouches for these very tokens."""
    split = read_tokens(tokens_dir, CALIBRATION_SPLIT)
    chunk_count = min(n_tokens, split.total_tokens) // ctx
    if chunk_count == 0:
        raise InputError(f"{tokens_dir}: the {CALIBRATION_SPLIT} split has {split.total_tokens:,} tokens, "
                         f"fewer than one chunk of ctx {ctx}")
    wanted, pieces = chunk_count * ctx, []
    for entry, shard in zip(manifest["splits"][CALIBRATION_SPLIT]["shards"], split.shards, strict=True):
        if wanted == 0:
            break
        if sha256_file(tokens_dir / entry["file"]) != entry["sha256"]:
            raise IntegrityError(f"{tokens_dir / entry['file']}: sha256 differs from {MANIFEST_NAME}'s; {REENCODE}")
        pieces.append(np.asarray(shard[:wanted], dtype=np.int64))
        wanted -= len(pieces[-1])
    chunks = np.concatenate(pieces).reshape(chunk_count, ctx)
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks


def column_sums(config: ModelConfig, weights: dict[str, torch.Tensor], chunks: torch.Tensor,
                device: torch.device) -> dict[str, np.ndarray]:
    """GGUF weight name -> float64 (n_cols,): over every token of `chunks` (n, ctx), the sum of
    the squared input of that decoder matrix, from forward hooks on the layers' nn.Linear.

    The model runs in float32 one decoder layer at a time, as the parity gate's torch engine
    does: a group of chunks goes through layer 0, then layer 1, ..., so memory holds one layer's
    weights and one group's residual stream, never the whole model.
    """
    sums: dict[str, torch.Tensor] = {}
    group = max(1, GROUP_TOKENS // chunks.shape[1])
    for start in range(0, len(chunks), group):
        _run_layers(config, weights, chunks[start:start + group], device, sums)
    return {name: total.cpu().numpy() for name, total in sums.items()}


def _run_layers(config: ModelConfig, weights: dict[str, torch.Tensor], chunks: torch.Tensor,
                device: torch.device, sums: dict[str, torch.Tensor]) -> None:
    batch = max(1, BATCH_TOKENS // chunks.shape[1])
    cos, sin = rope_tables(config, chunks.shape[1], device)
    hidden = weights[EMBEDDING_WEIGHT][chunks].to(device=device, dtype=torch.float32)  # (n, ctx, d)
    for index in range(config.num_hidden_layers):
        prefix = LAYER_PREFIX.format(index=index)
        layer = decoder_layer(config, {name[len(prefix):]: tensor.to(device=device, dtype=torch.float32)
                                       for name, tensor in weights.items() if name.startswith(prefix)})
        hooks = [_summing_hook(module, sums, _gguf_weight_name(prefix + module_name))
                 for module_name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        with torch.no_grad():
            for start in range(0, len(hidden), batch):
                hidden[start:start + batch] = layer(hidden[start:start + batch], cos, sin)
        for hook in hooks:
            hook.remove()


def _gguf_weight_name(module_path: str) -> str:
    name = gguf_name(module_path + ".weight")
    assert name is not None, module_path  # every nn.Linear of a DecoderLayer has a GGUF name
    return name


def _summing_hook(module: nn.Linear, sums: dict[str, torch.Tensor], name: str) -> Any:
    if name not in sums:
        sums[name] = torch.zeros(module.in_features, dtype=torch.float64, device=module.weight.device)
    total = sums[name]

    def add_squares(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        activations = inputs[0].reshape(-1, module.in_features)  # (tokens, n_cols)
        total.add_(activations.square().sum(dim=0, dtype=torch.float64))

    return module.register_forward_hook(add_squares)
