"""What a Hugging Face tokenizer folder promises, read from its own files.

A model's text side is more than `tokenizer.json`: the pre-tokenizer regexes (which llama.cpp
knows only by name), the special tokens and whether encoding adds BOS/EOS, the chat template.
`read_contract` gathers them from `tokenizer.json` and its companions (`tokenizer_config.json`,
`special_tokens_map.json`, `chat_template.jinja`) so import can carry them, export can write them
back, the GGUF gets the keys llama.cpp's own converter writes, and the tokens stage separates
documents with the model's own end-of-text token. The pre-tokenizer table: docs/import.md.

What lives where: `pre_tokenizers` (the table of llama.cpp's pre-tokenizers and
`detect_pre_tokenizer`, which names a tokenizer.json's), `reader` (`TokenizerContract`,
`read_contract`: the special tokens, chat templates and companion files).
"""

from shipkit.tokenizer_contract.pre_tokenizers import (
    LLAMA_CPP_PRE_NAMES,
    PRE_TOKENIZERS,
    detect_pre_tokenizer,
)
from shipkit.tokenizer_contract.reader import (
    CARRIED_FILES,
    CHAT_TEMPLATE_FILE,
    DEFAULT_CHAT_TEMPLATE,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TokenizerContract,
    read_contract,
)

__all__ = [
    "CARRIED_FILES",
    "CHAT_TEMPLATE_FILE",
    "DEFAULT_CHAT_TEMPLATE",
    "LLAMA_CPP_PRE_NAMES",
    "PRE_TOKENIZERS",
    "SPECIAL_TOKENS_MAP_FILE",
    "TOKENIZER_CONFIG_FILE",
    "TokenizerContract",
    "detect_pre_tokenizer",
    "read_contract",
]
