"""`shipkit gates`: every gate on a real release (trained, exported, quantized, parity-gated and
carded), and the faults each one must catch."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from release_helpers import tokenizer_section

from shipkit.apr import inspect_apr
from shipkit.card import render_card
from shipkit.cli import main
from shipkit.contract import load_contract
from shipkit.errors import InputError
from shipkit.evidence import evidence_path, read_evidence, write_evidence
from shipkit.export import export_hf
from shipkit.gates import evaluate_gates, render_scoreboard, run_gates
from shipkit.hf_import import import_hf
from shipkit.parity import ParityOptions, run_parity
from shipkit.predict import judge_predictions, record_predictions
from shipkit.quantize import write_gguf

REPO = "shipkit-org/tiny-code"


@pytest.fixture(scope="module")
def release_template(tiny_run_dir, tiny_tokens_dir, tmp_path_factory):
    """The tiny run with everything a release needs: release/hf, a Q4_K_M GGUF, parity
    evidence from both engines on that GGUF, and the cards."""
    run_dir = shutil.copytree(tiny_run_dir, tmp_path_factory.mktemp("gates") / "run")
    best = run_dir / "ckpt" / "best.apr"
    export_hf(best, run_dir / "release" / "hf")
    quant = write_gguf(best, run_dir / "release" / "gguf", "Q4_K_M", base_name="tiny-code")
    run_parity(ParityOptions(base=best, quant=quant.path, tokens_dir=tiny_tokens_dir, n_tokens=256, ctx=64,
                             run_dir=run_dir))
    render_card(run_dir, repo_id=REPO)
    return run_dir


@pytest.fixture
def run_dir(release_template, tmp_path):
    return shutil.copytree(release_template, tmp_path / "run")


def _gates(result, prefix=""):
    return {gate["id"]: gate for gate in result["gates"] if gate["id"].startswith(prefix)}


def _status(result, gate_id):
    return _gates(result)[gate_id]["status"]


def _contract(tmp_path, text):
    path = tmp_path / "contract.toml"
    path.write_text('[contract]\nname = "shipkit-default"\n' + text)
    return path


def _set_predictions(run_dir, expressions):
    training = read_evidence(run_dir, "training-summary")
    training["predictions"] = judge_predictions(record_predictions(expressions), training["summary"])
    write_evidence(run_dir, "training-summary", training)


# --- the whole scoreboard -----------------------------------------------------------------------


def test_complete_release_discharges_every_gate_but_the_absent_predictions(run_dir):
    result = evaluate_gates(run_dir)
    not_discharged = {g["id"]: g["status"] for g in result["gates"] if g["status"] != "DISCHARGED"}
    assert not_discharged == {"falsifiers.predictions": "PARTIAL"}
    assert result["verdict"] == "PASS"


def test_scoreboard_covers_every_category(run_dir):
    categories = {gate["category"] for gate in evaluate_gates(run_dir)["gates"]}
    assert categories == {"TRAIN", "CHECKPOINT", "PARITY", "CARD", "RELEASE", "FALSIFIERS"}


def test_summary_line_counts_each_status(run_dir):
    shutil.rmtree(run_dir / "release" / "hf")
    result = evaluate_gates(run_dir)
    statuses = [gate["status"] for gate in result["gates"]]
    counts = {status: statuses.count(status) for status in ("DISCHARGED", "PARTIAL", "FAILED")}
    assert counts["FAILED"] == 1
    assert result["summary"] == (f"{counts['DISCHARGED']}/{len(result['gates'])} DISCHARGED, "
                                 f"{counts['PARTIAL']} PARTIAL, 1 FAILED")


def test_every_gate_names_the_evidence_it_rests_on(run_dir):
    gates = evaluate_gates(run_dir)["gates"]
    discharged = [gate for gate in gates if gate["status"] == "DISCHARGED"]
    assert discharged and all(gate["evidence"] for gate in discharged)
    assert all(item["file"] and item["field"] for gate in gates for item in gate["evidence"])


def test_gates_evidence_is_written_schema_valid(run_dir):
    returned = run_gates(run_dir)
    assert read_evidence(run_dir, "gates") == returned


def test_cli_prints_the_table_and_summary_and_exits_0_on_a_clean_release(run_dir):
    result = CliRunner().invoke(main, ["gates", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["CATEGORY", "GATE", "STATUS", "EVIDENCE"]
    assert any(line.split()[:3] == ["RELEASE", "release.gguf.Q4_K_M", "DISCHARGED"] for line in lines)
    assert lines[-1] == read_evidence(run_dir, "gates")["summary"]


def test_cli_exits_1_naming_the_failed_gates(run_dir):
    evidence_path(run_dir, "parity").unlink()
    result = CliRunner().invoke(main, ["gates", str(run_dir)])
    assert result.exit_code == 1
    assert "error: gates FAILED: parity.evidence" in result.output


def test_cli_json_is_the_written_evidence(run_dir):
    result = CliRunner().invoke(main, ["gates", str(run_dir), "--json"])
    assert json.loads(result.output) == read_evidence(run_dir, "gates")


def test_missing_run_dir_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        evaluate_gates(tmp_path / "absent")


# --- TRAIN --------------------------------------------------------------------------------------


def test_target_val_loss_from_the_contract_is_enforced(run_dir, tmp_path):
    best = read_evidence(run_dir, "training-summary")["summary"]["best_val_loss"]
    threshold = '[train.thresholds.best_val_loss]\nmax = {}\nreason = "the target of this model card"\n'
    below = evaluate_gates(run_dir, contract=_contract(tmp_path, threshold.format(best - 0.01)))
    above = evaluate_gates(run_dir, contract=_contract(tmp_path, threshold.format(best + 0.01)))
    assert _status(below, "train.best_val_loss") == "FAILED"
    assert _status(above, "train.best_val_loss") == "DISCHARGED"
    assert "the target of this model card" in _gates(below)["train.best_val_loss"]["detail"]


def test_a_stopped_run_fails_and_a_running_one_is_partial(run_dir):
    training = read_evidence(run_dir, "training-summary")
    training["summary"].update(status="running", stop_reason=None)
    write_evidence(run_dir, "training-summary", training)
    assert _status(evaluate_gates(run_dir), "train.completed") == "PARTIAL"
    training["summary"].update(status="stopped", stop_reason="divergence", stop_message="val loss diverged")
    write_evidence(run_dir, "training-summary", training)
    assert _status(evaluate_gates(run_dir), "train.completed") == "FAILED"


@pytest.mark.parametrize(("verdict", "status"), [("healthy", "DISCHARGED"), ("too-early", "PARTIAL"),
                                                 ("split-shift", "PARTIAL"), ("memorization-suspect", "FAILED")])
def test_training_regime_decides_its_gate(run_dir, verdict, status):
    training = read_evidence(run_dir, "training-summary")
    training["summary"]["memorization"] |= {"verdict": verdict, "turn_epoch": None}
    write_evidence(run_dir, "training-summary", training)
    assert _status(evaluate_gates(run_dir), "train.memorization") == status


@pytest.mark.parametrize(("best_is_released", "turn_after_release", "status"),
                         [(True, True, "PARTIAL"), (False, True, "FAILED"), (True, False, "FAILED")])
def test_overfitting_is_partial_only_when_the_release_is_the_best_epoch_before_the_turn(
        run_dir, best_is_released, turn_after_release, status):
    released = inspect_apr(run_dir / "ckpt" / "best.apr").metadata["producer"]["epoch"]
    training = read_evidence(run_dir, "training-summary")
    training["summary"]["memorization"] |= {"verdict": "overfitting",
                                            "turn_epoch": released + 1 if turn_after_release else released,
                                            "best_epoch": released if best_is_released else released - 1}
    write_evidence(run_dir, "training-summary", training)
    assert _status(evaluate_gates(run_dir), "train.memorization") == status


def test_val_loss_that_never_fell_fails(run_dir):
    training = read_evidence(run_dir, "training-summary")
    training["summary"]["best_val_loss"] = training["epochs"][0]["val_loss"]
    write_evidence(run_dir, "training-summary", training)
    assert _status(evaluate_gates(run_dir), "train.val_loss_decreasing") == "FAILED"


def test_missing_training_summary_fails_every_train_gate(run_dir):
    evidence_path(run_dir, "training-summary").unlink()
    train = _gates(evaluate_gates(run_dir), "train.")
    assert train and all(gate["status"] == "FAILED" for gate in train.values())
    assert "run `shipkit train`" in train["train.completed"]["detail"]


# --- CHECKPOINT ---------------------------------------------------------------------------------


def test_a_flipped_checkpoint_byte_fails_validation_and_checksum(run_dir):
    path = run_dir / "ckpt" / "best.apr"
    data = np.memmap(path, dtype=np.uint8, mode="r+")
    data[len(data) // 2] ^= 0xFF
    data.flush()
    del data
    result = evaluate_gates(run_dir)
    assert _status(result, "checkpoint.valid") == "FAILED"
    assert "checksum" in _gates(result)["checkpoint.valid"]["detail"]
    assert _status(result, "checkpoint.sha256") == "FAILED"
    assert _status(result, "parity.measured_release") == "FAILED"


def test_contract_tensor_count_must_match_the_file(run_dir, tmp_path):
    count = len(inspect_apr(run_dir / "ckpt" / "best.apr").tensors)
    table = '[model]\ntensor_count = {{ value = {}, reason = "the tensors of the released config" }}\n'
    wrong = evaluate_gates(run_dir, contract=_contract(tmp_path, table.format(count - 1)))
    right = evaluate_gates(run_dir, contract=_contract(tmp_path, table.format(count)))
    assert _status(wrong, "checkpoint.tensor_count") == "FAILED"
    assert f"contract model.tensor_count expects {count - 1}" in _gates(wrong)["checkpoint.tensor_count"]["detail"]
    assert _status(right, "checkpoint.tensor_count") == "DISCHARGED"


def test_parameter_count_outside_the_contract_band_fails(run_dir, tmp_path):
    contract = _contract(tmp_path, '[model]\nparameters = { min = 1, max = 1000, reason = "a toy" }\n')
    assert _status(evaluate_gates(run_dir, contract=contract), "checkpoint.parameters") == "FAILED"


def test_architecture_outside_the_contract_fails(run_dir, tmp_path):
    contract = _contract(tmp_path, '[model]\narchitectures = { value = ["qwen2"], reason = "a Qwen release" }\n')
    assert _status(evaluate_gates(run_dir, contract=contract), "checkpoint.architecture") == "FAILED"


def test_missing_checkpoint_fails_every_checkpoint_gate(run_dir):
    (run_dir / "ckpt" / "best.apr").unlink()
    checkpoint = _gates(evaluate_gates(run_dir), "checkpoint.")
    assert checkpoint and all(gate["status"] == "FAILED" for gate in checkpoint.values())


# --- PARITY -------------------------------------------------------------------------------------


def test_absent_parity_evidence_fails_with_the_command_to_run(run_dir):
    evidence_path(run_dir, "parity").unlink()
    parity = _gates(evaluate_gates(run_dir), "parity.")
    assert list(parity) == ["parity.evidence"]
    assert parity["parity.evidence"]["status"] == "FAILED"
    assert "run `shipkit parity" in parity["parity.evidence"]["detail"]


def test_each_parity_check_is_a_gate_with_its_value(run_dir):
    parity = read_evidence(run_dir, "parity")
    gates = _gates(evaluate_gates(run_dir))
    for engine, section in parity["engines"].items():
        for metric, check in section["checks"].items():
            assert gates[f"parity.{engine}.{metric}"]["evidence"][0]["value"] == check["value"]


def test_a_failed_parity_check_fails_its_gate(run_dir):
    parity = read_evidence(run_dir, "parity")
    parity["engines"]["torch"]["checks"]["kl_mean"]["verdict"] = "FAIL"
    parity["verdict"] = "FAIL"
    write_evidence(run_dir, "parity", parity)
    result = evaluate_gates(run_dir)
    assert _status(result, "parity.torch.kl_mean") == "FAILED"
    assert _status(result, "parity.llama.cpp.kl_mean") == "DISCHARGED"


def test_shipkits_own_tokenizer_passes_the_tokenizer_gate(run_dir, tiny_tokens_dir):
    tokenizer = read_evidence(run_dir, "parity")["tokenizer"]
    val_docs = json.loads((tiny_tokens_dir / "manifest.json").read_text())["splits"]["val"]["docs"]
    assert tokenizer["documents"]["documents_compared"] == val_docs
    assert tokenizer["pre"] == "gpt-2" and tokenizer["chat_template"]["verdict"] == "SKIPPED"
    assert _status(evaluate_gates(run_dir), "parity.tokenizer") == "DISCHARGED"


def test_a_gguf_that_tokenizes_differently_fails_the_tokenizer_gate_naming_where(run_dir):
    parity = read_evidence(run_dir, "parity")
    parity["tokenizer"] = tokenizer_section(differing=2)
    parity["verdict"], parity["failed"] = "FAIL", ["tokenizer.documents"]
    write_evidence(run_dir, "parity", parity)
    gate = _gates(evaluate_gates(run_dir))["parity.tokenizer"]
    assert gate["status"] == "FAILED"
    assert "38/40 val documents tokenized alike" in gate["detail"]
    assert "first difference in document 3 at token 17" in gate["detail"]


def test_a_gguf_other_than_the_measured_one_fails(run_dir):
    gguf = next((run_dir / "release" / "gguf").glob("*.gguf"))
    gguf.unlink()
    write_gguf(run_dir / "ckpt" / "best.apr", run_dir / "release" / "gguf" / "tiny-code-Q8_0.gguf", "Q8_0")
    result = evaluate_gates(run_dir)
    assert _status(result, "parity.measured_release") == "FAILED"
    assert _status(result, "release.gguf.Q4_K_M") == "FAILED"
    assert "file_type 7" in _gates(result)["release.gguf.Q4_K_M"]["detail"]


def test_a_truncated_gguf_fails_the_release_gate_naming_it(run_dir):
    gguf = next((run_dir / "release" / "gguf").glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:200])
    gate = _gates(evaluate_gates(run_dir))["release.gguf.Q4_K_M"]
    assert gate["status"] == "FAILED" and f"{gguf.name}: header does not parse" in gate["detail"]


def test_parity_under_another_contract_fails(run_dir, tmp_path):
    contract = tmp_path / "other.toml"
    contract.write_text('[contract]\nname = "other"\n')
    assert _status(evaluate_gates(run_dir, contract=contract), "parity.contract") == "FAILED"


# --- CARD and RELEASE ---------------------------------------------------------------------------


def test_missing_card_fails_the_card_gates_and_the_license(run_dir):
    (run_dir / "release" / "card" / "README.md").unlink()
    result = evaluate_gates(run_dir)
    assert all(gate["status"] == "FAILED" for gate in _gates(result, "card.").values())
    assert _status(result, "release.license") == "FAILED"


def test_a_card_number_that_differs_from_the_evidence_fails(run_dir):
    path = run_dir / "release" / "card" / "README.md"
    card = ModelCard.load(path)
    best = read_evidence(run_dir, "training-summary")["summary"]["best_val_loss"]
    card.content = card.content.replace(repr(best), repr(best + 0.5))
    path.write_text(card.content)
    assert _status(evaluate_gates(run_dir), "card.numbers") == "FAILED"


def test_card_rendered_before_the_latest_evidence_fails(run_dir):
    parity = read_evidence(run_dir, "parity")
    parity["date"] = "2030-01-01T00:00:00+00:00"
    write_evidence(run_dir, "parity", parity)
    gate = _gates(evaluate_gates(run_dir))["card.evidence_current"]
    assert gate["status"] == "FAILED" and "parity changed" in gate["detail"]


def test_card_missing_a_contract_field_fails(run_dir, tmp_path):
    contract = _contract(tmp_path, '[card]\nrequired_fields = { value = ["license", "datasets"], reason = "r" }\n')
    gate = _gates(evaluate_gates(run_dir, contract=contract))["card.fields"]
    assert gate["status"] == "FAILED" and "datasets" in gate["detail"]


def test_license_outside_the_contract_fails(run_dir, tmp_path):
    contract = _contract(tmp_path, '[release]\nlicenses = { value = ["mit"], reason = "our policy" }\n')
    assert _status(evaluate_gates(run_dir, contract=contract), "release.license") == "FAILED"


def test_unknown_license_fails(run_dir):
    render_card(run_dir, repo_id=REPO, license="unknown")
    assert _status(evaluate_gates(run_dir), "release.license") == "FAILED"


def test_hf_folder_without_weights_fails(run_dir):
    (run_dir / "release" / "hf" / "model.safetensors").unlink()
    gate = _gates(evaluate_gates(run_dir))["release.hf"]
    assert gate["status"] == "FAILED" and "*.safetensors" in gate["detail"]


# --- FALSIFIERS ---------------------------------------------------------------------------------


def test_confirmed_prediction_discharges_and_falsified_fails(run_dir):
    _set_predictions(run_dir, ["best_val_loss < 100", "best_val_loss > 100"])
    falsifiers = _gates(evaluate_gates(run_dir), "falsifiers.")
    assert {gate_id: gate["status"] for gate_id, gate in falsifiers.items()} == {
        "falsifiers.prediction.1": "DISCHARGED", "falsifiers.prediction.2": "FAILED"}
    assert "best_val_loss > 100" in falsifiers["falsifiers.prediction.2"]["detail"]


def test_a_falsified_prediction_makes_the_cli_exit_1(run_dir):
    _set_predictions(run_dir, ["epochs_completed == 99"])
    result = CliRunner().invoke(main, ["gates", str(run_dir)])
    assert result.exit_code == 1 and "falsifiers.prediction.1" in result.output


def test_a_pending_prediction_is_partial(run_dir):
    training = read_evidence(run_dir, "training-summary")
    training["predictions"] = record_predictions(["best_val_loss < 9"])
    write_evidence(run_dir, "training-summary", training)
    assert _status(evaluate_gates(run_dir), "falsifiers.prediction.1") == "PARTIAL"


# --- an imported model --------------------------------------------------------------------------


@pytest.fixture
def imported_run(release_template, tmp_path):
    run_dir = tmp_path / "imported"
    import_hf(release_template / "release" / "hf", run_dir / "ckpt" / "best.apr", base_model="org/upstream",
              license="mit")
    return run_dir


def test_imported_model_train_gates_are_partial_not_failed(imported_run):
    result = evaluate_gates(imported_run)
    train = _gates(result, "train.")
    assert train and all(gate["status"] == "PARTIAL" for gate in train.values())
    assert train["train.completed"]["detail"] == "imported model: not trained here"
    assert train["train.completed"]["evidence"][0]["value"] == "org/upstream"
    assert result["imported"] is True


def test_imported_model_checkpoint_is_still_verified(imported_run):
    result = evaluate_gates(imported_run)
    assert _status(result, "checkpoint.valid") == "DISCHARGED"
    assert _status(result, "checkpoint.tensor_count") == "DISCHARGED"
    assert _status(result, "checkpoint.sha256") == "PARTIAL"


# --- the contract's gate tables -----------------------------------------------------------------


def test_default_contract_gate_expectations_all_have_reasons():
    contract = load_contract()
    expectations = [contract.model.parameters, contract.model.architectures, contract.card.required_fields,
                    contract.release.quants, contract.release.hf_files, *contract.train.thresholds.values()]
    assert all(len(item.reason) > 20 for item in expectations)


@pytest.mark.parametrize(("text", "message"), [
    ('[model]\ntensor_count = { value = 21 }\n', "model.tensor_count.reason"),
    ('[model]\nparameters = { min = 10, max = 1, reason = "r" }\n', "min 10 exceeds max 1"),
    ('[release]\nquants = { value = "Q4_K_M", reason = "r" }\n', "expected a list of names"),
    ('[card]\nfields = { value = ["license"], reason = "r" }\n', "unknown field"),
    ('[train.thresholds.loss]\nmax = 3\nreason = "r"\n', "unknown metric"),
])
def test_malformed_gate_tables_are_input_errors(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_contract(_contract(tmp_path, text))


def test_scoreboard_lists_what_is_not_discharged_with_its_detail(run_dir):
    evidence_path(run_dir, "parity").unlink()
    text = render_scoreboard(evaluate_gates(run_dir))
    assert "FAILED parity.evidence: evidence/parity.json not found" in text
