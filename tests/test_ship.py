"""`shipkit ship`: a two-model release (one imported, one trained) end to end, and its resume."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hf_helpers import save_tiny_hf_model
from release_helpers import TOY_CONTRACT
from tokenizer_helpers import special_ids

from shipkit.errors import InputError, IntegrityError
from shipkit.ship import default_config, load_ship_config, ship

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXAMPLE = Path(__file__).parent.parent / "examples" / "ship.toml"


SHIP_TOML = """
[ship]
out = "out"

[[model]]
name = "tiny-import"
source = "import"
hf_dir = "hf"
base_model = "my-org/tiny-upstream"
corpus = ["{corpus}"]
val_fraction = 0.2
parity_tokens = 1024
parity_ctx = 64
contract = "toy.toml"

[[model]]
name = "tiny-train"
corpus = ["{corpus}"]
val_fraction = 0.2
vocab_size = 512
overrides = {{ hidden_size = 256, intermediate_size = 256, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, seq_len = 32, batch_size = 4, num_steps = 6, steps_per_epoch = 2, warmup_steps = 1, val_tokens = 512 }}
predict = ["best_val_loss < 100"]
parity_tokens = 1024
parity_ctx = 64
contract = "toy.toml"
"""


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship")
    # Qwen2-style, as the real checkpoints: its own pre-tokenizer and chat template, and
    # <|endoftext|> (the document separator) after the BPE vocabulary.
    save_tiny_hf_model(root / "hf", "qwen2", hidden=256, tokenizer_family="qwen2")
    separator = special_ids(root / "hf")["<|endoftext|>"]
    config = json.loads((root / "hf" / "config.json").read_text())
    config["bos_token_id"] = config["eos_token_id"] = separator
    (root / "hf" / "config.json").write_text(json.dumps(config))
    (root / "toy.toml").write_text(TOY_CONTRACT)
    config_path = root / "ship.toml"
    config_path.write_text(SHIP_TOML.format(corpus=STDLIB / "json"))
    report = ship(load_ship_config(config_path), log=lambda line: None)
    return root, config_path, report


def test_ship_releases_an_imported_and_a_trained_model(shipped):
    root, _, report = shipped
    assert [model.name for model in report.models] == ["tiny-import", "tiny-train"]
    for model in report.models:
        assert model.summary["parity"]["verdict"] == "PASS"
        assert model.summary["push"] == "dry run"
        released = {Path(f["path"]).suffix for f in model.summary["files"]}
        assert {".gguf", ".safetensors", ".json"} <= released
    summary = json.loads((root / "out" / "ship-summary.json").read_text())
    assert summary["tiny-train"]["best_val_loss"] == report.models[1].summary["best_val_loss"]
    assert summary["tiny-import"]["best_val_loss"] is None


def test_imported_qwen2_style_model_passes_every_gate_with_its_own_tokenizer(shipped):
    root, _, report = shipped
    run = root / "out" / "tiny-import" / "run"
    separator = special_ids(root / "hf")["<|endoftext|>"]
    manifest = json.loads((root / "out" / "tiny-import" / "tokens" / "manifest.json").read_text())
    assert (manifest["eot_id"], manifest["eot_token"]) == (separator, "<|endoftext|>") and separator > 256
    gates = json.loads((run / "evidence" / "gates.json").read_text())["gates"]
    assert [gate["id"] for gate in gates if gate["status"] == "FAILED"] == []
    assert {gate["id"]: gate["status"] for gate in gates}["parity.tokenizer"] == "DISCHARGED"
    tokenizer = json.loads((run / "evidence" / "parity.json").read_text())["tokenizer"]
    assert tokenizer["pre"] == "qwen2" and tokenizer["documents"]["documents_differing"] == 0
    assert tokenizer["special_tokens"]["verdict"] == tokenizer["chat_template"]["verdict"] == "PASS"
    exported = json.loads((run / "release" / "hf" / "tokenizer_config.json").read_text())
    assert exported == json.loads((root / "hf" / "tokenizer_config.json").read_text())


def test_imported_model_card_names_its_upstream_model_and_license(shipped):
    from huggingface_hub import ModelCard

    root, _, _ = shipped
    card = ModelCard.load(root / "out" / "tiny-import" / "run" / "release" / "card" / "README.md")
    assert card.data.base_model == "my-org/tiny-upstream"
    assert card.data.license == "apache-2.0"


def test_ship_records_gates_and_the_prediction(shipped):
    root, _, report = shipped
    gates = json.loads((root / "out" / "tiny-train" / "run" / "evidence" / "gates.json").read_text())
    falsifiers = [gate for gate in gates["gates"] if gate["category"] == "FALSIFIERS"]
    assert falsifiers and all(gate["status"] == "DISCHARGED" for gate in falsifiers)
    assert "DISCHARGED" in report.models[1].summary["gates"]
    card = (root / "out" / "tiny-train" / "run" / "release" / "card" / "README.md").read_text()
    assert "| `best_val_loss < 100` |" in card and "| CONFIRMED |" in card


def test_rerun_skips_every_stage_whose_outputs_are_unchanged(shipped):
    _, config_path, _ = shipped
    report = ship(load_ship_config(config_path), log=lambda line: None)
    skipped = {model.name: [stage.stage for stage in model.stages if stage.skipped] for model in report.models}
    assert skipped == {
        "tiny-import": ["import", "corpus", "tokens", "validate", "export", "quantize", "parity", "card"],
        "tiny-train": ["corpus", "tokens", "train", "validate", "export", "quantize", "parity", "card"],
    }


def test_a_touched_output_reruns_its_stage_which_restores_it(shipped):
    root, config_path, _ = shipped
    gguf = next((root / "out" / "tiny-train" / "run" / "release" / "gguf").glob("*-Q4_K_M.gguf"))
    original = gguf.read_bytes()
    gguf.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    report = ship(load_ship_config(config_path), log=lambda line: None)
    rerun = {stage.stage for stage in report.models[1].stages if not stage.skipped}
    assert gguf.read_bytes() == original
    # quantization is deterministic, so the stages reading its output see the same bytes
    assert rerun == {"quantize", "gates", "push"}


def test_example_config_describes_an_import_and_a_trained_model():
    config = load_ship_config(EXAMPLE)
    assert [model.source for model in config.models] == ["import", "train"]
    assert config.models[1].preset == "model-2"
    assert all(model.repo and model.gguf_repo for model in config.models)


def test_a_corrupt_stage_ledger_is_named_before_any_stage_runs(tmp_path):
    config = default_config(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ship-state.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="ship-state.json: not valid JSON"):
        ship(config, log=lambda line: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ship-state.json"]


def test_config_with_an_unknown_field_names_it(tmp_path):
    path = tmp_path / "ship.toml"
    path.write_text('[[model]]\nname = "x"\nlearning_rate = 1\n')
    with pytest.raises(InputError, match="unknown field\\(s\\) learning_rate"):
        load_ship_config(path)


def test_ship_cli_reports_a_bad_config_on_one_line(tmp_path):
    path = tmp_path / "ship.toml"
    path.write_text('[[model]]\nsource = "download"\n')
    result = subprocess.run([sys.executable, "-m", "shipkit", "ship", "--config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: model shipkit-tiny: field source: must be 'train' or 'import', got 'download'"
    )
