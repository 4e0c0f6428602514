"""The parity gate's tokenizer check on imported Qwen2-, Qwen3-, Llama-3- and Mistral-style
models: it passes on what shipkit writes and fails, naming where, on GGUFs planted with the
faults users hit (a wrong pre-tokenizer, a flipped add_bos_token, a missing chat template)."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from tokenizer_helpers import EXPECTED_PRE, special_ids, write_family_hf_model

from shipkit.corpus import CorpusConfig, build_corpus
from shipkit.hf_import import import_hf
from shipkit.parity import ParityOptions, run_parity
from shipkit.parity.tokenizer import check_tokenizer, val_documents
from shipkit.quantize import write_gguf
from shipkit.tokenize import encode_corpus, read_tokens
from shipkit.tokenizer_contract import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE

pytest.importorskip("llama_cpp")

# Held-out text: stdlib code the family BPEs of tokenizer_helpers were not trained on.
CORPUS_PACKAGES = ("email", "urllib")


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama3", "mistral"])
def imported(request, tmp_path_factory):
    """An imported family checkpoint, its token folder built with its own tokenizer, and its
    F32 GGUF: {"apr", "tokens", "gguf", "hf", "family"}."""
    family = request.param
    root = tmp_path_factory.mktemp(f"fidelity-{family}")
    write_family_hf_model(root / "hf", family, base_model=f"example/{family}-coder")
    report = import_hf(root / "hf", root / "run" / "ckpt" / "best.apr")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    build_corpus([stdlib / name for name in CORPUS_PACKAGES], root / "corpus", CorpusConfig(val_fraction=0.3))
    encode_corpus(root / "corpus", root / "tokens", report.tokenizer_path)
    gguf = write_gguf(report.apr_path, root / "model-F32.gguf", "F32").path
    return {"apr": report.apr_path, "tokens": root / "tokens", "gguf": gguf, "hf": root / "hf", "family": family,
            "root": root}


def _check(imported, gguf=None):
    from shipkit.apr import read_apr

    config = read_apr(imported["apr"]).metadata["config"]
    return check_tokenizer(gguf or imported["gguf"], imported["tokens"], config)


def test_the_tokens_stage_separates_documents_with_the_models_own_end_of_text(imported):
    manifest = json.loads((imported["tokens"] / "manifest.json").read_text())
    # The EOS its tokenizer_config.json names: Qwen2's <|endoftext|>, Llama-3.1-Instruct's <|eot_id|>.
    expected = {"qwen2": "<|endoftext|>", "qwen3": "<|im_end|>", "llama3": "<|eot_id|>",
                "mistral": "</s>"}[imported["family"]]
    assert manifest["eot_token"] == expected
    assert manifest["eot_id"] == special_ids(imported["hf"])[expected]
    val = read_tokens(imported["tokens"], "val")
    assert int(np.count_nonzero(np.asarray(val.shards[0]) == manifest["eot_id"])) == manifest["splits"]["val"]["docs"]
    assert (imported["tokens"] / TOKENIZER_CONFIG_FILE).is_file()


def test_val_documents_decode_to_the_corpus_text(imported):
    from shipkit.corpus import iter_texts
    from shipkit.tokenize import load_tokenizer

    tokenizer = load_tokenizer(imported["tokens"] / "tokenizer.json")
    decoded = list(val_documents(imported["tokens"], tokenizer))
    assert decoded == list(iter_texts(imported["root"] / "corpus", "val"))


def test_shipkits_gguf_of_an_imported_model_passes_every_part(imported):
    result = _check(imported)
    assert result["verdict"] == "PASS", result
    documents = result["documents"]
    assert documents["documents_compared"] == json.loads(
        (imported["tokens"] / "manifest.json").read_text())["splits"]["val"]["docs"]
    assert documents["documents_differing"] == 0 and documents["first_difference"] is None
    assert result["pre"] == result["gguf_pre"] == EXPECTED_PRE[imported["family"]]
    assert result["special_tokens"]["add_bos"] is (imported["family"] in ("llama3", "mistral"))
    assert result["chat_template"]["verdict"] == "PASS"


def test_a_planted_gpt2_pre_tokenizer_fails_naming_the_first_differing_document(imported, tmp_path):
    wrong = write_gguf(imported["apr"], tmp_path / "gpt2-pre.gguf", "F32", pre="gpt-2").path
    result = _check(imported, wrong)
    assert result["verdict"] == "FAIL" and "documents" in result["failed"]
    first = result["documents"]["first_difference"]
    assert result["documents"]["documents_differing"] > 0
    assert first["hf_ids"] != first["llama_cpp_ids"]
    documents = list(val_documents(imported["tokens"], _tokenizer(imported)))
    assert first["text"] in documents[first["document"]]


def test_a_flipped_add_bos_token_fails_the_special_tokens_part(imported, tmp_path):
    planted = tmp_path / "flipped-bos.gguf"
    shutil.copyfile(imported["gguf"], planted)
    reader = GGUFReader(planted, "r+")
    field = reader.fields["tokenizer.ggml.add_bos_token"]
    field.parts[field.data[0]][0] = not bool(field.parts[field.data[0]][0])
    reader.data.flush()
    result = _check(imported, planted)
    assert result["failed"] == ["special_tokens"]
    special = result["special_tokens"]
    assert special["hf_ids"] != special["llama_cpp_ids"]


def test_a_gguf_without_the_chat_template_fails_the_chat_part(imported, tmp_path):
    bare = tmp_path / "tokenizer"
    bare.mkdir()
    shutil.copy(imported["tokens"] / "tokenizer.json", bare / "tokenizer.json")
    config = json.loads((imported["tokens"] / TOKENIZER_CONFIG_FILE).read_text())
    config.pop("chat_template", None)
    (bare / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    assert not (bare / CHAT_TEMPLATE_FILE).exists()
    gguf = write_gguf(imported["apr"], tmp_path / "no-template.gguf", "F32", tokenizer_path=bare / "tokenizer.json").path
    result = _check(imported, gguf)
    assert result["failed"] == ["chat_template"]
    assert "is not the tokenizer's chat template" in result["chat_template"]["note"]


def test_the_parity_gate_fails_and_names_the_tokenizer_cause(imported, tmp_path):
    wrong = write_gguf(imported["apr"], tmp_path / "gpt2-pre-Q8_0.gguf", "Q8_0", pre="gpt-2").path
    evidence = run_parity(ParityOptions(base=imported["apr"], quant=wrong, tokens_dir=imported["tokens"],
                                        n_tokens=256, ctx=64, run_dir=tmp_path / "run"))
    assert evidence["verdict"] == "FAIL"
    assert "tokenizer.documents" in evidence["failed"]
    assert any(cause.startswith("tokenizer: llama.cpp tokenizes") and "'gpt-2'" in cause
               for cause in evidence["causes"])


def _tokenizer(imported):
    from shipkit.tokenize import load_tokenizer

    return load_tokenizer(imported["tokens"] / "tokenizer.json")
