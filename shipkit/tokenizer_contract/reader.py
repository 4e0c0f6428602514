"""What a Hugging Face tokenizer folder promises, read from its own files: `read_contract`
gathers the special tokens and whether encoding adds BOS/EOS, the EOT and fill-in-the-middle
tokens, the document separator and the chat templates from `tokenizer.json` and its companions
(`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`) into a
`TokenizerContract`, with the pre-tokenizer name shipkit.tokenizer_contract.pre_tokenizers detects.

Sources mirrored here (llama.cpp as vendored by llama-cpp-python 0.3.36): the EOT/FIM token texts
from `src/llama-vocab.cpp`; how special ids and add_bos/add_eos are found from
`gguf-py/gguf/vocab.py` (`SpecialVocab`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from shipkit.errors import InputError
from shipkit.layout import TOKENIZER_FILE
from shipkit.tokenizer_contract.pre_tokenizers import (
    LLAMA_CPP_PRE_NAMES,
    detect_pre_tokenizer,
)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# What import copies beside the APR and export writes back, when the source folder has them.
CARRIED_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_FILE)
# Fill-in-the-middle roles, named as in GGUF's tokenizer.ggml.fim_<role>_token_id keys.
FIM_ROLES = ("pre", "suf", "mid", "pad", "rep", "sep")
# The token-id roles read from tokenizer_config.json / config.json (GGUF tokenizer.ggml.<role>_token_id).
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")
ENDOFTEXT = "<|endoftext|>"  # the document separator when nothing else names one
# The name of the default template when tokenizer_config.json lists several.
DEFAULT_CHAT_TEMPLATE = "default"
# Text that shows what the post-processor adds around a sequence (any text encodes to >= 1 id).
PROBE_TEXT = "x"

# Token texts llama.cpp recognises by text when the GGUF names no id (llama-vocab.cpp, "auto-detect
# special tokens by text"), in its order; the first present in the vocabulary is taken.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
             "<end_of_utterance>")
FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}


@dataclass(frozen=True)
class TokenizerContract:
    """The tokenizer's behaviour that a runtime must reproduce; ids are vocabulary ids."""

    pre: str  # llama.cpp's pre-tokenizer name (GGUF tokenizer.ggml.pre)
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None  # end of turn / of text: where a generation stops (llama.cpp's EOT)
    pad_id: int | None
    unk_id: int | None
    add_bos: bool  # encoding with special tokens prepends BOS (as the post-processor does)
    add_eos: bool
    chat_template: str | None
    fim_ids: dict[str, int] = field(default_factory=dict)  # FIM_ROLES -> id, those present
    separator_id: int = 0  # the token the tokens stage puts between documents
    # Named templates besides the default one (tokenizer_config.json's list form): name -> text.
    chat_templates: dict[str, str] = field(default_factory=dict)
    # tokenizer_config.json's add_prefix_space, when it sets one (llama.cpp's add_space_prefix).
    add_space_prefix: bool | None = None
    # Whether a token between the two sequences of a pair is the separator (EOS); None when the
    # post-processor puts nothing between them. Read only by llama.cpp's rerank pooling.
    add_sep: bool | None = None



def read_contract(tokenizer_path: str | Path, *, pre: str | None = None,
                  model_config: dict[str, Any] | None = None) -> TokenizerContract:
    """The contract of `tokenizer_path` (a tokenizer.json) and its companion files beside it.

    `pre` overrides the detected pre-tokenizer (an expert's `--pre NAME`; must be a name llama.cpp
    knows). `model_config` (config.json's dict, or ModelConfig.to_dict()) supplies bos/eos ids
    the tokenizer files do not name, as llama.cpp's converter falls back to config.json.
    Raises InputError naming the file and field for anything unreadable or inconsistent."""
    tokenizer_path = Path(tokenizer_path)
    folder = tokenizer_path.parent
    text = _read_text(tokenizer_path)
    tokenizer_json = _parse_json(text, tokenizer_path)
    if pre is not None and pre not in LLAMA_CPP_PRE_NAMES:
        raise InputError(f"pre {pre}: not a pre-tokenizer name llama.cpp knows (see docs/import.md)")
    pre = pre or detect_pre_tokenizer(tokenizer_json, tokenizer_path)
    config = _read_optional_json(folder / TOKENIZER_CONFIG_FILE)
    vocab = _vocabulary(tokenizer_json, tokenizer_path)
    added = {token["content"]: token["id"] for token in reversed(tokenizer_json.get("added_tokens") or [])}
    prefix, suffix, middle = _added_around(text, tokenizer_path)

    names = _special_names(config, prefix, suffix, vocab)
    _check_special_tokens_map(folder, config)
    ids = _special_ids(names, added, model_config)
    # Where nothing names BOS / EOS, the token the post-processor adds is it (the converter would
    # write add_bos_token true without a bos id, which llama.cpp cannot honour).
    if len(prefix) == 1:
        ids.setdefault("bos", prefix[0])
    if len(suffix) == 1:
        ids.setdefault("eos", suffix[0])
    add_bos = _added_role(prefix, ids.get("bos"), "bos", tokenizer_path)
    add_eos = _added_role(suffix, ids.get("eos"), "eos", tokenizer_path)
    default_template, named_templates = _chat_templates(folder, config)
    eot_id = added.get(names["eot"]) if "eot" in names else _first_present(EOT_TEXTS, vocab)
    fim_ids = {role: token_id for role in FIM_ROLES
               if (token_id := _first_present(FIM_TEXTS[role], vocab)) is not None}
    add_space_prefix = (config or {}).get("add_prefix_space")
    return TokenizerContract(
        pre=pre, bos_id=ids.get("bos"), eos_id=ids.get("eos"), eot_id=eot_id,
        pad_id=ids.get("pad"), unk_id=ids.get("unk"), add_bos=add_bos, add_eos=add_eos,
        chat_template=default_template, fim_ids=fim_ids,
        separator_id=_separator_id(config, vocab, model_config, tokenizer_path),
        chat_templates=named_templates,
        add_space_prefix=add_space_prefix if isinstance(add_space_prefix, bool) else None,
        add_sep=_separates(middle, suffix, ids.get("eos")),
    )



# --- special tokens ------------------------------------------------------------------------------


def _vocabulary(tokenizer_json: dict[str, Any], where: Path) -> dict[str, int]:
    """Token text -> id over the BPE vocabulary and the added tokens (which win)."""
    vocab = dict((tokenizer_json.get("model") or {}).get("vocab") or {})
    for token in tokenizer_json.get("added_tokens") or []:
        if not isinstance(token.get("content"), str) or not isinstance(token.get("id"), int):
            raise InputError(f"{where}: field added_tokens: entry {token!r} lacks content/id")
        vocab[token["content"]] = token["id"]
    return vocab


def _added_around(text: str, where: Path) -> tuple[list[int], list[int], list[int]]:
    """The ids the tokenizer's own post-processor puts before and after a sequence, and between
    the two sequences of a pair, found by encoding PROBE_TEXT with and without special tokens
    (what HF's `encode` really does)."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as error:  # the Rust side raises its own Exception type
        raise InputError(f"{where}: the tokenizers library cannot load it ({error})") from None
    plain = tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    full = tokenizer.encode(PROBE_TEXT, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            pair = tokenizer.encode(PROBE_TEXT, PROBE_TEXT, add_special_tokens=True).ids
            inner = pair[len(prefix):len(pair) - len(suffix)] if pair[:len(prefix)] == prefix else pair
            middle = inner[len(plain):len(inner) - len(plain)] if len(inner) >= 2 * len(plain) else []
            return prefix, suffix, middle
    raise InputError(f"{where}: field post_processor: encoding {PROBE_TEXT!r} with special tokens "
                     "changes its text tokens, which llama.cpp cannot reproduce")


def _separates(middle: list[int], suffix: list[int], eos_id: int | None) -> bool | None:
    """add_sep as SpecialVocab reads a TemplateProcessing pair `A <x> [<y>] B`: true when <x> is
    EOS and a single sequence ends without one, or when <y> is EOS."""
    if not middle:
        return None
    return (middle[0] == eos_id and not suffix) or (len(middle) == 2 and middle[1] == eos_id)


def _special_names(config: dict[str, Any] | None, prefix: list[int], suffix: list[int],
                   vocab: dict[str, int]) -> dict[str, str]:
    """role -> token text, as gguf-py's SpecialVocab fills tokenizer_config: its bos/eos/unk/pad
    (cls/sep standing in for bos/eos), then the post-processor's leading token as bos and its
    trailing token as eos when the config names none. A trailing token other than the named eos
    becomes eos and the named one EOT, as SpecialVocab does."""
    if not config:
        return {}
    names = {role: text for role in SPECIAL_ROLES if (text := _token_text(config.get(f"{role}_token")))}
    names.setdefault("bos", _token_text(config.get("cls_token")) or "")
    names.setdefault("eos", _token_text(config.get("sep_token")) or "")
    by_id = {token_id: text for text, token_id in vocab.items()}
    if prefix and not names["bos"]:
        names["bos"] = by_id.get(prefix[0], "")
    if suffix:
        last = by_id.get(suffix[-1], "")
        if names["eos"] and last != names["eos"]:
            names["eot"] = names["eos"]
        names["eos"] = last
    return {role: text for role, text in names.items() if text}


def _token_text(entry: Any) -> str | None:
    """A tokenizer_config token entry: a string, or an AddedToken dict with its content."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _check_special_tokens_map(folder: Path, config: dict[str, Any] | None) -> None:
    """special_tokens_map.json must not name another token than tokenizer_config.json does."""
    special_map = _read_optional_json(folder / SPECIAL_TOKENS_MAP_FILE)
    if not special_map or not config:
        return
    for role in SPECIAL_ROLES:
        mapped = _token_text(special_map.get(f"{role}_token"))
        configured = _token_text(config.get(f"{role}_token"))
        if mapped and configured and mapped != configured:
            raise InputError(f"{folder / SPECIAL_TOKENS_MAP_FILE}: field {role}_token: {mapped!r}, "
                             f"but {TOKENIZER_CONFIG_FILE} names {configured!r}")


def _special_ids(names: dict[str, str], added: dict[str, int],
                 model_config: dict[str, Any] | None) -> dict[str, int]:
    """role -> id: a named token found among the added tokens, else config.json's <role>_token_id
    (an int; a list is not taken, as SpecialVocab does not)."""
    ids = {role: added[text] for role, text in names.items() if role in SPECIAL_ROLES and text in added}
    for role in SPECIAL_ROLES:
        value = (model_config or {}).get(f"{role}_token_id")
        if role not in ids and isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise InputError(f"model config: field {role}_token_id: {value} is negative")
            ids[role] = value
    return ids


def _added_role(added: list[int], role_id: int | None, role: str, where: Path) -> bool:
    """Whether the post-processor adds the `role` token; llama.cpp can add only that one token."""
    if not added:
        return False
    if added != [role_id]:
        raise InputError(f"{where}: field post_processor: adds ids {added} where llama.cpp can add "
                         f"only the {role} token ({role_id}); fix {TOKENIZER_CONFIG_FILE}'s "
                         f"{role}_token or the post-processor")
    return True


def _first_present(texts: tuple[str, ...], vocab: dict[str, int]) -> int | None:
    return next((vocab[text] for text in texts if text in vocab), None)


def _separator_id(config: dict[str, Any] | None, vocab: dict[str, int],
                  model_config: dict[str, Any] | None, where: Path) -> int:
    """The EOS tokenizer_config.json names, else the model config's eos id, else <|endoftext|>."""
    named = _token_text((config or {}).get("eos_token"))
    if named is not None:
        if named not in vocab:
            raise InputError(f"{where.parent / TOKENIZER_CONFIG_FILE}: field eos_token: {named!r} "
                             f"is not in {where.name}'s vocabulary")
        return vocab[named]
    eos = (model_config or {}).get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    if ENDOFTEXT in vocab:
        return vocab[ENDOFTEXT]
    raise InputError(f"{where}: no document separator: {TOKENIZER_CONFIG_FILE} names no eos_token, "
                     f"the model config no eos_token_id and the vocabulary has no {ENDOFTEXT}")


# --- chat template -------------------------------------------------------------------------------


def _chat_templates(folder: Path, config: dict[str, Any] | None) -> tuple[str | None, dict[str, str]]:
    """(default template, other named templates) from tokenizer_config.json's chat_template (a
    string, or a list of {name, template}) or chat_template.jinja; both, differing: InputError."""
    jinja_path = folder / CHAT_TEMPLATE_FILE
    from_file = _read_text(jinja_path) if jinja_path.is_file() else None
    entry = (config or {}).get("chat_template")
    named: dict[str, str] = {}
    if entry is None:
        default = None
    elif isinstance(entry, str):
        default = entry
    elif isinstance(entry, list) and all(isinstance(item, dict) for item in entry):
        templates = {item.get("name"): item.get("template") for item in entry}
        default = templates.pop(DEFAULT_CHAT_TEMPLATE, None)
        named = {name: text for name, text in templates.items()
                 if isinstance(name, str) and isinstance(text, str)}
    else:
        raise InputError(f"{folder / TOKENIZER_CONFIG_FILE}: field chat_template: expected a string "
                         f"or a list of {{name, template}}, got {type(entry).__name__}")
    if from_file is not None and default is not None and from_file != default:
        raise InputError(f"{jinja_path}: differs from {TOKENIZER_CONFIG_FILE}'s chat_template; "
                         "keep one of them")
    return (default if default is not None else from_file), named


# --- files ---------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not readable ({error})") from None


def _parse_json(text: str, path: Path) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a tokenizer file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    return _parse_json(_read_text(path), path) if path.is_file() else None
