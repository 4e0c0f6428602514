"""llama.cpp as a runtime shipkit checks against, through llama-cpp-python's low-level bindings.

Imported lazily by the parity gate and the tokenizer check: llama-cpp-python is an optional
dependency (the `llama` extra) and builds llama.cpp from source.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path
from types import ModuleType

from shipkit.errors import InputError

META_VALUE_BYTES = 256  # first guess at a metadata value's length; longer ones are read again


@cache
def bindings() -> ModuleType:
    """llama-cpp-python's low-level bindings, the backend initialised, its log limited to errors."""
    try:
        from llama_cpp import llama_cpp as api
    except ImportError:
        raise InputError("llama.cpp is needed here: pip install llama-cpp-python (or shipkit[llama])") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    api.llama_backend_init()
    return api


class LlamaCppVocab:
    """A GGUF's vocabulary as llama.cpp loads it (no weights, no context): tokenization, special
    tokens and metadata exactly as llama.cpp reads them from the file."""

    def __init__(self, path: Path) -> None:
        api = self._api = bindings()
        params = api.llama_model_default_params()
        params.vocab_only = True
        self.model = api.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise InputError(f"{path}: llama.cpp cannot load its vocabulary")
        self.vocab = api.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Special-token text is tokenized as plain text (parse_special off)."""
        data = text.encode("utf-8")
        capacity = len(data) + 2  # a token covers at least one byte; room for BOS and EOS
        tokens = (self._api.llama_token * capacity)()
        count = self._api.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, False)
        return list(tokens[:count])

    def token_text(self, token_id: int) -> str:
        return "" if token_id < 0 else self._api.llama_vocab_get_text(self.vocab, token_id).decode("utf-8")

    @property
    def bos_id(self) -> int:
        return self._api.llama_vocab_bos(self.vocab)

    @property
    def eos_id(self) -> int:
        return self._api.llama_vocab_eos(self.vocab)

    def metadata(self, key: str) -> str | None:
        """A GGUF key's value as llama.cpp prints it (strings as they are)."""
        buffer = ctypes.create_string_buffer(META_VALUE_BYTES)
        size = self._api.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        if size < 0:
            return None
        if size >= len(buffer):  # snprintf semantics: the full length, the text cut to fit
            buffer = ctypes.create_string_buffer(size + 1)
            self._api.llama_model_meta_val_str(self.model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8")

    def chat_template(self) -> str | None:
        template = self._api.llama_model_chat_template(self.model, None)
        return None if template is None else template.decode("utf-8")

    def close(self) -> None:
        self._api.llama_model_free(self.model)

