"""The tokenizer keys of a GGUF, written as llama.cpp's convert_hf_to_gguf.py writes them.

`read_tokenizer` turns tokenizer.json into GGUF's token list, token types and merges (the
converter's `get_vocab_base` and `SpecialVocab(load_merges=True)`); `add_tokenizer` writes them
with the contract's pre-tokenizer, special ids, add_bos/add_eos and chat template, plus the EOT
and fill-in-the-middle ids llama.cpp would otherwise guess from token texts. Each key and where
its value comes from: docs/import.md, "What the GGUF carries".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from shipkit.errors import InputError
from shipkit.tokenizer_contract import DEFAULT_CHAT_TEMPLATE, TokenizerContract

TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for a byte-level BPE vocabulary
# Architectures whose converter class (LlamaModel) writes tokenizer_config.json's
# add_prefix_space as tokenizer.ggml.add_space_prefix.
ADD_SPACE_PREFIX_ARCHITECTURES = ("llama", "mistral")
# Added tokens the converter marks CONTROL although their tokenizer.json entry is not special
# (convert_hf_to_gguf.py `does_token_look_special`).
LOOKS_SPECIAL_TEXTS = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
SPECIAL_BRACKETS = (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">"))
METASPACE = "\u2581"  # SentencePiece's space; the converter turns it back into " " in user tokens
# A space inside a merge part, as gguf-py writes it (the byte-level alphabet's 'Ġ' is chr(288)).
MERGE_SPACE = chr(ord(" ") + 256)
FIM_KEYS = {
    "pre": gguf.Keys.Tokenizer.FIM_PRE_ID, "suf": gguf.Keys.Tokenizer.FIM_SUF_ID,
    "mid": gguf.Keys.Tokenizer.FIM_MID_ID, "pad": gguf.Keys.Tokenizer.FIM_PAD_ID,
    "rep": gguf.Keys.Tokenizer.FIM_REP_ID, "sep": gguf.Keys.Tokenizer.FIM_SEP_ID,
}


@dataclass(frozen=True)
class GgufTokenizer:
    """tokenizer.json in GGUF's terms: tokens by id, their types, merges."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def read_tokenizer(path: Path, vocab_size: int) -> GgufTokenizer:
    """Tokens, types and merges of a byte-level BPE tokenizer.json, padded to `vocab_size` with
    UNUSED `[PAD<id>]` tokens. Added tokens keep their text; they are CONTROL when special or
    when they look special (`<|…|>`, `<｜…｜>`, `<pad>`, …), USER_DEFINED otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable tokenizer.json ({error})") from error
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise InputError(f"{path}: only byte-level BPE tokenizers can be exported to GGUF")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, token_id in model["vocab"].items():
        _place(path, tokens, types, token, token_id, gguf.TokenType.NORMAL)
    added = {entry["content"]: entry for entry in data.get("added_tokens", [])}
    for entry in added.values():
        _place(path, tokens, types, entry["content"], entry["id"], _added_type(entry))
    for token_id, token in enumerate(tokens):
        if token is not None and types[token_id] == gguf.TokenType.NORMAL and token in added:
            types[token_id] = _added_type(added[token])  # a vocabulary token also added
        if types[token_id] == gguf.TokenType.USER_DEFINED:
            tokens[token_id] = token.replace(METASPACE, " ")
    filled = [token if token is not None else f"[PAD{index}]" for index, token in enumerate(tokens)]
    return GgufTokenizer(filled, [int(kind) for kind in types], _merges(model.get("merges") or [], path))


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: GgufTokenizer, contract: TokenizerContract,
                  *, architecture: str) -> None:
    """Every tokenizer.* key: model, pre, tokens, types, merges, special ids, add_bos/add_eos,
    chat template(s), then EOT and FIM ids (explicit, so llama.cpp does not pick by text)."""
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(contract.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.token_types)
    writer.add_token_merges(tokenizer.merges)
    for key, token_id in ((gguf.Keys.Tokenizer.BOS_ID, contract.bos_id),
                          (gguf.Keys.Tokenizer.EOS_ID, contract.eos_id),
                          (gguf.Keys.Tokenizer.UNK_ID, contract.unk_id),
                          (gguf.Keys.Tokenizer.PAD_ID, contract.pad_id)):
        if token_id is not None:
            writer.add_uint32(key, token_id)
    writer.add_add_bos_token(contract.add_bos)
    writer.add_add_eos_token(contract.add_eos)
    if contract.add_sep is not None:
        writer.add_add_sep_token(contract.add_sep)
    if architecture in ADD_SPACE_PREFIX_ARCHITECTURES and contract.add_space_prefix is not None:
        writer.add_add_space_prefix(contract.add_space_prefix)
    if contract.chat_templates:
        named = [{"name": name, "template": text} for name, text in contract.chat_templates.items()]
        if contract.chat_template is not None:
            named.insert(0, {"name": DEFAULT_CHAT_TEMPLATE, "template": contract.chat_template})
        writer.add_chat_template(named)
    elif contract.chat_template is not None:
        writer.add_chat_template(contract.chat_template)
    if contract.eot_id is not None:
        writer.add_eot_token_id(contract.eot_id)
    for role, token_id in contract.fim_ids.items():
        writer.add_uint32(FIM_KEYS[role], token_id)


def looks_special(text: str) -> bool:
    """The converter's `does_token_look_special`: added tokens some models forget to mark special."""
    return text in LOOKS_SPECIAL_TEXTS or any(
        text.startswith(opening) and text.endswith(closing) for opening, closing in SPECIAL_BRACKETS)


def _added_type(entry: dict) -> gguf.TokenType:
    if entry.get("special") or looks_special(entry["content"]):
        return gguf.TokenType.CONTROL
    return gguf.TokenType.USER_DEFINED


def _merges(merges: list, path: Path) -> list[str]:
    """`"a b"` strings; the pair form of transformers >= 4.45 joined, a space inside a part
    written as chr(288) as gguf-py does."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        return [" ".join(part.replace(" ", MERGE_SPACE) for part in pair) for pair in merges]
    raise InputError(f"{path}: field model.merges: unknown format {merges[0]!r}")


def _place(path: Path, tokens: list[str | None], types: list[gguf.TokenType], token: str,
           token_id: int, kind: gguf.TokenType) -> None:
    if not 0 <= token_id < len(tokens):
        raise InputError(f"{path}: token id {token_id} ({token!r}) is outside the model's "
                         f"vocabulary of {len(tokens)}")
    tokens[token_id] = token
    types[token_id] = kind
