"""The chat-template check against its references: transformers' `apply_chat_template` for the
rendering, llama.cpp's builtin engine and llama-cpp-python's jinja path for the GGUF side.
The published templates and where they come from: tests/data/chat_templates/README.md."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from shipkit.errors import InputError
from shipkit.evidence import FAIL, PASS, SKIPPED
from shipkit.parity.chat_template import (
    PROBE_CONVERSATION,
    compare_chat,
    first_difference,
    render_hf,
    render_llama_cpp,
)

TEMPLATES_DIR = Path(__file__).parent / "data" / "chat_templates"
# Published template -> its tokenizer's bos/eos text (None: the tokenizer has no such token).
PUBLISHED = {
    "qwen2.5-7b-instruct": (None, "<|im_end|>"),
    "qwen3-0.6b": (None, "<|im_end|>"),
    "llama-3.1-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.2-3b-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-large-instruct-2407": ("<s>", "</s>"),
    "deepseek-coder-33b-instruct": ("<｜begin▁of▁sentence｜>", "<|EOT|>"),
    "gemma-2-2b-it": ("<bos>", "<eos>"),
}
TOOL_TEMPLATES = ("qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "mistral-large-instruct-2407")
# Key order, non-ASCII and HTML characters: jinja's own tojson would sort and escape them.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": 'Température à <city> & "now"',
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# A template llama.cpp's builtin engine has no family for.
CUSTOM_TEMPLATE = ("{% for m in messages %}<<{{ m.role }}>>{{ m.content }}{% endfor %}"
                   "{% if add_generation_prompt %}<<assistant>>{% endif %}")
# What each template writes before the conversation when no system message is given, and
# llama.cpp's builtin format does not: the whole difference on the probe.
DEFAULT_SYSTEM_TURNS = {
    "qwen2.5-7b-instruct":
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
    "llama-3.1-8b-instruct":
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|>",
    "deepseek-coder-33b-instruct":
        "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, "
        "and you only answer questions related to computer science. For politically sensitive questions, security "
        "and privacy issues, and other non-computer science questions, you will refuse to answer\n",
}


def load_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def special_tokens(name: str) -> dict[str, str | None]:
    bos_token, eos_token = PUBLISHED[name]
    return {"bos_token": bos_token, "eos_token": eos_token}


def transformers_render(template: str, messages, *, bos_token: str | None, eos_token: str | None,
                        add_generation_prompt: bool = True, tokens: dict[str, str] | None = None, **kwargs) -> str:
    """The reference: a real transformers tokenizer (any tokenizers.Tokenizer will do) with this
    template and these special tokens."""
    named = {name: text for name, text in (("bos_token", bos_token), ("eos_token", eos_token)) if text is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=template,
                                        **named, **(tokens or {}))
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_render_hf_matches_transformers_on_published_templates(name, add_generation_prompt):
    template, tokens = load_template(name), special_tokens(name)
    expected = transformers_render(template, PROBE_CONVERSATION, add_generation_prompt=add_generation_prompt, **tokens)
    assert render_hf(template, PROBE_CONVERSATION, add_generation_prompt=add_generation_prompt, **tokens) == expected


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_render_hf_matches_transformers_with_tools(name):
    template, tokens = load_template(name), special_tokens(name)
    expected = transformers_render(template, PROBE_CONVERSATION, tools=[WEATHER_TOOL], **tokens)
    assert "get_weather" in expected
    assert render_hf(template, PROBE_CONVERSATION, tools=[WEATHER_TOOL], **tokens) == expected


def test_render_hf_matches_transformers_on_template_features():
    template = (
        "{{ bos_token }}|{{ unk_token }}|{{ pad_token }}|{{ {'b': 1, 'a': '<é>'} | tojson }}|"
        "{{ [1, 2] | tojson(indent=2) }}|{{ strftime_now('%Y') }}\n"
        "{% set ns = namespace(count=0) %}"
        "{% for message in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.count = ns.count + 1 %}"
        "{% generation %}{{ message.role }}: {{ message.content }}{% endgeneration %}\n"
        "{% endfor %}{{ ns.count }}{% if enable_thinking is defined %}|thinking={{ enable_thinking }}{% endif %}"
    )
    tokens = {"unk_token": "<unk>", "pad_token": "<pad>"}
    expected = transformers_render(template, PROBE_CONVERSATION, bos_token=None, eos_token="</s>", tokens=tokens,
                                   enable_thinking=False)
    assert render_hf(template, PROBE_CONVERSATION, bos_token=None, eos_token="</s>", enable_thinking=False,
                     **tokens) == expected


def test_render_hf_matches_transformers_on_reasoning_and_none_fields():
    messages = [{"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": "ok", "reasoning": "think"},
                {"role": "user", "content": "bye"}]
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.reasoning_content }}:{{ m.thinking }}:"
                "{{ m.name is defined }};{% endfor %}")
    expected = transformers_render(template, messages, bos_token=None, eos_token=None)
    assert render_hf(template, messages, bos_token=None, eos_token=None) == expected


@settings(max_examples=40, deadline=None)
@given(contents=st.lists(st.text(max_size=30), min_size=3, max_size=3),
       name=st.sampled_from(["qwen2.5-7b-instruct", "llama-3.1-8b-instruct", "mistral-large-instruct-2407"]))
def test_render_hf_matches_transformers_on_any_text(contents, name):
    messages = [{"role": role, "content": text} for role, text in zip(("user", "assistant", "user"), contents)]
    template, tokens = load_template(name), special_tokens(name)
    assert render_hf(template, messages, **tokens) == transformers_render(template, messages, **tokens)


def test_render_hf_syntax_error_is_one_line_input_error():
    with pytest.raises(InputError, match=r"^chat template line 2: ") as caught:
        render_hf("{% for m in messages %}\n{{ m.content }", PROBE_CONVERSATION, bos_token=None, eos_token=None)
    assert "\n" not in str(caught.value)


def test_render_hf_raise_exception_is_input_error_where_transformers_raises():
    template, tokens = load_template("gemma-2-2b-it"), special_tokens("gemma-2-2b-it")
    with_system = [{"role": "system", "content": "Be brief."}, *PROBE_CONVERSATION]
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        transformers_render(template, with_system, **tokens)
    with pytest.raises(InputError, match="^chat template cannot render the conversation: System role not supported$"):
        render_hf(template, with_system, **tokens)


def test_render_llama_cpp_unknown_template_is_none():
    assert render_llama_cpp(CUSTOM_TEMPLATE, PROBE_CONVERSATION) is None


def test_render_llama_cpp_rejects_non_text_content():
    with pytest.raises(InputError, match="message 0: .*text role and content"):
        render_llama_cpp(load_template("qwen3-0.6b"), [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


@pytest.mark.parametrize("name", ["qwen3-0.6b", "mistral-large-instruct-2407", "gemma-2-2b-it"])
def test_compare_chat_passes_where_llama_cpp_renders_the_template(name):
    result = compare_chat(load_template(name), special_tokens(name))
    assert result["verdict"] == PASS, result["note"]
    assert result["first_difference"] is None and result["builtin_first_difference"] is None
    expected = transformers_render(load_template(name), PROBE_CONVERSATION, **special_tokens(name))
    assert result["hf"] == result["llama_cpp_jinja"] == result["llama_cpp_builtin"] == expected


def test_compare_chat_names_the_builtin_format():
    assert "llama.cpp's builtin 'chatml' format render" in compare_chat(
        load_template("qwen3-0.6b"), special_tokens("qwen3-0.6b"))["note"]
    assert "'mistral-v3' format" in compare_chat(load_template("mistral-large-instruct-2407"),
                                                 special_tokens("mistral-large-instruct-2407"))["note"]


@pytest.mark.parametrize("name", sorted(DEFAULT_SYSTEM_TURNS))
def test_compare_chat_reports_the_default_system_turn_the_builtin_engine_omits(name):
    result = compare_chat(load_template(name), special_tokens(name))
    assert result["verdict"] == PASS
    assert result["hf"] == result["llama_cpp_jinja"]
    bos_token = special_tokens(name)["bos_token"] or ""
    conversation = result["llama_cpp_builtin"][len(bos_token):]
    assert result["hf"] == bos_token + DEFAULT_SYSTEM_TURNS[name] + conversation
    offset = len(bos_token) + first_difference(DEFAULT_SYSTEM_TURNS[name], conversation)
    assert result["builtin_first_difference"] == offset
    assert f"differs at character {offset}" in result["note"]


def test_compare_chat_reports_llama_3_2_dated_system_turn():
    result = compare_chat(load_template("llama-3.2-3b-instruct"), special_tokens("llama-3.2-3b-instruct"))
    assert result["verdict"] == PASS
    assert result["builtin_first_difference"] == len("<|begin_of_text|><|start_header_id|>")
    assert result["hf"][result["builtin_first_difference"]:].startswith(
        "system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: ")
    assert "'llama3' format" in result["note"]


def test_compare_chat_fails_on_template_llama_cpp_does_not_know():
    result = compare_chat(CUSTOM_TEMPLATE, {"eos_token": "</s>"})
    assert result["verdict"] == FAIL
    assert result["llama_cpp_builtin"] is None and result["builtin_first_difference"] is None
    assert result["hf"] == transformers_render(CUSTOM_TEMPLATE, PROBE_CONVERSATION, bos_token=None, eos_token="</s>")
    assert "does not recognise this template" in result["note"]


def test_compare_chat_fails_when_the_gguf_names_another_eos_token():
    name = "mistral-large-instruct-2407"  # writes eos_token after each assistant turn
    result = compare_chat(load_template(name), special_tokens(name),
                          runtime_tokens={"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    assert result["verdict"] == FAIL
    assert "</s>" in result["hf"] and "</s>" not in result["llama_cpp_jinja"]
    assert "llama-cpp-python renders the GGUF's template differently" in result["note"]


@pytest.mark.parametrize("template", [None, ""])
def test_compare_chat_skipped_without_template(template):
    result = compare_chat(template, {"bos_token": "<s>", "eos_token": "</s>"})
    assert result["verdict"] == SKIPPED
    assert result["hf"] is None and result["llama_cpp_builtin"] is None


def test_builtin_text_starts_with_bos_only_when_the_gguf_adds_it():
    name = "mistral-large-instruct-2407"  # the template writes BOS itself
    result = compare_chat(load_template(name), special_tokens(name), add_bos=False)
    assert result["verdict"] == PASS
    assert result["builtin_first_difference"] == 0


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_llama_cpp_python_jinja_path_renders_as_render_hf(name):
    """llama-cpp-python's create_chat_completion renders the GGUF's template with jinja2
    (Jinja2ChatFormatter), passing only bos/eos text ("" where the GGUF has none)."""
    template, tokens = load_template(name), special_tokens(name)
    formatter = Jinja2ChatFormatter(template=template, bos_token=tokens["bos_token"] or "",
                                    eos_token=tokens["eos_token"] or "")
    assert formatter(messages=list(PROBE_CONVERSATION)).prompt == render_hf(template, PROBE_CONVERSATION, **tokens)


def test_first_difference():
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference("ab", "abc") == 2
    assert first_difference("→x", "→y") == 1
