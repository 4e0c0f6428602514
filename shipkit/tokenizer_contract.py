"""What a Hugging Face tokenizer folder promises, read from its own files.

A model's text side is more than `tokenizer.json`: the pre-tokenizer regexes (which llama.cpp
knows only by name), the special tokens and whether encoding adds BOS/EOS, the chat template.
`read_contract` gathers them from `tokenizer.json` and its companions (`tokenizer_config.json`,
`special_tokens_map.json`, `chat_template.jinja`) so import can carry them, export can write them
back, the GGUF gets the keys llama.cpp's own converter writes, and the tokens stage separates
documents with the model's own end-of-text token. The pre-tokenizer table: docs/import.md.

Sources mirrored here (llama.cpp as vendored by llama-cpp-python 0.3.36): the regex behind each
pre-tokenizer name and the EOT/FIM token texts from `src/llama-vocab.cpp`; how special ids and
add_bos/add_eos are found from `gguf-py/gguf/vocab.py` (`SpecialVocab`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from shipkit.errors import InputError

TOKENIZER_FILE = "tokenizer.json"
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

# --- the pre-tokenizer table --------------------------------------------------------------------
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
                         "(accepted: none or NFC); pass --pre NAME to override")
    if "ByteLevel" not in json.dumps(tokenizer_json.get("pre_tokenizer")):
        raise InputError(f"{where}: not a byte-level BPE (a SentencePiece-style vocabulary, e.g. "
                         "Metaspace with byte fallback): only byte-level BPE tokenizers can be exported to GGUF")
    steps = _pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"), where)
    ignore_merges = bool(model.get("ignore_merges", False))
    for signature in PRE_TOKENIZERS:
        if signature.steps == steps and signature.ignore_merges == ignore_merges:
            return signature.name
    raise InputError(f"{where}: pre-tokenizer {_describe(steps, ignore_merges)} matches no "
                     "llama.cpp pre-tokenizer (table: docs/import.md); pass --pre NAME to name one")


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
        raise InputError(f"--pre {pre}: not a pre-tokenizer name llama.cpp knows (see docs/import.md)")
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


# --- pre-tokenizer evidence ---------------------------------------------------------------------


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
                         "pass --pre NAME to override")
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
