"""Tiny Hugging Face checkpoints made locally with transformers (no downloads)."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SAMPLE_CODE = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 40


def write_tokenizer(path) -> int:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([SAMPLE_CODE], trainer)
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def save_tiny_hf_model(folder, family: str, hidden: int = 96, tied: bool = False, shard: str | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder / "tokenizer.json")
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    if family == "llama":
        config = transformers.LlamaConfig(rms_norm_eps=1e-5, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(rms_norm_eps=1e-6, **common)
        model = transformers.Qwen2ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return model.eval()
