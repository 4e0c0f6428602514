"""Tiny checkpoints and tokenizers for the export, card and push tests (built in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shipkit.apr import write_apr
from shipkit.config import ModelConfig
from shipkit.fsutil import sha256_file
from shipkit.model import CausalLM

SAMPLE_CODE = "import os\n\ndef main(argv):\n    return len(argv) + 1\n\nclass Box:\n    size: int = 3\n" * 30


def write_tokenizer(path: Path) -> Tokenizer:
    """A byte-level BPE with `<|endoftext|>` as id 0, like `shipkit tokenize` makes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([SAMPLE_CODE], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


def write_tiny_checkpoint(
    apr_path: Path, tokenizer_path: Path, *, architecture: str = "llama", tied: bool = False, seed: int = 0
) -> CausalLM:
    """A random 2-layer model saved as APR weights whose metadata names `tokenizer_path`."""
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    config = ModelConfig(
        architecture=architecture, vocab_size=vocab, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = CausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.08)
    metadata = {
        "kind": "weights",
        "config": config.to_dict(),
        "tokenizer": {"file": tokenizer_path.name, "sha256": sha256_file(tokenizer_path)},
        "producer": {"shipkit_version": "test", "run_id": "20261125-093000-abcdef", "epoch": 1, "step": 4},
    }
    write_apr(apr_path, model.weights(), metadata)
    return model


def _check(value: float, limit: float, direction: str, reason: str) -> dict:
    passes = value <= limit if direction == "max" else value >= limit
    return {"value": value, "limit": limit, "direction": direction, "reason": reason,
            "verdict": "PASS" if passes else "FAIL"}


def tokenizer_section(*, differing: int = 0) -> dict:
    """parity.json's `tokenizer` section for 40 compared val documents, `differing` of them
    tokenized differently by llama.cpp (the shape `shipkit parity` writes)."""
    first = None if not differing else {
        "document": 3, "position": 17, "text": "    return f(b)\n", "hf_ids": [40, 41], "llama_cpp_ids": [40, 7],
        "hf_tokens": 120, "llama_cpp_tokens": 131}
    return {
        "verdict": "FAIL" if differing else "PASS", "failed": ["documents"] if differing else [],
        "gguf": "release/gguf/tiny-code-Q4_K_M.gguf", "pre": "gpt-2", "gguf_pre": "gpt-2",
        "text_source": "tokens val split",
        "documents": {"verdict": "FAIL" if differing else "PASS", "documents_compared": 40,
                      "tokens_compared": 9000, "documents_differing": differing, "first_difference": first},
        "special_tokens": {"verdict": "PASS", "add_bos": False, "add_eos": False, "hf_ids": [5, 6],
                           "llama_cpp_ids": [5, 6]},
        "chat_template": {"verdict": "SKIPPED", "note": "the tokenizer has no chat template: nothing to render"},
    }


def parity_evidence(run_dir: Path, quant_path: Path, tensor_types: dict[str, int], *, kl_mean: float = 0.012,
                    tokenizer: dict | None = None) -> dict:
    """A schema-valid evidence/parity.json for `quant_path`, its verdict following `kl_mean`
    against a 0.05 limit and the `tokenizer` section (default: a passing one) (the shape
    `shipkit parity` writes; numbers chosen by the test)."""
    from shipkit.apr import read_apr
    from shipkit.config import parameter_count
    from shipkit.contract import load_contract

    checkpoint = read_apr(run_dir / "ckpt" / "best.apr")
    contract = load_contract(None)
    checks = {
        "kl_mean": _check(kl_mean, 0.05, "max", "llama.cpp Q4_K_M KLD 0.031, loosened for a tiny model"),
        "same_top_pct": _check(93.5, 85.0, "min", "llama.cpp Q4_K_M same-top 91.9 %, loosened"),
    }
    metrics = {"kl_mean": kl_mean, "kl_p99": 0.08, "kl_max": 0.3, "same_top_pct": 93.5, "ppl_base": 42.0,
               "ppl_quant": 42.7, "ppl_ratio": 1.0167, "rms_dp_pct": 0.9, "max_abs_dp_pct": 7.5,
               "hidden_cosine_min": 0.998}
    tokenizer = tokenizer or tokenizer_section()
    failed = [f"torch.{m}" for m, c in checks.items() if c["verdict"] == "FAIL"]
    engine_verdict = "FAIL" if failed else "PASS"
    failed += [f"tokenizer.{part}" for part in tokenizer["failed"]]
    verdict = "FAIL" if failed else "PASS"
    engine = {"device": "cpu", "seconds": 1.5, "tokens_per_second": 2730.0, "metrics": metrics,
              "hidden_cosine": [1.0, 0.999, 0.998], "hidden_cosine_note": None, "checks": checks,
              "verdict": engine_verdict}
    return {
        "schema_version": 1, "verdict": verdict,
        "failed": failed, "causes": [],
        "date": "2026-11-25T10:00:00+00:00", "shipkit_version": "0.1.0", "host": "test",
        "base": {"path": str(run_dir / "ckpt" / "best.apr"), "format": "apr",
                 "sha256": sha256_file(run_dir / "ckpt" / "best.apr")},
        "quant": {"path": str(quant_path), "sha256": sha256_file(quant_path), "bytes": quant_path.stat().st_size,
                  "tensor_types": tensor_types},
        "model": checkpoint.config.to_dict(), "parameters": parameter_count(checkpoint.config),
        "tokens": {"tokens_dir": "tokens", "split": "val", "tokenizer_sha256": "0" * 64, "ctx": 64,
                   "windows": 8, "tokens_evaluated": 512, "positions_scored": 256},
        "contract": {"name": contract.name, "source": contract.source, "reference": "llama.cpp Q4_K_M",
                     "band": "tiny", "band_reason": "under 10M parameters", "required_engines": ["torch"]},
        "engines": {"torch": engine},
        "agreement": {"verdict": "SKIPPED", "model": None, "metrics": None, "checks": {}, "side": None,
                      "note": "engine agreement needs both engines (--engine both)"},
        "tensors": {"verdict": "PASS", "checks": {}, "worst": [{"name": "lm_head.weight", "rel_rmse": 0.01}],
                    "flagged": []},
        "tokenizer": tokenizer,
    }


def write_gates(run_dir: Path) -> dict:
    """`shipkit gates` on a carded run: its scoreboard becomes evidence/gates.json."""
    from shipkit.evidence import write_evidence
    from shipkit.gates import evaluate_gates

    scoreboard = evaluate_gates(run_dir)
    write_evidence(run_dir, "gates", scoreboard)
    return scoreboard


def build_release_run(trained_run: Path, dest: Path, *, kl_mean: float = 0.012, tokenizer: dict | None = None) -> Path:
    """A RUN_DIR ready for `shipkit card`: the trained run's tokenizer, best.apr and training
    evidence, `release/hf` from `shipkit.export`, a Q4_K_M GGUF from `shipkit.quantize` in
    `release/gguf`, and parity evidence for that GGUF."""
    import shutil

    from shipkit.evidence import write_evidence
    from shipkit.export import export_hf
    from shipkit.quantize import write_gguf

    (dest / "ckpt").mkdir(parents=True)
    shutil.copy(trained_run / "tokenizer.json", dest / "tokenizer.json")
    shutil.copy(trained_run / "ckpt" / "best.apr", dest / "ckpt" / "best.apr")
    shutil.copytree(trained_run / "evidence", dest / "evidence")
    export_hf(dest / "ckpt" / "best.apr", dest / "release" / "hf")
    (dest / "release" / "gguf").mkdir()
    quant = write_gguf(dest / "ckpt" / "best.apr", dest / "release" / "gguf", "Q4_K_M", base_name="tiny-code")
    write_evidence(dest, "parity", parity_evidence(dest, quant.path, quant.tensor_types, kl_mean=kl_mean,
                                                   tokenizer=tokenizer))
    return dest


# Models trained for a handful of steps predict almost uniformly: near-tied top tokens flip under
# 4-bit rounding while KL stays ~1e-5, so these toy releases state a lower same-top floor.
TOY_CONTRACT = """
[contract]
name = "toy"

[parity]
reference = "shipkit default contract, same-top loosened for untrained toy models"
required_engines = ["torch", "llama.cpp"]
thresholds.kl_mean = { max = 0.0625, reason = "the default small-model band" }
thresholds.same_top_pct = { min = 70.0, reason = "near-uniform predictions of a 6-step model have near-tied top tokens" }
thresholds.ppl_ratio = { max = 1.05, reason = "the default small-model band" }
agreement.top1_pct = { min = 99.9, reason = "the default" }
agreement.kl_mean = { max = 1e-4, reason = "the default" }
tensors.rel_rmse = { max = 0.35, reason = "the default" }
"""
