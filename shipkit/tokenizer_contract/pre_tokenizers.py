"""Which llama.cpp pre-tokenizer a tokenizer.json is: the table of known pre-tokenizers (the
regexes and steps behind each name llama.cpp knows, and the models that ship them) and
`detect_pre_tokenizer`, which matches a tokenizer.json's pre_tokenizer, normalizer and
`ignore_merges` against it. The table in prose: docs/import.md.

Sources mirrored here (llama.cpp as vendored by llama-cpp-python 0.3.36): the pre-tokenizer
names and the regex behind each from `src/llama-vocab.cpp`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipkit.errors import InputError

REGEX_SHOWN_CHARS = 60  # an unknown regex is quoted up to this many characters in the error

# Every pre-tokenizer name llama.cpp accepts for a BPE vocabulary (llama-vocab.cpp,
# llama_vocab::impl::load); `--pre NAME` must be one of them.
LLAMA_CPP_PRE_NAMES = frozenset((
    "default", "minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
    "midm-2.0", "lfm2", "jina-v5-nano", "deepseek-llm", "deepseek-coder", "deepseek-v3",
    "spark2_5", "youtu", "falcon", "mpt", "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de",
    "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "jais-2",
    "gemma4", "granite-embed-multi-311m", "sarvam-moe", "jina-v1-en", "jina-v2-code",
    "roberta-bpe", "whitespace", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo",
    "f2llmv2", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe",
    "glm4", "glm5", "viking", "jais", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish",
    "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4",
    "kanana2", "talkie", "granite-embed-multi-97m", "tiny_aya", "cohere2moe", "superbpe",
    "trillion", "granite-docling", "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder",
    "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2", "ufakzeka", "grok-2", "afmoe",
    "laguna", "minimax-m2", "solar-open", "mellum2",
))

# A pre-tokenizer step in normalised form: ("Split", regex) for Split(Regex, behavior=Isolated,
# invert=false), ("Digits", individual_digits), ("ByteLevel", use_regex) for ByteLevel without
# add_prefix_space. llama.cpp runs its regex list the same way: each regex splits every piece left
# by the one before, keeping matches and the text between them as separate pieces.
Step = tuple[str, Any]

# The pre-tokenizer shared by the Qwen2/2.5/3 family (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.x: Qwen2's regex with numbers in runs of up to three digits.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5: Qwen2's regex with combining marks kept with letters (llama-vocab.cpp, QWEN35).
QWEN35_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
                r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Mistral's tekken (Mistral-Nemo, Pixtral): casing-aware words, single digits.
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The CJK ranges both DeepSeek v1 tokenizers split out (llama-vocab.cpp DEEPSEEK_LLM/CODER).
DEEPSEEK_CJK_REGEX = "[一-龥ࠀ-一가-퟿]+"
DEEPSEEK_LLM_LETTERS_REGEX = (
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
DEEPSEEK_LLM_PUNCT_REGEX = "\\s?[!-/:-~！-／：-～‘-‟　-。]+"
# DeepSeek-V3/R1: up to three digits, CJK and kana, then words with one leading ASCII punctuation.
DEEPSEEK_V3_CJK_REGEX = "[一-龥぀-ゟ゠-ヿ]+"
DEEPSEEK_V3_WORDS_REGEX = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)


@dataclass(frozen=True)
class PreTokenizerSignature:
    """The tokenizer.json evidence that selects one llama.cpp pre-tokenizer name."""

    name: str  # llama.cpp's name, written as tokenizer.ggml.pre
    steps: tuple[Step, ...]
    ignore_merges: bool  # llama.cpp sets ignore_merges per name; the BPE model must agree
    families: str  # models that ship this tokenizer (docs)
    aliases: tuple[str, ...] = ()  # other llama.cpp names with the same regexes and merges rule


PRE_TOKENIZERS = (
    PreTokenizerSignature("gpt-2", (("ByteLevel", True),), False,
                          "GPT-2, shipkit's own tokenizer",
                          ("phi-2", "mpt", "olmo", "jais", "mellum", "roberta-bpe", "jina-v1-en",
                           "jina-v2-code", "exaone4", "a.x-4.0", "gigachat", "trillion",
                           "granite-docling", "modern-bert")),
    PreTokenizerSignature("starcoder", (("Digits", True), ("ByteLevel", True)), False,
                          "StarCoder, StarCoder2, SantaCoder, SmolLM, Refact",
                          ("refact", "smollm", "command-r", "codeshell", "exaone", "minerva-7b",
                           "mellum2")),
    PreTokenizerSignature("qwen2", (("Split", QWEN2_REGEX), ("ByteLevel", False)), False,
                          "Qwen2, Qwen2.5, Qwen2.5-Coder, Qwen3, DeepSeek-R1-Distill-Qwen",
                          ("deepseek-r1-qwen", "stablelm2", "megrez", "kormo", "f2llmv2",
                           "hunyuan", "solar-open", "grok-2")),
    PreTokenizerSignature("qwen35", (("Split", QWEN35_REGEX), ("ByteLevel", False)), False,
                          "Qwen3.5"),
    PreTokenizerSignature("llama-bpe", (("Split", LLAMA3_REGEX), ("ByteLevel", False)), True,
                          "Llama 3, 3.1, 3.2, 3.3, Falcon3",
                          ("llama3", "llama-v3", "falcon3", "falcon-h1", "midm-2.0", "lfm2",
                           "jina-v5-nano")),
    PreTokenizerSignature("smaug-bpe", (("Split", LLAMA3_REGEX), ("ByteLevel", False)), False,
                          "Llama 3 tokenizers saved without ignore_merges (Smaug, DBRX)",
                          ("dbrx",)),
    PreTokenizerSignature("deepseek-coder",
                          (("Split", "[\r\n]"), ("Split", "\\s?\\p{L}+"), ("Split", "\\s?\\p{P}+"),
                           ("Split", DEEPSEEK_CJK_REGEX), ("Digits", True), ("ByteLevel", False)),
                          False, "DeepSeek-Coder 1.3b/6.7b/33b (v1)"),
    PreTokenizerSignature("deepseek-llm",
                          (("Split", "[\r\n]"), ("Split", DEEPSEEK_LLM_LETTERS_REGEX),
                           ("Split", DEEPSEEK_LLM_PUNCT_REGEX), ("Split", "\\s+$"),
                           ("Split", DEEPSEEK_CJK_REGEX), ("Digits", True), ("ByteLevel", False)),
                          False, "DeepSeek-LLM 7b/67b, DeepSeek-MoE"),
    PreTokenizerSignature("deepseek-v3",
                          (("Split", "\\p{N}{1,3}"), ("Split", DEEPSEEK_V3_CJK_REGEX),
                           ("Split", DEEPSEEK_V3_WORDS_REGEX), ("ByteLevel", False)),
                          False, "DeepSeek-V2, V2.5, V3, R1, DeepSeek-Coder-V2",
                          ("hunyuan-dense", "joyai-llm", "hy_v4")),
    PreTokenizerSignature("tekken", (("Split", TEKKEN_REGEX), ("ByteLevel", False)), True,
                          "Mistral-Nemo, Pixtral, Ministral (Mistral's tekken)"),
)
# Normalizers llama.cpp's BPE path can live with: it normalizes nothing, and NFC changes nothing
# in text already in NFC (source code nearly always is; Qwen2 ships NFC).
ACCEPTED_NORMALIZERS = (None, "NFC")


def detect_pre_tokenizer(tokenizer_json: dict[str, Any], where: str | Path) -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer.json, from its pre_tokenizer (Split
    regexes and their order, ByteLevel's use_regex, Digits), normalizer and `ignore_merges`.
    Raises InputError naming the unknown regex (one line) when no llama.cpp name matches."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(f"{where}: model type {model.get('type')!r}: only byte-level BPE "
                         "tokenizers can be exported to GGUF")
    normalizer = _normalizer_kind(tokenizer_json.get("normalizer"))
    if normalizer not in ACCEPTED_NORMALIZERS:
        raise InputError(f"{where}: normalizer {normalizer} is not applied by llama.cpp "
                         "(accepted: none or NFC); give pre=NAME to override")
    if "ByteLevel" not in json.dumps(tokenizer_json.get("pre_tokenizer")):
        raise InputError(f"{where}: not a byte-level BPE (a SentencePiece-style vocabulary, e.g. "
                         "Metaspace with byte fallback): only byte-level BPE tokenizers can be exported to GGUF")
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"), where)
    ignore_merges = bool(model.get("ignore_merges", False))
    for signature in PRE_TOKENIZERS:
        if signature.steps == steps and signature.ignore_merges == ignore_merges:
            return signature.name
    raise InputError(f"{where}: pre-tokenizer {_describe(steps, ignore_merges)} matches no "
                     "llama.cpp pre-tokenizer (table: docs/import.md); give pre=NAME to name one")


def _normalizer_kind(normalizer: dict[str, Any] | None) -> str | None:
    """None, "NFC", or a description of anything else (a Sequence of one is its member)."""
    if normalizer is None:
        return None
    kind = normalizer.get("type")
    if kind == "Sequence":
        members = [_normalizer_kind(member) for member in normalizer.get("normalizers", [])]
        members = [member for member in members if member is not None]
        return None if not members else members[0] if len(members) == 1 else "+".join(members)
    return str(kind)


def _pre_tokenizer_steps(pre_tokenizer: dict[str, Any] | None, where: str | Path) -> tuple[Step, ...]:
    if pre_tokenizer is None:
        raise InputError(f"{where}: no pre_tokenizer: llama.cpp's BPE needs a byte-level one; "
                         "give pre=NAME to override")
    members = (pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence"
               else [pre_tokenizer])
    return tuple(_step(member) for member in members)


def _step(member: dict[str, Any]) -> Step:
    kind = member.get("type")
    if kind == "Split":
        pattern = member.get("pattern") or {}
        isolated = str(member.get("behavior")).lower() == "isolated"
        if "Regex" not in pattern or member.get("invert") or not isolated:
            return ("Split(" + json.dumps(member, ensure_ascii=False)[:REGEX_SHOWN_CHARS] + ")", None)
        return ("Split", pattern["Regex"])
    if kind == "Digits":
        return ("Digits", bool(member.get("individual_digits", False)))
    if kind == "ByteLevel":
        if member.get("add_prefix_space"):
            return ("ByteLevel(add_prefix_space=true)", None)
        return ("ByteLevel", bool(member.get("use_regex", True)))
    return (str(kind), None)


def _describe(steps: tuple[Step, ...], ignore_merges: bool) -> str:
    """`Split('…') + ByteLevel(use_regex=false) with ignore_merges=…`; a regex no table entry has
    is shown around where it leaves the nearest known one, a known one from its start."""
    known = {value for signature in PRE_TOKENIZERS for kind, value in signature.steps if kind == "Split"}
    parts = []
    for kind, value in steps:
        if kind == "Split":
            parts.append(f"Split('{_excerpt(value, known)}')")
        elif kind in ("Digits", "ByteLevel"):
            argument = "individual_digits" if kind == "Digits" else "use_regex"
            parts.append(f"{kind}({argument}={str(value).lower()})")
        else:
            parts.append(kind)
    return " + ".join(parts) + f" with ignore_merges={str(ignore_merges).lower()}"


def _excerpt(regex: str, known: set[str]) -> str:
    """REGEX_SHOWN_CHARS of `regex`, starting a little before its first difference from the
    known regex it shares the longest prefix with; control characters escaped."""
    start = 0
    if regex not in known:
        shared = max((_common_prefix(regex, other) for other in known), default=0)
        start = max(0, shared - REGEX_SHOWN_CHARS // 3)
    shown = regex[start:start + REGEX_SHOWN_CHARS]
    shown = ("…" if start else "") + shown + ("…" if start + REGEX_SHOWN_CHARS < len(regex) else "")
    return shown.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def _common_prefix(first: str, second: str) -> int:
    length = 0
    for one, other in zip(first, second):
        if one != other:
            break
        length += 1
    return length

