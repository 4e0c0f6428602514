"""llama.cpp as a runtime the parity gate checks against, through llama-cpp-python's low-level
bindings: a GGUF's vocabulary alone (`LlamaCppVocab`, for the tokenizer and chat-template
checks) or the whole model (`LlamaCppModel`: every position's logits and each layer's output).

llama-cpp-python is an optional dependency (the `llama` extra, which builds llama.cpp from
source), so it is imported only when a runtime is first asked for (`bindings`).
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from shipkit.errors import InputError, IntegrityError

META_VALUE_BYTES = 256  # first guess at a metadata value's length; longer ones are read again
# llama.cpp's name for the residual stream after layer N (llama-graph: `cb(cur, "l_out", il)`).
LAYER_OUTPUT_PREFIX = "l_out-"
GGML_TYPE_F32 = 0  # enum ggml_type


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


class LlamaCppModel:
    """A GGUF in llama.cpp, through llama-cpp-python's C API: the logits of every position and,
    via the graph-evaluation callback, each layer's output (the `l_out-N` tensors)."""

    def __init__(self, path: Path, ctx: int, threads: int) -> None:
        llama = bindings()
        self._api = llama
        self._ggml = _ggml_api()
        self._layers: dict[int, np.ndarray] = {}
        self._callback = llama.ggml_backend_sched_eval_callback(self._on_tensor)  # kept alive here
        model_params = llama.llama_model_default_params()
        # ggml's extra CPU buffer types (AMX tiles, repacked Q4_K/Q8_0 layouts) crash llama_decode
        # on batches of more than one token on AMX machines (llama-cpp-python 0.3.36); the plain
        # CPU kernels compute the same products.
        model_params.use_extra_bufts = False
        self.model = llama.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise IntegrityError(f"{path}: llama.cpp cannot load this GGUF (a conversion bug, or a feature llama.cpp lacks)")
        params = llama.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = ctx
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = GGML_TYPE_F32  # an F16 KV cache would round what torch keeps in float32
        params.cb_eval = self._callback
        self.context = llama.llama_init_from_model(self.model, params)
        if not self.context:
            llama.llama_model_free(self.model)
            raise InputError(f"{path}: llama.cpp cannot create a context of {ctx} tokens for this GGUF")
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.batch = llama.llama_batch_init(ctx, 0, 1)
        self.path = path

    def _on_tensor(self, tensor: int, ask: bool, _user_data: int) -> bool:
        """Called by ggml for every graph node: first to ask whether we want its data, then,
        for those we said yes to, once it is computed. Must not raise (a C callback)."""
        name = self._ggml.ggml_get_name(tensor).decode(errors="replace")
        if not name.startswith(LAYER_OUTPUT_PREFIX):
            return not ask
        if ask:
            return True
        values = np.empty(self._ggml.ggml_nelements(tensor), dtype=np.float32)
        self._ggml.ggml_backend_tensor_get(tensor, values.ctypes.data, 0, values.nbytes)
        self._layers[int(name[len(LAYER_OUTPUT_PREFIX):])] = values
        return True

    def run(self, window: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(T,) ids, from an empty cache -> (T, V) float32 logits and each layer's output (T, d),
        or None for the layers if llama.cpp named no `l_out-N` tensor."""
        llama, batch, length = self._api, self.batch, len(window)
        batch.n_tokens = length
        for position, token in enumerate(window.tolist()):
            batch.token[position] = token
            batch.pos[position] = position
            batch.n_seq_id[position] = 1
            batch.seq_id[position][0] = 0
            batch.logits[position] = True
        self._layers.clear()
        llama.llama_memory_clear(llama.llama_get_memory(self.context), True)
        status = llama.llama_decode(self.context, batch)
        if status != 0:
            raise IntegrityError(f"{self.path}: llama.cpp failed to evaluate a window (llama_decode returned {status})")
        logits = np.ctypeslib.as_array(llama.llama_get_logits(self.context), shape=(length * self.n_vocab,))
        layers = [torch.from_numpy(self._layers[i].reshape(length, -1)) for i in sorted(self._layers)] or None
        return torch.from_numpy(logits.reshape(length, self.n_vocab).copy()), layers

    def close(self) -> None:
        self._api.llama_batch_free(self.batch)
        self._api.llama_free(self.context)
        self._api.llama_model_free(self.model)


@cache
def _ggml_api() -> ctypes.CDLL:
    """The three ggml C functions the layer callback needs, from llama-cpp-python's libggml-base."""
    import llama_cpp

    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise InputError(f"{path}: cannot load ggml from this llama-cpp-python install ({error})") from None
    library.ggml_get_name.restype = ctypes.c_char_p
    library.ggml_get_name.argtypes = [ctypes.c_void_p]
    library.ggml_nelements.restype = ctypes.c_int64
    library.ggml_nelements.argtypes = [ctypes.c_void_p]
    library.ggml_backend_tensor_get.restype = None
    library.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return library
