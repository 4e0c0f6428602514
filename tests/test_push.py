"""`shipkit push` against a real local Hub server (tests/hubserver.py) through huggingface_hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hubserver import HubServer
from huggingface_hub import constants as hf_constants
from release_helpers import build_release_run, tokenizer_section, write_gates

from shipkit.card import render_card
from shipkit.cli import main
from shipkit.errors import GateFailed, HubError, IntegrityError
from shipkit.fsutil import sha256_file
from shipkit.push import push_release
from shipkit.release import read_manifest

REPO = "shipkit-org/tiny-code"
GGUF_REPO = f"{REPO}-GGUF"
TOKEN = "hf_test_5b1c9d0e7f2a4c6e8a0b2d4f6a8c0e2b"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def carded_template(tiny_run_dir, tmp_path_factory):
    run_dir = build_release_run(tiny_run_dir, tmp_path_factory.mktemp("push") / "run")
    render_card(run_dir, repo_id=REPO)
    assert write_gates(run_dir)["verdict"] == "PASS"
    return run_dir


@pytest.fixture
def run_dir(carded_template, tmp_path):
    return shutil.copytree(carded_template, tmp_path / "run")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # read at import; the tests may import first
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with HubServer(tmp_path / "hub", TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _planned(run_dir):
    """(repo, path_in_repo, local path) of every file a push sends, cards included."""
    manifest = read_manifest(run_dir)
    files = []
    for repo in manifest["repos"]:
        files += [(repo["repo_id"], f["path_in_repo"], run_dir / f["local"]) for f in repo["files"]]
        files.append((repo["repo_id"], "README.md", run_dir / repo["card"]))
    return files


def _lfs_oid(run_dir, name):
    return sha256_file(next(p for _, n, p in _planned(run_dir) if n == name))


def test_dry_run_prints_every_file_size_sha256_repo_and_gate_verdict(run_dir):
    result = CliRunner().invoke(main, ["push", str(run_dir), "--repo", REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"repo {REPO} (public, main)" in result.output and f"repo {GGUF_REPO} (public, main)" in result.output
    assert "gate parity: PASS" in result.output and "gate checkpoint: VALID" in result.output
    assert "gate scoreboard: PASS (" in result.output
    for _, name, path in _planned(run_dir):
        assert f"{path.stat().st_size:>12,} B  {sha256_file(path)}" in result.output
        assert f"  {name} " in result.output


def test_push_makes_one_commit_per_repo_naming_run_id_and_evidence_sha256(run_dir, hub):
    report = push_release(run_dir, REPO)
    evidence_sha256 = sha256_file(run_dir / "evidence" / "release.json")
    for repo in (REPO, GGUF_REPO):
        head = hub.head(repo)
        assert report.run_id in head.summary and evidence_sha256 in head.summary
        assert hub.repos[repo].commits[head.parent].summary == "initial commit"


def test_pushed_files_are_byte_identical_to_the_release(run_dir, hub):
    push_release(run_dir, REPO)
    for repo, name, path in _planned(run_dir):
        assert hub.file_bytes(repo, name) == path.read_bytes(), name


def test_push_cli_verifies_every_file_remotely(run_dir, hub):
    result = CliRunner().invoke(main, ["push", str(run_dir), "--repo", REPO])
    assert result.exit_code == 0, result.output
    assert f"verified {len(_planned(run_dir))}/{len(_planned(run_dir))} files" in result.output


def test_push_to_a_revision_creates_the_branch_and_leaves_main_alone(run_dir, hub):
    push_release(run_dir, REPO, revision="release-1", private=True)
    assert hub.head(REPO).summary == "initial commit"
    assert "config.json" in hub.head(REPO, "release-1").files
    assert hub.repos[REPO].private


def test_second_push_uploads_nothing_and_still_verifies(run_dir, hub):
    push_release(run_dir, REPO)
    uploads, heads = len(hub.uploads), {repo: hub.head(repo).oid for repo in (REPO, GGUF_REPO)}
    report = push_release(run_dir, REPO)
    assert len(hub.uploads) == uploads
    assert {repo: hub.head(repo).oid for repo in (REPO, GGUF_REPO)} == heads
    assert report.verified_files == report.total_files == len(_planned(run_dir))


def test_push_refuses_a_failed_parity_gate_before_contacting_the_hub(tiny_run_dir, tmp_path, hub):
    run_dir = build_release_run(tiny_run_dir, tmp_path / "failed", kl_mean=0.2)
    render_card(run_dir, repo_id=REPO)
    write_gates(run_dir)
    with pytest.raises(GateFailed, match="parity gate: FAIL"):
        push_release(run_dir, REPO)
    assert hub.requests == []
    report = push_release(run_dir, REPO, allow_failed_gates=True)
    assert report.waived == ["parity", "scoreboard"] and report.verified_files == report.total_files


def test_push_refuses_a_gguf_that_tokenizes_unlike_the_hf_tokenizer(tiny_run_dir, tmp_path, hub):
    run_dir = build_release_run(tiny_run_dir, tmp_path / "tokenizer", tokenizer=tokenizer_section(differing=2))
    render_card(run_dir, repo_id=REPO)
    write_gates(run_dir)
    with pytest.raises(GateFailed, match="parity gate: FAIL"):
        push_release(run_dir, REPO)
    assert hub.requests == []


def test_push_refuses_when_parity_evidence_is_missing(run_dir, hub):
    (run_dir / "evidence" / "parity.json").unlink()
    with pytest.raises(GateFailed, match="parity gate: MISSING"):
        push_release(run_dir, REPO)
    assert hub.requests == []


def test_push_refuses_when_the_gates_scoreboard_is_missing(run_dir, hub):
    (run_dir / "evidence" / "gates.json").unlink()
    with pytest.raises(GateFailed, match=r"scoreboard gate: MISSING \(evidence/gates.json\)"):
        push_release(run_dir, REPO)
    assert hub.requests == []


def test_dry_run_of_a_refused_release_prints_the_plan_then_exits_1(run_dir):
    (run_dir / "evidence" / "parity.json").unlink()
    result = CliRunner().invoke(main, ["push", str(run_dir), "--repo", REPO, "--dry-run"])
    assert result.exit_code == 1
    assert "gate parity: MISSING" in result.stdout and f"repo {REPO}" in result.stdout
    assert result.stderr.startswith("error: parity gate: MISSING")


def test_push_refuses_a_corrupt_checkpoint_even_with_gates_waived(run_dir, hub):
    checkpoint = run_dir / "ckpt" / "best.apr"
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="best.apr: INVALID"):
        push_release(run_dir, REPO, allow_failed_gates=True)
    assert hub.requests == []


def test_push_refuses_a_release_file_changed_after_the_card(run_dir, hub):
    config = run_dir / "release" / "hf" / "config.json"
    config.write_text(config.read_text().replace('"use_cache": true', '"use_cache": false'))
    with pytest.raises(IntegrityError, match="config.json: changed since the card was rendered"):
        push_release(run_dir, REPO)


def test_push_refuses_a_card_edited_after_rendering(run_dir, hub):
    card = run_dir / "release" / "card" / "README.md"
    card.write_text(card.read_text().replace("Best validation loss", "Best-ever validation loss"))
    with pytest.raises(IntegrityError, match="README.md: changed since the card was rendered"):
        push_release(run_dir, REPO)


def test_push_without_repos_pushes_to_the_ones_the_card_names(run_dir, hub):
    report = push_release(run_dir)
    assert [plan.repo_id for plan in report.repos] == [REPO, GGUF_REPO]
    assert report.verified_files == report.total_files


def test_push_refuses_a_repo_the_card_was_not_rendered_for(run_dir):
    result = CliRunner().invoke(main, ["push", str(run_dir), "--repo", "someone/else", "--dry-run"])
    assert result.exit_code == 2
    assert "rendered for shipkit-org/tiny-code, not someone/else" in result.output


def test_wrong_token_is_a_one_line_error_with_exit_code_1(run_dir, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_0000")
    result = CliRunner().invoke(main, ["push", str(run_dir), "--repo", REPO])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "the Hub rejected the token (401 Unauthorized)" in result.output
    assert "hf_wrong_token_0000" not in result.output
    assert REPO not in hub.repos


def test_token_is_never_printed_logged_or_written(run_dir, hub, caplog):
    caplog.set_level("DEBUG")
    runner = CliRunner()
    outputs = [runner.invoke(main, ["push", str(run_dir), "--repo", REPO, *extra]).output
               for extra in ([], ["--json"], ["--dry-run"])]
    written = [path.read_bytes() for path in run_dir.rglob("*") if path.is_file()]
    written += [path.read_bytes() for path in (hub.root).rglob("*") if path.is_file()]
    assert "verified" in outputs[0]
    assert all(TOKEN not in text for text in [*outputs, caplog.text])
    assert all(TOKEN.encode() not in data for data in written)


def test_upload_dropped_mid_file_is_retried_and_arrives_intact(run_dir, hub):
    hub.drop_next_upload(after_bytes=1 << 20)
    report = push_release(run_dir, REPO)
    oid = _lfs_oid(run_dir, "model.safetensors")
    attempts = [attempt for attempt in hub.uploads if attempt.oid == oid]
    assert [attempt.completed for attempt in attempts] == [False, True]
    assert hub.file_bytes(REPO, "model.safetensors") == (run_dir / "release/hf/model.safetensors").read_bytes()
    assert report.verified_files == report.total_files


def test_rerun_after_a_killed_push_uploads_only_what_had_not_arrived(run_dir, hub):
    model_oid, plot_oid = _lfs_oid(run_dir, "model.safetensors"), _lfs_oid(run_dir, "loss.png")
    gguf_oid = _lfs_oid(run_dir, next((run_dir / "release" / "gguf").glob("*.gguf")).name)
    hub.stall_next_upload(after_bytes=1 << 20)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "shipkit", "push", str(run_dir), "--repo", REPO],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert hub.stalled.wait(timeout=90), "the push never reached the stalled upload"
        deadline = time.monotonic() + 30
        while plot_oid not in hub.completed_uploads() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    hub.release_stall()
    assert hub.wait_for_uploads_to_settle(timeout=30)
    assert hub.completed_uploads() == [plot_oid] and hub.head(REPO).summary == "initial commit"
    first_run = len(hub.uploads)
    report = push_release(run_dir, REPO)
    assert sorted(attempt.oid for attempt in hub.uploads[first_run:]) == sorted([model_oid, gguf_oid])
    assert report.verified_files == report.total_files


def test_push_json_report_lists_commits_and_verification(run_dir, hub):
    result = CliRunner().invoke(main, ["push", str(run_dir), "--repo", REPO, "--json"])
    data = json.loads(result.stdout)
    assert [repo["commit"] for repo in data["repos"]] == [hub.head(REPO).oid, hub.head(GGUF_REPO).oid]
    assert data["verified_files"] == data["total_files"] == len(_planned(run_dir))


def test_push_reports_a_missing_token_on_one_line(run_dir, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN"):
        push_release(run_dir, REPO)


def test_an_unexpected_client_exception_becomes_one_hub_error_without_the_token() -> None:
    from shipkit.push import _hub_errors

    with pytest.raises(HubError) as caught, _hub_errors("hf_secretTOKEN123", "upload"):
        raise TypeError("header value 'Bearer hf_secretTOKEN123' is not a str")
    assert "hf_secretTOKEN123" not in str(caught.value)
    assert str(caught.value).startswith("upload: unexpected TypeError:")
