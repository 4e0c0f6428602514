"""Time every K-quant file type, with and without an importance matrix: shipkit vs llama.cpp's
`llama-quantize` on the same cores and the same input, and check that both write the same bytes.

Builds a random F32 model (`--layers` layers of the `model-2` preset's shape: hidden 1024, 16/4
heads, FFN 2816, vocab 50257; the default 8 layers are 193M weights, well under a minute per
type and tool on a 2-core CPU; `--quick`: a small shape), writes it as an `.apr` and as an F32
GGUF, makes an importance matrix with `llama-imatrix` on stdlib code, then for each type and
each imatrix mode times end to end
- llama-quantize [--imatrix F] F32.gguf OUT TYPE THREADS (a subprocess: load, quantize, write),
- shipkit's `write_gguf` (.apr -> GGUF: read, quantize, write) on `--device`,
both pinned to the same `--threads` cores, and prints seconds and the ratio llama/shipkit
(target ≥ 1.0: shipkit at least as fast). The tools come from tests/llama_tools.py (built once
per machine if need be).

    python benchmarks/bench_quantize.py --quick
    python benchmarks/bench_quantize.py --types Q4_K_M,Q2_K --json-out bench-quantize.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shipkit.apr import write_apr  # noqa: E402
from shipkit.config import ModelConfig  # noqa: E402
from shipkit.quantize import kquants, write_gguf  # noqa: E402
from shipkit.quantize.formats import QType  # noqa: E402
from shipkit.tokenize import EOT_TOKEN, new_tokenizer  # noqa: E402
from shipkit.train.presets import get_preset  # noqa: E402

K_QUANT_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
DEFAULT_LAYERS = 8
QUICK_SHAPE = {"vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1024,
               "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2}
IMATRIX_CONTEXT = 256  # tokens per llama-imatrix chunk
IMATRIX_CHUNKS = 4
CALIBRATION_PACKAGE = "json"  # stdlib code the importance matrix is computed on


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


def gguf_tensors(path: Path) -> dict[str, bytes]:
    return {t.name: np.ascontiguousarray(t.data).tobytes() for t in gguf.GGUFReader(path).tensors}


def llama_tool(name: str) -> str:
    """tests/llama_tools.py's tool path (imported here: bench_parity imports this module too)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from llama_tools import llama_tool as find_tool

    return str(find_tool(name))


def run(command: list[str], cwd: Path) -> float:
    """Seconds `command` took; its output only if it failed."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - started


def make_imatrix(folder: Path, threads: int) -> float:
    """llama-imatrix on the F32 GGUF over stdlib code; its seconds."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / CALIBRATION_PACKAGE
    (folder / "calibration.txt").write_text("\n".join(p.read_text() for p in sorted(stdlib.glob("*.py"))))
    return run([llama_tool("llama-imatrix"), "-m", "f32.gguf", "-f", "calibration.txt", "-o", "imatrix.gguf",
                "-c", str(IMATRIX_CONTEXT), "--chunks", str(IMATRIX_CHUNKS), "--no-ppl", "-t", str(threads)], folder)


def compare(folder: Path, file_type: str, imatrix: bool, threads: int, device: str) -> dict:
    """One type, one imatrix mode: both tools timed, their files compared, then removed."""
    options = ["--imatrix", "imatrix.gguf"] if imatrix else []
    llama_seconds = run([llama_tool("llama-quantize"), *options, "f32.gguf", "theirs.gguf", file_type,
                         str(threads)], folder)
    ours = write_gguf(folder / "model.apr", folder / "ours.gguf", file_type, tokenizer_path=folder / "tokenizer.json",
                      device=device, imatrix=folder / "imatrix.gguf" if imatrix else None)
    identical = gguf_tensors(folder / "ours.gguf") == gguf_tensors(folder / "theirs.gguf")
    (folder / "ours.gguf").unlink()
    (folder / "theirs.gguf").unlink()
    return {"file_type": file_type, "imatrix": imatrix, "llama_quantize_seconds": round(llama_seconds, 3),
            "shipkit_seconds": round(ours.seconds, 3), "ratio": round(llama_seconds / ours.seconds, 3),
            "bytes_identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(K_QUANT_TYPES), help="comma-separated file types")
    parser.add_argument("--imatrix", choices=["both", "with", "without"], default="both")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="layers of the model-2 shape")
    parser.add_argument("--quick", action="store_true", help="a small shape (CPU smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="cores both tools are pinned to")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where shipkit quantizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()

    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.threads]))  # subprocesses inherit it
    config = get_preset("model-2").model
    config = ModelConfig(**(config.to_dict() | (QUICK_SHAPE if args.quick else {"num_hidden_layers": args.layers})))
    weights = random_weights(config, args.seed)
    modes = {"both": (False, True), "with": (True,), "without": (False,)}[args.imatrix]
    result: dict = {"weights": sum(t.numel() for t in weights.values()), "shape": config.to_dict(),
                    "threads": args.threads, "device": args.device, "cores": sorted(os.sched_getaffinity(0)),
                    "backend": {mode: kquants.backend(QType.Q4_K, args.device, importance=mode == "imatrix")
                                for mode in ("plain", "imatrix")}, "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        folder = Path(tmp)
        write_apr(folder / "model.apr", weights, {"kind": "weights", "config": config.to_dict(),
                                                  "producer": {"shipkit_version": "bench", "source": "random",
                                                               "epoch": 0, "step": 0}})
        del weights
        write_tokenizer(folder / "tokenizer.json")
        write_gguf(folder / "model.apr", folder / "f32.gguf", "F32", tokenizer_path=folder / "tokenizer.json")
        if True in modes:
            result["imatrix_seconds"] = round(make_imatrix(folder, args.threads), 3)
        for file_type in args.types.split(","):
            for imatrix in modes:
                line = compare(folder, file_type, imatrix, args.threads, args.device)
                result["runs"].append(line)
                print(f"{file_type:7s} {'imatrix' if imatrix else 'plain':7s} llama-quantize "
                      f"{line['llama_quantize_seconds']:7.2f} s  shipkit {line['shipkit_seconds']:7.2f} s  "
                      f"ratio {line['ratio']:.2f}x  {'identical' if line['bytes_identical'] else 'BYTES DIFFER'}",
                      flush=True)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    if not all(line["bytes_identical"] for line in result["runs"]):
        raise SystemExit("bytes differ")


if __name__ == "__main__":
    main()
