"""Hostile files and paths (issue 16): a ship.toml that lies about its types or names a way out of
its output folder, output paths of the wrong kind, kill -9 and a full disk in the middle of a write.

Every refused input goes through `hostile.assert_refused` (suite "files"); every ship.toml case
also checks that nothing outside the output folder changed. A full disk is tested twice: on a
real 4 MiB tmpfs where the sandbox lets us mount one, and through an fsync that fails with a real
OSError(ENOSPC/EDQUOT) everywhere. docs/reliability-files.md lists the families and counts.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile import assert_refused, run_cli
from release_helpers import write_tiny_checkpoint, write_tokenizer

from shipkit.config import ModelConfig
from shipkit.fsutil import sha256_file
from shipkit.model import CausalLM
from shipkit.ship import ModelSpec, ShipConfig

SUITE = "files"
SMALL_DISK = "4m"  # holds a tiny export or GGUF (~0.45 MB) with room to fill the rest
ROOM_LEFT_BYTES = 64 << 10  # what the filler leaves free: less than any tiny output needs
KILL_WAIT_S = 120  # the writer's start (imports, reading the checkpoint) on a busy 2-core machine
POLL_S = 0.001
WRITER_NICENESS = 10  # the killed writer yields the CPU to the poller on a busy machine
# A model whose F32 weights (~200 MB) take long enough to write that a poller catches the temp file.
BIG_CONFIG = ModelConfig(vocab_size=320, hidden_size=1024, intermediate_size=4096, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
# Keeps any ship.toml case that wrongly passed loading from starting a real ship: ship() refuses a
# missing corpus before any stage runs.
GUARD_CORPUS = 'corpus = ["not-here.jsonl"]'


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """RUN_DIR with tokenizer.json, ckpt/best.apr (seed 0) and ckpt/other.apr (seed 1)."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    write_tokenizer(run_dir / "tokenizer.json")
    write_tiny_checkpoint(run_dir / "ckpt" / "best.apr", run_dir / "tokenizer.json")
    write_tiny_checkpoint(run_dir / "ckpt" / "other.apr", run_dir / "tokenizer.json", seed=1)
    return run_dir


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory, small_run) -> Path:
    from shipkit.apr import write_apr

    run_dir = tmp_path_factory.mktemp("big") / "run"
    run_dir.mkdir()
    shutil.copy(small_run / "tokenizer.json", run_dir / "tokenizer.json")
    metadata = {"kind": "weights", "config": BIG_CONFIG.to_dict(),
                "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(run_dir / "tokenizer.json")},
                "producer": {"shipkit_version": "test", "run_id": "20261125-093000-abcdef", "epoch": 1, "step": 4}}
    write_apr(run_dir / "ckpt" / "best.apr", CausalLM(BIG_CONFIG).weights(), metadata)
    return run_dir / "ckpt" / "best.apr"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): its kind and content."""
    entries: dict[str, tuple] = {}
    for folder, subfolders, files in os.walk(root):
        for name in subfolders + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_dir():
                entries[key] = ("dir",)
            else:
                entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return entries


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def leftovers(folder: Path, target_name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{target_name}."))


# ---------------------------------------------------------------- ship.toml: the workspace


@pytest.fixture
def workspace(tmp_path) -> Path:
    """tmp/ship.toml (written by the case), tmp/out (the output folder), tmp/victim (must not change)."""
    (tmp_path / "victim" / "corpus").mkdir(parents=True)
    (tmp_path / "victim" / "corpus" / "precious.txt").write_text("do not touch\n")
    (tmp_path / "victim" / "run" / "release").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text('{"text": "def f():\\n    return 1\\n"}\n')
    return tmp_path


def ship_refused(workspace: Path, toml: str | bytes, *, names: str, exit_codes: tuple[int, ...] = (2,),
                 args: tuple[str, ...] = ()) -> str:
    """Write ship.toml, run `shipkit ship --config ship.toml`, require a clean refusal and that
    no file anywhere in the workspace (the victim, the output folder) changed."""
    config = workspace / "ship.toml"
    if isinstance(toml, bytes):
        config.write_bytes(toml)
    else:
        config.write_text(toml)
    before = snapshot(workspace)
    line = assert_refused(run_cli("ship", "--config", config, *args), SUITE, names=names, exit_codes=exit_codes)
    assert snapshot(workspace) == before
    return line


def model_toml(lines: str, *, name: str = 'name = "m"', guard: bool = True) -> str:
    body = "\n".join(line for line in (name, lines, GUARD_CORPUS if guard else "") if line)
    return f'[ship]\nout = "out"\n\n[[model]]\n{body}\n'


# ---------------------------------------------------------------- ship.toml: a wrong type per field

MODEL_TYPE_LIES = [
    ("name", "3"),
    ("source", "true"),
    ("corpus", '"small.jsonl"'),
    ("corpus", '["data.jsonl", 3]'),
    ("text_column", "1"),
    ("glob", '["*.py"]'),
    ("val_fraction", '"0.1"'),
    ("val_fraction", "nan"),
    ("val_fraction", "inf"),
    ("val_fraction", "-inf"),
    ("vocab_size", "512.0"),
    ("vocab_size", "true"),
    ("preset", '{ name = "tiny" }'),
    ("overrides", '"lr=1"'),
    ("overrides", '[["lr", 1]]'),
    ("predict", '"best_val_loss < 5"'),
    ("predict", "[true]"),
    ("device", "0"),
    ("compile", '"false"'),
    ("hf_dir", '["hf"]'),
    ("base_model", "1"),
    ("license", "false"),
    ("pre", "2"),
    ("quant_types", '"xxQ4_K_Mxx"'),
    ("quant_types", '["Q4_K_M", 4]'),
    ("quant_types", '["Q4_K_M", ["Q8_0"]]'),
    ("imatrix", '"yes"'),
    ("imatrix", "1"),
    ("imatrix", '["n_tokens", 1024]'),
    ("parity_tokens", '"8192"'),
    ("parity_tokens", "true"),
    ("parity_ctx", "25.6"),
    ("parity_engines", '"torch"'),
    ("contract", "1979-05-27T07:32:00Z"),
    ("repo", '["a/b"]'),
    ("gguf_repo", "3"),
    ("datasets", '"org/data"'),
    ("card_templates", '["templates"]'),
]

SHIP_TYPE_LIES = [
    ("push", '"false"', "expected true or false, got the string 'false'"),
    ("push", '"true"', "expected true or false, got the string 'true'"),
    ("push", "1", "expected true or false, got the number 1"),
    ("allow_failed_gates", '"yes"', "expected true or false, got the string 'yes'"),
    ("out", "3", "expected a string (a path), got the number 3"),
    ("out", '["out"]', "expected a string (a path), got a list"),
]


def test_every_config_field_has_a_type_lie():
    assert {name for name, _ in MODEL_TYPE_LIES} == {f.name for f in dataclasses.fields(ModelSpec)}
    assert {name for name, _, _ in SHIP_TYPE_LIES} == {f.name for f in dataclasses.fields(ShipConfig)} - {"models"}


@pytest.mark.parametrize(("field", "value"), MODEL_TYPE_LIES, ids=[f"{f}={v}" for f, v in MODEL_TYPE_LIES])
def test_model_field_of_the_wrong_type_is_named_with_file_and_model(workspace, field, value):
    if field == "name":
        toml = model_toml("", name=f"name = {value}")
    else:
        toml = model_toml(f"{field} = {value}", guard=field != "corpus")
    line = ship_refused(workspace, toml, names=f"field {field}: expected ")
    assert "ship.toml: model " in line and ("model m:" in line or field == "name")


@pytest.mark.parametrize(("field", "value", "says"), SHIP_TYPE_LIES, ids=[f"{f}={v}" for f, v, _ in SHIP_TYPE_LIES])
def test_ship_field_of_the_wrong_type_is_named_with_the_file(workspace, field, value, says):
    toml = f'[ship]\n{field} = {value}\n\n[[model]]\nname = "m"\n{GUARD_CORPUS}\n'
    line = ship_refused(workspace, toml, names=f"ship.toml: [ship]: field {field}: ")
    assert line.endswith(says)


# ---------------------------------------------------------------- ship.toml: values the rules refuse

NAME_LIES = ['"a/b"', '"/abs/victim"', '""', '"a\\u0000b"', '"."', '".."', '".hidden"',
             '"a..b"', '"ship-state.json"', '"' + "a" * 97 + '"', '"modèle"', '"a b"', '"a\\\\b"']

RULE_LIES = [
    ("quant_types", '["Q4_K_S"]'),
    ("quant_types", '["q4_k_m"]'),
    ("quant_types", '["Q4_K_M", "Q5_X"]'),
    ("quant_types", '["Q4_K_M", "Q4_K_M"]'),
    ("quant_types", "[]"),
    ("quant_types", '["Q4_K_M", { type = "Q4_K_M" }]'),
    ("quant_types", '["Q4_K_M", { type = "Q4_K_M", output = "Q8_0" }, { type = "Q4_K_M", output = "Q8_0" }]'),
    ("quant_types", '["Q4_K_M", { type = "Q4_K_M", output = "Q9_K" }]'),
    ("quant_types", '["Q4_K_M", { type = "Q4_K_M", token_embedding = "q8_0" }]'),
    ("quant_types", '["Q4_K_M", { type = "Q4_K_M", output_tensor_type = "Q8_0" }]'),
    ("quant_types", '["Q4_K_M", { output = "Q8_0" }]'),
    ("quant_types", '["Q4_K_M", { type = 4 }]'),
    ("quant_types", '["Q4_K_M", { type = "Q4_K_L" }]'),
    ("imatrix", "{ ctx = 8 }"),
    ("imatrix", "{ n_tokens = 100 }"),
    ("imatrix", "{ n_tokens = 100_000_000 }"),
    ("imatrix", "{ n_tokens = -1 }"),
    ("imatrix", "{ ctx = 4096 }"),
    ("imatrix", '{ ctx = "512" }'),
    ("imatrix", "{ ctx = 512.0 }"),
    ("imatrix", "{ chunks = 4 }"),
    ("val_fraction", "0"),
    ("val_fraction", "1"),
    ("val_fraction", "-0.5"),
    ("val_fraction", "1.5"),
    ("parity_tokens", "0"),
    ("parity_tokens", "-1"),
    ("parity_ctx", "0"),
    ("parity_ctx", "3"),
    ("parity_engines", '["torch", "vllm"]'),
    ("parity_engines", "[]"),
    ("parity_engines", '["torch", "torch"]'),
    ("device", '"gpu"'),
    ("device", '"CUDA"'),
    ("source", '"download"'),
    ("vocab_size", "10"),
    ("preset", '"huge"'),
    ("overrides", "{ unknown_field = 1 }"),
    ("overrides", "{ lr = -1.0 }"),
    ("overrides", '{ hidden_size = "abc" }'),
    ("overrides", "{ lr = nan }"),
    ("predict", '["nonsense"]'),
    ("predict", '["best_val_loss < nan"]'),
]


@pytest.mark.parametrize("value", NAME_LIES)
def test_model_name_that_is_not_a_plain_folder_name_is_refused(workspace, value):
    ship_refused(workspace, model_toml("", name=f"name = {value}"), names="field name: ")


def test_name_dot_dot_victim_touches_nothing_outside_out(workspace):
    """The issue's case: this name once deleted victim/corpus/precious.txt and wrote shards there."""
    ship_refused(workspace, model_toml("", name='name = "../victim"', guard=False), names="field name")
    assert (workspace / "victim" / "corpus" / "precious.txt").read_text() == "do not touch\n"
    assert not (workspace / "out").exists()


@pytest.mark.parametrize(("field", "value"), RULE_LIES, ids=[f"{f}={v}" for f, v in RULE_LIES])
def test_model_field_value_the_rules_refuse_is_named(workspace, field, value):
    ship_refused(workspace, model_toml(f"{field} = {value}"), names=f"model m: field {field}: ")


def test_import_without_hf_dir_is_refused(workspace):
    ship_refused(workspace, model_toml('source = "import"'), names="field hf_dir: required")


# ---------------------------------------------------------------- ship.toml: a broken file

STRUCTURE_LIES = [
    ("ship-not-a-table", 'ship = 3\n[[model]]\nname = "m"\n', "ship must be a table"),
    ("model-a-string", 'model = "m"\n', "model must be an array of tables"),
    ("model-one-table", '[model]\nname = "m"\n', "model must be an array of tables"),
    ("no-model", '[ship]\nout = "out"\n', "no [[model]] table"),
    ("unknown-table", '[foo]\n[[model]]\n', "unknown table(s) foo"),
    ("duplicate-names", '[[model]]\nname = "m"\n[[model]]\nname = "m"\n', "model names must be unique"),
    ("empty-out", '[ship]\nout = ""\n[[model]]\n', "field out: must not be empty"),
    ("unknown-model-field", '[[model]]\nname = "m"\nlearning_rate = 1\n', "unknown field(s) learning_rate"),
    ("models-in-ship", '[ship]\nmodels = []\n[[model]]\n', "unknown field(s) models"),
    ("invalid-toml", 'name = = "x"\n', "not valid TOML"),
]


@pytest.mark.parametrize(("case", "toml", "names"), STRUCTURE_LIES, ids=[c for c, _, _ in STRUCTURE_LIES])
def test_broken_ship_toml_is_refused_on_one_line(workspace, case, toml, names):
    ship_refused(workspace, toml, names=names)


def test_ship_toml_that_is_not_utf8_is_refused(workspace):
    ship_refused(workspace, b'\xff\xfe[[model]]\nname = "m"\n', names="not UTF-8")


def test_ship_config_that_is_a_folder_or_missing_is_refused(workspace):
    before = snapshot(workspace)
    assert_refused(run_cli("ship", "--config", workspace / "victim"), SUITE, names="is a folder")
    assert_refused(run_cli("ship", "--config", workspace / "nope.toml"), SUITE, names="not found")
    assert snapshot(workspace) == before


# ---------------------------------------------------------------- ship: ways out of the output folder


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


LINK_ESCAPES = [
    ("out/m", "victim"),
    ("out/m/corpus", "victim/corpus"),
    ("out/m/run/release", "victim/run/release"),
]


@pytest.mark.parametrize(("link", "target"), LINK_ESCAPES, ids=[link for link, _ in LINK_ESCAPES])
def test_symlink_from_the_model_folder_to_outside_out_is_refused(workspace, link, target):
    _link(workspace / link, workspace / target)
    ship_refused(workspace, model_toml('corpus = ["data.jsonl"]', guard=False), names="outside")


def test_symlink_loop_in_the_model_folder_is_refused(workspace):
    (workspace / "out" / "m").mkdir(parents=True)
    (workspace / "out" / "m" / "tokens").symlink_to(workspace / "out" / "m" / "tokens")
    ship_refused(workspace, model_toml('corpus = ["data.jsonl"]', guard=False), names="symbolic-link loop")


INPUTS_INSIDE = [
    ("corpus", 'corpus = ["out/m/data.jsonl"]'),
    ("hf_dir", 'source = "import"\nhf_dir = "out/m/hf"\ncorpus = ["data.jsonl"]'),
    ("contract", 'contract = "out/m/contract.toml"\ncorpus = ["data.jsonl"]'),
]


@pytest.mark.parametrize(("field", "lines"), INPUTS_INSIDE, ids=[f for f, _ in INPUTS_INSIDE])
def test_input_inside_the_model_folder_is_refused(workspace, field, lines):
    (workspace / "out" / "m" / "hf").mkdir(parents=True)
    (workspace / "out" / "m" / "data.jsonl").write_text('{"text": "x = 1\\n"}\n')
    (workspace / "out" / "m" / "contract.toml").write_text("")
    ship_refused(workspace, model_toml(lines, guard=False), names=f"field {field}: ")


MISSING_INPUTS = [
    ("corpus", 'corpus = ["missing.jsonl"]'),
    ("hf_dir", 'source = "import"\nhf_dir = "missing-hf"\ncorpus = ["data.jsonl"]'),
    ("contract", 'contract = "missing.toml"\ncorpus = ["data.jsonl"]'),
]


@pytest.mark.parametrize(("field", "lines"), MISSING_INPUTS, ids=[f for f, _ in MISSING_INPUTS])
def test_missing_input_is_refused_before_any_stage(workspace, field, lines):
    ship_refused(workspace, model_toml(lines, guard=False), names=f"field {field}: ")


OUT_OF_KIND = [
    ("out-is-a-file", 'out = "victim/corpus/precious.txt"', "is a file"),
    ("out-under-a-file", 'out = "victim/corpus/precious.txt/out"', "is not a folder"),
    ("model-folder-is-a-file", 'out = "victim/corpus"\n', "is a file"),
]


@pytest.mark.parametrize(("case", "out_line", "names"), OUT_OF_KIND, ids=[c for c, _, _ in OUT_OF_KIND])
def test_out_of_the_wrong_kind_is_refused(workspace, case, out_line, names):
    name = 'name = "precious.txt"' if case == "model-folder-is-a-file" else 'name = "m"'
    toml = f"[ship]\n{out_line}\n\n[[model]]\n{name}\ncorpus = [\"data.jsonl\"]\n"
    ship_refused(workspace, toml, names=names)


LEDGER_LIES = [
    ("a-list", []),
    ("entry-not-a-table", {"m/corpus": 1}),
    ("fingerprint-not-a-string", {"m/corpus": {"fingerprint": 1, "outputs": {}}}),
]


@pytest.mark.parametrize(("case", "ledger"), LEDGER_LIES, ids=[c for c, _ in LEDGER_LIES])
def test_ship_state_of_the_wrong_shape_is_refused(workspace, case, ledger):
    (workspace / "out").mkdir()
    (workspace / "out" / "ship-state.json").write_text(json.dumps(ledger))
    ship_refused(workspace, model_toml('corpus = ["data.jsonl"]', guard=False), names="not a ship ledger",
                 exit_codes=(1,))


def test_ledger_naming_a_file_outside_out_is_not_trusted(workspace):
    from shipkit.ship import StageLedger

    victim = workspace / "victim" / "corpus" / "precious.txt"
    (workspace / "out").mkdir()
    (workspace / "out" / "ship-state.json").write_text(json.dumps(
        {"m/corpus": {"fingerprint": "f", "outputs": {str(victim): sha256_file(victim)}}}))
    assert not StageLedger(workspace / "out").is_done("m/corpus", "f")


# ---------------------------------------------------------------- --out of the wrong kind, per writing command


@dataclasses.dataclass
class Paths:
    file: Path
    folder: Path
    ckpt: Path
    src: Path


@pytest.fixture
def paths(tmp_path, small_run) -> Paths:
    """afile (a file), adir (a folder holding folders named like convert's and quantize's outputs)."""
    from shipkit.apr import read_apr
    from shipkit.quantize.gguf_export import default_file_name

    (tmp_path / "afile").write_text("precious\n")
    (tmp_path / "adir" / "x.safetensors").mkdir(parents=True)
    config = ModelConfig.from_dict(read_apr(small_run / "ckpt" / "best.apr").metadata["config"])
    (tmp_path / "adir" / default_file_name("m", config, "F32")).mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    return Paths(file=tmp_path / "afile", folder=tmp_path / "adir", ckpt=small_run / "ckpt" / "best.apr",
                 src=tmp_path / "src")


OUT_MISMATCHES: list[tuple[str, Callable[[Paths], list], str]] = [
    ("corpus-build-out-file", lambda p: ["corpus", "build", p.src, "--out", p.file], "is a file"),
    ("corpus-build-out-under-file", lambda p: ["corpus", "build", p.src, "--out", p.file / "c"], "is not a folder"),
    ("tokenize-train-out-file", lambda p: ["tokenize", "train", p.folder, "--out", p.file], "is a file"),
    ("tokenize-encode-out-file", lambda p: ["tokenize", "encode", p.folder, "--out", p.file], "is a file"),
    ("train-out-file", lambda p: ["train", "--data", p.folder, "--out", p.file], "is a file"),
    ("train-resume-file", lambda p: ["train", "--resume", p.file], "is a file"),
    ("audit-out-folder", lambda p: ["audit", p.folder, "--out", p.folder], "is a folder"),
    ("audit-out-under-file", lambda p: ["audit", p.folder, "--out", p.file / "a.json"], "is not a folder"),
    ("import-out-folder", lambda p: ["import", p.folder, "--out", p.folder], "is a folder"),
    ("import-out-under-file", lambda p: ["import", p.folder, "--out", p.file / "m.apr"], "is not a folder"),
    ("export-hf-file", lambda p: ["export", p.ckpt, "--hf", p.file], "is a file"),
    ("export-hf-under-file", lambda p: ["export", p.ckpt, "--hf", p.file / "hf"], "is not a folder"),
    ("quantize-out-file", lambda p: ["quantize", p.ckpt, "--q4k", "--out", p.file], "is a file"),
    ("quantize-out-under-file", lambda p: ["quantize", p.ckpt, "--q4k", "--out", p.file / "m.gguf"],
     "is not a folder"),
    ("quantize-out-gguf-folder", lambda p: ["quantize", p.ckpt, "--type", "F32", "--out", p.folder,
                                            "--name", "m"], "is a folder"),
    ("convert-destination-folder", lambda p: ["convert", p.ckpt, p.folder / "x.safetensors"], "is a folder"),
    ("convert-destination-under-file", lambda p: ["convert", p.ckpt, p.file / "x.safetensors"], "is not a folder"),
    ("card-run-dir-file", lambda p: ["card", p.file], "is a file"),
    ("parity-run-dir-file", lambda p: ["parity", p.ckpt, p.file, "--tokens", p.folder, "--run-dir", p.file],
     "is a file"),
    ("ship-out-file", lambda p: ["ship", "--out", p.file], "is a file"),
]


@pytest.mark.parametrize(("case", "args", "names"), OUT_MISMATCHES, ids=[c for c, _, _ in OUT_MISMATCHES])
def test_output_path_of_the_wrong_kind_is_one_line(paths, case, args, names):
    before = snapshot(paths.file.parent)
    assert_refused(run_cli(*args(paths)), SUITE, names=names, exit_codes=(2,))
    assert snapshot(paths.file.parent) == before
    assert paths.file.read_text() == "precious\n"


# ---------------------------------------------------------------- stale temp files of killed writers


def test_convert_removes_only_a_dead_writers_temp_files_beside_its_target(tmp_path, small_run):
    dead, alive = dead_pid(), os.getppid()
    planted = {f".m.apr.{dead}.abcd1234.tmp": False, f".m.apr.{alive}.abcd1234.tmp": True,
               ".m.apr.notes.tmp": True, f"m.apr.{dead}.tmp": True, f".other.apr.{dead}.abcd1234.tmp": True}
    for name in planted:
        (tmp_path / name).write_text("partial")
    assert run_cli("convert", small_run / "ckpt" / "best.apr", tmp_path / "m.safetensors").exit_code == 0
    assert run_cli("convert", tmp_path / "m.safetensors", tmp_path / "m.apr").exit_code == 0
    assert {name: (tmp_path / name).exists() for name in planted} == planted


def test_quantize_removes_a_dead_writers_temp_file(tmp_path, small_run):
    stale = tmp_path / f".m.gguf.{dead_pid()}.tmp"
    stale.write_bytes(b"GGUF partial")
    outcome = run_cli("quantize", small_run / "ckpt" / "best.apr", "--type", "F32", "--out", tmp_path / "m.gguf")
    assert outcome.exit_code == 0, outcome.stderr
    assert leftovers(tmp_path, "m.gguf") == []


def test_export_removes_a_dead_writers_staging_and_retired_folders(tmp_path, small_run):
    pid = dead_pid()
    for suffix in ("tmp", "old"):
        (tmp_path / f".hf.{pid}.abcd1234.{suffix}").mkdir()
        (tmp_path / f".hf.{pid}.abcd1234.{suffix}" / "model.safetensors").write_bytes(b"partial")
    assert run_cli("export", small_run / "ckpt" / "best.apr", "--hf", tmp_path / "hf").exit_code == 0
    assert leftovers(tmp_path, "hf") == []


def test_crash_between_the_swap_renames_gets_the_old_folder_back_even_if_the_next_export_fails(
        monkeypatch, tmp_path, small_run):
    hf = tmp_path / "hf"
    assert run_cli("export", small_run / "ckpt" / "best.apr", "--hf", hf).exit_code == 0
    before = snapshot(hf)
    pid = dead_pid()
    hf.rename(tmp_path / f".hf.{pid}.abcd1234.old")  # the state a crash between the renames leaves
    shutil.copytree(tmp_path / f".hf.{pid}.abcd1234.old", tmp_path / f".hf.{pid}.abcd1234.tmp")
    fail_fsync_of_files(monkeypatch, errno.ENOSPC)
    assert_refused(run_cli("export", small_run / "ckpt" / "other.apr", "--hf", hf), SUITE,
                   names="no space left on", exit_codes=(1,))
    assert snapshot(hf) == before
    assert leftovers(tmp_path, "hf") == []


def test_export_keeps_the_files_it_does_not_write_and_drops_stale_shards(tmp_path, small_run):
    hf = tmp_path / "hf"
    (hf / ".git").mkdir(parents=True)
    (hf / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (hf / "README.md").write_text("# my model\n")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    assert run_cli("export", small_run / "ckpt" / "best.apr", "--hf", hf).exit_code == 0
    assert (hf / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (hf / "README.md").read_text() == "# my model\n"
    assert not (hf / "model-00001-of-00002.safetensors").exists()
    assert (hf / "model.safetensors").is_file()


# ---------------------------------------------------------------- kill -9 mid-write


def _kill_mid_write(args: list, temp_glob: str, where: Path) -> None:
    """Start `shipkit ARGS` (niced, so the poller outruns it) and SIGKILL it the moment a temp
    file matching `temp_glob` under `where` exists (and is still there after the kill)."""
    process = subprocess.Popen([sys.executable, "-m", "shipkit", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    os.setpriority(os.PRIO_PROCESS, process.pid, WRITER_NICENESS)
    deadline = time.monotonic() + KILL_WAIT_S
    try:
        while time.monotonic() < deadline:
            hits = list(where.glob(temp_glob))
            if hits:
                process.kill()
                process.wait()
                assert hits[0].exists(), "the writer finished between the sighting and the kill"
                return
            if process.poll() is not None:
                pytest.fail(f"the writer ended (exit {process.returncode}) before it was caught mid-write: "
                            f"{process.stderr.read().decode()[-500:]}")
            time.sleep(POLL_S)
        pytest.fail(f"no {temp_glob} under {where} within {KILL_WAIT_S} s")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_kill_during_export_leaves_the_previous_folder_loadable(tmp_path, small_run, big_ckpt):
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    assert run_cli("export", small_run / "ckpt" / "best.apr", "--hf", hf).exit_code == 0
    before = snapshot(hf)
    _kill_mid_write(["export", big_ckpt, "--hf", hf], ".hf.*.tmp/.model.safetensors.*.tmp", tmp_path)
    assert snapshot(hf) == before
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.hidden_size == 64
    assert leftovers(tmp_path, "hf"), "the killed export left its staging folder"
    assert run_cli("export", small_run / "ckpt" / "other.apr", "--hf", hf).exit_code == 0
    assert leftovers(tmp_path, "hf") == []


def test_kill_during_quantize_leaves_the_previous_gguf_readable(tmp_path, small_run, big_ckpt):
    from gguf import GGUFReader

    target = tmp_path / "m.gguf"
    assert run_cli("quantize", small_run / "ckpt" / "best.apr", "--type", "F32", "--out", target).exit_code == 0
    digest = sha256_file(target)
    _kill_mid_write(["quantize", big_ckpt, "--type", "F32", "--out", target], ".m.gguf.*.tmp", tmp_path)
    assert sha256_file(target) == digest
    reader = GGUFReader(target)
    assert {int(t.shape[0]) for t in reader.tensors if t.name == "token_embd.weight"} == {64}
    assert leftovers(tmp_path, "m.gguf"), "the killed quantize left its temp file"
    outcome = run_cli("quantize", small_run / "ckpt" / "other.apr", "--type", "F32", "--out", target)
    assert outcome.exit_code == 0, outcome.stderr
    assert leftovers(tmp_path, "m.gguf") == []


# ---------------------------------------------------------------- a full disk: a real small tmpfs


@pytest.fixture(scope="module")
def small_disk_mount(tmp_path_factory) -> Path:
    mount_point = tmp_path_factory.mktemp("small-disk")
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mount_point)],
                                check=False, capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here; the injected-ENOSPC tests below cover a full disk")
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the injected-ENOSPC tests below "
                    "cover a full disk")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def small_disk(small_disk_mount) -> Path:
    for entry in small_disk_mount.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return small_disk_mount


def fill(disk: Path, room_left: int = ROOM_LEFT_BYTES) -> None:
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(disk / "filler", "wb") as handle:
        handle.write(bytes(max(free - room_left, 0)))


def _old_output(kind: str, small_run: Path, disk: Path, tmp_path: Path) -> tuple[list, Path]:
    """Write the old output of `kind` onto the disk; returns the args of the second write and the
    output's path."""
    best, other = small_run / "ckpt" / "best.apr", small_run / "ckpt" / "other.apr"
    if kind == "export":
        assert run_cli("export", best, "--hf", disk / "hf").exit_code == 0
        return ["export", other, "--hf", disk / "hf"], disk / "hf"
    if kind == "quantize":
        assert run_cli("quantize", best, "--type", "F32", "--out", disk / "m.gguf").exit_code == 0
        return ["quantize", other, "--type", "F32", "--out", disk / "m.gguf"], disk / "m.gguf"
    if kind == "convert-safetensors":
        assert run_cli("convert", best, disk / "m.safetensors").exit_code == 0
        return ["convert", other, disk / "m.safetensors"], disk / "m.safetensors"
    for name in ("best", "other"):
        assert run_cli("convert", small_run / "ckpt" / f"{name}.apr", tmp_path / f"{name}.safetensors").exit_code == 0
    assert run_cli("convert", tmp_path / "best.safetensors", disk / "m.apr").exit_code == 0
    return ["convert", tmp_path / "other.safetensors", disk / "m.apr"], disk / "m.apr"


WRITERS = ["export", "quantize", "convert-safetensors", "convert-apr"]


@pytest.mark.parametrize("kind", WRITERS)
def test_full_tmpfs_is_one_line_and_keeps_the_old_output(small_disk, small_run, tmp_path, kind):
    args, output = _old_output(kind, small_run, small_disk, tmp_path)
    before = snapshot(small_disk)
    fill(small_disk)
    line = assert_refused(run_cli(*args), SUITE, names=f"no space left on {small_disk}", exit_codes=(1,))
    assert "needed " in line
    (small_disk / "filler").unlink()
    assert snapshot(small_disk) == before
    assert leftovers(small_disk, output.name) == []


def test_read_only_disk_is_one_line_not_an_internal_error(small_disk, small_run):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        outcome = run_cli("export", small_run / "ckpt" / "best.apr", "--hf", small_disk / "hf")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert_refused(outcome, SUITE, names="Read-only file system", exit_codes=(1,))


# ---------------------------------------------------------------- a full disk: an injected ENOSPC / EDQUOT


def fail_fsync_of_files(monkeypatch, code: int) -> None:
    """os.fsync of a regular file fails as a full disk does (delayed allocation reports it there)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("kind", WRITERS)
def test_injected_enospc_is_one_line_and_keeps_the_old_output(monkeypatch, small_run, tmp_path, kind):
    disk = tmp_path / "disk"
    disk.mkdir()
    args, output = _old_output(kind, small_run, disk, tmp_path)
    before = snapshot(disk)
    fail_fsync_of_files(monkeypatch, errno.ENOSPC)
    line = assert_refused(run_cli(*args), SUITE, names=f"no space left on {disk}", exit_codes=(1,))
    assert "needed " in line and "No space left on device" in line
    assert snapshot(disk) == before
    assert leftovers(disk, output.name) == []


def test_injected_quota_exceeded_is_one_line(monkeypatch, small_run, tmp_path):
    disk = tmp_path / "disk"
    args, _ = _old_output("export", small_run, disk, tmp_path)
    fail_fsync_of_files(monkeypatch, errno.EDQUOT)
    assert_refused(run_cli(*args), SUITE, names="Disk quota exceeded", exit_codes=(1,))


def test_injected_enospc_while_writing_a_corpus_names_the_shard(monkeypatch, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    fail_fsync_of_files(monkeypatch, errno.ENOSPC)
    line = assert_refused(run_cli("corpus", "build", tmp_path / "src", "--out", tmp_path / "corpus"), SUITE,
                          names=f"no space left on {tmp_path / 'corpus'}", exit_codes=(1,))
    assert "writing " in line


def test_os_error_no_stage_handles_is_one_line_with_the_file(tmp_path, small_run):
    too_long = tmp_path / ("x" * 300)
    assert_refused(run_cli("export", small_run / "ckpt" / "best.apr", "--hf", too_long), SUITE,
                   names="File name too long", exit_codes=(1,))
