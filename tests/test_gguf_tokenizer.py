"""The GGUF's tokenizer keys: llama.cpp reading shipkit's GGUF tokenizes code as the HF tokenizer
does, adds BOS as it does, and every tokenizer.* / general.* key equals what llama.cpp's own
convert_hf_to_gguf.py writes for the same folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from quant_helpers import write_random_checkpoint
from tokenizer_helpers import (
    ARCHITECTURE,
    EXPECTED_PRE,
    FAMILIES,
    held_out_documents,
    llama_cpp_source,
    model_vocab_size,
    run_llama_cpp_converter,
    special_ids,
    write_family_hf_model,
    write_family_tokenizer,
    write_tiny_hf_model,
)
from tokenizers import Tokenizer

from shipkit.apr import read_apr
from shipkit.config import ModelConfig
from shipkit.hf_import import import_hf
from shipkit.quantize import write_gguf
from shipkit.quantize.gguf_source import source_metadata
from shipkit.quantize.gguf_tokenizer import FIM_KEYS, read_tokenizer
from shipkit.tokenizer_contract import CARRIED_FILES

SHIPKIT = "gpt2"  # shipkit's own trained tokenizer (tiny_tokens_dir), beside the families
ALL_TOKENIZERS = (SHIPKIT, *FAMILIES)
MIN_DOCUMENTS = 50
BASE_MODEL = "test-org/TinyCoder-v1"  # the upstream the converted folders name in their card
# Keys only shipkit writes, on purpose (docs/import.md, "What the GGUF carries"): EOT and FIM ids
# llama.cpp would otherwise guess from token texts in hash-map order, and add_bos/add_eos that
# the converter leaves to llama.cpp's per-pre-tokenizer default when the post-processor and
# tokenizer_config.json say nothing.
SHIPKIT_ONLY_KEYS = {gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.ADD_BOS, gguf.Keys.Tokenizer.ADD_EOS,
                     *FIM_KEYS.values()}
# general.* keys naming the release itself, not its source: shipkit names the release (run folder,
# --base-name); the converter titles the folder name. Not compared.
RELEASE_NAME_KEYS = {gguf.Keys.General.NAME, gguf.Keys.General.VERSION, gguf.Keys.General.FINETUNE}


def _tiny_config(architecture: str, vocab_size: int) -> ModelConfig:
    return ModelConfig(architecture=architecture, vocab_size=vocab_size, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer_dirs(tiny_tokens_dir, tmp_path_factory) -> dict[str, Path]:
    """Each family's tokenizer folder, and shipkit's own tokenizer.json alone in a folder."""
    root = tmp_path_factory.mktemp("gguf-families")
    for family in FAMILIES:
        write_family_tokenizer(root / family, family)
    (root / SHIPKIT).mkdir()
    shutil.copyfile(tiny_tokens_dir / "tokenizer.json", root / SHIPKIT / "tokenizer.json")
    return {name: root / name for name in ALL_TOKENIZERS}


@pytest.fixture(scope="module")
def family_ggufs(tokenizer_dirs) -> dict[str, Path]:
    """An F32 GGUF of a random 1-layer model per tokenizer, written by shipkit."""
    ggufs = {}
    for name, folder in tokenizer_dirs.items():
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
        config = _tiny_config(ARCHITECTURE.get(name, "llama"), model_vocab_size(vocab))
        write_random_checkpoint(folder / "model.apr", config)
        ggufs[name] = write_gguf(folder / "model.apr", folder / "model.gguf", "F32",
                                 tokenizer_path=folder / "tokenizer.json").path
    return ggufs


def _llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_llama_cpp_tokenizes_held_out_code_as_hf(tokenizer_dirs, family_ggufs, name):
    documents = held_out_documents()
    hf = Tokenizer.from_file(str(tokenizer_dirs[name] / "tokenizer.json"))
    llama = _llama(family_ggufs[name])
    differing = [index for index, text in enumerate(documents)
                 if llama.tokenize(text.encode(), add_bos=False, special=False)
                 != hf.encode(text, add_special_tokens=False).ids]
    assert len(documents) >= MIN_DOCUMENTS
    assert differing == []


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_llama_cpp_adds_bos_as_hf(tokenizer_dirs, family_ggufs, name):
    import llama_cpp

    hf = Tokenizer.from_file(str(tokenizer_dirs[name] / "tokenizer.json"))
    llama = _llama(family_ggufs[name])
    text = "import os\n"
    with_special = hf.encode(text).ids
    assert llama.tokenize(text.encode(), add_bos=True, special=False) == with_special
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llama.model))
    assert add_bos == (len(with_special) > len(hf.encode(text, add_special_tokens=False).ids))


def test_gpt2_pre_tokenizer_on_a_qwen2_vocabulary_breaks_most_documents(tokenizer_dirs, tmp_path):
    """Issue 15: the pre-tokenizer name matters; always writing gpt-2 mis-tokenizes Qwen2 code."""
    folder = tokenizer_dirs["qwen2"]
    gguf_path = write_gguf(folder / "model.apr", tmp_path / "gpt2-pre.gguf", "F32",
                           tokenizer_path=folder / "tokenizer.json", pre="gpt-2").path
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    llama = _llama(gguf_path)
    documents = held_out_documents()
    differing = sum(llama.tokenize(text.encode(), add_bos=False, special=False)
                    != hf.encode(text, add_special_tokens=False).ids for text in documents)
    assert differing > len(documents) // 2


def test_token_types_follow_the_converter_rules(tokenizer_dirs):
    folder = tokenizer_dirs["qwen2"]
    ids = special_ids(folder)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    tokenizer = read_tokenizer(folder / "tokenizer.json", model_vocab_size(vocab))
    types = tokenizer.token_types
    assert types[ids["<|im_end|>"]] == gguf.TokenType.CONTROL  # special
    assert types[ids["<|fim_prefix|>"]] == gguf.TokenType.CONTROL  # not special, looks special
    assert types[ids["<tool_call>"]] == gguf.TokenType.USER_DEFINED
    assert types[vocab] == gguf.TokenType.UNUSED and tokenizer.tokens[vocab] == f"[PAD{vocab}]"
    assert types[0] == gguf.TokenType.NORMAL


def test_source_metadata_of_a_hub_id_and_of_a_folder_name():
    assert source_metadata({"base_model": "Qwen/Qwen2.5-Coder-7B", "license": "apache-2.0"}) == {
        "general.license": "apache-2.0", "general.basename": "Qwen2.5-Coder",
        "general.base_model.count": 1, "general.base_model.0.name": "Qwen2.5 Coder 7B",
        "general.base_model.0.organization": "Qwen",
        "general.base_model.0.repo_url": "https://huggingface.co/Qwen/Qwen2.5-Coder-7B"}
    assert source_metadata({"base_model": "tiny-upstream", "license": "unknown"}) == {
        "general.base_model.count": 1, "general.base_model.0.name": "Tiny Upstream"}


# --- key by key against convert_hf_to_gguf.py ------------------------------------------------


@pytest.fixture(scope="module")
def converter_source() -> Path:
    source = llama_cpp_source()
    if source is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not available: the llama-cpp-python sdist "
                    "could not be downloaded (set SHIPKIT_LLAMA_CPP_SOURCE to a vendor/llama.cpp folder)")
    return source


def _hf_folder(name: str, root: Path, tiny_tokens_dir: Path) -> Path:
    """An HF checkpoint folder named like its upstream (so the converter's folder-derived basename
    is the upstream's) with the tokenizer of `name`."""
    folder = root / name / BASE_MODEL.split("/")[1]
    if name == SHIPKIT:
        folder.mkdir(parents=True)
        shutil.copyfile(tiny_tokens_dir / "tokenizer.json", folder / "tokenizer.json")
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
        write_tiny_hf_model(folder, vocab_size=model_vocab_size(vocab), architecture="llama",
                            special={"bos_token_id": 0, "eos_token_id": 0}, base_model=BASE_MODEL)
    else:
        write_family_hf_model(folder, name, base_model=BASE_MODEL)
    return folder


def _fields(path: Path) -> dict[str, object]:
    """tokenizer.* and general.* keys of a GGUF, values as Python objects."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if name.startswith(("tokenizer.", "general."))}


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_keys_equal_llama_cpp_converter(converter_source, tiny_tokens_dir, tmp_path, name):
    hf_dir = _hf_folder(name, tmp_path / "hf", tiny_tokens_dir)
    converted = tmp_path / "converter.gguf"
    run_llama_cpp_converter(converter_source, hf_dir, converted, EXPECTED_PRE.get(name, "gpt-2"))

    report = import_hf(hf_dir, tmp_path / "ship" / "model.apr", base_model=BASE_MODEL)
    for file_name in CARRIED_FILES:  # until import carries the companions beside the APR
        if (hf_dir / file_name).is_file() and not (report.apr_path.parent / file_name).is_file():
            shutil.copyfile(hf_dir / file_name, report.apr_path.parent / file_name)
    written = write_gguf(report.apr_path, tmp_path / "ship" / "model.gguf", "F32",
                         tokenizer_path=report.apr_path.parent / "tokenizer.json")
    ours = _fields(written.path)
    ours.update(source_metadata(read_apr(report.apr_path).metadata["producer"]["source"]))
    theirs = _fields(converted)

    shared = sorted((set(ours) & set(theirs)) - RELEASE_NAME_KEYS)
    different = [key for key in shared if not _same(ours[key], theirs[key])]
    assert different == [], {key: (_short(ours[key]), _short(theirs[key])) for key in different}
    assert set(theirs) - set(ours) - RELEASE_NAME_KEYS == set()
    assert set(ours) - set(theirs) - RELEASE_NAME_KEYS <= SHIPKIT_ONLY_KEYS
    assert {gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.MERGES, gguf.Keys.Tokenizer.PRE,
            gguf.Keys.General.BASE_MODEL_COUNT, gguf.Keys.General.LICENSE} <= set(shared)


def _same(ours: object, theirs: object) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return bool(np.isclose(ours, theirs))
    return ours == theirs


def _short(value: object) -> object:
    return value[:8] if isinstance(value, list) else value
