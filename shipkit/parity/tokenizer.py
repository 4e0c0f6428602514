"""The parity gate's text side: does llama.cpp, reading the GGUF, turn text into the tokens the
Hugging Face tokenizer makes, add BOS/EOS as it does, and render the chat template as it does?

The numeric parity engines are fed the same token ids, so a wrong pre-tokenizer, a lost BOS or
a missing chat template is invisible to them; this check is what sees it. The text is the
val split of the token folder decoded with its own tokenizer (byte-level BPE decodes to the
exact text it encoded), compared document by document. Meaning of the evidence: docs/parity.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from shipkit.errors import InputError
from shipkit.evidence import FAIL, PASS, SKIPPED
from shipkit.layout import TOKENIZER_FILE
from shipkit.parity.chat_template import compare_chat
from shipkit.parity.llama_runtime import LlamaCppVocab
from shipkit.parity.options import DEFAULT_TOKEN_BUDGET
from shipkit.tokenize import load_tokenizer, read_tokens
from shipkit.tokenizer_contract import TokenizerContract, read_contract

# The short text whose encoding with special tokens shows whether BOS/EOS are added.
SPECIAL_PROBE = "def f(x):\n    return x\n"
# Token ids shown on each side of the first difference.
CONTEXT_IDS = 8
PRE_KEY = "tokenizer.ggml.pre"


def val_documents(tokens_dir: Path, tokenizer: Tokenizer) -> Iterator[str]:
    """The val split's documents as text: each run of ids between separators, decoded."""
    split = read_tokens(tokens_dir, "val")
    for shard in split.shards:
        ids = np.asarray(shard)
        bounds = [*np.flatnonzero(ids == split.eot_id).tolist(), len(ids)]
        for start, end in zip(bounds, bounds[1:]):
            if end > start + 1:
                yield tokenizer.decode(ids[start + 1:end].tolist(), skip_special_tokens=False)


def check_tokenizer(gguf_path: Path, tokens_dir: Path, model_config: dict[str, Any], *,
                    token_budget: int = DEFAULT_TOKEN_BUDGET) -> dict[str, Any]:
    """Compare the HF tokenizer of `tokens_dir` with llama.cpp reading `gguf_path`: val text,
    BOS/EOS on a probe, the chat template. Returns the `tokenizer` section of parity.json."""
    if token_budget < 1:
        raise InputError(f"tokenizer token budget: must be positive, got {token_budget}")
    tokenizer_path = Path(tokens_dir) / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_path)
    contract = read_contract(tokenizer_path, model_config=model_config)
    runtime = LlamaCppVocab(gguf_path)
    try:
        documents = _compare_documents(tokenizer, runtime, val_documents(Path(tokens_dir), tokenizer),
                                       token_budget)
        special = _compare_special(runtime, contract)
        chat = _compare_chat(runtime, contract, tokenizer)
        gguf_pre = runtime.metadata(PRE_KEY)
    finally:
        runtime.close()
    failed = [part for part, verdict in (("documents", documents["verdict"]),
                                         ("special_tokens", special["verdict"]),
                                         ("chat_template", chat["verdict"])) if verdict == FAIL]
    return {
        "verdict": FAIL if failed else PASS,
        "failed": failed,
        "gguf": str(gguf_path),
        "pre": contract.pre,
        "gguf_pre": gguf_pre,
        "text_source": f"{tokens_dir} val split, decoded with its {TOKENIZER_FILE}",
        "documents": documents,
        "special_tokens": special,
        "chat_template": chat,
    }


def skipped_section(reason: str) -> dict[str, Any]:
    return {"verdict": SKIPPED, "failed": [], "note": reason}


def _compare_documents(tokenizer: Tokenizer, runtime: LlamaCppVocab, texts: Iterator[str],
                       token_budget: int) -> dict[str, Any]:
    # The tokens stage encodes special-token text as plain text; llama.cpp does with special=False.
    tokenizer.encode_special_tokens = True
    compared = mismatched = tokens = 0
    first: dict[str, Any] | None = None
    for index, text in enumerate(texts):
        if tokens >= token_budget:
            break
        expected = tokenizer.encode(text, add_special_tokens=False).ids
        found = runtime.tokenize(text, add_special=False)
        compared += 1
        tokens += len(expected)
        if found != expected:
            mismatched += 1
            first = first or _first_difference(index, text, expected, found, tokenizer)
    return {
        "verdict": FAIL if mismatched or not compared else PASS,
        "documents_compared": compared,
        "tokens_compared": tokens,
        "documents_differing": mismatched,
        "first_difference": first,
    }


def _first_difference(index: int, text: str, expected: list[int], found: list[int],
                      tokenizer: Tokenizer) -> dict[str, Any]:
    position = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b),
                    min(len(expected), len(found)))
    window = slice(max(0, position - CONTEXT_IDS), position + CONTEXT_IDS)
    offset = len(tokenizer.decode(expected[:position], skip_special_tokens=False))
    return {
        "document": index,
        "position": position,
        "text": text[max(0, offset - 20):offset + 40],
        "hf_ids": expected[window],
        "llama_cpp_ids": found[window],
        "hf_tokens": len(expected),
        "llama_cpp_tokens": len(found),
    }


def _compare_special(runtime: LlamaCppVocab, contract: TokenizerContract) -> dict[str, Any]:
    """Encoding with special tokens adds what HF adds: BOS/EOS as the tokenizer's contract says,
    around llama.cpp's own tokens of the probe (so a pre-tokenizer fault shows only in documents)."""
    body = runtime.tokenize(SPECIAL_PROBE, add_special=False)
    expected = ([contract.bos_id] if contract.add_bos else []) + body + (
        [contract.eos_id] if contract.add_eos else [])
    found = runtime.tokenize(SPECIAL_PROBE, add_special=True)
    return {
        "verdict": PASS if found == expected else FAIL,
        "add_bos": contract.add_bos,
        "add_eos": contract.add_eos,
        "hf_ids": expected,
        "llama_cpp_ids": found,
    }


def _compare_chat(runtime: LlamaCppVocab, contract: TokenizerContract, tokenizer: Tokenizer) -> dict[str, Any]:
    """The GGUF must carry the tokenizer's chat template, and render it as transformers does."""
    gguf_template = runtime.chat_template()
    if contract.chat_template is not None and gguf_template != contract.chat_template:
        return {"verdict": FAIL, "note": "the GGUF's tokenizer.chat_template is not the tokenizer's chat "
                                         "template (missing or different)"}
    special = {f"{role}_token": tokenizer.id_to_token(token_id)
               for role, token_id in (("bos", contract.bos_id), ("eos", contract.eos_id),
                                      ("pad", contract.pad_id), ("unk", contract.unk_id))
               if token_id is not None}
    # llama-cpp-python hands the template the text of the GGUF's own BOS/EOS tokens.
    runtime_tokens = {"bos_token": runtime.token_text(runtime.bos_id),
                      "eos_token": runtime.token_text(runtime.eos_id)}
    return compare_chat(contract.chat_template, special, add_bos=contract.add_bos,
                        runtime_tokens=runtime_tokens)

