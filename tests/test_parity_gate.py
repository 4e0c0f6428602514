"""The parity gate end to end: a real trained model, its real Q4_K_M GGUF, both engines, and
planted faults in the GGUF bytes that the gate must catch and name."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader

from shipkit.apr import read_apr, write_apr
from shipkit.cli import main
from shipkit.errors import InputError
from shipkit.evidence import read_evidence
from shipkit.parity import ParityOptions, run_parity
from shipkit.quantize import write_gguf
from shipkit.quantize.tensor_names import from_interleaved

CTX = 128
N_TOKENS = 1024  # 8 windows of 128: 504 scored positions
FAULT_TOKENS = 512
Q4_K_BLOCK_BYTES = 144  # d, dmin (f16), 12 scale bytes, 128 bytes of nibbles


@pytest.fixture(scope="module")
def files(tiny_run_dir, tiny_tokens_dir, tmp_path_factory):
    """The tiny run's best checkpoint and its Q4_K_M GGUF."""
    folder = tmp_path_factory.mktemp("parity")
    base = tiny_run_dir / "ckpt" / "best.apr"
    quant = folder / "model-Q4_K_M.gguf"
    write_gguf(base, quant, "Q4_K_M", tokenizer_path=tiny_tokens_dir / "tokenizer.json")
    return {"base": base, "quant": quant, "tokens": tiny_tokens_dir, "folder": folder}


def _options(files, quant=None, **changes):
    options = dict(base=files["base"], quant=quant or files["quant"], tokens_dir=files["tokens"],
                   n_tokens=N_TOKENS, ctx=CTX)
    return ParityOptions(**{**options, **changes})


@pytest.fixture(scope="module")
def clean(files):
    return run_parity(_options(files))


def _copy_with(files, name, patch):
    """A copy of the quant GGUF with `patch(buffer, reader)` applied to its bytes."""
    path = files["folder"] / name
    shutil.copyfile(files["quant"], path)
    reader = GGUFReader(path)
    buffer = np.memmap(path, dtype=np.uint8, mode="r+")
    patch(buffer, {tensor.name: tensor for tensor in reader.tensors})
    buffer.flush()
    return path


def test_clean_q4_k_m_passes_in_both_engines(clean):
    assert clean["verdict"] == "PASS", clean["failed"]
    assert set(clean["engines"]) == {"torch", "llama.cpp"}
    assert clean["quant"]["tensor_types"].get("Q4_K", 0) > 0


def test_clean_quant_engines_agree_with_each_other(clean):
    torch_kl = clean["engines"]["torch"]["metrics"]["kl_mean"]
    llama_kl = clean["engines"]["llama.cpp"]["metrics"]["kl_mean"]
    assert llama_kl == pytest.approx(torch_kl, rel=0.5, abs=1e-4)


def test_clean_quant_reports_per_layer_cosine_in_both_engines(clean):
    for engine in clean["engines"].values():
        assert len(engine["hidden_cosine"]) == 2
        assert all(0.9 < cosine <= 1.0 + 1e-9 for cosine in engine["hidden_cosine"])


def test_same_f32_model_agrees_across_runtimes(clean):
    agreement = clean["agreement"]
    assert agreement["verdict"] == "PASS"
    assert agreement["metrics"]["top1_pct"] >= 99.9
    assert agreement["metrics"]["kl_mean"] <= 1e-4


def test_scoring_covers_the_second_half_of_each_window(clean):
    tokens = clean["tokens"]
    assert tokens == {**tokens, "windows": N_TOKENS // CTX, "tokens_evaluated": N_TOKENS,
                      "positions_scored": N_TOKENS // CTX * (CTX - 1 - CTX // 2), "split": "val"}


def test_every_check_carries_its_threshold_and_reason(clean):
    checks = [*clean["engines"]["torch"]["checks"].values(), *clean["agreement"]["checks"].values()]
    assert checks and all(check["reason"] and "limit" in check for check in checks)
    assert clean["contract"]["band"].startswith("small")


def test_evidence_is_written_to_the_run_dir_and_schema_valid(files, tmp_path):
    run_parity(_options(files, n_tokens=256, run_dir=tmp_path))
    evidence = read_evidence(tmp_path, "parity")
    assert evidence["verdict"] == "PASS"
    assert evidence["quant"]["sha256"] and evidence["base"]["format"] == "apr"


def test_cli_prints_tokens_per_second_per_engine_and_exits_0(files):
    result = CliRunner().invoke(main, ["parity", str(files["base"]), str(files["quant"]), "--tokens",
                                       str(files["tokens"]), "--n-tokens", "256", "--ctx", str(CTX)])
    assert result.exit_code == 0, result.output
    assert "torch on cpu:" in result.output and "llama.cpp on cpu:" in result.output
    assert result.output.count("tokens/s") == 2
    assert "verdict: PASS" in result.output


def test_cli_json_prints_the_evidence(files, tmp_path):
    result = CliRunner().invoke(main, ["parity", str(files["base"]), str(files["quant"]), "--tokens",
                                       str(files["tokens"]), "--n-tokens", "256", "--ctx", str(CTX), "--json",
                                       "--run-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == read_evidence(tmp_path, "parity")


def test_corrupt_q4_k_scale_fails_and_names_the_tensor_and_block(files):
    victim = "blk.1.ffn_gate.weight"

    def flip_scale_exponent(buffer, tensors):
        tensor = tensors[victim]
        assert tensor.tensor_type == GGMLQuantizationType.Q4_K
        block = tensor.data_offset + 5 * Q4_K_BLOCK_BYTES  # rows hold 256 weights: one block, row 5
        buffer[block + 1] ^= 0x40  # top exponent bit of the f16 super-block scale d

    evidence = run_parity(_options(files, _copy_with(files, "scale.gguf", flip_scale_exponent), n_tokens=FAULT_TOKENS))
    assert evidence["verdict"] == "FAIL"
    assert {"torch.kl_mean", "llama.cpp.kl_mean", "tensors.rel_rmse"} <= set(evidence["failed"])
    (cause,) = evidence["causes"]
    assert cause.startswith("model.layers.1.mlp.gate_proj.weight: error concentrated in row 5 ")


def test_swapped_tensors_fail_and_are_named(files, clean):
    first, second = "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"

    def swap(buffer, tensors):
        a, b = tensors[first], tensors[second]
        assert a.n_bytes == b.n_bytes and a.tensor_type == b.tensor_type
        data_a = buffer[a.data_offset : a.data_offset + a.n_bytes].copy()
        buffer[a.data_offset : a.data_offset + a.n_bytes] = buffer[b.data_offset : b.data_offset + b.n_bytes]
        buffer[b.data_offset : b.data_offset + b.n_bytes] = data_a

    evidence = run_parity(_options(files, _copy_with(files, "swap.gguf", swap), n_tokens=FAULT_TOKENS))
    assert evidence["verdict"] == "FAIL"
    flagged = {entry["name"]: entry["cause"] for entry in evidence["tensors"]["flagged"]}
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert set(flagged) == {gate, up}
    assert "swapped" in flagged[gate] and up in flagged[gate]
    # The barely trained fixture's predictions move too little for the KL threshold, but they do move.
    for name, engine in evidence["engines"].items():
        assert engine["metrics"]["kl_mean"] > 10 * clean["engines"][name]["metrics"]["kl_mean"]


def _unpermuted_checkpoint(files, name):
    """The base checkpoint with Q/K rows pre-unpermuted, so a correct writer stores them in HF
    order: exactly the file a writer that skips the Q/K permutation makes from the base."""
    checkpoint = read_apr(files["base"])
    config = checkpoint.config
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensors = {}
    for tensor_name, tensor in checkpoint.tensors.items():
        kind = tensor_name.split(".")[-2]
        tensors[tensor_name] = from_interleaved(tensor, heads[kind]) if kind in heads else tensor
    path = files["folder"] / name
    write_apr(path, tensors, checkpoint.metadata)
    return path


def test_skipped_qk_permutation_fails_and_is_named(files):
    unpermuted = _unpermuted_checkpoint(files, "unpermuted.apr")
    quant = files["folder"] / "unpermuted-Q4_K_M.gguf"
    write_gguf(unpermuted, quant, "Q4_K_M", tokenizer_path=files["tokens"] / "tokenizer.json")
    evidence = run_parity(_options(files, quant, n_tokens=FAULT_TOKENS))
    assert evidence["verdict"] == "FAIL"
    flagged = {entry["name"]: entry["cause"] for entry in evidence["tensors"]["flagged"]}
    assert set(flagged) == {f"model.layers.{layer}.self_attn.{kind}.weight" for layer in (0, 1) for kind in ("q_proj", "k_proj")}
    assert all("skipped the Q/K permutation" in cause for cause in flagged.values())


def test_writer_bug_fails_engine_agreement_and_blames_the_writer(files, monkeypatch):
    checkpoint = read_apr(files["base"])
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    swapped = {**checkpoint.tensors, gate: checkpoint.tensors[up], up: checkpoint.tensors[gate]}
    miswired = files["folder"] / "miswired-base.apr"
    write_apr(miswired, swapped, checkpoint.metadata)

    def writer_that_swaps_gate_and_up(ckpt_path, out_path, qtype, **kwargs):
        write_gguf(miswired, out_path, qtype, **kwargs)

    monkeypatch.setattr("shipkit.quantize.write_gguf", writer_that_swaps_gate_and_up)
    evidence = run_parity(_options(files, n_tokens=FAULT_TOKENS))
    assert evidence["verdict"] == "FAIL"
    assert evidence["agreement"]["verdict"] == "FAIL"
    assert evidence["agreement"]["side"].startswith("conversion: the GGUF writer (both runtimes read")
    assert evidence["causes"][0] == evidence["agreement"]["side"]


def test_cli_exits_1_and_names_the_failed_checks_on_a_fault(files):
    def zero_tensor(buffer, tensors):
        tensor = tensors["blk.0.attn_output.weight"]
        buffer[tensor.data_offset : tensor.data_offset + tensor.n_bytes] = 0

    quant = _copy_with(files, "zero.gguf", zero_tensor)
    result = CliRunner().invoke(main, ["parity", str(files["base"]), str(quant), "--tokens", str(files["tokens"]),
                                       "--n-tokens", "256", "--ctx", str(CTX), "--engine", "torch"])
    assert result.exit_code == 1
    assert "parity gate FAILED" in result.output and "tensors.rel_rmse" in result.output


def test_torch_only_run_fails_a_contract_that_requires_both_engines(files):
    evidence = run_parity(_options(files, n_tokens=256, engines=("torch",)))
    assert evidence["agreement"]["verdict"] == "SKIPPED"
    assert "llama.cpp: required by the contract but not run" in evidence["failed"]


def test_torch_only_run_passes_a_contract_that_requires_torch_only(files, tmp_path):
    contract = tmp_path / "torch.toml"
    contract.write_text('[parity]\nrequired_engines = ["torch"]\n'
                        '[parity.thresholds.kl_mean]\nmax = 0.0625\nreason = "small model"\n')
    evidence = run_parity(_options(files, n_tokens=256, engines=("torch",), contract=contract))
    assert evidence["verdict"] == "PASS"
    assert evidence["contract"]["required_engines"] == ["torch"]


def test_window_longer_than_the_model_context_is_an_input_error(files):
    with pytest.raises(InputError, match="max_position_embeddings"):
        run_parity(_options(files, n_tokens=4096, ctx=4096, engines=("torch",)))


def test_a_quant_that_is_not_a_gguf_is_an_input_error(files, tiny_run_dir):
    with pytest.raises(InputError, match="must be a .gguf"):
        run_parity(_options(files, quant=tiny_run_dir / "ckpt" / "epoch-001.apr", engines=("torch",)))


def test_fewer_val_tokens_than_one_window_is_an_input_error(files):
    with pytest.raises(InputError, match="at least one window"):
        run_parity(_options(files, n_tokens=CTX - 1))


def test_missing_base_is_an_input_error(files, tmp_path):
    with pytest.raises(InputError, match="not found"):
        run_parity(ParityOptions(base=tmp_path / "absent.apr", quant=files["quant"], tokens_dir=files["tokens"]))


def test_base_may_be_an_f32_gguf(files):
    base = files["folder"] / "model-F32.gguf"
    write_gguf(files["base"], base, "F32", tokenizer_path=files["tokens"] / "tokenizer.json")
    evidence = run_parity(_options(files, n_tokens=256, base=base))
    assert evidence["base"]["format"] == "gguf"
    assert evidence["verdict"] == "PASS"
    assert Path(evidence["agreement"]["model"]) == base
