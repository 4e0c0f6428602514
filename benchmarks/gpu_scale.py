"""MODEL-1's size on one GPU (issue 17): `shipkit ship` of an imported Qwen2.5-Coder-7B-shaped
checkpoint, with each stage's seconds, peak host RssAnon and peak GPU memory, in one JSON file.

Writes a random bf16 checkpoint of the shape (`bench_scale.write_checkpoint`; the random numbers
are drawn on the GPU), a contract and a ship.toml for one imported model (import on the CPU,
quantize and parity on `--device`), runs `shipkit.ship.ship` in this process and times each stage
from the lines it logs: at every stage boundary the peak of `torch.cuda.max_memory_allocated()`
and of this process's RssAnon (sampled every 10 ms) are read and reset.

    # the GPU host (16 cores, 128 GiB, an H200; shipkit's dependencies on PYTHONPATH):
    PYTHONPATH=.:$DEPS python benchmarks/gpu_scale.py --out /tmp/gpu-scale
    # the same logic on a CPU, small:
    PYTHONPATH=. python benchmarks/gpu_scale.py --shape 0.5B --device cpu --parity-tokens 1024 \
        --parity-ctx 256 --out /tmp/gs

Parity runs the torch engine only by default: llama.cpp would first write the 7B base as a 30 GB
F32 GGUF and evaluate it on the CPU, far beyond this run's disk and its 9 minutes. `--llama-cpp`
adds it (and the tokenizer check) when llama_cpp imports, for smaller shapes. The contract keeps
shipkit's default parity checks but loose thresholds (random weights predict near-uniformly, so
top-1 ties flip; the run measures time and memory, not quality) and a parameter band that admits
7.6B. `OUT/gpu-scale.json` holds the machine, each stage's figures, the parity evidence's torch
engine section and the gate summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import (  # noqa: E402
    GIB,
    SHAPES,
    folder_bytes,
    machine,
    model_config,
    write_checkpoint,
)

from shipkit.config import parameter_count  # noqa: E402

# shipkit's stage log lines: "[model] stage …" when a stage starts, "[model] stage: detail" when it ends.
STAGE_LINE = re.compile(r"^\[(?P<model>[^\]]+)\] (?P<stage>[\w.]+)(?P<rest>( …|:.*))$")
POLL_SECONDS = 0.01
# Disk one run takes: the source, the APR and the export (each the checkpoint's size), the GGUF
# (under a third of it), and the corpus, tokens and cards.
DISK_FACTOR = 3.4
CORPUS_PACKAGES = ("json", "email")  # ~150k val tokens through the test tokenizer: plenty for parity
CONTRACT = """[contract]
name = "gpu-scale"

[parity]
reference = "benchmarks/gpu_scale.py: random weights; the run measures time and memory, not quality"
required_engines = {engines}
thresholds.kl_mean = {{ max = 1.0, reason = "28 random layers amplify 4-bit rounding: 0.61 on the H200 run" }}
thresholds.same_top_pct = {{ min = 0.0, reason = "random weights predict near-uniformly: top tokens are near-tied" }}
thresholds.ppl_ratio = {{ max = 1.5, reason = "random weights: loose; the tensor check catches a broken quant" }}
agreement.top1_pct = {{ min = 99.9, reason = "shipkit's default" }}
agreement.kl_mean = {{ max = 1e-4, reason = "shipkit's default" }}
tensors.rel_rmse = {{ max = 0.35, reason = "shipkit's default: Q4_K_M of Gaussian weights stays near 0.1" }}

[model]
parameters = {{ min = 1, max = 10_000_000_000, reason = "Qwen2.5-Coder-7B has 7.6B parameters" }}
architectures = {{ value = ["llama", "mistral", "qwen2", "qwen3"], reason = "shipkit's default" }}
"""
SHIP_TOML = """[ship]
out = "ship"
allow_failed_gates = true

[[model]]
name = "{name}"
source = "import"
hf_dir = "hf"
base_model = "Qwen/Qwen2.5-Coder-{shape}"
license = "apache-2.0"
corpus = {corpus}
val_fraction = 0.5
device = "{device}"
parity_tokens = {parity_tokens}
parity_ctx = {parity_ctx}
parity_engines = {engines}
contract = "contract.toml"
"""


class StageMonitor:
    """The `log` callback of `ship`: prints each line and, at each stage boundary, records the
    stage's seconds, peak host RssAnon and peak GPU memory, then resets both peaks."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.stages: dict[str, dict[str, Any]] = {}
        self._started = time.perf_counter()
        self._host_peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        match = STAGE_LINE.match(line)
        if match is None:
            return
        stage, rest = match["stage"], match["rest"]
        if rest == " …":
            self._reset()
        elif rest.strip() != ": unchanged, skipped":
            self.stages[stage] = {"seconds": round(time.perf_counter() - self._started, 2),
                                  "peak_host_rss_anon_gib": round(self._host_peak / GIB, 3),
                                  "peak_gpu_allocated_gib": self._gpu_peak(),
                                  "detail": rest.removeprefix(":").strip()}
            self._reset()  # a stage logged only at its end (push) starts here

    def close(self) -> None:
        self._stop.set()
        self._sampler.join()

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._host_peak = _rss_anon()
        self._started = time.perf_counter()

    def _gpu_peak(self) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return round(torch.cuda.max_memory_allocated() / GIB, 3)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._host_peak = max(self._host_peak, _rss_anon())
            time.sleep(POLL_SECONDS)


def _rss_anon() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("RssAnon:"))


def preflight(out: Path, shape: str, device: str) -> None:
    """Fail in seconds, not minutes in: shipkit's stages import, the device and the disk are there."""
    missing = [name for name in ("gguf", "jsonschema", "xxhash", "safetensors", "tokenizers", "click",
                                 "huggingface_hub", "jinja2", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"missing Python packages: {', '.join(missing)} (carry them on PYTHONPATH)")
    importlib.import_module("shipkit.ship")  # every stage's own imports, before any work

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    needed = DISK_FACTOR * 2 * parameter_count(model_config(shape, eot_id=0))  # bf16: 2 bytes a weight
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise SystemExit(f"{out}: {free / GIB:.1f} GiB free, the {shape} run needs about {needed / GIB:.1f} GiB")


def write_inputs(out: Path, args: argparse.Namespace, engines: list[str]) -> Path:
    """contract.toml and ship.toml in `out`; returns the ship.toml."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = json.dumps([str(stdlib / package) for package in CORPUS_PACKAGES])
    (out / "contract.toml").write_text(CONTRACT.format(engines=json.dumps(engines)))
    config = out / "ship.toml"
    config.write_text(SHIP_TOML.format(name=f"qwen2.5-coder-{args.shape.lower()}-shape", shape=args.shape,
                                       corpus=corpus, device=args.device, parity_tokens=args.parity_tokens,
                                       parity_ctx=args.parity_ctx, engines=json.dumps(engines)))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder; gpu-scale.json is written here")
    parser.add_argument("--shape", choices=list(SHAPES), default="7B")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--parity-tokens", type=int, default=16384)
    parser.add_argument("--parity-ctx", type=int, default=512)
    parser.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp's engine (if it imports)")
    parser.add_argument("--cleanup", action="store_true", help="delete the checkpoint copies when done")
    args = parser.parse_args()
    started = time.perf_counter()
    preflight(args.out, args.shape, args.device)
    from shipkit.ship import load_ship_config, ship

    engines = ["torch"] + (["llama.cpp"] if args.llama_cpp and importlib.util.find_spec("llama_cpp") else [])
    generated = time.perf_counter()
    config = write_checkpoint(args.out / "hf", args.shape, device=args.device)
    generate_seconds = time.perf_counter() - generated
    monitor = StageMonitor(args.device)
    try:
        report = ship(load_ship_config(write_inputs(args.out, args, engines)), log=monitor)
    finally:
        monitor.close()
    run_dir = report.models[0].run_dir
    parity = json.loads((run_dir / "evidence" / "parity.json").read_text())
    summary = {
        "benchmark": "gpu-scale",
        "machine": {**machine(), "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
                    if args.device == "cuda" else None},
        "shape": args.shape, "config": config.to_dict(),
        "parameters": parity["parameters"],
        "checkpoint_bytes": folder_bytes(run_dir / "ckpt" / "best.apr"),
        "generate_seconds": round(generate_seconds, 1),
        "stages": monitor.stages,
        "parity": {"verdict": parity["verdict"], "failed": parity["failed"], "tokens": parity["tokens"],
                   "engines": {name: {key: engine[key] for key in ("device", "seconds", "tokens_per_second", "metrics")}
                               for name, engine in parity["engines"].items()},
                   "tensors_worst": parity["tensors"]["worst"][:3]},
        "gates": report.models[0].summary["gates"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "gpu-scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if args.cleanup:
        for heavy in (args.out / "hf", run_dir / "ckpt", run_dir / "release"):
            shutil.rmtree(heavy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
