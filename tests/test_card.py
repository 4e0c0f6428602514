"""`shipkit card`: model cards for both repos, rendered from the evidence JSON only."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from release_helpers import build_release_run

from shipkit.card import card_environment, render_card
from shipkit.cli import main
from shipkit.errors import InputError, IntegrityError
from shipkit.evidence import read_evidence
from shipkit.fsutil import sha256_file

REPO = "shipkit-org/tiny-code"


@pytest.fixture(scope="module")
def release_template(tiny_run_dir, tmp_path_factory):
    return build_release_run(tiny_run_dir, tmp_path_factory.mktemp("release") / "run")


@pytest.fixture
def run_dir(release_template, tmp_path):
    return shutil.copytree(release_template, tmp_path / "run")


def _card_text(run_dir, role="hf"):
    name = "README.md" if role == "hf" else "gguf/README.md"
    return (run_dir / "release" / "card" / name).read_text()


def test_card_front_matter_is_what_the_hub_expects(run_dir):
    render_card(run_dir, repo_id=REPO, datasets=["shipkit-org/stdlib-code"])
    data = ModelCard.load(run_dir / "release" / "card" / "README.md").data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.datasets == ["shipkit-org/stdlib-code"]
    assert "shipkit" in data.tags


def test_card_model_index_holds_the_best_epoch_val_loss_and_perplexity(run_dir):
    render_card(run_dir, repo_id=REPO)
    training = read_evidence(run_dir, "training-summary")
    best = next(e for e in training["epochs"] if e["epoch"] == training["summary"]["best_epoch"])
    results = {r.metric_type: r.metric_value for r in ModelCard.load(run_dir / "release/card/README.md").data.eval_results}
    assert results == {"loss": best["val_loss"], "perplexity": best["val_ppl"]}


def test_gguf_card_declares_a_quantized_gguf_of_the_safetensors_repo(run_dir):
    render_card(run_dir, repo_id=REPO)
    data = ModelCard.load(run_dir / "release" / "card" / "gguf" / "README.md").data.to_dict()
    assert data["library_name"] == "gguf"
    assert {"gguf", "llama.cpp"} <= set(data["tags"])
    assert data["base_model"] == REPO
    assert data["base_model_relation"] == "quantized"
    kl = [m for m in data["model-index"][0]["results"][0]["metrics"] if m["type"] == "kl_mean"]
    assert kl[0]["value"] == read_evidence(run_dir, "parity")["engines"]["torch"]["metrics"]["kl_mean"]


def test_card_quotes_every_epoch_of_the_training_summary(run_dir):
    render_card(run_dir, repo_id=REPO)
    text = _card_text(run_dir)
    for epoch in read_evidence(run_dir, "training-summary")["epochs"]:
        row = f"| {epoch['epoch']} | {epoch['step']:,} | {epoch['train_loss']:.4f} | {epoch['val_loss']:.4f} |"
        assert row in text


def test_card_states_the_training_verdict_its_reason_and_rule(run_dir):
    render_card(run_dir, repo_id=REPO)
    verdict = read_evidence(run_dir, "training-summary")["summary"]["memorization"]
    assert f"### Training verdict: {verdict['verdict']}" in _card_text(run_dir)
    assert verdict["reason"] in _card_text(run_dir)
    assert f"Rule `{verdict['rule']}`" in _card_text(run_dir)


def test_card_files_tables_give_size_and_sha256_of_every_released_file(run_dir):
    render_card(run_dir, repo_id=REPO)
    hf_files = sorted((run_dir / "release" / "hf").iterdir()) + [run_dir / "release" / "card" / "loss.png"]
    for path in hf_files:
        assert f"| `{path.name}` |" in _card_text(run_dir)
        assert f"| {path.stat().st_size:,} B" in _card_text(run_dir)
        assert f"| `{sha256_file(path)}` |" in _card_text(run_dir)
    gguf = next((run_dir / "release" / "gguf").glob("*.gguf"))
    assert f"| `{gguf.name}` | " in _card_text(run_dir, "gguf") and sha256_file(gguf) in _card_text(run_dir, "gguf")


def test_card_parity_table_has_each_check_with_its_verdict(run_dir):
    render_card(run_dir, repo_id=REPO)
    parity = read_evidence(run_dir, "parity")
    for text in (_card_text(run_dir), _card_text(run_dir, "gguf")):
        assert f"## Quantization parity: {parity['verdict']}" in text
        for metric, check in parity["engines"]["torch"]["checks"].items():
            assert f"| torch | {metric} |" in text and check["reason"] in text


def test_loss_plot_is_a_png_and_rerendering_gives_the_same_bytes(run_dir):
    render_card(run_dir, repo_id=REPO)
    plot = run_dir / "release" / "card" / "loss.png"
    first = plot.read_bytes()
    render_card(run_dir, repo_id=REPO)
    assert first.startswith(b"\x89PNG\r\n\x1a\n")
    assert plot.read_bytes() == first
    assert "![Train and validation loss per epoch](loss.png)" in _card_text(run_dir)


def test_card_names_a_missing_evidence_field(run_dir):
    path = run_dir / "evidence" / "training-summary.json"
    training = json.loads(path.read_text())
    del training["model"]["rope_theta"]
    path.write_text(json.dumps(training))
    with pytest.raises(InputError, match=r"evidence field training-summary\.model\.rope_theta is missing"):
        render_card(run_dir, repo_id=REPO)


def test_card_refuses_to_render_without_parity_evidence(run_dir):
    (run_dir / "evidence" / "parity.json").unlink()
    with pytest.raises(InputError, match="parity.json: evidence file not found"):
        render_card(run_dir, repo_id=REPO)


def test_card_refuses_parity_measured_on_another_gguf(run_dir):
    gguf = next((run_dir / "release" / "gguf").glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes() + b"\0" * 32)
    with pytest.raises(IntegrityError, match="not one of the released GGUF files"):
        render_card(run_dir, repo_id=REPO)


def test_card_of_a_failed_parity_gate_states_the_waiver(tiny_run_dir, tmp_path):
    run_dir = build_release_run(tiny_run_dir, tmp_path / "run", kl_mean=0.2)
    render_card(run_dir, repo_id=REPO)
    assert "## Quantization parity: FAIL" in _card_text(run_dir)
    assert "**Waiver:** the parity gate did **not** pass" in _card_text(run_dir)
    assert "**Waiver:**" in _card_text(run_dir, "gguf")


def test_card_of_an_imported_model_names_base_model_and_omits_an_empty_model_index(run_dir, tmp_path):
    from shipkit.hf_import import import_hf

    upstream = shutil.copytree(run_dir / "release" / "hf", tmp_path / "upstream-coder")
    (upstream / "README.md").write_text("---\nlicense: mit\n---\n# upstream\n")
    imported = tmp_path / "imported"
    import_hf(upstream, imported / "ckpt" / "best.apr")
    (imported / "evidence").mkdir()
    shutil.copy(run_dir / "evidence" / "parity.json", imported / "evidence" / "parity.json")
    shutil.copytree(upstream, imported / "release" / "hf", ignore=shutil.ignore_patterns("README.md"))
    render_card(imported, repo_id=REPO)
    data = ModelCard.load(imported / "release" / "card" / "README.md").data.to_dict()
    assert data["base_model"] == "upstream-coder"
    assert data["license"] == "mit"
    assert "model-index" not in data
    assert not (imported / "release" / "card" / "loss.png").exists()


def test_card_cli_writes_both_cards_and_the_release_manifest(run_dir):
    result = CliRunner().invoke(main, ["card", str(run_dir), "--repo", REPO, "--gguf-repo", f"{REPO}-q"])
    assert result.exit_code == 0, result.output
    manifest = read_evidence(run_dir, "release")
    assert [repo["repo_id"] for repo in manifest["repos"]] == [REPO, f"{REPO}-q"]
    assert (run_dir / "release" / "card" / "gguf" / "README.md").is_file()


def test_card_without_a_repo_names_a_local_placeholder_repo(run_dir):
    render_card(run_dir)
    manifest = read_evidence(run_dir, "release")
    assert [repo["repo_id"] for repo in manifest["repos"]] == ["shipkit-local/run", "shipkit-local/run-GGUF"]
    assert 'from_pretrained("shipkit-local/run")' in _card_text(run_dir)


REPO_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
PARITY_OVERRIDE = "## Parity, in our words: {{ parity.verdict }} on {{ parity.tokens.positions_scored | num }} positions\n"


def _templates(folder, files):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_builtin_card_templates_are_the_top_level_templates_folder():
    env, overrides = card_environment()
    assert overrides == {}
    for path in REPO_TEMPLATES.glob("*.j2"):
        assert Path(env.get_template(path.name).filename).resolve() == path


def test_card_templates_override_one_partial_and_keep_shipkit_s_other_templates(run_dir, tmp_path):
    folder = _templates(tmp_path / "mine", {"_parity.md.j2": PARITY_OVERRIDE})
    render_card(run_dir, repo_id=REPO, templates_dir=folder)
    positions = read_evidence(run_dir, "parity")["tokens"]["positions_scored"]
    for role in ("hf", "gguf"):
        text = _card_text(run_dir, role)
        assert f"## Parity, in our words: PASS on {positions:,} positions" in text
        assert "## Quantization parity:" not in text
    assert "## Model" in _card_text(run_dir)  # model-card.md.j2 is still shipkit's


def test_card_templates_override_a_card_with_a_new_partial_of_its_own(run_dir, tmp_path):
    folder = _templates(tmp_path / "mine", {
        "model-card.md.j2": "# {{ model_name }}, our way\n{% include 'extra/_loss.md.j2' %}\n",
        "extra/_loss.md.j2": "best val loss {{ training.summary.best_val_loss | num }}\n",
    })
    render_card(run_dir, repo_id=REPO, templates_dir=folder)
    best = read_evidence(run_dir, "training-summary")["summary"]["best_val_loss"]
    assert _card_text(run_dir).endswith(f"---\n\n# tiny-code, our way\nbest val loss {best:.4f}\n")
    assert "## Quantization parity:" in _card_text(run_dir, "gguf")  # gguf-card.md.j2 is shipkit's


def test_card_template_override_missing_an_evidence_field_names_the_user_file(run_dir, tmp_path):
    folder = _templates(tmp_path / "mine", {"model-card.md.j2": "{{ training.summary.no_such_field }}\n"})
    with pytest.raises(InputError, match=rf"^{re.escape(str(folder / 'model-card.md.j2'))}: evidence field "
                                         r"training-summary\.summary\.no_such_field is missing$"):
        render_card(run_dir, repo_id=REPO, templates_dir=folder)


def test_card_cli_templates_option_overrides_a_template(run_dir, tmp_path):
    folder = _templates(tmp_path / "mine", {"_parity.md.j2": PARITY_OVERRIDE})
    result = CliRunner().invoke(main, ["card", str(run_dir), "--repo", REPO, "--templates", str(folder)])
    assert result.exit_code == 0, result.output
    assert "## Parity, in our words: PASS" in _card_text(run_dir, "gguf")


BAD_TEMPLATE_FOLDERS = {
    "missing": (None, "{folder}: card templates folder not found"),
    "a-file": ("file", "{folder}: not a folder (give the folder holding your *.j2 card templates)"),
    "no-templates": ({"notes.md": "mine"}, "{folder}: no *.j2 card templates in it"),
    "syntax": ({"gguf-card.md.j2": "# {{ model_name }}\n{% if parity %}\nunclosed\n"},
               "{folder}/gguf-card.md.j2:3: card template does not parse: Unexpected end of template. "),
    "not-utf8": ({"_files.md.j2": b"\xff\xfe{{ files }}"}, "{folder}/_files.md.j2: not UTF-8 text"),
    "missing-include": ({"model-card.md.j2": "{% include '_nowhere.md.j2' %}"},
                        "{folder}/model-card.md.j2: includes '_nowhere.md.j2', which is neither in {folder} nor"),
    "misspelt": ({"model_card.md.j2": "# {{ model_name }}"},
                 "{folder}/model_card.md.j2: replaces none of shipkit's card templates (_files.md.j2, "
                 "_parity.md.j2, gguf-card.md.j2, model-card.md.j2) and no template includes it"),
}


@pytest.mark.parametrize("case", list(BAD_TEMPLATE_FOLDERS))
def test_card_cli_refuses_a_bad_templates_folder_in_one_line_before_writing(run_dir, tmp_path, case):
    content, says = BAD_TEMPLATE_FOLDERS[case]
    folder = tmp_path / "mine"
    if content == "file":
        folder.write_text("not a folder")
    elif content is not None:
        folder.mkdir()
        for name, text in content.items():
            (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    result = CliRunner().invoke(main, ["card", str(run_dir), "--templates", str(folder)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {says.format(folder=folder)}")
    assert not (run_dir / "release" / "card").exists()


def test_ship_toml_card_templates_is_relative_to_the_config_and_checked_before_any_stage(tmp_path):
    from shipkit.ship import load_ship_config, ship

    _templates(tmp_path / "mine", {"gguf-card.md.j2": "# {{ model_name }}\n{% if parity %}\n"})
    path = tmp_path / "ship.toml"
    path.write_text(f'[ship]\nout = "out"\n\n[[model]]\nname = "m"\ncorpus = ["{tmp_path}"]\ncard_templates = "mine"\n')
    config = load_ship_config(path)
    assert config.models[0].card_templates == str(tmp_path / "mine")
    with pytest.raises(InputError, match=rf"^model m: field card_templates: {re.escape(str(tmp_path))}/mine/"
                                         r"gguf-card\.md\.j2:2: card template does not parse: "):
        ship(config, log=lambda line: None)
    assert not (tmp_path / "out").exists()
