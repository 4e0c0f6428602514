"""`shipkit validate`, `shipkit inspect` and `shipkit convert` on real files."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from shipkit.apr import read_apr, write_apr
from shipkit.cli import main
from shipkit.config import ModelConfig
from shipkit.model import CausalLM

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "epoch-004.apr"
    write_apr(path, CausalLM(TINY).weights(), {"kind": "weights", "config": TINY.to_dict()})
    return path


def run(*args: str):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def test_validate_prints_the_one_line_summary(checkpoint):
    result = run("validate", checkpoint)
    assert result.exit_code == 0
    assert result.output == "epoch-004.apr: APR v2 / 21 tensors / 0.00 GiB / checksum VALID\n"


def test_validate_json_carries_the_report(checkpoint):
    result = run("validate", checkpoint, "--json")
    report = json.loads(result.output)
    assert (result.exit_code, report["ok"], report["tensor_count"]) == (0, True, 21)
    assert report["nbytes"] == checkpoint.stat().st_size


def test_validate_fails_on_an_unexpected_tensor_count(checkpoint):
    result = run("validate", checkpoint, "--expect-tensors", "219")
    assert result.exit_code == 1
    assert "epoch-004.apr: tensor count: expected 219 tensors, file has 21" in result.output


def test_validate_names_truncation_with_both_sizes(checkpoint):
    size = checkpoint.stat().st_size
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    result = run("validate", checkpoint, "--json")
    assert result.exit_code == 1
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert report["problems"][0] == f"truncated: expected {size} bytes, found 1000"


def test_validate_of_a_missing_file_is_a_usage_error(tmp_path):
    result = run("validate", tmp_path / "none.apr")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'none.apr'}: no such file"


def test_inspect_lists_metadata_and_tensor_table(checkpoint):
    result = run("inspect", checkpoint)
    assert result.exit_code == 0
    assert "kind: \"weights\"" in result.output
    assert "model.layers.1.mlp.down_proj.weight" in result.output
    assert any(line.split()[1:] == ["F32", "64x32", "8192"] for line in result.output.splitlines()
               if "embed_tokens" in line)


def test_inspect_json_gives_dtype_shape_and_bytes(checkpoint):
    info = json.loads(run("inspect", checkpoint, "--json").output)
    assert info["metadata"]["config"] == TINY.to_dict()
    assert info["tensors"][0] == {"name": "model.embed_tokens.weight", "dtype": "F32",
                                  "shape": [64, 32], "nbytes": 8192}


def test_inspect_of_a_corrupt_index_fails_with_one_line(checkpoint):
    raw = bytearray(checkpoint.read_bytes())
    raw[70] ^= 0xFF  # inside the JSON index
    checkpoint.write_bytes(raw)
    result = run("inspect", checkpoint)
    assert result.exit_code == 1
    assert result.output.startswith("error: epoch-004.apr: ") and result.output.count("\n") == 1


def test_convert_apr_to_safetensors_and_back_keeps_tensors_and_metadata(checkpoint, tmp_path):
    assert run("convert", checkpoint, tmp_path / "w.safetensors").exit_code == 0
    assert run("convert", tmp_path / "w.safetensors", tmp_path / "back.apr").exit_code == 0
    original, back = read_apr(checkpoint), read_apr(tmp_path / "back.apr")
    assert back.metadata == original.metadata
    assert all(torch.equal(back.tensors[name], tensor) for name, tensor in original.tensors.items())


def test_convert_safetensors_takes_the_config_from_a_json_file(tmp_path):
    weights = CausalLM(TINY).weights()
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    result = run("convert", tmp_path / "model.safetensors", tmp_path / "model.apr",
                 "--config", tmp_path / "config.json")
    assert result.output == "model.safetensors -> model.apr: 21 tensors\n"
    converted = read_apr(tmp_path / "model.apr")
    assert converted.config == TINY
    assert converted.metadata["producer"]["source"] == "model.safetensors"
    assert run("validate", tmp_path / "model.apr", "--expect-tensors", "21").exit_code == 0


def test_convert_without_config_leaves_it_out(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2, 2)}, tmp_path / "x.safetensors")
    assert run("convert", tmp_path / "x.safetensors", tmp_path / "x.apr").exit_code == 0
    assert read_apr(tmp_path / "x.apr").config is None


def test_convert_refuses_weights_that_do_not_fit_the_config(tmp_path):
    safetensors.torch.save_file({"w": torch.ones(2, 2)}, tmp_path / "x.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    result = run("convert", tmp_path / "x.safetensors", tmp_path / "x.apr", "--config",
                 tmp_path / "config.json")
    assert result.exit_code == 2
    assert "config implies 21 tensors, got 1" in result.output
    assert not (tmp_path / "x.apr").exists()


def test_convert_refuses_a_corrupt_apr(checkpoint, tmp_path):
    raw = bytearray(checkpoint.read_bytes())
    raw[-100] ^= 1
    checkpoint.write_bytes(raw)
    result = run("convert", checkpoint, tmp_path / "w.safetensors")
    assert result.exit_code == 1
    assert "tensor lm_head.weight: checksum MISMATCH" in result.output
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("names", [("a.apr", "b.apr"), ("a.bin", "b.apr"), ("a.apr", "b.pt")])
def test_convert_needs_one_safetensors_and_one_apr(tmp_path, names):
    result = run("convert", tmp_path / names[0], tmp_path / names[1])
    assert result.exit_code == 2
    assert "give one .safetensors and one .apr file" in result.output


def test_convert_reports_an_unreadable_safetensors_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors at all")
    result = run("convert", tmp_path / "bad.safetensors", tmp_path / "x.apr")
    assert result.exit_code == 1
    assert "bad.safetensors: not a readable safetensors file" in result.output
