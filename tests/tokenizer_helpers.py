"""Small tokenizer folders shaped like real model families, trained locally (no downloads).

Each family gets a byte-level BPE of a few hundred merges trained with `tokenizers` on stdlib
code (TRAIN_PACKAGES), with the family's published pre-tokenizer, normalizer, BPE options,
special tokens (their texts, flags and where they sit: before or after the BPE vocabulary),
post-processor and tokenizer_config.json. `held_out_documents` gives stdlib modules the BPE never
saw, so tokenizing them exercises the regexes on unseen code.

Sources of the published pieces (pre-tokenizers as they appear in each tokenizer.json, JSON
escapes undone): Qwen2.5 — transformers' Qwen2Tokenizer PRETOKENIZE_REGEX and the Qwen2.5
tokenizer_config.json chat template; Llama 3 — the tokenizer.json regex quoted in llama.cpp's
llama-vocab.cpp and the Meta-Llama-3-8B-Instruct template; DeepSeek-Coder / DeepSeek-V3 — the
Split lists llama.cpp copies from their tokenizer.json files, with the Digits step the DeepSeek
tokenizers carry; StarCoder — Digits(individual) + ByteLevel; Mistral-Nemo's tekken — the
tokenizer.json regex quoted in llama-vocab.cpp.
"""

from __future__ import annotations

import functools
import json
import sysconfig
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

FAMILIES = ("qwen2", "qwen3", "llama3", "deepseek-coder", "deepseek-v3", "starcoder", "mistral")
# llama.cpp's pre-tokenizer name each family must be detected as.
EXPECTED_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama3": "llama-bpe", "deepseek-coder": "deepseek-coder",
                "deepseek-v3": "deepseek-v3", "starcoder": "starcoder", "mistral": "tekken"}
# transformers architecture of a tiny model per family (llama where the family's is not shipkit's).
ARCHITECTURE = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}
CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
TRAIN_PACKAGES = ("json", "http", "logging")  # ~440 kB of code
HELD_OUT_MAX_BYTES = 100_000  # top-level stdlib modules up to this size are held out
BPE_MERGES = 1200  # on top of the 256 byte tokens
# The model's vocab_size is the tokenizer's rounded up to this: the GGUF pads with [PADn].
VOCAB_MULTIPLE = 64

QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
               " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
                " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
TEKKEN_REGEX = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
                "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|"
                "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
DEEPSEEK_CODER_SPLITS = ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+")
DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)

QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
    "<|end_header_id|>\n\n' }}{% endif %}"
)

# (content, special) in id order. "before": ids 0.. ahead of the BPE vocabulary (the trainer's
# special tokens), "after": appended after it, as each family's tokenizer.json has them.
QWEN2_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
               ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
               ("<|box_end|>", True), ("<tool_call>", False), ("</tool_call>", False),
               ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
               ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False)]
LLAMA3_ADDED = [("<|begin_of_text|>", True), ("<|end_of_text|>", True),
                ("<|reserved_special_token_0|>", True), ("<|reserved_special_token_1|>", True),
                ("<|finetune_right_pad_id|>", True), ("<|reserved_special_token_2|>", True),
                ("<|start_header_id|>", True), ("<|end_header_id|>", True), ("<|eom_id|>", True),
                ("<|eot_id|>", True), ("<|python_tag|>", True)]
DEEPSEEK_CODER_ADDED = [("<｜begin▁of▁sentence｜>", True), ("<｜end▁of▁sentence｜>", True),
                        ("<｜fim▁hole｜>", False), ("<｜fim▁begin｜>", False), ("<｜fim▁end｜>", False),
                        ("<pad>", False), ("<|User|>", False), ("<|Assistant|>", False),
                        ("<|EOT|>", True)]
DEEPSEEK_V3_BEFORE = [("<｜begin▁of▁sentence｜>", True), ("<｜end▁of▁sentence｜>", True),
                      ("<｜▁pad▁｜>", True)]
DEEPSEEK_V3_AFTER = [("<｜fim▁hole｜>", False), ("<｜fim▁begin｜>", False), ("<｜fim▁end｜>", False),
                     ("<｜User｜>", False), ("<｜Assistant｜>", False), ("<|EOT|>", True)]
STARCODER_BEFORE = [(text, True) for text in (
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>",
    "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>",
    "<commit_msg>", "<commit_after>", "<reponame>")]
MISTRAL_BEFORE = [(text, True) for text in (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "<pad>", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "<SPECIAL_14>", "<SPECIAL_15>")]


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def training_texts() -> tuple[str, ...]:
    """The code the family BPEs are trained on: every module of TRAIN_PACKAGES."""
    files = sorted(path for package in TRAIN_PACKAGES for path in (stdlib() / package).rglob("*.py"))
    return tuple(path.read_text(encoding="utf-8") for path in files)


@functools.lru_cache(maxsize=1)
def held_out_documents() -> tuple[str, ...]:
    """Top-level stdlib modules (never in TRAIN_PACKAGES) up to HELD_OUT_MAX_BYTES: ~160 files,
    a few with non-ASCII text."""
    files = sorted(path for path in stdlib().glob("*.py") if path.stat().st_size <= HELD_OUT_MAX_BYTES)
    return tuple(path.read_text(encoding="utf-8") for path in files)


def write_family_tokenizer(folder: Path, family: str) -> int:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json, chat_template.jinja
    where the family ships them) in `folder`; returns the tokenizer's vocabulary size."""
    builder = {"qwen2": _qwen2, "qwen3": _qwen3, "llama3": _llama3, "deepseek-coder": _deepseek_coder,
               "deepseek-v3": _deepseek_v3, "starcoder": _starcoder, "mistral": _mistral}[family]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, config, extra_files = builder()
    tokenizer.save(str(folder / "tokenizer.json"))
    added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    config["added_tokens_decoder"] = {str(entry["id"]): {key: entry[key] for key in (
        "content", "lstrip", "normalized", "rstrip", "single_word", "special")} for entry in added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                  encoding="utf-8")
    for name, text in extra_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return tokenizer.get_vocab_size()


def model_vocab_size(tokenizer_vocab: int) -> int:
    """The model's vocab_size for a tokenizer of `tokenizer_vocab` tokens (padded, as real
    models pad theirs)."""
    return -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def special_ids(folder: Path) -> dict[str, int]:
    """Added token text -> id of the tokenizer in `folder`."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return {entry["content"]: entry["id"] for entry in data["added_tokens"]}


def write_family_hf_model(folder: Path, family: str, *, license: str = "apache-2.0",
                          base_model: str | None = None) -> int:
    """A tiny random transformers checkpoint (config.json, model.safetensors) of the family,
    its tokenizer folder and a README with license / base_model front matter; returns the
    model's vocab_size."""
    vocab_size = model_vocab_size(write_family_tokenizer(folder, family))
    write_tiny_hf_model(folder, vocab_size=vocab_size, architecture=ARCHITECTURE.get(family, "llama"),
                        special=_config_special_ids(family, special_ids(folder)), license=license,
                        base_model=base_model)
    return vocab_size


def write_tiny_hf_model(folder: Path, *, vocab_size: int, architecture: str,
                        special: dict[str, object], license: str = "apache-2.0",
                        base_model: str | None = None) -> None:
    """config.json + model.safetensors of a 1-layer random Llama, Mistral, Qwen2 or Qwen3
    (transformers), and a README whose front matter names the license and base model."""
    import torch
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **special)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[architecture]
    if architecture == "mistral":
        common["sliding_window"] = None  # Mistral-Nemo's: full attention
    model = model_class(config_class(rms_norm_eps=1e-6 if architecture.startswith("qwen") else 1e-5, **common))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    model.save_pretrained(folder)
    front = [f"license: {license}"] + ([f"base_model: {base_model}"] if base_model else [])
    (folder / "README.md").write_text("---\n" + "\n".join(front) + "\n---\n# tiny\n", encoding="utf-8")


def _config_special_ids(family: str, ids: dict[str, int]) -> dict[str, object]:
    """bos/eos/pad ids of config.json, as each family's published config.json sets them."""
    if family == "qwen2":
        return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"]}
    if family == "qwen3":
        return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    if family == "llama3":
        return {"bos_token_id": ids["<|begin_of_text|>"],
                "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
    if family in ("deepseek-coder", "deepseek-v3"):
        return {"bos_token_id": ids["<｜begin▁of▁sentence｜>"], "eos_token_id": ids["<｜end▁of▁sentence｜>"]}
    if family == "starcoder":
        return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"]}
    return {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}


# --- the families ---------------------------------------------------------------------------


def _train(pre_tokenizer, *, before=(), after=(), normalizer=None, ignore_merges=False,
           post_processor=None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(pre_tokenizers.ByteLevel.alphabet()) + len(before) + BPE_MERGES,
        special_tokens=[AddedToken(text, special=special, normalized=False) for text, special in before],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(training_texts(), trainer)
    tokenizer.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in after])
    if post_processor is not None:
        tokenizer.post_processor = post_processor(tokenizer)
    return tokenizer


def _split(*regexes: str) -> list:
    return [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in regexes]


def _byte_level(use_regex: bool):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _prepend(bos: str):
    """Llama 3 / DeepSeek / Mistral's TemplateProcessing: BOS before every sequence."""
    def build(tokenizer: Tokenizer):
        return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return build


def _byte_level_post(_tokenizer: Tokenizer):
    return processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)


def _qwen2():
    """Qwen2.5-Coder: NFC, the qwen2 regex, specials after the BPE vocabulary, ChatML."""
    tokenizer = _train(pre_tokenizers.Sequence([*_split(QWEN2_REGEX), _byte_level(False)]),
                       after=QWEN2_ADDED, normalizer=normalizers.NFC(),
                       post_processor=_byte_level_post)
    config = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
              "chat_template": QWEN25_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
              "eos_token": "<|endoftext|>", "errors": "replace", "model_max_length": 32768,
              "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    special_map = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                   "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    return tokenizer, config, {"special_tokens_map.json": json.dumps(special_map, indent=2)}


def _qwen3():
    """Qwen3: Qwen2's tokenizer and specials, its own ChatML template, EOS <|im_end|>."""
    tokenizer, config, extra_files = _qwen2()
    config |= {"chat_template": (CHAT_TEMPLATES / "qwen3-0.6b.jinja").read_text(encoding="utf-8"),
               "eos_token": "<|im_end|>", "model_max_length": 131072}
    special_map = json.loads(extra_files["special_tokens_map.json"]) | {"eos_token": "<|im_end|>"}
    return tokenizer, config, {"special_tokens_map.json": json.dumps(special_map, indent=2)}


def _llama3():
    """Llama 3.1 Instruct: \\p{N}{1,3}, ignore_merges, BOS from the post-processor, the Llama 3
    chat template in chat_template.jinja (as transformers >= 4.47 saves it)."""
    tokenizer = _train(pre_tokenizers.Sequence([*_split(LLAMA3_REGEX), _byte_level(False)]),
                       after=LLAMA3_ADDED, ignore_merges=True,
                       post_processor=_prepend("<|begin_of_text|>"))
    config = {"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
              "eos_token": "<|eot_id|>", "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    return tokenizer, config, {"chat_template.jinja": LLAMA3_CHAT_TEMPLATE}


def _deepseek_coder():
    """DeepSeek-Coder-6.7b-base: four Splits, single digits, BOS added, FIM specials after."""
    steps = [*_split(*DEEPSEEK_CODER_SPLITS), pre_tokenizers.Digits(individual_digits=True),
             _byte_level(False)]
    tokenizer = _train(pre_tokenizers.Sequence(steps), after=DEEPSEEK_CODER_ADDED,
                       post_processor=_prepend("<｜begin▁of▁sentence｜>"))
    config = {"add_bos_token": True, "add_eos_token": False,
              "bos_token": _added_token_entry("<｜begin▁of▁sentence｜>"),
              "clean_up_tokenization_spaces": False,
              "eos_token": _added_token_entry("<｜end▁of▁sentence｜>"), "legacy": True,
              "model_max_length": 16384, "pad_token": _added_token_entry("<｜end▁of▁sentence｜>"),
              "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast"}
    return tokenizer, config, {}


def _deepseek_v3():
    """DeepSeek-V3: three Splits (digits in threes), BOS/EOS/pad ahead of the vocabulary."""
    tokenizer = _train(pre_tokenizers.Sequence([*_split(*DEEPSEEK_V3_SPLITS), _byte_level(False)]),
                       before=DEEPSEEK_V3_BEFORE, after=DEEPSEEK_V3_AFTER,
                       post_processor=_prepend("<｜begin▁of▁sentence｜>"))
    config = {"add_bos_token": True, "add_eos_token": False,
              "bos_token": _added_token_entry("<｜begin▁of▁sentence｜>"),
              "clean_up_tokenization_spaces": False,
              "eos_token": _added_token_entry("<｜end▁of▁sentence｜>"), "legacy": True,
              "model_max_length": 16384, "pad_token": _added_token_entry("<｜end▁of▁sentence｜>"),
              "sp_model_kwargs": {}, "unk_token": None, "tokenizer_class": "LlamaTokenizerFast"}
    return tokenizer, config, {}


def _starcoder():
    """StarCoder: Digits(individual) + ByteLevel(use_regex), its 19 specials at ids 0-18."""
    steps = [pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]
    tokenizer = _train(pre_tokenizers.Sequence(steps), before=STARCODER_BEFORE,
                       post_processor=_byte_level_post)
    config = {"add_prefix_space": False,
              "additional_special_tokens": [text for text, _ in STARCODER_BEFORE],
              "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": True,
              "eos_token": "<|endoftext|>", "model_max_length": 1000000000000000019884624838656,
              "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": 49152}
    return tokenizer, config, {}


def _mistral():
    """Mistral-Nemo's tekken: casing-aware regex, ignore_merges, control tokens at 0.., <s> added;
    a Mistral instruct chat template (Mistral-Large-2407's, tests/data/chat_templates)."""
    tokenizer = _train(pre_tokenizers.Sequence([*_split(TEKKEN_REGEX), _byte_level(False)]),
                       before=MISTRAL_BEFORE, ignore_merges=True, post_processor=_prepend("<s>"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
              "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": True,
              "model_max_length": 1000000000000000019884624838656,
              "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
              "chat_template": (CHAT_TEMPLATES / "mistral-large-instruct-2407.jinja").read_text(encoding="utf-8")}
    return tokenizer, config, {}


def _added_token_entry(content: str) -> dict[str, object]:
    """An AddedToken as older transformers wrote it into tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


# --- llama.cpp's own converter ------------------------------------------------------------------

# Runs vendor/llama.cpp/convert_hf_to_gguf.py with its gguf-py first on the path and the
# pre-tokenizer name given: its get_vocab_base_pre only knows the hashes of published vocabularies.
CONVERTER_RUNNER = """
import runpy, sys
source, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [source + '/gguf-py', source]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [source + '/convert_hf_to_gguf.py', *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
LLAMA_CPP_SOURCE_ENV = "SHIPKIT_LLAMA_CPP_SOURCE"  # a vendor/llama.cpp folder to use
SDIST_CACHE = Path("/tmp/lcpp-src")  # where LLAMA-TOOLS.md unpacks the llama-cpp-python sdist


def llama_cpp_source() -> Path | None:
    """The llama.cpp tree vendored by the installed llama-cpp-python's sdist (convert_hf_to_gguf.py,
    gguf-py): $SHIPKIT_LLAMA_CPP_SOURCE, else the sdist unpacked under /tmp/lcpp-src, downloaded
    with pip there if need be (LLAMA-TOOLS.md); None when that fails (offline)."""
    import os
    import subprocess
    import sys
    import tarfile
    from importlib.metadata import version

    if os.environ.get(LLAMA_CPP_SOURCE_ENV):
        return Path(os.environ[LLAMA_CPP_SOURCE_ENV])
    release = version("llama-cpp-python")
    source = SDIST_CACHE / f"llama_cpp_python-{release}" / "vendor" / "llama.cpp"
    if (source / "convert_hf_to_gguf.py").is_file():
        return source
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                               ":all:", f"llama-cpp-python=={release}", "-d", str(SDIST_CACHE)],
                              capture_output=True, text=True)
    archive = SDIST_CACHE / f"llama_cpp_python-{release}.tar.gz"
    if download.returncode != 0 or not archive.is_file():
        return None
    with tarfile.open(archive) as handle:
        handle.extractall(SDIST_CACHE, filter="data")
    return source if (source / "convert_hf_to_gguf.py").is_file() else None


def run_llama_cpp_converter(source: Path, hf_dir: Path, out_path: Path, pre: str) -> None:
    """convert_hf_to_gguf.py HF_DIR --outfile OUT --outtype f32, told the pre-tokenizer name."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CONVERTER_RUNNER, str(source), pre, str(hf_dir),
                             "--outfile", str(out_path), "--outtype", "f32"],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"convert_hf_to_gguf.py failed:\n{result.stderr[-3000:]}"
