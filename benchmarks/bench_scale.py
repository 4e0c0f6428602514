"""Every stage at MODEL-1's real size (issue 17): time, peak anonymous memory and weights/s.

Writes a Qwen2.5-Coder-shaped bf16 checkpoint folder with random weights (config.json,
safetensors shards and their index, a qwen2-style tokenizer from tests/tokenizer_helpers.py),
shard by shard without holding the model, then runs each stage as its own `python -m shipkit`
process and samples the process tree's RssAnon (anonymous memory: the page cache of the
memory-mapped files is not counted) every few milliseconds:

    import    shipkit import HF --out ckpt/model.apr
    validate  shipkit validate ckpt/model.apr
    export    shipkit export ckpt/model.apr --hf hf-export
    quantize  shipkit quantize ckpt/model.apr --q4k --out gguf/
    parity    shipkit parity ckpt/model.apr gguf/*.gguf --engine torch --device cpu (small --n-tokens)

    PYTHONPATH=. python benchmarks/bench_scale.py --shape 0.5B --shape 1.5B --json-out scale.json
    PYTHONPATH=. python benchmarks/bench_scale.py --shape 7B --stages import,validate,export,quantize --cleanup

Shapes are those of the released config.json files (Qwen/Qwen2.5-Coder-0.5B, -1.5B: tied, vocab
151,936; -7B: untied, vocab 152,064). The tokenizer is much smaller than the embedding, as import
allows (the rows past it are padding the GGUF names `[PAD<id>]`). `--cleanup` deletes each
stage's output once the stages after it no longer need it (the 7B takes 15 GB per copy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tokenizer_helpers import special_ids, write_family_tokenizer  # noqa: E402

from shipkit.apr.convert import write_safetensors  # noqa: E402
from shipkit.config import ModelConfig, parameter_count, weight_shapes  # noqa: E402

GIB = 1 << 30
# Qwen2.5-Coder's published config.json values (the three sizes share everything but these).
SHAPES: dict[str, dict[str, Any]] = {
    "0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
}
SHARED_CONFIG = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
                 "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16"}
WEIGHT_STD = 0.02  # the scale of an initialised decoder's matrices
SHARD_BYTES = 1 << 30  # the 1.5B checkpoint came in 3 shards
STAGES = ("import", "validate", "export", "quantize", "parity")
POLL_SECONDS = 0.01  # RssAnon sampling period; the stages' big allocations live far longer
# The measurements before streaming (1.5B shape, peak RssAnon in GiB), the reference of
# the ratio column.
BEFORE_1_5B_GIB = {"import": 6.1, "export": 9.7, "quantize": 1.3, "validate": 0.2}
# The memory targets of issue 17 (GiB): every stage, per shape.
TARGET_GIB = {"1.5B": 2.5, "7B": 4.0}
PARITY_TOKENS, PARITY_CTX = 1024, 256  # a small parity run: 4 windows, 508 scored positions
# Parity of random weights is about memory and time, not the verdict: torch only, thresholds wide.
PARITY_CONTRACT = """[contract]
name = "bench-scale"
[parity]
reference = "bench_scale.py: random weights, memory and time only"
required_engines = ["torch"]
thresholds.kl_mean = { max = 10.0, reason = "random weights: not a quality measurement" }
tensors.rel_rmse = { max = 10.0, reason = "random weights: not a quality measurement" }
"""


def model_config(shape: str, eot_id: int) -> ModelConfig:
    fields = SHAPES[shape]
    return ModelConfig(architecture="qwen2", max_position_embeddings=SHARED_CONFIG["max_position_embeddings"],
                       rms_norm_eps=SHARED_CONFIG["rms_norm_eps"], rope_theta=SHARED_CONFIG["rope_theta"],
                       bos_token_id=eot_id, eos_token_id=eot_id, **fields)


def write_checkpoint(folder: Path, shape: str, *, shard_bytes: int = SHARD_BYTES, seed: int = 0,
                     device: str = "cpu") -> ModelConfig:
    """The HF folder of a random `shape` model in bf16, one shard in memory at a time
    (random numbers drawn on `device`: a GPU draws a 7B in seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_family_tokenizer(folder, "qwen2")
    eot_id = special_ids(folder)["<|endoftext|>"]  # the document separator, as in the real models
    config = model_config(shape, eot_id)
    hf = {**SHARED_CONFIG, **SHAPES[shape], "bos_token_id": eot_id, "eos_token_id": eot_id}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    shards = _shard_plan(weight_shapes(config), shard_bytes)
    generator = torch.Generator(device=device).manual_seed(seed)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {tensor: _random(tensor, tensor_shape, generator, device) for tensor, tensor_shape in shard.items()}
        total += write_safetensors(folder / name, tensors, {"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return config


def _shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[dict[str, tuple[int, ...]]]:
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, tensor_shape in shapes.items():
        nbytes = math.prod(tensor_shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor_shape
        size += nbytes
    return shards


def _random(name: str, shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """N(0, 0.02²) values; RMSNorm gains about 1, as in a trained model."""
    values = torch.randn(shape, generator=generator, device=device) * WEIGHT_STD
    if name.endswith("norm.weight"):
        values += 1.0
    return values.to(torch.bfloat16).cpu()


def tree_rss_anon(root: int) -> int:
    """RssAnon of `root` and all its descendants, in bytes (processes gone meanwhile count 0)."""
    total, pending = 0, [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/status") as status:
                total += next((int(line.split()[1]) << 10 for line in status if line.startswith("RssAnon:")), 0)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    pending += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_sampled(command: list[str], poll_seconds: float = POLL_SECONDS, **popen: Any
                ) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run `command` to the end, sampling the peak RssAnon of its process tree meanwhile:
    (the finished process with its output, that peak in bytes)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_anon(process.pid))
            time.sleep(poll_seconds)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak


def measure(args: list[str], cwd: Path) -> dict[str, Any]:
    """Run `python -m shipkit ARGS`; wall seconds, peak RssAnon of its process tree, exit code."""
    started = time.perf_counter()
    finished, peak = run_sampled([sys.executable, "-m", "shipkit", *args], cwd=cwd,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    return {"command": "shipkit " + " ".join(args), "seconds": round(seconds, 2), "peak_rss_anon_bytes": peak,
            "peak_rss_anon_gib": round(peak / GIB, 3), "exit_code": finished.returncode,
            "output": (finished.stdout + finished.stderr).strip().splitlines()[-3:]}


def prepare_tokens(work: Path, tokenizer: Path) -> Path:
    """Val tokens for parity: the stdlib's json package through the model's tokenizer."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for args in (["corpus", "build", str(stdlib / "json"), "--out", "corpus", "--val-fraction", "0.5"],
                 ["tokenize", "encode", "corpus", "--out", "tokens", "--tokenizer", str(tokenizer)]):
        result = subprocess.run([sys.executable, "-m", "shipkit", *args], cwd=work, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        if result.returncode:
            raise SystemExit(f"shipkit {' '.join(args)} failed: {result.stderr.strip()}")
    return work / "tokens"


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def run_shape(shape: str, work: Path, stages: list[str], cleanup: bool, seed: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, apr = work / "hf-source", work / "ckpt" / "model.apr"
    started = time.perf_counter()
    config = write_checkpoint(hf_dir, shape, seed=seed)
    generated = time.perf_counter() - started
    weights = parameter_count(config)
    result: dict[str, Any] = {"shape": shape, "config": config.to_dict(), "parameters": weights,
                              "source_bytes": folder_bytes(hf_dir), "generate_seconds": round(generated, 1),
                              "stages": {}}
    commands = {
        "import": ["import", str(hf_dir), "--out", str(apr), "--base-model", f"Qwen/Qwen2.5-Coder-{shape}"],
        "validate": ["validate", str(apr)],
        "export": ["export", str(apr), "--hf", str(work / "hf-export")],
        "quantize": ["quantize", str(apr), "--q4k", "--out", str(work / "gguf")],
    }
    outputs = {"import": apr, "export": work / "hf-export", "quantize": work / "gguf"}
    for stage in stages:
        if stage == "parity":
            commands["parity"] = _parity_command(work, apr)
        entry = measure(commands[stage], work)
        entry["weights_per_second"] = round(weights / entry["seconds"])
        if stage in outputs and outputs[stage].exists():
            entry["output_bytes"] = folder_bytes(outputs[stage])
        if shape == "1.5B" and stage in BEFORE_1_5B_GIB:
            entry["ratio_to_before"] = round(entry["peak_rss_anon_gib"] / BEFORE_1_5B_GIB[stage], 3)
        if shape in TARGET_GIB:
            entry["target_gib"] = TARGET_GIB[shape]
        result["stages"][stage] = entry
        print(f"{shape} {stage:9s} {entry['seconds']:8.1f} s  {entry['peak_rss_anon_gib']:6.2f} GiB  "
              f"{entry['weights_per_second'] / 1e6:8.1f}M weights/s  exit {entry['exit_code']}", flush=True)
        if cleanup:
            _clean_after(stage, stages, work)
    return result


def _parity_command(work: Path, apr: Path) -> list[str]:
    tokens = prepare_tokens(work, apr.parent / "tokenizer.json")
    contract = work / "bench-contract.toml"
    contract.write_text(PARITY_CONTRACT)
    quant = next((work / "gguf").glob("*.gguf"))
    return ["parity", str(apr), str(quant), "--tokens", str(tokens), "--engine", "torch", "--device", "cpu",
            "--n-tokens", str(PARITY_TOKENS), "--ctx", str(PARITY_CTX), "--contract", str(contract)]


def _clean_after(stage: str, stages: list[str], work: Path) -> None:
    """Delete what no later stage reads: the source after import, the export right away."""
    if stage == "import":
        shutil.rmtree(work / "hf-source", ignore_errors=True)
    if stage == "export":
        shutil.rmtree(work / "hf-export", ignore_errors=True)
    if stage == stages[-1]:
        shutil.rmtree(work, ignore_errors=True)


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) << 10 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory / GIB, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=list(SHAPES), help="repeatable [default: 0.5B]")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, in order [default: all: {','.join(STAGES)}]")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"),
                        help="scratch folder (one sub-folder per shape)")
    parser.add_argument("--cleanup", action="store_true", help="delete each output once no later stage reads it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    stages = [stage for stage in args.stages.split(",") if stage]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    report = {"benchmark": "scale", "machine": machine(), "shapes": []}
    for shape in args.shape or ["0.5B"]:
        report["shapes"].append(run_shape(shape, args.work / shape, stages, args.cleanup, args.seed))
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
