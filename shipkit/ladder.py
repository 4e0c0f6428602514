"""The GGUF ladder a release ships: which files (a llama.cpp file type, optionally with
llama-quantize's output / token-embedding overrides, optionally with an importance matrix), what
each file is called, and the settings of the importance matrix they share (read by `shipkit
ship` from ship.toml's `quant_types` and `imatrix`); and, from a measured ladder's parity.json,
the GGUF card's table rows and its one-line recommendation (`recommend`, rule in docs/release.md).

An entry is a file type's name, or a table when it overrides the two tensors llama-quantize lets
a user retype (`--output-tensor-type`, `--token-embedding-type`):

    quant_types = ["Q4_K_M", "Q8_0", { type = "Q4_K_M", output = "Q8_0", token_embedding = "Q8_0" }]

A table rather than a name suffix (the community's `Q4_K_L`): suffixes are unofficial and collide
with llama.cpp's own file types (`Q3_K_L` is a real mix that changes attn_v and ffn_down, not the
embeddings), while the table says which tensors change, exactly as llama-quantize's options do.
The file name spells the overrides out with the GGUF tensor names:
`<BaseName>-<SizeLabel>-Q4_K_M-output_Q8_0-token_embd_Q8_0.gguf`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shipkit.contract import Threshold
from shipkit.errors import InputError
from shipkit.evidence import PASS
from shipkit.imatrix.options import DEFAULT_CTX, DEFAULT_N_TOKENS, check_sizes

# The released importance matrix, in the GGUF repo beside the files quantized with it. A fixed
# name: every file's quantize.imatrix.file key names it, and a reader finds it without a listing.
IMATRIX_FILE = "imatrix.gguf"
ENTRY_KEYS = ("type", "output", "token_embedding")
IMATRIX_KEYS = ("n_tokens", "ctx")
# The GGUF tensor each override retypes, as it appears in the file name.
OVERRIDE_TENSORS = {"output": "output", "token_embedding": "token_embd"}


@dataclass(frozen=True)
class LadderEntry:
    """One GGUF file of the ladder: llama.cpp file type `type` (a name of
    `shipkit.quantize.mix.FILE_TYPES`), and the GGML types of output.weight and token_embd.weight
    when they replace the mix's choice."""

    type: str
    output: str | None = None
    token_embedding: str | None = None

    @property
    def label(self) -> str:
        """The type part of the file name: `Q4_K_M`, or `Q4_K_M-output_Q8_0-token_embd_Q8_0`."""
        overrides = [f"-{OVERRIDE_TENSORS[key]}_{value}"
                     for key, value in (("output", self.output), ("token_embedding", self.token_embedding))
                     if value is not None]
        return self.type + "".join(overrides)

    def file_name(self, default_name: str) -> str:
        """The released file's name from the quantizer's default (`<BaseName>-<SizeLabel>-<Type>.gguf`)."""
        stem, dot, suffix = default_name.rpartition(".")
        return f"{stem}{self.label.removeprefix(self.type)}{dot}{suffix}"


def parse_entry(value: str | dict[str, Any]) -> LadderEntry:
    """A `quant_types` item (a file type's name or a table) as an entry. Raises InputError,
    without the field's name (the caller adds it), for an unknown type, key or override."""
    from shipkit.quantize.mix import FILE_TYPES, OVERRIDE_TYPES

    if isinstance(value, str):
        value = {"type": value}
    unknown = sorted(set(value) - set(ENTRY_KEYS))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} in {_shown(value)} (keys: {', '.join(ENTRY_KEYS)})")
    if "type" not in value:
        raise InputError(f"{_shown(value)} names no type (e.g. type = \"Q4_K_M\")")
    for key, item in value.items():
        if not isinstance(item, str):
            raise InputError(f"{key} must be a string, in {_shown(value)}")
    if value["type"] not in FILE_TYPES:
        raise InputError(f"unknown {value['type']!r} (known: {', '.join(FILE_TYPES)})")
    overrides = [qtype.name for qtype in OVERRIDE_TYPES]
    for key in ("output", "token_embedding"):
        if key in value and value[key] not in overrides:
            raise InputError(f"{key}: unknown GGML type {value[key]!r} (known: {', '.join(overrides)})")
    return LadderEntry(value["type"], value.get("output"), value.get("token_embedding"))


def parse_ladder(values: list[str | dict[str, Any]]) -> list[LadderEntry]:
    """Every entry of `quant_types`; two entries that make the same file are refused."""
    entries = [parse_entry(value) for value in values]
    labels = [entry.label for entry in entries]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"lists the same file twice: {', '.join(twice)}")
    return entries


@dataclass(frozen=True)
class ImatrixSettings:
    """How the importance matrix is computed: the first `n_tokens` of the train split (whole
    `ctx`-token chunks). The defaults are `shipkit imatrix`'s."""

    n_tokens: int = DEFAULT_N_TOKENS
    ctx: int = DEFAULT_CTX

    def to_dict(self) -> dict[str, int]:
        return {"n_tokens": self.n_tokens, "ctx": self.ctx}


def parse_imatrix(value: bool | dict[str, Any]) -> ImatrixSettings | None:
    """ship.toml's `imatrix`: false (none), true (the defaults) or `{ n_tokens = N, ctx = C }`.
    Raises InputError, without the field's name, for an unknown key or a value out of range."""
    if value is False:
        return None
    if value is True:
        return ImatrixSettings()
    unknown = sorted(set(value) - set(IMATRIX_KEYS))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} (keys: {', '.join(IMATRIX_KEYS)})")
    for key, item in value.items():
        if not isinstance(item, int) or isinstance(item, bool):
            raise InputError(f"{key} must be an integer, got {json.dumps(item)}")
    settings = ImatrixSettings(**value)
    check_sizes(settings.n_tokens, settings.ctx)
    return settings


def _shown(table: dict[str, Any]) -> str:
    """A table as TOML spells it inline (JSON's quoting of strings and numbers is TOML's)."""
    return "{ " + ", ".join(f"{key} = {json.dumps(item)}" for key, item in table.items()) + " }"


# ---------------------------------------------------------------------------------------------
# The card's view of a measured ladder (parity.json with `files`)

# The columns of the card's ladder table a file's metrics give, in order.
TABLE_METRICS = ("kl_mean", "kl_p99", "same_top_pct", "ppl_ratio")
HEADLINE_ENGINES = ("torch", "llama.cpp")  # whose numbers the table shows: the first that ran


def ladder_rows(parity: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per measured file, every value copied from parity.json's `files`: name, bits per
    weight, bytes, the headline engine and its table metrics, whether the file was quantized with
    an importance matrix, its verdict and band. Empty for a one-file run."""
    rows = []
    for line in parity.get("files", []):
        engine = headline_engine(line["engines"])
        rows.append({"name": line["name"], "bits_per_weight": line["bits_per_weight"], "bytes": line["bytes"],
                     "engine": engine, **{metric: line["engines"][engine]["metrics"][metric] for metric in TABLE_METRICS},
                     "imatrix": line["imatrix"] is not None, "verdict": line["verdict"], "band": line["band"]["name"]})
    return rows


def headline_engine(engines: dict[str, Any]) -> str:
    """The engine whose numbers stand for a file: torch where it ran (every file of a run has it
    unless the run was llama.cpp only), else llama.cpp."""
    return next(engine for engine in HEADLINE_ENGINES if engine in engines)


def recommend(parity: dict[str, Any]) -> dict[str, Any] | None:
    """The card's one-line pick from a measured ladder, or None for a one-file run.

    The rule (docs/release.md): every file is held to ONE yardstick, the limits the primary file
    was judged by (parity.json's top-level `engines.*.checks`; in `shipkit ship` the Q4_K_M,
    the quality point the default contract is calibrated on). A file qualifies when its own
    verdict is PASS and, in each engine it was measured in (further files may be measured in
    torch only), each metric the primary was checked on in that engine is within the primary's
    limit. The recommendation is the qualifying file with the fewest bytes (ties:
    the lower KL mean, then the name). Per-type bands only say a file is a healthy quant of its
    type (a Q2_K may lose far more than a Q4_K_M), so "passed its own band" alone would always
    pick the smallest healthy file; the common yardstick picks the smallest file that is as
    faithful as the primary must be.

    Returns {"name", "bytes", "bits_per_weight", "yardstick": primary file name, "band": its
    band, "limits": [{metric, direction, limit}] (the headline engine's)}, with "name" None when
    no file qualifies."""
    if "files" not in parity:
        return None
    yardstick = {engine: section["checks"] for engine, section in sorted(parity["engines"].items())}
    primary = next(line for line in parity["files"] if line["primary"])
    headline = headline_engine(parity["engines"])
    qualifying = [line for line in parity["files"] if line["verdict"] == PASS and _within(line, yardstick)]
    best = min(qualifying, default=None,
               key=lambda line: (line["bytes"], _sort_key(line["engines"][headline_engine(line["engines"])]
                                                          ["metrics"]["kl_mean"]), line["name"]))
    limits = [{"metric": metric, "direction": check["direction"], "limit": check["limit"]}
              for metric, check in sorted(yardstick[headline].items())]
    return {"name": best["name"] if best else None, "bytes": best["bytes"] if best else None,
            "bits_per_weight": best["bits_per_weight"] if best else None, "yardstick": primary["name"],
            "band": primary["band"]["name"], "limits": limits}


def _within(line: dict[str, Any], yardstick: dict[str, dict[str, Any]]) -> bool:
    for engine, measured in line["engines"].items():
        for metric, check in yardstick.get(engine, {}).items():
            if not Threshold(check["limit"], check["direction"], "").passes(measured["metrics"].get(metric)):
                return False
    return True


def _sort_key(value: float | None) -> float:
    return float("inf") if value is None else value
