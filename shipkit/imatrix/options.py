"""What an imatrix run may be asked for: the defaults and bounds of `--ctx` and `--n-tokens`.

Import-free, so the CLI can show them in --help without loading torch or gguf.
"""

DEFAULT_CTX = 512  # llama-imatrix's default context (-c)
# 256 chunks of 512: about a minute for a small model on 2 CPU cores, seconds on a GPU
# (docs/imatrix.md, "Speed and devices").
DEFAULT_N_TOKENS = 1 << 17
# llama-imatrix collects only products of at least 16 rows (tokens); a chunk of 16 or more
# tokens therefore always counts whole, however llama.cpp batches it.
MIN_CTX = 16
MAX_N_TOKENS = 1 << 24  # counts are F32 in the file: exact up to 2**24


def check_sizes(n_tokens: int, ctx: int) -> None:
    """The one place the bounds are enforced (the CLI, the Python API and ship.toml all call it)."""
    from shipkit.errors import InputError

    if ctx < MIN_CTX:
        raise InputError(f"ctx {ctx}: at least {MIN_CTX} (llama-imatrix ignores shorter products)")
    if not ctx <= n_tokens <= MAX_N_TOKENS:
        raise InputError(f"n_tokens {n_tokens}: between one chunk (ctx {ctx}) and {MAX_N_TOKENS:,} "
                         "(the file's counts are float32)")
