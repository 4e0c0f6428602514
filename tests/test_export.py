"""`shipkit export`: the HF folder loads in transformers and computes what shipkit computes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from release_helpers import SAMPLE_CODE, write_tiny_checkpoint, write_tokenizer
from safetensors import safe_open

from shipkit.cli import main
from shipkit.errors import IntegrityError
from shipkit.export import export_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    write_tokenizer(run_dir / "tokenizer.json")
    model = write_tiny_checkpoint(run_dir / "ckpt" / "best.apr", run_dir / "tokenizer.json")
    return run_dir, model


def _hf_logits(folder, ids):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(ids).logits


def _ids(vocab_size):
    return torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, architecture):
    write_tokenizer(tmp_path / "tokenizer.json")
    model = write_tiny_checkpoint(tmp_path / "m.apr", tmp_path / "tokenizer.json", architecture=architecture,
                                  tied=architecture == "qwen2")
    export_hf(tmp_path / "m.apr", tmp_path / "hf")
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids)
    assert torch.allclose(_hf_logits(tmp_path / "hf", ids), expected, atol=1e-4, rtol=0)


TRICKY_TEXTS = [
    SAMPLE_CODE[:300],
    "\tif x:\n\t\treturn  'ünïcödé' + \"日本語\"  # emoji 🚀\n",
    "    " * 12 + "pass\r\n\n\n<|endoftext|>def f(): ...",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=["code", "unicode-tabs-emoji", "whitespace-special-token"])
def test_export_tokenizer_gives_the_trained_run_tokenizer_ids(tiny_run_dir, tmp_path, text):
    from tokenizers import Tokenizer

    export_hf(tiny_run_dir / "ckpt" / "best.apr", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    expected = Tokenizer.from_file(str(tiny_run_dir / "tokenizer.json")).encode(text).ids
    assert hf_tokenizer(text)["input_ids"] == expected
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == 0


def test_export_writes_every_hf_file_with_pt_format_metadata(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    report = export_hf(run_dir / "ckpt" / "best.apr", tmp_path / "hf")
    expected = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                "tokenizer.json", "tokenizer_config.json"]
    assert report.files == expected
    assert sorted(path.name for path in (tmp_path / "hf").iterdir()) == expected
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"]


def test_export_shards_past_the_size_limit_and_still_loads(tiny_run, tmp_path):
    run_dir, model = tiny_run
    report = export_hf(run_dir / "ckpt" / "best.apr", tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert report.shards > 2
    assert set(index["weight_map"]) == set(model.weights())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.weights().values())
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        expected = model(ids)
    assert torch.allclose(_hf_logits(tmp_path / "hf", ids), expected, atol=1e-4, rtol=0)


def test_export_refuses_a_tokenizer_other_than_the_recorded_one(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    other = tmp_path / "other.json"
    other.write_text((run_dir / "tokenizer.json").read_text().replace("<|endoftext|>", "<|eot|>"))
    with pytest.raises(IntegrityError, match="sha256 differs"):
        export_hf(run_dir / "ckpt" / "best.apr", tmp_path / "hf", tokenizer_path=other)


def test_export_cli_reports_a_missing_checkpoint_on_one_line(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nope.apr"), "--hf", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "nope.apr" in result.stderr


def test_export_cli_prints_the_files_it_wrote(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    result = CliRunner().invoke(main, ["export", str(run_dir / "ckpt" / "best.apr"), "--hf", str(tmp_path / "hf"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == sorted(path.name for path in (tmp_path / "hf").iterdir())
