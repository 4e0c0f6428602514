"""Tiny Hugging Face checkpoints made locally with transformers (no downloads)."""

from __future__ import annotations

import torch
import transformers
from tokenizer_helpers import model_vocab_size, write_family_tokenizer
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


# transformers config class, model class and rms_norm_eps of each family the helper builds.
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, 1e-5),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, 1e-5),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 1e-6),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 1e-6),
}
TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5
ROPE_THETA = 10000.0


def rope_kwargs(rope_scaling: dict) -> dict:
    """A RoPE scaling dict as config kwargs: `rope_parameters` (with theta) in transformers v5,
    `rope_scaling` in v4."""
    if TRANSFORMERS_V5:
        return {"rope_parameters": {**rope_scaling, "rope_theta": ROPE_THETA}}
    return {"rope_scaling": rope_scaling, "rope_theta": ROPE_THETA}


def save_tiny_hf_model(folder, family: str, hidden: int = 96, tied: bool = False, shard: str | None = None,
                       *, head_dim: int | None = None, rope_scaling: dict | None = None,
                       unit_norms: bool = False, tokenizer_family: str | None = None, **config_fields):
    """A random 2-layer `family` model saved in `folder` with a byte-level BPE tokenizer (GPT-2
    style with `<|endoftext|>` as id 0, or `tokenizer_family`'s from tokenizer_helpers, the
    embedding padded past its special tokens as real models pad it); returns it in eval mode. `head_dim` apart from hidden/heads, a llama3 `rope_scaling`, and any other
    config field may be given; Mistral gets `sliding_window=None` unless given. `unit_norms`
    draws the norm weights around 1 (as in a trained model) instead of around 0, so attention is
    sharp enough for a RoPE or Q/K-layout error to change the logits."""
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_family is None:
        vocab = write_tokenizer(folder / "tokenizer.json")
    else:
        vocab = model_vocab_size(write_family_tokenizer(folder, tokenizer_family))
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
    if head_dim is not None:
        common["head_dim"] = head_dim
    if rope_scaling is not None:
        common |= rope_kwargs(rope_scaling)
    if family == "mistral":
        common["sliding_window"] = None
    config_class, model_class, rms_norm_eps = FAMILIES[family]
    config = config_class(rms_norm_eps=rms_norm_eps, **(common | config_fields))
    model = model_class(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if unit_norms and "norm" in name else 0.0, 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return model.eval()
