"""`shipkit ship` of a GGUF ladder with an importance matrix: the config, one parity run over every
file, the card's ladder table and recommendation, the released imatrix, and push refusing a
release one of whose files failed."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hubserver import HubServer
from huggingface_hub import constants as hf_constants
from release_helpers import TOY_CONTRACT

from shipkit.errors import GateFailed, InputError
from shipkit.imatrix import load_imatrix
from shipkit.imatrix.format import split_sha256
from shipkit.ladder import LadderEntry, recommend
from shipkit.quantize.gguf_load import open_gguf
from shipkit.ship import load_ship_config, ship

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOKEN = "hf_test_7c2d4e6f8a0b1c3d5e7f9a1b3c5d7e9f"
REPO = "shipkit-org/ladder"

# The toy contract with a Q3_K_M band no quant can meet: that file's parity line fails.
STRICT_Q3_CONTRACT = TOY_CONTRACT + """
[parity.file_types.Q3_K_M]
reference = "a test band no quantized file can meet"
thresholds.kl_mean = { max = 1e-12, reason = "to fail the Q3_K_M file" }
"""

SHIP_TOML = """
[ship]
out = "out"

[[model]]
name = "ladder"
corpus = ["{corpus}"]
val_fraction = 0.2
vocab_size = 512
overrides = {{ hidden_size = 256, intermediate_size = 256, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, seq_len = 32, batch_size = 4, num_steps = 6, steps_per_epoch = 2, warmup_steps = 1, val_tokens = 512 }}
quant_types = ["Q3_K_M", "Q4_K_M", {{ type = "Q8_0", output = "F16" }}]
imatrix = {{ n_tokens = 4096, ctx = 64 }}
parity_tokens = 1024
parity_ctx = 64
contract = "toy.toml"
repo = "{repo}"
"""


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder")
    (root / "toy.toml").write_text(TOY_CONTRACT)
    (root / "strict.toml").write_text(STRICT_Q3_CONTRACT)
    config_path = root / "ship.toml"
    config_path.write_text(SHIP_TOML.format(corpus=STDLIB / "json", repo=REPO))
    report = ship(load_ship_config(config_path), log=lambda line: None)
    return root, config_path, report


def _run(root: Path) -> Path:
    return root / "out" / "ladder" / "run"


def _evidence(root: Path, name: str) -> dict:
    return json.loads((_run(root) / "evidence" / f"{name}.json").read_text())


def _gguf_card(root: Path) -> str:
    return (_run(root) / "release" / "card" / "gguf" / "README.md").read_text()


def _ladder_table(card: str) -> dict[str, list[str]]:
    """File name -> the other cells of its row in the card's ladder table."""
    section = card.split("## Which file to pick", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip().strip("`"): [cell.strip() for cell in cells[1:]] for cells in rows}


def _number(cell: str) -> float:
    return float(cell.split()[0].replace(",", ""))


def _close_to_printed(cell: str, value: float) -> bool:
    """`value` rounds to what the card printed (4 decimals, or 4 significant digits)."""
    printed = _number(cell)
    return abs(printed - value) <= max(5e-5, abs(value) * 5e-4)


# ------------------------------------------------------------------ the release a ladder makes

def test_every_file_of_the_ladder_and_the_imatrix_are_released_and_measured_in_one_run(shipped):
    root, _, report = shipped
    run = _run(root)
    released = sorted(path.name for path in (run / "release" / "gguf").iterdir())
    assert released == ["imatrix.gguf", "ladder-656K-Q3_K_M.gguf", "ladder-656K-Q4_K_M.gguf",
                        "ladder-656K-Q8_0-output_F16.gguf"]
    parity = _evidence(root, "parity")
    assert [line["name"] for line in parity["files"]] == [
        "ladder-656K-Q4_K_M.gguf", "ladder-656K-Q3_K_M.gguf", "ladder-656K-Q8_0-output_F16.gguf"]
    assert parity["files"][0]["primary"] and Path(parity["quant"]["path"]).name == "ladder-656K-Q4_K_M.gguf"
    assert parity["verdict"] == "PASS" and {line["verdict"] for line in parity["files"]} == {"PASS"}
    assert [line["file_type"] for line in parity["files"]] == ["Q4_K_M", "Q3_K_M", "Q8_0"]
    summary = report.models[0].summary
    assert [line["name"] for line in summary["parity"]["files"]] == [line["name"] for line in parity["files"]]
    gguf_repo = {f["path"] for f in summary["files"] if f["repo"] == f"{REPO}-GGUF"}
    assert {"imatrix.gguf", "ladder-656K-Q3_K_M.gguf", "README.md"} <= gguf_repo


def test_the_imatrix_is_computed_on_the_train_split_and_every_file_is_quantized_with_it(shipped):
    root, _, _ = shipped
    run = _run(root)
    released = run / "release" / "gguf" / "imatrix.gguf"
    assert released.read_bytes() == (root / "out" / "ladder" / "imatrix" / "imatrix.gguf").read_bytes()
    matrix = load_imatrix(released)
    manifest = json.loads((root / "out" / "ladder" / "tokens" / "manifest.json").read_text())
    assert matrix.calibration["split"] == "train"
    assert matrix.calibration["split_sha256"] == split_sha256(manifest, "train") != split_sha256(manifest, "val")
    assert (matrix.calibration["tokens"], matrix.calibration["ctx"]) == (4096, 64)
    for gguf in sorted((run / "release" / "gguf").glob("ladder-*.gguf")):
        fields = open_gguf(gguf).fields
        assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == "imatrix.gguf", gguf.name
    parity = _evidence(root, "parity")
    assert all(line["imatrix"] is not None for line in parity["files"])


def test_an_override_entry_retypes_only_the_output_tensor(shipped):
    root, _, _ = shipped
    run = _run(root)
    reader = open_gguf(run / "release" / "gguf" / "ladder-656K-Q8_0-output_F16.gguf")
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    head = "output.weight" if "output.weight" in types else "token_embd.weight"  # a tied model's head
    assert types[head] == "F16"
    assert {kind for name, kind in types.items() if name.startswith("blk.") and not name.endswith("norm.weight")} == {"Q8_0"}


def test_release_manifest_lists_the_imatrix_and_its_calibration(shipped):
    root, _, _ = shipped
    release = _evidence(root, "release")
    imatrix = release["imatrix"]
    gguf_files = next(repo for repo in release["repos"] if repo["role"] == "gguf")["files"]
    assert {k: imatrix[k] for k in ("path_in_repo", "local", "size", "sha256")} in gguf_files
    assert imatrix["calibration"] == load_imatrix(_run(root) / imatrix["local"]).calibration


# ------------------------------------------------------------------ the card

def test_card_ladder_table_numbers_equal_the_parity_evidence(shipped):
    root, _, _ = shipped
    parity = _evidence(root, "parity")
    table = _ladder_table(_gguf_card(root))
    assert list(table) == [line["name"] for line in parity["files"]]
    for line in parity["files"]:
        bits, size, kl_mean, kl_p99, same_top, ppl_ratio, imatrix, verdict = table[line["name"]]
        metrics = line["engines"]["torch"]["metrics"]
        assert abs(_number(bits) - line["bits_per_weight"]) <= 0.005
        assert _number(size) == line["bytes"]
        for cell, metric in ((kl_mean, "kl_mean"), (kl_p99, "kl_p99"), (same_top, "same_top_pct"),
                             (ppl_ratio, "ppl_ratio")):
            assert _close_to_printed(cell, metrics[metric]), (line["name"], metric, cell, metrics[metric])
        assert imatrix == "yes"
        assert verdict == f"{line['verdict']} ({line['band']['name']})"


def test_card_recommends_the_file_the_rule_picks_and_names_the_calibration_set(shipped):
    root, _, _ = shipped
    parity, release = _evidence(root, "parity"), _evidence(root, "release")
    card = _gguf_card(root)
    picked = recommend(parity)["name"]
    assert picked is not None
    assert re.search(rf"^\*\*Recommended: `{re.escape(picked)}`\*\* ", card, re.MULTILINE)
    assert f'filename="{picked}"' in card  # the usage example loads it
    calibration = release["imatrix"]["calibration"]
    assert f"Calibration set: {calibration['tokens']:,} tokens ({calibration['chunks']} chunks of 64)" in card
    for digest in (calibration["tokens_sha256"], calibration["split_sha256"], release["imatrix"]["sha256"]):
        assert digest in card


def test_rerun_skips_every_stage_including_the_imatrix(shipped):
    _, config_path, _ = shipped
    report = ship(load_ship_config(config_path), log=lambda line: None)
    assert [stage.stage for stage in report.models[0].stages if stage.skipped] == [
        "corpus", "tokens", "train", "validate", "export", "imatrix", "quantize", "parity", "card"]


# ------------------------------------------------------------------ push (these run last: they re-ship
# the module's release under another contract)

@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with HubServer(tmp_path / "hub", TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def test_a_failed_file_stops_the_whole_push_unless_waived(shipped, hub):
    root, config_path, _ = shipped
    config = load_ship_config(config_path)
    config.push = True
    config.models[0].contract = str(root / "strict.toml")
    with pytest.raises(GateFailed, match=r"parity gate: FAIL \(evidence/parity.json: ladder-656K-Q3_K_M.gguf FAIL\)"):
        ship(config, log=lambda line: None)
    assert hub.requests == []
    parity = _evidence(root, "parity")
    assert [line["verdict"] for line in parity["files"]] == ["PASS", "FAIL", "PASS"]
    assert _ladder_table(_gguf_card(root))["ladder-656K-Q3_K_M.gguf"][-1].startswith("FAIL (Q3_K_M")

    config.allow_failed_gates = True
    report = ship(config, log=lambda line: None)
    assert report.models[0].summary["push"].startswith("verified ")
    assert hub.file_bytes(f"{REPO}-GGUF", "imatrix.gguf") == (_run(root) / "release" / "gguf" / "imatrix.gguf").read_bytes()
    assert "**Waiver:**" in hub.file_bytes(f"{REPO}-GGUF", "README.md").decode()


# ------------------------------------------------------------------ the rule, on its own

def _line(name: str, nbytes: int, kl_mean: float, *, verdict: str = "PASS", primary: bool = False,
          same_top: float = 95.0) -> dict:
    metrics = {"kl_mean": kl_mean, "kl_p99": kl_mean * 5, "same_top_pct": same_top, "ppl_ratio": 1.0}
    return {"name": name, "primary": primary, "bytes": nbytes, "bits_per_weight": nbytes / 1e5,
            "verdict": verdict, "imatrix": None, "band": {"name": f"{name} band"},
            "engines": {"torch": {"metrics": metrics}}}


def _parity(*lines: dict) -> dict:
    checks = {"kl_mean": {"limit": 0.05, "direction": "max"}, "same_top_pct": {"limit": 90.0, "direction": "min"}}
    return {"engines": {"torch": {"checks": checks}, "llama.cpp": {"checks": checks}}, "files": list(lines)}


def test_recommend_picks_the_smallest_file_within_the_primary_files_limits():
    parity = _parity(_line("q4km", 400, 0.03, primary=True), _line("q3km", 300, 0.045), _line("q2k", 200, 0.2),
                     _line("q8", 800, 0.001))
    assert recommend(parity)["name"] == "q3km"  # q2k passed its own band but is over the Q4_K_M limit


def test_recommend_skips_a_failed_file_and_one_below_a_minimum():
    parity = _parity(_line("q4km", 400, 0.03, primary=True), _line("q3km", 300, 0.01, verdict="FAIL"),
                     _line("q3ks", 280, 0.01, same_top=85.0))
    assert recommend(parity)["name"] == "q4km"


def test_recommend_breaks_a_size_tie_on_kl_and_says_none_when_nothing_qualifies():
    assert recommend(_parity(_line("a", 300, 0.04, primary=True), _line("b", 300, 0.02)))["name"] == "b"
    nothing = recommend(_parity(_line("a", 300, 0.06, primary=True, verdict="FAIL")))
    assert nothing["name"] is None and nothing["yardstick"] == "a"
    assert recommend({"engines": {}}) is None  # a one-file run has no ladder


def test_recommend_uses_the_llama_cpp_limits_only_where_a_file_was_measured_there():
    parity = _parity(_line("q4km", 400, 0.03, primary=True), _line("q3km", 300, 0.04))
    parity["files"][1]["engines"]["llama.cpp"] = copy.deepcopy(parity["files"][1]["engines"]["torch"])
    parity["files"][1]["engines"]["llama.cpp"]["metrics"]["kl_mean"] = 0.07
    assert recommend(parity)["name"] == "q4km"


# ------------------------------------------------------------------ ship.toml

def test_ladder_entries_name_their_files():
    entry = LadderEntry("Q4_K_M", output="Q8_0", token_embedding="Q8_0")
    assert entry.label == "Q4_K_M-output_Q8_0-token_embd_Q8_0"
    assert entry.file_name("m-1.1M-Q4_K_M.gguf") == "m-1.1M-Q4_K_M-output_Q8_0-token_embd_Q8_0.gguf"
    assert LadderEntry("Q8_0").file_name("m-1.1M-Q8_0.gguf") == "m-1.1M-Q8_0.gguf"


def test_config_reads_a_ladder_and_imatrix_settings(tmp_path):
    path = tmp_path / "ship.toml"
    path.write_text('[[model]]\nname = "m"\nquant_types = ["Q4_K_M", "IQ4_XS", { type = "Q4_K_M", '
                    'output = "Q8_0", token_embedding = "Q8_0" }]\nimatrix = true\n')
    spec = load_ship_config(path).models[0]
    assert [entry.label for entry in spec.ladder] == ["Q4_K_M", "IQ4_XS", "Q4_K_M-output_Q8_0-token_embd_Q8_0"]
    assert spec.imatrix_settings.to_dict() == {"n_tokens": 131072, "ctx": 512}
    path.write_text('[[model]]\nname = "m"\n')
    assert load_ship_config(path).models[0].imatrix_settings is None


@pytest.mark.parametrize(("lines", "message"), [
    ('quant_types = ["Q4_K_M", { type = "Q4_K_M" }]', "field quant_types: lists the same file twice: Q4_K_M"),
    ('quant_types = ["Q4_K_M", { type = "Q4_K_M", output = "Q9_K" }]',
     "field quant_types: output: unknown GGML type 'Q9_K' (known: F32, F16, BF16, Q8_0, "),
    ('quant_types = ["Q4_K_M", { type = "Q8_0", colour = "red" }]',
     'field quant_types: unknown key(s) colour in { type = "Q8_0", colour = "red" }'),
    ("imatrix = { ctx = 8 }", "field imatrix: ctx 8: at least 16"),
    ("imatrix = { n_tokens = 100 }", "field imatrix: n_tokens 100: between one chunk (ctx 512) and 16,777,216"),
    ("imatrix = { ctx = 1024 }", "field imatrix: ctx 1024: longer than the model's 512 positions"),
    ("imatrix = { chunks = 4 }", "field imatrix: unknown key(s) chunks (keys: n_tokens, ctx)"),
])
def test_config_refuses_a_bad_ladder_or_imatrix_naming_the_field(tmp_path, lines, message):
    path = tmp_path / "ship.toml"
    path.write_text(f'[[model]]\nname = "m"\n{lines}\n')
    with pytest.raises(InputError) as refused:
        load_ship_config(path)
    assert str(refused.value).startswith(f"model m: {message}")


def test_ship_cli_refuses_an_imatrix_out_of_range_on_one_line(tmp_path):
    path = tmp_path / "ship.toml"
    path.write_text('[[model]]\nname = "m"\nimatrix = { n_tokens = 100_000_000 }\n')
    result = subprocess.run([sys.executable, "-m", "shipkit", "ship", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == ("error: model m: field imatrix: n_tokens 100000000: between one chunk (ctx 512) "
                             "and 16,777,216 (the file's counts are float32)\n")
