"""The chat-template check: does a GGUF user get the prompt the model was trained on?

A chat model's template lives in two places after export: `tokenizer_config.json` /
`chat_template.jinja`, where `transformers`' `apply_chat_template` renders it with jinja2, and
the GGUF key `tokenizer.chat_template`, where llama.cpp's builtin engine
(`llama_chat_apply_template`, src/llama-chat.cpp) does not run it at all: it recognises the
template's family by keywords (`<|im_start|>` → ChatML, `<|start_header_id|>` → Llama 3, …) and
writes that family's hard-coded format, or gives up (-1). `compare_chat` renders one fixed
conversation both ways and compares the texts. Meaning of the verdicts: docs/chat-template.md.

`render_hf` is our own jinja2 rendering, set up as transformers sets it up
(utils/chat_template_utils.py, transformers 5.x), so the runtime needs no transformers. It
differs only where transformers' extra sandbox hardening (its `namespace`/`dict` wrappers) would
refuse a template; a template that renders in transformers renders the same here.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from types import ModuleType
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shipkit.errors import InputError
from shipkit.evidence import FAIL, PASS, SKIPPED
from shipkit.parity.llama_runtime import bindings

# One fixed conversation, rendered by both engines. Each ingredient is there for a reason:
# - user, assistant, user, and nothing else: every common template accepts it (Gemma's rejects
#   a system role, Mistral's and Llama 2's demand strict user/assistant alternation starting with
#   the user), it has a past assistant turn (where templates differ: EOS after it, trimming,
#   Qwen3's <think> handling) and ends with the user, so the generation prompt is meaningful.
#   No system message, so a template's *default* system prompt (Qwen2.5's "You are Qwen…",
#   Llama 3.1's date header) shows: llama.cpp's builtin formats never write one.
# - code with blank lines and 4-space indentation: whitespace must survive both engines.
# - both quote kinds and backticks: no engine may escape them (jinja autoescape, a JSON filter).
# - f-string braces `{n}`: message text is data, never re-read as template syntax.
# - `→`: a multi-byte UTF-8 character, crossing the C API as bytes; offsets are in characters.
# - no leading or trailing whitespace in any message: templates trim it by their own rules
#   (`| trim`, `.lstrip('\n')`), and the probe tests formats, not each template's trim policy.
PROBE_CONVERSATION: tuple[dict[str, str], ...] = (
    {"role": "user", "content": 'Write `is_even(n)` in Python, with a "docstring".'},
    {
        "role": "assistant",
        "content": 'Here it is:\n\n```python\ndef is_even(n: int) -> bool:\n'
                   '    """Return True when n is even."""\n    return n % 2 == 0\n```',
    },
    {"role": "user", "content": "Now print f\"{n} → even\" for n in [1, 2, 3]; keep the 'is_even' name."},
)
# The probe with a system message first: only to name the builtin format llama.cpp picked, which
# the probe alone cannot always tell (Mistral v3 and v7 differ only in the system turn).
FORMAT_FINGERPRINT: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a careful programmer."}, *PROBE_CONVERSATION)
# Characters of each side the FAIL note quotes from the first difference on.
NOTE_CONTEXT_CHARS = 40
# Message fields transformers copies into one another, the first being what templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# ---------------------------------------------------------------------------------------------
# transformers' rendering


class _GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}`, transformers' marker for assistant-token masks:
    rendering keeps its body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: no HTML escaping and no key sorting, unlike jinja's builtin."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@cache
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationTag, loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise InputError(f"chat template line {error.lineno}: {_one_line(error.message)}") from None


def _normalise(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as apply_chat_template hands them to the template: fields set to None dropped,
    a reasoning field also copied under `reasoning_content` and `thinking`."""
    normalised = []
    for message in messages:
        fields = {key: value for key, value in message.items() if value is not None}
        reasoning = next((fields[name] for name in REASONING_FIELDS if name in fields), None)
        if reasoning is not None:
            fields = {"thinking": reasoning, **fields, "reasoning_content": reasoning}
        normalised.append(fields)
    return normalised


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def render_hf(template: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str | None,
              eos_token: str | None, add_generation_prompt: bool = True,
              tools: Sequence[Mapping[str, Any]] | None = None,
              documents: Sequence[Mapping[str, Any]] | None = None, **variables: Any) -> str:
    """`messages` rendered with `template` as transformers'
    `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..., tools=...,
    documents=..., **variables)` renders them.

    `bos_token`/`eos_token` are the tokenizer's special-token text; None where the tokenizer has
    none, and the template then sees the name undefined, as in transformers. `variables` are the
    other names apply_chat_template passes: the rest of the tokenizer's `special_tokens_map`
    (`unk_token`, `pad_token`, …) and template options such as `enable_thinking` or `date_string`.
    `tools` are JSON schemas (dicts), passed as they are.
    Raises InputError, one line, when the template does not parse or fails while rendering
    (`raise_exception`, an undefined attribute, a type error in an expression).
    """
    special_tokens = {name: text for name, text in (("bos_token", bos_token), ("eos_token", eos_token))
                      if text is not None}
    compiled = _compile(template)
    try:
        return compiled.render(messages=_normalise(messages), tools=None if tools is None else list(tools),
                               documents=documents, add_generation_prompt=add_generation_prompt,
                               **{**special_tokens, **variables})
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as error:
        raise InputError(f"chat template cannot render the conversation: {_one_line(error)}") from None


# ---------------------------------------------------------------------------------------------
# llama.cpp's builtin rendering


def _apply_builtin(api: ModuleType, template: bytes, messages: Sequence[Mapping[str, Any]],
                   add_generation_prompt: bool) -> str | None:
    """One llama_chat_apply_template call pair: ask the length, then fill a buffer that size."""
    encoded = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise InputError(f"message {index}: llama.cpp's builtin templates take a text role and content, "
                             f"got {type(role).__name__} and {type(content).__name__}")
        encoded.append(api.llama_chat_message(role.encode(), content.encode()))
    chat = (api.llama_chat_message * len(encoded))(*encoded)
    length = api.llama_chat_apply_template(template, chat, len(encoded), add_generation_prompt, None, 0)
    if length < 0:
        return None
    buffer = ctypes.create_string_buffer(length + 1)
    api.llama_chat_apply_template(template, chat, len(encoded), add_generation_prompt, buffer, len(buffer))
    return buffer.raw[:length].decode("utf-8")


def render_llama_cpp(template: str, messages: Sequence[Mapping[str, Any]], *,
                     add_generation_prompt: bool = True) -> str | None:
    """`messages` rendered by llama.cpp's builtin engine for a GGUF whose `tokenizer.chat_template`
    is `template` (what `llama-cli`/`llama-server --no-jinja` and llama.cpp's C API users get).

    Returns None when llama.cpp does not recognise the template's family: that is a finding for
    the caller to report, not an input error (compare_chat makes it a FAIL). The builtin formats
    never write BOS; llama.cpp's tokenizer adds it. Raises InputError when llama-cpp-python is
    missing or a message's role or content is not text.
    """
    return _apply_builtin(bindings(), template.encode(), messages, add_generation_prompt)


def _builtin_formats(api: ModuleType, template: bytes) -> list[str]:
    """The names of llama.cpp's builtin formats that render FORMAT_FINGERPRINT as `template` does:
    the family llama.cpp took the template for (more than one only if the fingerprint cannot tell)."""
    count = api.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    api.llama_chat_builtin_templates(names, count)
    rendered = _apply_builtin(api, template, FORMAT_FINGERPRINT, True)
    return [name.decode() for name in names if _apply_builtin(api, name, FORMAT_FINGERPRINT, True) == rendered]


# ---------------------------------------------------------------------------------------------
# The check


def first_difference(left: str, right: str) -> int | None:
    """The first character offset where the texts differ (the shorter length when one is a
    prefix of the other); None when they are equal."""
    if left == right:
        return None
    return next((index for index, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right)))


def render_llama_cpp_jinja(template: str, messages: Sequence[Mapping[str, Any]], *, bos_token: str,
                           eos_token: str, add_generation_prompt: bool = True) -> str:
    """`messages` rendered as llama-cpp-python's chat path renders a GGUF's template
    (`Jinja2ChatFormatter`, fed the text of the GGUF's BOS/EOS tokens); llama.cpp's own `--jinja`
    path, the default of `llama-server`, likewise runs the template text itself."""
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        raise InputError("the chat template check needs llama-cpp-python (pip install llama-cpp-python)") from None
    formatter = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token,
                                    add_generation_prompt=add_generation_prompt)
    try:
        return formatter(messages=[dict(message) for message in messages]).prompt
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as error:
        raise InputError(f"llama-cpp-python cannot render the chat template: {_one_line(error)}") from None


def compare_chat(template: str | None, special_tokens: Mapping[str, str | None], *,
                 add_bos: bool = True, runtime_tokens: Mapping[str, str] | None = None) -> dict[str, Any]:
    """PROBE_CONVERSATION rendered with generation prompt by transformers' rules, by
    llama-cpp-python's jinja chat path and by llama.cpp's builtin engine.

    `special_tokens`: the tokenizer's special-token text by name (`bos_token`, `eos_token`,
    `unk_token`, `pad_token`, …, as transformers' `special_tokens_map`). `runtime_tokens`: the
    `bos_token`/`eos_token` text as the GGUF names them (default: the same). `add_bos`: whether the
    GGUF's tokenizer prepends BOS (`tokenizer.ggml.add_bos_token`); llama.cpp's builtin formats
    never write BOS but its tokenizer then adds it, so the builtin text is compared with
    `bos_token` in front exactly when `add_bos` is set.

    Verdict: SKIPPED without a template (shipkit's own models); FAIL when the jinja path renders
    other text than transformers, or when the builtin engine does not recognise the template
    (llama.cpp without --jinja refuses it or uses another model's format); PASS otherwise. A
    builtin rendering that differs (its hard-coded formats never write a template's default
    system turn, e.g. Qwen2.5's "You are Qwen…") does not fail: llama.cpp's own converter gives
    the GGUF the same template, so no GGUF can do better; it is reported in
    `builtin_first_difference` and the note. Raises InputError when a rendering raises or
    llama-cpp-python is missing.
    """
    if not template:
        return {"verdict": SKIPPED, "hf": None, "llama_cpp_jinja": None, "llama_cpp_builtin": None,
                "first_difference": None, "builtin_first_difference": None,
                "note": "the tokenizer has no chat template: nothing to render"}
    tokens = {name: text for name, text in special_tokens.items() if text is not None}
    bos_token, eos_token = tokens.pop("bos_token", None), tokens.pop("eos_token", None)
    hf = render_hf(template, PROBE_CONVERSATION, bos_token=bos_token, eos_token=eos_token,
                   add_generation_prompt=True, **tokens)
    runtime = dict(runtime_tokens or {"bos_token": bos_token or "", "eos_token": eos_token or ""})
    jinja = render_llama_cpp_jinja(template, PROBE_CONVERSATION, bos_token=runtime.get("bos_token", ""),
                                   eos_token=runtime.get("eos_token", ""))
    api = bindings()
    builtin = _apply_builtin(api, template.encode(), PROBE_CONVERSATION, True)
    result = {"hf": hf, "llama_cpp_jinja": jinja, "first_difference": first_difference(hf, jinja),
              "llama_cpp_builtin": None, "builtin_first_difference": None}
    if result["first_difference"] is not None:
        offset = result["first_difference"]
        return {**result, "verdict": FAIL,
                "note": f"llama-cpp-python renders the GGUF's template differently at character {offset}: "
                        f"transformers has {_quote(hf, offset)}, llama-cpp-python has {_quote(jinja, offset)}"}
    if builtin is None:
        return {**result, "verdict": FAIL,
                "note": "llama.cpp's builtin engine does not recognise this template (llama_chat_apply_template "
                        "returns -1): llama.cpp without --jinja refuses it, so a GGUF user gets no prompt or "
                        "another model's format"}
    builtin = ((bos_token or "") if add_bos else "") + builtin
    names = _builtin_formats(api, template.encode())
    engine = f"llama.cpp's builtin {' / '.join(map(repr, names))} format" if names else "llama.cpp's builtin format"
    offset = first_difference(hf, builtin)
    result |= {"llama_cpp_builtin": builtin, "builtin_first_difference": offset}
    if offset is None:
        note = f"llama-cpp-python and {engine} render the probe conversation as transformers does"
    else:
        note = (f"llama-cpp-python renders it as transformers does; {engine} differs at character {offset} "
                f"(transformers has {_quote(hf, offset)}, llama.cpp has {_quote(builtin, offset)}), as it "
                "would for llama.cpp's own conversion: its hard-coded formats write no default system turn")
    return {**result, "verdict": PASS, "note": note}


def _quote(text: str, offset: int) -> str:
    return repr(text[offset:offset + NOTE_CONTEXT_CHARS])
