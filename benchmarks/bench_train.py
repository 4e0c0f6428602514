"""Training throughput: shipkit's model vs HF `LlamaForCausalLM` of the same shape.

    python benchmarks/bench_train.py                  # GPU: model-2 at batch 16 × seq 512, + tiny on CPU
    python benchmarks/bench_train.py --quick          # any machine: a tiny shape, a few steps
    python benchmarks/bench_train.py --json-out r.json

shipkit runs the trainer's single-GPU step (`shipkit.train.graphed_step`: a compiled bfloat16
working copy in the GPU layout, float32 master weights updated by its AdamW kernel, the whole
step one CUDA graph); `--no-cuda-graph` runs the trainer's multi-GPU step on one GPU instead (bf16
autocast, GPU layout, fused AdamW with clipping folded in, compiled forward + loss). The
reference is HF's model under bf16 autocast + fused AdamW + `torch.compile` (through
`shipkit.train.step.train_step`), on the same random tokens. MFU = flops_per_token · tok/s /
989e12 (H100 dense bf16 peak), flops_per_token = 6·N + 12·L·d·T (`shipkit.model.flops_per_token`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shipkit.config import ModelConfig, parameter_count  # noqa: E402
from shipkit.model import CausalLM, flops_per_token  # noqa: E402
from shipkit.train.graphed_step import GraphedTrainStep  # noqa: E402
from shipkit.train.presets import get_preset  # noqa: E402
from shipkit.train.step import build_optimizer, train_step, training_model  # noqa: E402

H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM
QUICK_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@dataclasses.dataclass
class Case:
    """One measurement: a model implementation on a device at a shape."""

    name: str
    implementation: str  # "shipkit" or "transformers"
    config: ModelConfig
    batch_size: int
    seq_len: int
    device: str
    compile_model: bool
    cuda_graph: bool
    steps: int
    warmup_steps: int


class HFLoss(nn.Module):
    """HF's model under the same loss as `shipkit.train.step.LanguageModelLoss`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _hf_model(config: ModelConfig) -> nn.Module:
    """HF's model of the same shape, from the config.json that `shipkit export` writes."""
    import transformers

    hf_config = transformers.LlamaConfig(**config.to_hf("float32"), attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf_config)


def _step_function(case: Case, device: torch.device) -> tuple[nn.Module, Callable[..., tuple[torch.Tensor, torch.Tensor]]]:
    """(the model, its optimizer step called as `step(batch, lr=...)`), built as the trainer does."""
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if case.implementation == "shipkit":
        model: nn.Module = CausalLM(case.config).to(device)
        optimizer, _ = build_optimizer(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=cuda and not case.cuda_graph)
        if case.cuda_graph:
            return model, GraphedTrainStep(model, optimizer, grad_clip=1.0)
        loss_module = training_model(model, ddp_device_ids=None, distributed=False, compile_model=case.compile_model)
    else:
        model = _hf_model(case.config).to(device)
        optimizer, _ = build_optimizer(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=cuda)
        loss_module = HFLoss(model)
        loss_module = torch.compile(loss_module) if case.compile_model else loss_module
    return model, functools.partial(train_step, loss_module, list(model.parameters()), optimizer, grad_clip=1.0, bf16=cuda)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case) -> dict[str, Any]:
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, train_step_function = _step_function(case, device)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, case.config.vocab_size, (case.batch_size, case.seq_len + 1), generator=generator).to(device)
        for _ in range(4)
    ]

    def step(index: int) -> torch.Tensor:
        return train_step_function(batches[index % len(batches)], lr=3e-4)[0]

    started = time.perf_counter()
    for index in range(case.warmup_steps):
        step(index)
    _sync(device)
    warmup_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for index in range(case.steps):
        loss = step(index)
    _sync(device)
    seconds = time.perf_counter() - started
    final_loss = loss.item()

    tokens_per_second = case.steps * case.batch_size * case.seq_len / seconds
    flops = flops_per_token(case.config, case.seq_len)
    result = {
        "name": case.name,
        "implementation": case.implementation,
        "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu"),
        "compiled": case.compile_model,
        "cuda_graph": case.cuda_graph,
        "batch_size": case.batch_size,
        "seq_len": case.seq_len,
        "parameters": parameter_count(case.config),
        "flops_per_token": flops,
        "steps": case.steps,
        "warmup_seconds": round(warmup_seconds, 2),
        "step_ms": round(1000 * seconds / case.steps, 2),
        "tokens_per_second": round(tokens_per_second, 1),
        "mfu": round(flops * tokens_per_second / H100_BF16_PEAK_FLOPS, 4) if cuda else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "final_loss": round(final_loss, 4),
    }
    del model, train_step_function, batches
    return result


def _print_result(result: dict[str, Any]) -> None:
    if "error" in result:
        print(f"  {result['name']:<28} ERROR {result['error']}", flush=True)
        return
    mfu = "" if result["mfu"] is None else f"  MFU {100 * result['mfu']:5.1f}%"
    memory = "" if result["peak_memory_gib"] is None else f"  peak {result['peak_memory_gib']:.1f} GiB"
    print(
        f"  {result['name']:<28} {result['tokens_per_second']:>11,.0f} tok/s{mfu}  "
        f"{result['step_ms']:.1f} ms/step  (warmup/compile {result['warmup_seconds']:.0f} s){memory}",
        flush=True,
    )


def _safe_run(case: Case) -> dict[str, Any]:
    """A failing case is reported and the benchmark goes on with the next."""
    try:
        result = run_case(case)
    except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and continues
        traceback.print_exc()
        result = {"name": case.name, "implementation": case.implementation, "error": f"{type(error).__name__}: {error}"}
    if case.device == "cuda":
        torch.cuda.empty_cache()
    _print_result(result)
    return result


def _ratio(results: list[dict[str, Any]], ours: str, theirs: str) -> float | None:
    by_name = {result["name"]: result for result in results if "error" not in result}
    if ours in by_name and theirs in by_name:
        return by_name[ours]["tokens_per_second"] / by_name[theirs]["tokens_per_second"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape, few steps (works on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 30, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, incl. compilation (default 5, quick 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="eager mode on CUDA")
    parser.add_argument("--no-cuda-graph", action="store_true", help="shipkit without the one-graph step")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    parser.add_argument("--no-cpu-tiny", action="store_true", help="skip the tiny preset on CPU")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    steps = args.steps or (5 if args.quick else 30)
    warmup = args.warmup or (2 if args.quick else 5)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = "cuda" if cuda else "cpu"
    compile_model = cuda and not args.no_compile
    if args.quick:
        config, batch_size, seq_len, label = ModelConfig(**QUICK_SHAPE), 4, 64, "quick"
    else:
        preset = get_preset("model-2")
        config, batch_size, seq_len, label = preset.model, args.batch_size, args.seq_len, "model-2"

    print(f"bench_train: torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""), flush=True)
    print(f"{label}: {parameter_count(config) / 1e6:.1f}M parameters, batch {batch_size} × seq {seq_len}, "
          f"{flops_per_token(config, seq_len) / 1e9:.3f} GFLOP/token, compile {compile_model}", flush=True)

    results = []
    implementations = ["shipkit"] + ([] if args.no_hf else ["transformers"])
    for implementation in implementations:
        graph = cuda and implementation == "shipkit" and compile_model and not args.no_cuda_graph
        case = Case(f"{label} {implementation}", implementation, config, batch_size, seq_len, device,
                    compile_model, graph, steps, warmup)
        results.append(_safe_run(case))
    ratio = _ratio(results, f"{label} shipkit", f"{label} transformers")
    if ratio is not None:
        print(f"  ratio shipkit / transformers: {ratio:.2f}x", flush=True)

    if not args.no_cpu_tiny:
        tiny = get_preset("tiny")
        tiny_steps = 3 if args.quick else 10
        case = Case("tiny cpu shipkit", "shipkit", tiny.model, tiny.batch_size, tiny.seq_len, "cpu",
                    False, False, tiny_steps, 1)
        results.append(_safe_run(case))

    report = {
        "torch": torch.__version__,
        "device": device,
        "peak_flops": H100_BF16_PEAK_FLOPS,
        "ratio_shipkit_over_transformers": None if ratio is None else round(ratio, 3),
        "results": results,
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 1 if any("error" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
