"""The tokenizer contract: llama.cpp's pre-tokenizer name, special ids, BOS/EOS and chat template
read from real-shaped tokenizer folders (tests/tokenizer_helpers.py) and shipkit's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizer_helpers import (
    EXPECTED_PRE,
    FAMILIES,
    special_ids,
    write_family_tokenizer,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from shipkit.config import ModelConfig
from shipkit.errors import InputError
from shipkit.tokenizer_contract import detect_pre_tokenizer, read_contract

QWEN2_NUMBER = "\\p{N}|"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tokenizer folder per family, shared by the module: copy before changing one."""
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        write_family_tokenizer(root / family, family)
    return {family: root / family for family in FAMILIES}


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def _tokenizer_json(folder: Path) -> dict:
    return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_names_each_family(family_dirs, family):
    folder = family_dirs[family]
    assert detect_pre_tokenizer(_tokenizer_json(folder), folder / "tokenizer.json") == EXPECTED_PRE[family]


def test_detect_shipkit_own_tokenizer_is_gpt2(tiny_tokens_dir):
    path = tiny_tokens_dir / "tokenizer.json"
    assert detect_pre_tokenizer(_tokenizer_json(tiny_tokens_dir), path) == "gpt-2"


def test_detect_llama3_regex_without_ignore_merges_is_smaug(family_dirs):
    data = _tokenizer_json(family_dirs["llama3"])
    data["model"]["ignore_merges"] = False
    assert detect_pre_tokenizer(data, "tokenizer.json") == "smaug-bpe"


def test_detect_refuses_unknown_regex_on_one_line_naming_it(family_dirs):
    data = _tokenizer_json(family_dirs["qwen2"])
    split = data["pre_tokenizer"]["pretokenizers"][0]
    split["pattern"]["Regex"] = split["pattern"]["Regex"].replace(QWEN2_NUMBER, "\\p{N}{1,2}|")
    with pytest.raises(InputError) as error:
        detect_pre_tokenizer(data, "x/tokenizer.json")
    message = str(error.value)
    assert "\n" not in message
    assert "\\p{N}{1,2}" in message and "pre=NAME" in message
    assert len(message) < 400


def test_detect_refuses_an_ignore_merges_llama_cpp_does_not_apply(family_dirs):
    data = _tokenizer_json(family_dirs["qwen2"])
    data["model"]["ignore_merges"] = True
    with pytest.raises(InputError, match="ignore_merges=true matches no llama.cpp pre-tokenizer"):
        detect_pre_tokenizer(data, "tokenizer.json")


def test_detect_refuses_a_normalizer_llama_cpp_does_not_apply(family_dirs):
    data = _tokenizer_json(family_dirs["qwen2"])
    data["normalizer"] = {"type": "Lowercase"}
    with pytest.raises(InputError, match="normalizer Lowercase is not applied by llama.cpp"):
        detect_pre_tokenizer(data, "tokenizer.json")


def test_pre_override_names_an_unrecognised_tokenizer(family_dirs, tmp_path):
    folder = _copy(family_dirs["qwen2"], tmp_path)
    _rewrite(folder / "tokenizer.json", lambda data: data["pre_tokenizer"]["pretokenizers"][0]["pattern"]
             .update(Regex="\\p{N}{1,2}|\\s+"))
    with pytest.raises(InputError, match="pre=NAME"):
        read_contract(folder / "tokenizer.json")
    assert read_contract(folder / "tokenizer.json", pre="qwen2").pre == "qwen2"


def test_pre_override_must_be_a_llama_cpp_name(family_dirs):
    with pytest.raises(InputError, match="pre qwen-2: not a pre-tokenizer name llama.cpp knows"):
        read_contract(family_dirs["qwen2"] / "tokenizer.json", pre="qwen-2")


def test_shipkit_own_tokenizer_keeps_todays_contract(tiny_tokens_dir):
    contract = read_contract(tiny_tokens_dir / "tokenizer.json",
                             model_config=ModelConfig(vocab_size=2048).to_dict())
    assert (contract.pre, contract.bos_id, contract.eos_id, contract.add_bos, contract.add_eos,
            contract.separator_id, contract.eot_id, contract.chat_template) == (
        "gpt-2", 0, 0, False, False, 0, 0, None)


def test_qwen2_contract(family_dirs):
    folder = family_dirs["qwen2"]
    ids = special_ids(folder)
    config = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"]}
    contract = read_contract(folder / "tokenizer.json", model_config=config)
    assert (contract.bos_id, contract.eos_id, contract.pad_id, contract.unk_id) == (
        ids["<|endoftext|>"], ids["<|endoftext|>"], ids["<|endoftext|>"], None)
    assert (contract.add_bos, contract.add_eos, contract.add_space_prefix) == (False, False, False)
    assert contract.eot_id == ids["<|im_end|>"]  # llama.cpp's list puts <|im_end|> first
    assert contract.fim_ids == {"pre": ids["<|fim_prefix|>"], "suf": ids["<|fim_suffix|>"],
                                "mid": ids["<|fim_middle|>"], "pad": ids["<|fim_pad|>"],
                                "rep": ids["<|repo_name|>"], "sep": ids["<|file_sep|>"]}
    assert contract.chat_template.startswith("{%- if tools %}")
    assert contract.separator_id == ids["<|endoftext|>"]


def test_llama3_contract_adds_bos_and_separates_with_the_configured_eos(family_dirs):
    folder = family_dirs["llama3"]
    ids = special_ids(folder)
    contract = read_contract(folder / "tokenizer.json")
    assert (contract.pre, contract.bos_id, contract.add_bos, contract.add_eos) == (
        "llama-bpe", ids["<|begin_of_text|>"], True, False)
    assert contract.eos_id == contract.eot_id == contract.separator_id == ids["<|eot_id|>"]
    assert contract.chat_template == (folder / "chat_template.jinja").read_text(encoding="utf-8")


def test_starcoder_contract_finds_its_fim_tokens(family_dirs):
    ids = special_ids(family_dirs["starcoder"])
    contract = read_contract(family_dirs["starcoder"] / "tokenizer.json")
    assert (contract.bos_id, contract.eos_id, contract.unk_id, contract.add_bos) == (0, 0, 0, False)
    assert contract.fim_ids == {"pre": ids["<fim_prefix>"], "suf": ids["<fim_suffix>"],
                                "mid": ids["<fim_middle>"], "pad": ids["<fim_pad>"],
                                "rep": ids["<reponame>"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_add_bos_and_eos_are_what_hf_encode_does(family_dirs, family):
    path = family_dirs[family] / "tokenizer.json"
    contract = read_contract(path)
    tokenizer = Tokenizer.from_file(str(path))
    body = tokenizer.encode("def f(x):\n    return x\n", add_special_tokens=False).ids
    expected = ([contract.bos_id] if contract.add_bos else []) + body + (
        [contract.eos_id] if contract.add_eos else [])
    assert tokenizer.encode("def f(x):\n    return x\n").ids == expected


def test_post_processor_adding_another_token_than_bos_is_refused(family_dirs, tmp_path):
    folder = _copy(family_dirs["llama3"], tmp_path)
    _rewrite(folder / "tokenizer_config.json", lambda config: config.update(bos_token="<|eot_id|>"))
    with pytest.raises(InputError, match="post_processor: adds ids .* only the bos token"):
        read_contract(folder / "tokenizer.json")


def test_chat_template_list_gives_default_and_named(family_dirs, tmp_path):
    folder = _copy(family_dirs["qwen2"], tmp_path)
    templates = [{"name": "default", "template": "{{ messages }}"},
                 {"name": "tool_use", "template": "{{ tools }}"}]
    _rewrite(folder / "tokenizer_config.json", lambda config: config.update(chat_template=templates))
    contract = read_contract(folder / "tokenizer.json")
    assert contract.chat_template == "{{ messages }}"
    assert contract.chat_templates == {"tool_use": "{{ tools }}"}


def test_chat_template_file_differing_from_config_is_refused(family_dirs, tmp_path):
    folder = _copy(family_dirs["qwen2"], tmp_path)
    (folder / "chat_template.jinja").write_text("{{ other }}", encoding="utf-8")
    with pytest.raises(InputError, match="chat_template.jinja: differs from tokenizer_config.json"):
        read_contract(folder / "tokenizer.json")


def test_special_tokens_map_naming_another_eos_is_refused(family_dirs, tmp_path):
    folder = _copy(family_dirs["qwen2"], tmp_path)
    _rewrite(folder / "special_tokens_map.json", lambda tokens: tokens.update(eos_token="<|im_end|>"))
    with pytest.raises(InputError, match="special_tokens_map.json: field eos_token: '<|im_end|>', "
                                         "but tokenizer_config.json names '<|endoftext|>'"):
        read_contract(folder / "tokenizer.json")


def test_separator_without_config_is_the_model_eos_then_endoftext(family_dirs, tmp_path):
    folder = _copy(family_dirs["qwen2"], tmp_path)
    (folder / "tokenizer_config.json").unlink()
    (folder / "special_tokens_map.json").unlink()
    ids = special_ids(folder)
    assert read_contract(folder / "tokenizer.json", model_config={"eos_token_id": 7}).separator_id == 7
    assert read_contract(folder / "tokenizer.json").separator_id == ids["<|endoftext|>"]


def test_no_separator_is_refused(family_dirs, tmp_path):
    folder = _copy(family_dirs["mistral"], tmp_path)
    (folder / "tokenizer_config.json").unlink()
    _rewrite(folder / "tokenizer.json", lambda data: data.update(post_processor=None))
    with pytest.raises(InputError, match="no document separator"):
        read_contract(folder / "tokenizer.json")


def test_a_sentencepiece_style_bpe_is_refused_naming_what_is_supported(tmp_path):
    tokenizer = Tokenizer(models.BPE(byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(["def f(x):\n    return x\n"] * 20,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(InputError, match="tokenizer.json: not a byte-level BPE .*Metaspace"):
        read_contract(tmp_path / "tokenizer.json")
