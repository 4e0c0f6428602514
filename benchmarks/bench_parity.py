"""Time the parity gate's torch engine on a MODEL-2-shaped model.

Builds a random model of the `model-2` preset's shape (370M parameters; `--quick`: a small
shape for the CPU), writes it as an F32 `.apr`, quantizes it with shipkit's own GGUF writer,
reads the quant back (dequantized from the GGUF bytes), and times `shipkit.parity.torch_engine.TorchEngine`
over `--n-tokens` random tokens in windows of `--ctx` on `--device`.

    python benchmarks/bench_parity.py --device cuda --json-out bench-parity.json
    python benchmarks/bench_parity.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quantize import write_tokenizer  # noqa: E402 (the same small test tokenizer)

from shipkit.apr import write_apr  # noqa: E402
from shipkit.config import ModelConfig, parameter_count  # noqa: E402
from shipkit.device import resolve_device  # noqa: E402
from shipkit.model import CausalLM  # noqa: E402
from shipkit.parity.inputs import Windows  # noqa: E402
from shipkit.parity.torch_engine import TorchEngine  # noqa: E402
from shipkit.parity.weights import LoadedModel, load_model_file  # noqa: E402
from shipkit.quantize import write_gguf  # noqa: E402
from shipkit.train.presets import get_preset  # noqa: E402

QUICK_SHAPE = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


def build_files(config: ModelConfig, qtype: str, folder: Path, seed: int, device: str) -> tuple[Path, Path]:
    """A random model as `base.apr` and its `qtype` GGUF (quantized on `device`)."""
    torch.manual_seed(seed)
    model = CausalLM(config)
    base = folder / "base.apr"
    write_apr(base, model.weights(), {"kind": "weights", "config": config.to_dict(),
                                      "producer": {"shipkit_version": "bench", "source": "random", "epoch": 0, "step": 0}})
    tokenizer = folder / "tokenizer.json"
    write_tokenizer(tokenizer)
    quant = folder / f"base-{qtype}.gguf"
    write_gguf(base, quant, qtype, tokenizer_path=tokenizer, device=device)
    return base, quant


def time_torch_engine(base: LoadedModel, quant: LoadedModel, windows: Windows, device: torch.device) -> dict:
    warmup = Windows(tokens=windows.tokens[:1], tokenizer_sha256=windows.tokenizer_sha256)
    for _ in TorchEngine(base, quant, device).steps(warmup):  # CUDA context, kernels, allocator: not timed
        pass
    engine = TorchEngine(base, quant, device)
    started = time.perf_counter()
    for _ in engine.steps(windows):
        pass
    wall = time.perf_counter() - started
    return {"seconds": wall, "tokens_per_second": windows.tokens.size / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--n-tokens", type=int, default=65536)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--qtype", default="Q4_K_M")
    parser.add_argument("--quick", action="store_true", help="small shape and 4096 tokens, for the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    config = get_preset("model-2").model
    n_tokens = args.n_tokens
    if args.quick:
        config = dataclasses.replace(config, **QUICK_SHAPE)
        n_tokens = min(n_tokens, 4096)
    device = resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, config.vocab_size, size=(n_tokens // args.ctx, args.ctx), dtype=np.int64)
    windows = Windows(tokens=tokens, tokenizer_sha256="")
    with tempfile.TemporaryDirectory(prefix="bench-parity-") as scratch:
        started = time.perf_counter()
        base_path, quant_path = build_files(config, args.qtype, Path(scratch), args.seed, device.type)
        quantize_seconds = time.perf_counter() - started
        started = time.perf_counter()
        base, quant = load_model_file(base_path), load_model_file(quant_path)
        load_seconds = time.perf_counter() - started
        timing = time_torch_engine(base, quant, windows, device)
    result = {
        "benchmark": "parity-torch-engine",
        "shape": "quick" if args.quick else "model-2",
        "parameters": parameter_count(config),
        "qtype": args.qtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "ctx": args.ctx,
        "tokens": int(tokens.size),
        "torch_engine_seconds": timing["seconds"],
        "tokens_per_second": timing["tokens_per_second"],
        "build_and_quantize_seconds": quantize_seconds,
        "load_seconds": load_seconds,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
