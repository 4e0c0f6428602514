"""`shipkit import`: tiny random Llama and Qwen2 checkpoints made locally with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import save_tiny_hf_model

from shipkit.apr import read_apr, validate_apr
from shipkit.config import ModelConfig
from shipkit.errors import InputError
from shipkit.hf_import import import_hf
from shipkit.model import CausalLM


def _shipkit_logits(apr_path, ids):
    checkpoint = read_apr(apr_path)
    model = CausalLM(checkpoint.config)
    model.load_weights(checkpoint.tensors)
    with torch.no_grad():
        return model.eval()(ids)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_import_gives_the_same_logits_as_transformers(tmp_path, family):
    hf_model = save_tiny_hf_model(tmp_path / "hf", family)
    report = import_hf(tmp_path / "hf", tmp_path / "out" / "model.apr")
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
    assert report.architecture == family
    assert torch.allclose(_shipkit_logits(report.apr_path, ids), expected, atol=1e-4, rtol=0)


def test_import_reads_sharded_tied_checkpoint_and_validates(tmp_path):
    save_tiny_hf_model(tmp_path / "hf", "llama", tied=True, shard="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    report = import_hf(tmp_path / "hf", tmp_path / "out" / "model.apr")
    config = ModelConfig.from_dict(read_apr(report.apr_path).metadata["config"])
    assert config.tie_word_embeddings
    assert report.tensor_count == 9 * 2 + 2
    assert validate_apr(report.apr_path).ok


def test_import_records_upstream_license_and_base_model(tmp_path):
    save_tiny_hf_model(tmp_path / "tiny-upstream", "qwen2")
    report = import_hf(tmp_path / "tiny-upstream", tmp_path / "out" / "model.apr")
    producer = read_apr(report.apr_path).metadata["producer"]
    assert producer["source"] == {"base_model": "tiny-upstream", "license": "apache-2.0", "model_type": "qwen2"}
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tiny-upstream" / "tokenizer.json").read_bytes()


def test_import_rejects_unsupported_family_naming_the_field(tmp_path):
    save_tiny_hf_model(tmp_path / "hf", "llama")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "gemma"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InputError, match="model_type: 'gemma' is not supported"):
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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_imported_model_runs_in_llama_cpp_with_the_logits_of_transformers(tmp_path, family):
    llama_cpp = pytest.importorskip("llama_cpp")
    from quant_helpers import gguf_tensors, llama_cpp_quantize

    from shipkit.quantize import write_gguf

    hf_model = save_tiny_hf_model(tmp_path / "hf", family, hidden=96)  # not a multiple of 256
    report = import_hf(tmp_path / "hf", tmp_path / "out" / "model.apr")
    f32 = write_gguf(report.apr_path, tmp_path / "f32.gguf", "F32").path
    ids = [5, 17, 42, 99, 3, 250, 7, 64]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0].numpy()
    runtime = llama_cpp.Llama(str(f32), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    runtime.eval(ids)
    found = np.array(runtime.scores[: len(ids)])
    assert np.abs(found - expected).max() / np.abs(expected).max() <= 1e-3
    ours = write_gguf(report.apr_path, tmp_path / "ours-q4km.gguf", "Q4_K_M").path
    llama_cpp_quantize(Path(f32), tmp_path / "theirs-q4km.gguf", "Q4_K_M")
    assert gguf_tensors(Path(ours)) == gguf_tensors(tmp_path / "theirs-q4km.gguf")
