"""`shipkit import`: tiny random Llama and Qwen2 checkpoints made locally with transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shipkit.apr import read_apr, validate_apr
from shipkit.errors import InputError
from shipkit.hf_import import import_hf
from shipkit.model import CausalLM, ModelConfig

transformers = pytest.importorskip("transformers")

SAMPLE_CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


def _write_tokenizer(path) -> int:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([SAMPLE_CODE], trainer)
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def _save_tiny_hf_model(folder, family: str, hidden: int = 96, tied: bool = False, shard: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(folder / "tokenizer.json")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    if family == "llama":
        config = transformers.LlamaConfig(rms_norm_eps=1e-5, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(rms_norm_eps=1e-6, **common)
        model = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return model.eval()


def _shipkit_logits(apr_path, ids):
    checkpoint = read_apr(apr_path)
    model = CausalLM(checkpoint.config)
    model.load_weights(checkpoint.tensors)
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_import_gives_the_same_logits_as_transformers(tmp_path, family):
    hf_model = _save_tiny_hf_model(tmp_path / "hf", family)
    report = import_hf(tmp_path / "hf", tmp_path / "out" / "model.apr")
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert report.architecture == family
    assert torch.allclose(_shipkit_logits(report.apr_path, ids), expected, atol=1e-4, rtol=0)


def test_import_reads_sharded_tied_checkpoint_and_validates(tmp_path):
    _save_tiny_hf_model(tmp_path / "hf", "llama", tied=True, shard="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    report = import_hf(tmp_path / "hf", tmp_path / "out" / "model.apr")
    config = ModelConfig.from_dict(read_apr(report.apr_path).metadata["config"])
    assert config.tie_word_embeddings
    assert report.tensor_count == 9 * 2 + 2
    assert validate_apr(report.apr_path).ok


def test_import_records_upstream_license_and_base_model(tmp_path):
    _save_tiny_hf_model(tmp_path / "tiny-upstream", "qwen2")
    report = import_hf(tmp_path / "tiny-upstream", tmp_path / "out" / "model.apr")
    producer = read_apr(report.apr_path).metadata["producer"]
    assert producer["source"] == {"base_model": "tiny-upstream", "license": "apache-2.0", "model_type": "qwen2"}
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tiny-upstream" / "tokenizer.json").read_bytes()


def test_import_rejects_unsupported_family_naming_the_field(tmp_path):
    _save_tiny_hf_model(tmp_path / "hf", "llama")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "mistral"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="model_type: 'mistral' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "model.apr")


def test_import_cli_reports_missing_folder_on_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "shipkit", "import", str(tmp_path / "nope"), "--out", str(tmp_path / "m.apr")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "config.json: not found" in result.stderr
    assert "Traceback" not in result.stderr
