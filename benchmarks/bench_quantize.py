"""Time Q4_K_M quantization of a MODEL-2-shaped model: shipkit vs llama.cpp, same machine.

Builds a random F32 model of the `model-2` preset's shape (hidden 1024, 24 layers, 16/4 heads,
FFN 2816, vocab 50257: 370M weights; `--quick`: a small shape), writes it as an `.apr` and as
an F32 GGUF, then times
- llama.cpp's own quantizer (`llama_model_quantize`, `--threads` threads) F32 GGUF -> Q4_K_M,
- shipkit's quantizer on `--device` over every tensor in memory (the compute alone; on CUDA
  also with the weights already on the GPU), and `write_gguf` end to end (.apr -> Q4_K_M GGUF,
  reading, quantizing and writing),
and checks that both files hold the same bytes in every tensor. Without llama-cpp-python
(a GPU box, say) the bytes are checked against shipkit's CPU quantizer on a few tensors.

    python benchmarks/bench_quantize.py --quick
    python benchmarks/bench_quantize.py --device cuda --json-out bench-quantize.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shipkit.apr import write_apr  # noqa: E402
from shipkit.model import ModelConfig  # noqa: E402
from shipkit.presets import get_preset  # noqa: E402
from shipkit.quantize import mix, native_search, write_gguf  # noqa: E402
from shipkit.quantize.gguf_export import encode_tensors, plan_tensor  # noqa: E402
from shipkit.tokenize import EOT_TOKEN, new_tokenizer  # noqa: E402

FILE_TYPE = "Q4_K_M"
QUICK_SHAPE = {"vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1024,
               "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2}
CPU_CHECK_TENSORS = 3  # tensors re-quantized on the CPU when llama.cpp is not installed


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """HF-named N(0, 0.02) matrices and N(1, 0.02) norms, generated tensor by tensor."""
    generator = torch.Generator().manual_seed(seed)
    d, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        shapes |= {prefix + "input_layernorm.weight": (d,),
                   prefix + "self_attn.q_proj.weight": (d, d),
                   prefix + "self_attn.k_proj.weight": (kv, d),
                   prefix + "self_attn.v_proj.weight": (kv, d),
                   prefix + "self_attn.o_proj.weight": (d, d),
                   prefix + "post_attention_layernorm.weight": (d,),
                   prefix + "mlp.gate_proj.weight": (f, d),
                   prefix + "mlp.up_proj.weight": (f, d),
                   prefix + "mlp.down_proj.weight": (d, f)}
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (config.vocab_size, d)}
    return {name: torch.randn(shape, generator=generator) * 0.02 + (1.0 if len(shape) == 1 else 0.0)
            for name, shape in shapes.items()}


def write_tokenizer(path: Path) -> None:
    """A small byte-level BPE; the GGUF writer pads its vocabulary to the model's."""
    from tokenizers import pre_tokenizers, trainers

    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["def main():\n    return 0\n"] * 8, trainer)
    tokenizer.save(str(path))


def quantize_in_memory(weights: dict[str, torch.Tensor], config: ModelConfig, device: str,
                       *, resident: bool = False) -> tuple[float, dict[str, bytes]]:
    """Seconds to encode every tensor as write_gguf does (mix, Q/K order), and the bytes.

    `resident`: the weights are moved to `device` before the clock starts (a GPU-trained
    model's case); otherwise they travel from CPU memory inside the timing."""
    spec = mix.file_type(FILE_TYPE)
    plan = [plan_tensor(name, values, config, spec) for name, values in weights.items()]
    if resident:
        plan = [(target, values.to(device), qtype) for target, values, qtype in plan]
    if device == "cuda":  # context creation, kernel compilation and first launches, not timed
        encode_tensors([entry for entry in plan if entry[2] == mix.QType.Q4_K][:1], device)
        torch.cuda.synchronize()
    started = time.perf_counter()
    payloads = encode_tensors(plan, device)
    seconds = time.perf_counter() - started
    return seconds, {target: np.ascontiguousarray(payload).tobytes()
                     for (target, _, _), payload in zip(plan, payloads)}


def llama_cpp_quantize(source: Path, target: Path, threads: int) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = int(mix.file_type(FILE_TYPE).ftype)
    started = time.perf_counter()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise SystemExit(f"llama_model_quantize failed ({status})")
    return time.perf_counter() - started


def gguf_tensors(path: Path) -> dict[str, bytes]:
    return {t.name: np.ascontiguousarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp quantizer threads")
    parser.add_argument("--quick", action="store_true", help="a small shape (CPU smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    config = get_preset("model-2").model
    if args.quick:
        config = ModelConfig(**(config.to_dict() | QUICK_SHAPE))
    weights = random_weights(config, args.seed)
    n_weights = sum(t.numel() for t in weights.values())
    result: dict = {"file_type": FILE_TYPE, "device": args.device, "weights": n_weights,
                    "shape": config.to_dict(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        folder = Path(tmp)
        apr = folder / "model.apr"
        write_apr(apr, weights, {"kind": "weights", "config": config.to_dict(),
                                 "producer": {"shipkit_version": "bench", "source": "random",
                                              "epoch": 0, "step": 0}})
        write_tokenizer(folder / "tokenizer.json")
        f32 = write_gguf(apr, folder / "f32.gguf", "F32", tokenizer_path=folder / "tokenizer.json").path

        theirs = folder / "llama-cpp.gguf"
        llama_seconds = llama_cpp_quantize(f32, theirs, args.threads)
        compute_seconds, ours_in_memory = quantize_in_memory(weights, config, args.device)
        ours = write_gguf(apr, folder / "shipkit.gguf", FILE_TYPE, tokenizer_path=folder / "tokenizer.json",
                          device=args.device)
        ours_tensors = gguf_tensors(ours.path)
        result["shipkit"] = {"search_backend": native_search.backend(args.device),
                             "compute_seconds": compute_seconds,
                             "compute_weights_per_s": n_weights / compute_seconds,
                             "write_gguf_seconds": ours.seconds,
                             "write_gguf_weights_per_s": n_weights / ours.seconds}
        result["in_memory_equals_file"] = all(ours_tensors[n] == b for n, b in ours_in_memory.items())
        if args.device == "cuda":
            resident_seconds, resident_bytes = quantize_in_memory(weights, config, "cuda", resident=True)
            result["shipkit"] |= {"gpu_resident_seconds": resident_seconds,
                                  "gpu_resident_weights_per_s": n_weights / resident_seconds}
            result["in_memory_equals_file"] &= resident_bytes == ours_in_memory
        if llama_seconds is not None:
            llama_tensors = gguf_tensors(theirs)
            result["llama_cpp"] = {"threads": args.threads, "seconds": llama_seconds,
                                   "weights_per_s": n_weights / llama_seconds}
            result["ratio_compute_vs_llama_cpp"] = llama_seconds / compute_seconds
            result["ratio_write_gguf_vs_llama_cpp"] = llama_seconds / ours.seconds
            result["bytes_identical"] = llama_tensors == ours_tensors
            result["bytes_reference"] = "llama.cpp llama_model_quantize"
        else:
            checked = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                       "model.layers.1.mlp.up_proj.weight")[:CPU_CHECK_TENSORS]
            _, cpu_bytes = quantize_in_memory({name: weights[name] for name in checked}, config, "cpu")
            result["bytes_identical"] = all(cpu_bytes[n] == ours_tensors[n] for n in cpu_bytes)
            result["bytes_reference"] = f"shipkit CPU quantizer on {sorted(cpu_bytes)}"
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not result["bytes_identical"] or not result["in_memory_equals_file"]:
        raise SystemExit("bytes differ")


if __name__ == "__main__":
    main()
