"""shipkit: from raw corpus to a Hugging Face release of a causal code language model."""

__version__ = "0.1.0"
