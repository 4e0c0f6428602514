"""Hostile checkpoints and configs (issue 16): checksum-valid APR files whose metadata lies, HF
folders whose config.json or tokenizer.json lies, resume files whose progress lies, bad `--set`
values, and a second writer on a run folder. Each is refused through the real CLI in one line
naming the field (tests/hostile.py counts them), before any output is written or anything the
lie would size is allocated."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import save_tiny_hf_model
from hostile import Outcome, assert_refused, run_cli

from shipkit.apr import checked_tokenizer_name, validate_apr, write_apr
from shipkit.apr import format as fmt
from shipkit.config import ModelConfig
from shipkit.corpus import CorpusConfig, build_corpus
from shipkit.errors import IntegrityError
from shipkit.layout import RunDir
from shipkit.model import CausalLM
from shipkit.tokenize import TokenizerConfig, encode_corpus, train_tokenizer
from shipkit.train.presets import apply_overrides, get_preset
from shipkit.train.resume_file import read_resume_point
from shipkit.train.run_folder import run_dir_lock

SUITE = "checkpoints"
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PEAK_RSS_LIMIT_KIB = 1536 << 10  # a refused command stays near torch's import footprint (~0.5 GiB)


# ---------------------------------------------------------------------------------------------
# Crafting files


def craft_apr(path: Path, tensors: dict[str, torch.Tensor], metadata: Any,
              entry_changes: dict[str, dict[str, Any]] | None = None) -> Path:
    """A checksum-valid APR v2 file holding `tensors` and any `metadata`, NaN and lies included:
    the layout of docs/apr-format.md written directly (write_apr refuses a lying config).
    `entry_changes` replaces index fields of the named tensors (a dtype as a JSON list, ...)."""
    entries, payloads, end = [], [], 0
    for name, tensor in tensors.items():
        payload = tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        offset = fmt.align(end)
        entry = {"name": name, "dtype": fmt.DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                 "offset": offset, "nbytes": len(payload), "xxh3": fmt.digest_hex(fmt.checksum(payload))}
        entries.append(entry | (entry_changes or {}).get(name, {}))
        payloads.append((offset, payload))
        end = offset + len(payload)
    index = json.dumps({"metadata": metadata, "tensors": entries}).encode()
    data_offset = fmt.align(fmt.HEADER_SIZE + len(index))
    region = index + bytes(data_offset - fmt.HEADER_SIZE - len(index))
    file_size = data_offset + end + fmt.FOOTER_SIZE
    header = fmt.HEADER_STRUCT.pack(fmt.MAGIC, fmt.VERSION, 0, len(entries), len(index), data_offset,
                                    end, file_size, 0)
    digest = fmt.header_digest(header, region).to_bytes(8, "little")
    data = bytearray(end)
    for offset, payload in payloads:
        data[offset:offset + len(payload)] = payload
    path.write_bytes(header[: fmt.HEADER_DIGEST_OFFSET] + digest + region + bytes(data)
                     + fmt.FOOTER_STRUCT.pack(fmt.FOOTER_MAGIC, file_size))
    return path


def weights_metadata(config: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    metadata = {"kind": "weights", "config": config if config is not None else TINY.to_dict(),
                "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64},
                "producer": {"shipkit_version": "0.1.0", "run_id": "hostile", "epoch": 1, "step": 8}}
    return metadata | changes


# `shipkit ARGS` in a fresh interpreter that writes its own peak RSS (KiB) to a file on exit.
MEASURED = """
import resource, sys
from pathlib import Path
from shipkit.cli import main
try:
    main(sys.argv[2:], prog_name="shipkit")
finally:
    Path(sys.argv[1]).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def run_measured(tmp_path: Path, *args: str | Path) -> tuple[Outcome, int]:
    """`shipkit ARGS` in a subprocess, with its peak resident memory in KiB."""
    peak_file = tmp_path / "peak-rss"
    result = subprocess.run([sys.executable, "-c", MEASURED, str(peak_file), *map(str, args)],
                            capture_output=True, text=True, timeout=300, check=False)
    return Outcome(result.returncode, result.stdout, result.stderr), int(peak_file.read_text())


# ---------------------------------------------------------------------------------------------
# Shared inputs, built once


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return CausalLM(TINY).weights()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (config.json, model.safetensors, tokenizer.json)."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    save_tiny_hf_model(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TOKENS_DIR of a few hundred tokens (parity reads its val split before the models)."""
    root = tmp_path_factory.mktemp("tokens")
    sources = root / "src"
    sources.mkdir()
    for number in range(40):
        (sources / f"m{number}.py").write_text(f"def f{number}(x):\n    return x * {number} + {number * 7}\n" * 8)
    build_corpus([sources], root / "corpus", CorpusConfig(val_fraction=0.25))
    train_tokenizer(root / "corpus", root / "tokens", TokenizerConfig(vocab_size=300))
    encode_corpus(root / "corpus", root / "tokens")
    return root / "tokens"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, hf_base: Path) -> Path:
    """A --data folder holding only a tokenizer.json: every refusal below comes before the
    token shards are read."""
    folder = tmp_path_factory.mktemp("data")
    shutil.copy(hf_base / "tokenizer.json", folder / "tokenizer.json")
    return folder


def test_the_crafted_baseline_is_valid(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    """The crafting writes what validate accepts: every refusal below is the lie's doing."""
    path = craft_apr(tmp_path / "honest.apr", weights, weights_metadata())
    assert validate_apr(path).ok
    assert run_cli("inspect", path).exit_code == 0


# ---------------------------------------------------------------------------------------------
# APR metadata: config fields, dtypes, shapes, tokenizer paths, producer

INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "head_dim")
INT_LIES: dict[str, Any] = {"string": "32", "bool": True, "float": 32.5, "zero": 0, "negative": -1,
                            "huge": 10**12, "null": None, "list": [32]}
# Lies that are the truth for some fields: a zero token id, a null head_dim (derived).
NOT_LIES = {("bos_token_id", "zero"), ("eos_token_id", "zero"), ("head_dim", "null")}
FLOAT_LIES: dict[str, Any] = {"string": "1e-5", "nan": math.nan, "inf": math.inf, "minus-inf": -math.inf,
                              "zero": 0.0, "negative": -1.0, "null": None, "bool": True, "huge-int": 10**400}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}

CONFIG_LIES: list[tuple[str, dict[str, Any], str]] = [
    *((f"{field}-{kind}", {field: value}, f"config field {field}")
      for field in INT_FIELDS for kind, value in INT_LIES.items() if (field, kind) not in NOT_LIES),
    *((f"{field}-{kind}", {field: value}, f"config field {field}")
      for field in ("rms_norm_eps", "rope_theta") for kind, value in FLOAT_LIES.items()),
    ("rms_norm_eps-above-limit", {"rms_norm_eps": 2.0}, "config field rms_norm_eps"),
    ("heads-do-not-divide-hidden", {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
     "config field hidden_size"),
    ("kv-heads-do-not-divide-heads", {"num_key_value_heads": 3}, "config field num_key_value_heads"),
    ("head-dim-odd", {"head_dim": 7}, "config field head_dim"),
    ("token-id-beyond-vocab", {"eos_token_id": 64}, "config field eos_token_id"),
    ("parameters-beyond-limit", {"vocab_size": 1 << 22, "hidden_size": 1 << 15, "num_attention_heads": 256,
                                 "num_key_value_heads": 256, "intermediate_size": 1 << 17,
                                 "num_hidden_layers": 1024}, "parameters exceed"),
    *((f"tie-{kind}", {"tie_word_embeddings": value}, "config field tie_word_embeddings")
      for kind, value in {"string": "false", "int": 0, "null": None, "list": []}.items()),
    *((f"architecture-{kind}", {"architecture": value}, "config field architecture")
      for kind, value in {"unknown": "gpt2", "list": ["llama"], "int": 7, "null": None, "empty": ""}.items()),
    ("rope-scaling-string", {"rope_scaling": "llama3"}, "config field rope_scaling"),
    ("rope-scaling-list", {"rope_scaling": [8.0]}, "config field rope_scaling"),
    ("rope-scaling-yarn", {"rope_scaling": {**LLAMA3, "rope_type": "yarn"}}, "config field rope_scaling.rope_type"),
    *((f"rope-factor-{kind}", {"rope_scaling": {**LLAMA3, "factor": value}}, "config field rope_scaling.factor")
      for kind, value in {"nan": math.nan, "inf": math.inf, "negative": -8.0, "string": "8"}.items()),
    ("rope-original-context-huge", {"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 10**12}},
     "config field rope_scaling.original_max_position_embeddings"),
    ("rope-missing-field", {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "factor"}},
     "config field rope_scaling"),
    ("rope-high-not-above-low", {"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}},
     "config field rope_scaling.high_freq_factor"),
    ("unknown-field", {"sliding_window": 4}, "unknown field(s) 'sliding_window'"),
]
# One consumer per case, in turn: each must refuse before it sizes anything from the lie.
COMMANDS = ("validate", "inspect", "quantize", "export", "parity")


def command_for(request: pytest.FixtureRequest, parameter: str) -> str:
    """The consumer a case goes through: COMMANDS in turn along the parameter's cases."""
    return COMMANDS[request.node.callspec.indices[parameter] % len(COMMANDS)]


def refused_by(command: str, path: Path, tmp_path: Path, tokens_dir: Path, names: str) -> str:
    """`command` on the hostile `path` is refused naming `names` (validate: on the report's
    line), and writes nothing; returns the error line."""
    out = tmp_path / "out"
    if command == "validate":
        outcome = run_cli("validate", path)
        line = assert_refused(outcome, SUITE, names=path.name, exit_codes=(1,))
        assert names in outcome.stdout, outcome.stdout
        return line
    args = {"inspect": ("inspect", path),
            "quantize": ("quantize", path, "--q4k", "--out", out),
            "export": ("export", path, "--hf", out),
            "parity": ("parity", path, out / "q.gguf", "--tokens", tokens_dir, "--ctx", "8",
                       "--n-tokens", "64", "--run-dir", out)}[command]
    line = assert_refused(run_cli(*args), SUITE, names=names)
    assert not out.exists()
    return line


@pytest.mark.parametrize(("changes", "names"), [case[1:] for case in CONFIG_LIES],
                         ids=[case[0] for case in CONFIG_LIES])
def test_config_lie_is_refused(request: pytest.FixtureRequest, tmp_path: Path, weights: dict[str, torch.Tensor],
                               tokens_dir: Path, changes: dict[str, Any], names: str) -> None:
    path = craft_apr(tmp_path / "lying.apr", weights, weights_metadata(TINY.to_dict() | changes))
    assert any(names in problem for problem in validate_apr(path).problems)
    refused_by(command_for(request, "changes"), path, tmp_path, tokens_dir, names)


def test_config_as_a_list_is_refused(tmp_path: Path, weights: dict[str, torch.Tensor], tokens_dir: Path) -> None:
    path = craft_apr(tmp_path / "lying.apr", weights, weights_metadata([TINY.to_dict()]))
    refused_by("quantize", path, tmp_path, tokens_dir, "metadata config: invalid")


DTYPE_LIES: dict[str, Any] = {"list": ["F32"], "object": {"F32": 4}, "number": 4, "null": None,
                              "unknown": "F128", "lowercase": "f32", "empty": "", "long": "F" * 5000}


@pytest.mark.parametrize("dtype", DTYPE_LIES.values(), ids=DTYPE_LIES.keys())
def test_dtype_that_is_not_a_known_name_is_refused(request: pytest.FixtureRequest, tmp_path: Path,
                                                   weights: dict[str, torch.Tensor], tokens_dir: Path,
                                                   dtype: Any) -> None:
    path = craft_apr(tmp_path / "lying.apr", weights, weights_metadata(),
                     {"model.norm.weight": {"dtype": dtype}})
    command = command_for(request, "dtype")
    line = refused_by(command, path, tmp_path, tokens_dir, "tensor model.norm.weight: dtype")
    assert len(line) < 300  # a crafted value is quoted, not echoed whole


def _reshaped(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """`weights` with `name` one row longer (same count, same dtype: only the shape lies)."""
    tensor = weights[name]
    grown = torch.cat([tensor, tensor[:1]]) if tensor.dim() else tensor.reshape(1)
    return {key: grown if key == name else value for key, value in weights.items()}


SHAPE_LIES = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              *(f"model.layers.1.{part}.weight" for part in (
                  "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                  "post_attention_layernorm"))]


@pytest.mark.parametrize("name", SHAPE_LIES)
def test_shape_that_the_config_does_not_imply_is_refused(request: pytest.FixtureRequest, tmp_path: Path,
                                                         weights: dict[str, torch.Tensor], tokens_dir: Path,
                                                         name: str) -> None:
    path = craft_apr(tmp_path / "lying.apr", _reshaped(weights, name), weights_metadata())
    refused_by(command_for(request, "name"), path, tmp_path, tokens_dir, f"tensor {name}: shape")


@pytest.mark.parametrize(("case", "names"), [
    ("renamed", "not a weight of the config's llama model"),
    ("integer-weight", "is not a weight dtype"),
    ("config-wider-than-tensors", "the config implies"),
    ("config-names-qwen3", "tensor count: the config implies"),
])
def test_tensors_that_are_not_the_configs_model_are_refused(tmp_path: Path, weights: dict[str, torch.Tensor],
                                                            tokens_dir: Path, case: str, names: str) -> None:
    tensors, config = dict(weights), TINY.to_dict()
    if case == "renamed":
        tensors["model.layers.9.mlp.up_proj.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    elif case == "integer-weight":
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    elif case == "config-wider-than-tensors":
        config |= {"hidden_size": 64}  # tensors of width 32: the "hidden 65536" within bounds
    else:
        config |= {"architecture": "qwen3"}
    path = craft_apr(tmp_path / "lying.apr", tensors, weights_metadata(config))
    refused_by("export", path, tmp_path, tokens_dir, names)


TOKENIZER_LIES: dict[str, Any] = {
    "absolute": {"file": "/etc/passwd"}, "parent": {"file": "../tokenizer.json"},
    "grandparent": {"file": "../../../etc/passwd"}, "subfolder": {"file": "sub/tokenizer.json"},
    "dotdot": {"file": ".."}, "dot": {"file": "."}, "empty": {"file": ""}, "number": {"file": 5},
    "null-file": {"file": None}, "nul": {"file": "tokenizer\x00.json"},
    "backslash": {"file": "..\\..\\tokenizer.json"}, "too-long": {"file": "t" * 300},
    "newline": {"file": "tokenizer.json\nerror: forged"}, "sha-short": {"sha256": "abc"},
    "sha-number": {"sha256": 5}, "sha-upper": {"sha256": "A" * 64}, "pre-list": {"pre": ["gpt-2"]},
}


@pytest.mark.parametrize("recorded", TOKENIZER_LIES.values(), ids=TOKENIZER_LIES.keys())
def test_tokenizer_entry_that_is_not_a_plain_file_name_is_refused(request: pytest.FixtureRequest, tmp_path: Path,
                                                                 weights: dict[str, torch.Tensor], tokens_dir: Path,
                                                                 recorded: dict[str, Any]) -> None:
    tokenizer = {"file": "tokenizer.json", "sha256": "0" * 64} | recorded
    path = craft_apr(tmp_path / "lying.apr", weights, weights_metadata(tokenizer=tokenizer))
    refused_by(command_for(request, "recorded"), path, tmp_path, tokens_dir, "metadata tokenizer.")


@pytest.mark.parametrize("metadata", [
    {"tokenizer": ["tokenizer.json"]}, {"tokenizer": "tokenizer.json"},
    {"producer": ["shipkit"]}, {"producer": {"source": 5}}, {"kind": ["weights"]},
], ids=["tokenizer-list", "tokenizer-string", "producer-list", "producer-source-number", "kind-list"])
def test_metadata_entry_of_the_wrong_type_is_refused(tmp_path: Path, weights: dict[str, torch.Tensor],
                                                    tokens_dir: Path, metadata: dict[str, Any]) -> None:
    path = craft_apr(tmp_path / "lying.apr", weights, weights_metadata(**metadata))
    refused_by("quantize", path, tmp_path, tokens_dir, f"metadata {next(iter(metadata))}")


def test_checked_tokenizer_name_confines_the_lookup() -> None:
    assert checked_tokenizer_name({}) == "tokenizer.json"
    assert checked_tokenizer_name({"tokenizer": {"file": "vocab.json"}}) == "vocab.json"
    with pytest.raises(IntegrityError, match="metadata tokenizer.file: '/etc/passwd'"):
        checked_tokenizer_name({"tokenizer": {"file": "/etc/passwd"}})


@pytest.mark.parametrize(("command", "changes"), [
    ("quantize", {"vocab_size": 10**12}),
    ("parity", {"hidden_size": 65536}),
])
def test_absurd_sizes_are_refused_before_any_allocation(tmp_path: Path, weights: dict[str, torch.Tensor],
                                                        tokens_dir: Path, command: str,
                                                        changes: dict[str, Any]) -> None:
    """The issue's cases: quantize grew to 2.3 GB and parity asked for 16 GiB."""
    path = craft_apr(tmp_path / "lying.apr", weights, weights_metadata(TINY.to_dict() | changes))
    out = tmp_path / "out"
    args = {"quantize": ("quantize", path, "--q4k", "--out", out),
            "parity": ("parity", path, out / "q.gguf", "--tokens", tokens_dir, "--ctx", "8", "--n-tokens", "64")}
    outcome, peak_kib = run_measured(tmp_path, *args[command])
    assert_refused(outcome, SUITE, names=f"config field {next(iter(changes))}")
    assert peak_kib < PEAK_RSS_LIMIT_KIB, f"peak RSS {peak_kib >> 10} MiB"
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# `shipkit import`: a lying config.json, tokenizer.json or shard index


def hf_copy(hf_base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(hf_base, folder)
    return folder


def edit_json(path: Path, changes: dict[str, Any]) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def refused_import(folder: Path, tmp_path: Path, names: str) -> str:
    out = tmp_path / "out"
    line = assert_refused(run_cli("import", folder, "--out", out / "model.apr"), SUITE, names=names)
    assert not out.exists()
    return line


def test_the_honest_folder_imports(hf_base: Path, tmp_path: Path) -> None:
    """The folder the lies below are made from imports: each refusal is the lie's doing."""
    outcome = run_cli("import", hf_copy(hf_base, tmp_path), "--out", tmp_path / "out" / "model.apr")
    assert outcome.exit_code == 0, outcome.stderr
    assert validate_apr(tmp_path / "out" / "model.apr").ok


HF_CONFIG_LIES: list[tuple[str, dict[str, Any], str]] = [
    *((f"{field}-{kind}", {field: value}, f"field {field}")
      for field, lies in {
          "vocab_size": {"string": "287", "huge": 10**12, "zero": 0, "negative": -1, "bool": True,
                         "null": None, "float": 287.5, "larger-than-tensors": 300},
          "hidden_size": {"zero": 0, "string": "96", "huge": 65536, "bool": True, "other": 128},
          "intermediate_size": {"zero": 0, "string": "160", "huge": 10**9},
          "num_hidden_layers": {"zero": 0, "string": "2", "huge": 10**6, "fewer": 1},
          "num_attention_heads": {"zero": 0, "string": "4", "negative": -4},
          "num_key_value_heads": {"zero": 0, "not-a-divisor": 3, "string": "2"},
          "max_position_embeddings": {"zero": 0, "string": "128", "huge": 10**12},
          "rms_norm_eps": {"string": "1e-5", "zero": 0, "negative": -1e-5, "null": None},
          "head_dim": {"zero": 0, "odd": 23, "string": "24", "huge": 10**6},
          "bos_token_id": {"string": "0", "negative": -1, "beyond-vocab": 10**9},
          "eos_token_id": {"list-of-strings": ["eos"], "object": {"id": 0}},
          "tie_word_embeddings": {"string": "false", "int": 1},
          "attention_bias": {"string": "false"},
          "use_sliding_window": {"string": "false"},
          "sliding_window": {"string": "32", "list": [32]},
          "layer_types": {"string": "full_attention", "objects": [{"kind": "full"}]},
          "rope_scaling": {"string": "llama3", "list": [8.0]},
          "rope_parameters": {"rope-theta-string": {"rope_type": "default", "rope_theta": "1e4"},
                              "rope-theta-zero": {"rope_type": "default", "rope_theta": 0}},
      }.items() for kind, value in lies.items()),
]
# What each import lie's refusal names besides config.json (the field, or the tensor it breaks).
HF_NAMES = {
            "hidden_size-other": "has shape", "num_hidden_layers-fewer": "holds 21 tensors",
            "vocab_size-larger-than-tensors": "has shape",
            "rope_parameters-rope-theta-string": "field rope_theta",
            "rope_parameters-rope-theta-zero": "field rope_theta",
            "bos_token_id-beyond-vocab": "field bos_token_id"}


@pytest.mark.parametrize(("changes", "names"), [case[1:] for case in HF_CONFIG_LIES],
                         ids=[case[0] for case in HF_CONFIG_LIES])
def test_import_refuses_a_lying_config_json(request: pytest.FixtureRequest, hf_base: Path, tmp_path: Path,
                                            changes: dict[str, Any], names: str) -> None:
    folder = hf_copy(hf_base, tmp_path)
    edit_json(folder / "config.json", changes)
    case = request.node.callspec.id
    line = refused_import(folder, tmp_path, HF_NAMES.get(case, names))
    assert "config.json" in line or "has shape" in line or "holds" in line


@pytest.mark.parametrize("content", [b"[]", b"\xff\xfe not utf-8", b"[" * 100_000, b'"config"'],
                         ids=["list", "not-utf8", "deep", "string"])
def test_import_refuses_a_config_json_that_is_not_an_object(hf_base: Path, tmp_path: Path, content: bytes) -> None:
    folder = hf_copy(hf_base, tmp_path)
    (folder / "config.json").write_bytes(content)
    refused_import(folder, tmp_path, "config.json")


def _tokenizer_lies() -> dict[str, Any]:
    return {
        "empty": "", "list": [], "number": 5, "model-number": {"model": 5},
        "vocab-string": lambda tok: {**tok, "model": {**tok["model"], "vocab": "abc"}},
        "added-tokens-string": lambda tok: {**tok, "added_tokens": "x"},
        "added-token-number": lambda tok: {**tok, "added_tokens": [5]},
        "deep": "[" * 100_000,
        "truncated": lambda tok: json.dumps(tok)[:1000],
        "id-beyond-u32": lambda tok: {**tok, "model": {**tok["model"], "vocab": {**tok["model"]["vocab"],
                                                                                 "zzz": 10**12}}},
        "added-id-beyond-vocab": lambda tok: {**tok, "added_tokens": [*tok["added_tokens"], {
            "id": 10**6, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}]},
        "binary": b"\x00\x01\x02garbage",
    }


@pytest.mark.parametrize("lie", _tokenizer_lies().values(), ids=_tokenizer_lies().keys())
def test_import_refuses_a_garbage_tokenizer_json(hf_base: Path, tmp_path: Path, lie: Any) -> None:
    folder = hf_copy(hf_base, tmp_path)
    path = folder / "tokenizer.json"
    content = lie(json.loads(path.read_text())) if callable(lie) else lie
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    refused_import(folder, tmp_path, "tokenizer.json")


@pytest.mark.parametrize(("weight_map", "names"), [
    ({"model.norm.weight": "../elsewhere.safetensors"}, "shard '../elsewhere.safetensors'"),
    ({"model.norm.weight": "/etc/passwd"}, "contains '/'"),
    ({"model.norm.weight": 5}, "not a string"),
    ({"model.norm.weight": "missing.safetensors"}, "is not in"),
], ids=["parent", "absolute", "number", "missing"])
def test_import_refuses_a_shard_index_that_points_outside(hf_base: Path, tmp_path: Path,
                                                         weight_map: dict[str, Any], names: str) -> None:
    folder = hf_copy(hf_base, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused_import(folder, tmp_path, names)


def test_import_refuses_integer_weights(hf_base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = hf_copy(hf_base, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    save_file(tensors, folder / "model.safetensors")
    refused_import(folder, tmp_path, "tensor model.norm.weight has dtype I64")


# ---------------------------------------------------------------------------------------------
# Resume files whose progress lies

RESUME_CONFIG = apply_overrides(get_preset("tiny"), {
    **{name: getattr(TINY, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads",
                                              "max_position_embeddings", "vocab_size")},
    "seq_len": 16, "batch_size": 2, "num_steps": 24, "steps_per_epoch": 8, "warmup_steps": 2,
})


def honest_resume(epochs: int = 2) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors the trainer writes after `epochs` epochs of RESUME_CONFIG."""
    steps = RESUME_CONFIG.steps_per_epoch
    records = [{"epoch": n, "step": n * steps, "train_loss": 5.0 - n / 10, "val_loss": 5.1 - n / 10,
                "gap": 0.1, "wraps": n / 4, "lr": 1e-3} for n in range(1, epochs + 1)]
    state = {"run_id": "hostile", "date": "2026-12-01T00:00:00Z", "step": epochs * steps,
             "cursor": epochs * steps * RESUME_CONFIG.batch_size, "epochs": records,
             "best_val_loss": records[-1]["val_loss"], "best_epoch": epochs,
             "best_checkpoint": {"path": "ckpt/best.apr", "epoch": epochs, "tensor_count": 21, "sha256": "0" * 64},
             "predictions": [{"expr": "best_val_loss < 6", "field": "best_val_loss", "op": "<", "value": 6.0,
                              "recorded_at": "2026-12-01T00:00:00Z", "observed": None, "verdict": "PENDING"}]}
    metadata = {"kind": "resume", "config": TINY.to_dict(),
                "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64},
                "producer": {"shipkit_version": "0.1.0", "run_id": "hostile", "epoch": epochs, "step": state["step"]},
                "resume": {"state": state, "adam_step": state["step"], "hyperparameters": RESUME_CONFIG.to_dict(),
                           "data_dir": "/nonexistent/tokens", "world_size": 1}}
    tensors = {f"optimizer.{name}.{moment}": torch.zeros_like(tensor)
               for name, tensor in CausalLM(TINY).weights().items() for moment in ("exp_avg", "exp_avg_sq")}
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    return metadata, tensors


def resume_run(tmp_path: Path, weights: dict[str, torch.Tensor], metadata: Any,
               tensors: dict[str, torch.Tensor], epoch: int = 2) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "ckpt").mkdir(parents=True)
    write_apr(run_dir / f"ckpt/epoch-{epoch:03d}.apr", weights, weights_metadata())
    craft_apr(run_dir / f"ckpt/epoch-{epoch:03d}.resume.apr", tensors, metadata)
    return run_dir


def test_the_honest_resume_file_passes(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    point = read_resume_point(resume_run(tmp_path, weights, *honest_resume()), 2)
    assert (point.state.step, point.state.cursor, point.config.num_steps) == (16, 32, 24)


def _set(path: str, value: Any) -> Any:
    """An edit of the honest metadata: `value` at the dotted `path`."""
    def edit(metadata: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = metadata
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(leaf)] = value
        else:
            target[leaf] = value
    return edit


def _drop(path: str) -> Any:
    def edit(metadata: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = metadata
        for key in parents:
            target = target[key]
        del target[leaf]
    return edit


STATE = "resume.state"
RESUME_LIES: list[tuple[str, Any, str]] = [
    ("step-negative", _set(f"{STATE}.step", -5), "resume.state.step"),
    ("step-string", _set(f"{STATE}.step", "16"), "resume.state.step"),
    ("step-float", _set(f"{STATE}.step", 16.0), "resume.state.step"),
    ("step-bool", _set(f"{STATE}.step", True), "resume.state.step"),
    ("step-ahead-of-epochs", _set(f"{STATE}.step", 17), "resume.state.step"),
    ("cursor-float-1e30", _set(f"{STATE}.cursor", 1e30), "resume.state.cursor"),
    ("cursor-negative", _set(f"{STATE}.cursor", -1), "resume.state.cursor"),
    ("cursor-beyond-the-steps", _set(f"{STATE}.cursor", 10**15), "resume.state.cursor"),
    ("cursor-off-by-one", _set(f"{STATE}.cursor", 33), "resume.state.cursor"),
    ("cursor-string", _set(f"{STATE}.cursor", "32"), "resume.state.cursor"),
    ("epochs-empty", _set(f"{STATE}.epochs", []), "resume.state.epochs"),
    ("epochs-not-a-list", _set(f"{STATE}.epochs", {"1": {}}), "resume.state.epochs"),
    ("epoch-record-not-object", _set(f"{STATE}.epochs.0", 5), "resume.state.epochs[0]"),
    ("epoch-number-wrong", _set(f"{STATE}.epochs.1.epoch", 7), "resume.state.epochs[1].epoch"),
    ("epoch-step-jump", _set(f"{STATE}.epochs.0.step", 2), "resume.state.epochs[1].step"),
    ("epoch-step-beyond-epoch", _set(f"{STATE}.epochs.0.step", 9), "resume.state.epochs[0].step"),
    ("val-loss-nan", _set(f"{STATE}.epochs.1.val_loss", math.nan), "resume.state.epochs[1].val_loss"),
    ("val-loss-string", _set(f"{STATE}.epochs.1.val_loss", "4.9"), "resume.state.epochs[1].val_loss"),
    ("gap-null", _set(f"{STATE}.epochs.0.gap", None), "resume.state.epochs[0].gap"),
    ("wraps-inf", _set(f"{STATE}.epochs.0.wraps", math.inf), "resume.state.epochs[0].wraps"),
    ("best-epoch-zero", _set(f"{STATE}.best_epoch", 0), "resume.state.best_epoch"),
    ("best-epoch-beyond", _set(f"{STATE}.best_epoch", 99), "resume.state.best_epoch"),
    ("best-val-loss-other", _set(f"{STATE}.best_val_loss", 0.5), "resume.state.best_val_loss"),
    ("best-checkpoint-elsewhere", _set(f"{STATE}.best_checkpoint.path", "/etc/passwd"),
     "resume.state.best_checkpoint"),
    ("best-epoch-null-beside-loss", _set(f"{STATE}.best_epoch", None), "resume.state.best_epoch"),
    ("prediction-tampered", _set(f"{STATE}.predictions.0.op", ">"), "resume.state.predictions"),
    ("prediction-not-object", _set(f"{STATE}.predictions", [5]), "resume.state.predictions"),
    ("state-unknown-field", _set(f"{STATE}.extra", 1), "resume.state"),
    ("state-not-object", _set(STATE, [1]), "resume.state"),
    ("run-id-number", _set(f"{STATE}.run_id", 5), "resume.state.run_id"),
    ("adam-step-other", _set("resume.adam_step", 3), "resume.adam_step"),
    ("world-size-zero", _set("resume.world_size", 0), "resume.world_size"),
    ("world-size-string", _set("resume.world_size", "1"), "resume.world_size"),
    ("data-dir-number", _set("resume.data_dir", 5), "resume.data_dir"),
    ("resume-key-missing", _drop("resume.adam_step"), "metadata resume:"),
    ("resume-not-object", _set("resume", "x"), "metadata resume:"),
    ("kind-weights", _set("kind", "weights"), "epoch-002.resume.apr: tensor count"),
    ("tokenizer-sha-missing", _drop("tokenizer.sha256"), "tokenizer.sha256"),
    ("plan-ends-before-step", _set("resume.hyperparameters.num_steps", 12), "beyond the plan"),
    ("lr-nan", _set("resume.hyperparameters.lr", math.nan), "train config field lr"),
    ("batch-size-string", _set("resume.hyperparameters.batch_size", "2"), "train config field batch_size"),
    ("hyperparameter-unknown", _set("resume.hyperparameters.learning_rate", 1e-3),
     "unknown field(s) 'learning_rate'"),
    ("hyperparameters-list", _set("resume.hyperparameters", [1]), "train config: expected an object"),
    ("config-differs-from-weights", _set("config.rope_theta", 500000.0), "not the weights of"),
    ("config-heads-zero", _set("config.num_attention_heads", 0), "config field num_attention_heads"),
]


@pytest.mark.parametrize(("edit", "names"), [case[1:] for case in RESUME_LIES], ids=[case[0] for case in RESUME_LIES])
def test_resume_file_whose_metadata_lies_is_refused(tmp_path: Path, weights: dict[str, torch.Tensor],
                                                   edit: Any, names: str) -> None:
    metadata, tensors = honest_resume()
    edit(metadata)
    run_dir = resume_run(tmp_path, weights, metadata, tensors)
    before = sorted(path.name for path in run_dir.rglob("*"))
    assert_refused(run_cli("train", "--resume", run_dir, "--device", "cpu", "--quiet"), SUITE, names=names)
    assert sorted(path.name for path in run_dir.rglob("*")) == sorted([*before, RunDir.LOCK])


def _tensor_lie(case: str, tensors: dict[str, torch.Tensor]) -> None:
    moment = "optimizer.model.layers.0.self_attn.q_proj.weight.exp_avg"
    if case == "moment-missing":
        del tensors[moment]
    elif case == "moment-shape":
        tensors[moment] = torch.zeros(3, 3)
    elif case == "moment-dtype":
        tensors[moment] = tensors[moment].double()
    elif case == "rng-dtype":
        tensors["rng.torch_cpu"] = tensors["rng.torch_cpu"].to(torch.int32)
    elif case == "rng-size":
        tensors["rng.torch_cpu"] = tensors["rng.torch_cpu"][:100]
    elif case == "rng-missing":
        del tensors["rng.torch_cpu"]
    else:
        tensors["payload"] = torch.zeros(4)


@pytest.mark.parametrize(("case", "names"), [
    ("moment-missing", "missing"), ("moment-shape", "the config implies"), ("moment-dtype", "float64"),
    ("rng-dtype", "rng.torch_cpu"), ("rng-size", "rng.torch_cpu"), ("rng-missing", "tensor rng.torch_cpu: missing"),
    ("extra-tensor", "tensor payload: not part of a resume file"),
])
def test_resume_file_whose_tensors_lie_is_refused(tmp_path: Path, weights: dict[str, torch.Tensor],
                                                  case: str, names: str) -> None:
    metadata, tensors = honest_resume()
    _tensor_lie(case, tensors)
    run_dir = resume_run(tmp_path, weights, metadata, tensors)
    assert_refused(run_cli("train", "--resume", run_dir, "--device", "cpu", "--quiet"), SUITE, names=names)


@pytest.mark.parametrize(("file_epoch", "names"), [(1, "resume.state.epochs"), (999, "resume.state.epochs"),
                                                   (0, "resume.state.epochs")])
def test_resume_file_named_for_another_epoch_is_refused(tmp_path: Path, weights: dict[str, torch.Tensor],
                                                        file_epoch: int, names: str) -> None:
    run_dir = resume_run(tmp_path, weights, *honest_resume(), epoch=file_epoch)
    assert_refused(run_cli("train", "--resume", run_dir, "--device", "cpu", "--quiet"), SUITE, names=names)


# ---------------------------------------------------------------------------------------------
# `--set` overrides

SET_LIES: list[tuple[str, str]] = [
    *((f"lr={value}", "train config field lr") for value in ("nan", "inf", "-inf", "-1", "0", "1e300")),
    ("lr=abc", "--set lr: expected a float, got 'abc'"), ("lr=", "--set lr: expected a float, got ''"),
    *((f"min_lr_ratio={value}", "field min_lr_ratio") for value in ("2", "-0.1", "nan")),
    *((f"beta1={value}", "field beta1") for value in ("1", "-0.5", "inf")),
    *((f"beta2={value}", "field beta2") for value in ("nan", "1.5")),
    *((f"weight_decay={value}", "field weight_decay") for value in ("-1", "nan")),
    *((f"grad_clip={value}", "field grad_clip") for value in ("0", "-1", "inf")),
    *((f"memorization_threshold={value}", "field memorization_threshold") for value in ("-1", "nan")),
    *((f"batch_size={value}", "batch_size") for value in ("0", "-1", "1e3", "1000000000", "true")),
    ("seq_len=0", "field seq_len"), ("seq_len=100000", "seq_len"),
    ("num_steps=0", "field num_steps"), ("num_steps=10000000000000000000", "field num_steps"),
    ("steps_per_epoch=-3", "field steps_per_epoch"), ("warmup_steps=-1", "field warmup_steps"),
    ("seed=-1", "field seed"), ("seed=18446744073709551616", "field seed"), ("val_tokens=0", "field val_tokens"),
    ("hidden_size=0", "field hidden_size"), ("hidden_size=7", "field hidden_size"),
    ("hidden_size=1000000000", "field hidden_size"), ("num_attention_heads=0", "field num_attention_heads"),
    ("num_attention_heads=3", "field hidden_size"), ("num_key_value_heads=3", "field num_key_value_heads"),
    ("num_key_value_heads=0", "field num_key_value_heads"), ("head_dim=3", "field head_dim"),
    ("head_dim=0", "field head_dim"), ("intermediate_size=-5", "field intermediate_size"),
    ("num_hidden_layers=100000", "field num_hidden_layers"), ("max_position_embeddings=0", "field max_position_embeddings"),
    ("rms_norm_eps=nan", "field rms_norm_eps"), ("rms_norm_eps=0", "field rms_norm_eps"),
    ("rope_theta=-1", "field rope_theta"), ("rope_theta=inf", "field rope_theta"),
    ("tie_word_embeddings=maybe", "tie_word_embeddings"), ("architecture=gpt2", "field architecture"),
    ("rope_scaling={\"rope_type\": \"yarn\"}", "rope_scaling.rope_type"), ("rope_scaling={", "rope_scaling"),
    ("bos_token_id=-1", "field bos_token_id"), ("hiden_size=64", "hiden_size: unknown field"),
    ("lr", "--set: 'lr' is not key=value"),
]


@pytest.mark.parametrize(("item", "names"), SET_LIES, ids=[item for item, _ in SET_LIES])
def test_set_value_that_the_config_cannot_take_is_refused(tmp_path: Path, data_dir: Path, item: str,
                                                          names: str) -> None:
    out = tmp_path / "run"
    outcome = run_cli("train", "--data", data_dir, "--out", out, "--set", item, "--device", "cpu", "--quiet")
    assert_refused(outcome, SUITE, names=names, exit_codes=(2,))
    assert not out.exists()


@pytest.mark.parametrize("content", ["", "{\"model\": 5}", "[" * 100_000], ids=["empty", "model-number", "deep"])
def test_train_refuses_a_garbage_tokenizer_in_the_data_folder(tmp_path: Path, content: str) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "tokenizer.json").write_text(content)
    outcome = run_cli("train", "--data", data, "--out", out, "--device", "cpu", "--quiet")
    assert_refused(outcome, SUITE, names="tokenizer.json: the tokenizers library cannot load it", exit_codes=(2,))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The run-folder lock

HOLDER = """
import sys, time
from pathlib import Path
from shipkit.train import run_dir_lock
with run_dir_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        outcome = run_cli("train", "--data", data_dir, "--out", run_dir, "--device", "cpu", "--quiet")
        assert_refused(outcome, SUITE, names=f"is being written by another shipkit train (pid {holder.pid})",
                       exit_codes=(2,))
        assert sorted(path.name for path in run_dir.iterdir()) == [RunDir.LOCK]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_dir_lock(run_dir):  # the kernel dropped the killed holder's lock: nothing stale
        assert (run_dir / RunDir.LOCK).read_text().strip() == str(os.getpid())


def test_resume_is_refused_while_another_process_writes_the_run(tmp_path: Path,
                                                                weights: dict[str, torch.Tensor]) -> None:
    run_dir = resume_run(tmp_path, weights, *honest_resume())
    with run_dir_lock(run_dir):  # a second open file description conflicts as another process would
        outcome = run_cli("train", "--resume", run_dir, "--device", "cpu", "--quiet")
    assert_refused(outcome, SUITE, names=f"pid {os.getpid()}", exit_codes=(2,))
