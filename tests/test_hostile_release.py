"""Hostile inputs on the release path: evidence edited after the scoreboard, a stale or edited
evidence/gates.json, release files changed after the card (push must refuse before a request
reaches the Hub), and GGUF headers that lie (`shipkit parity` and `shipkit gates` must refuse in
one line, naming the file, before allocating)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader
from hostile import assert_refused, run_cli
from hubserver import HubServer
from huggingface_hub import constants as hf_constants
from release_helpers import build_release_run, write_gates

from shipkit.card import render_card

REPO = "shipkit-org/tiny-code"
TOKEN = "hf_test_hostile_release_0000000000000000"
HUGE = 1 << 60


@pytest.fixture(scope="module")
def carded(tiny_run_dir, tmp_path_factory):
    """A release run that pushes cleanly: carded for REPO, scoreboard PASS."""
    run_dir = build_release_run(tiny_run_dir, tmp_path_factory.mktemp("hostile-release") / "run")
    render_card(run_dir, repo_id=REPO)
    assert write_gates(run_dir)["verdict"] == "PASS"
    return run_dir


@pytest.fixture
def run_dir(carded, tmp_path):
    return shutil.copytree(carded, tmp_path / "run")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    with HubServer(tmp_path / "hub", TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _release_gguf(run_dir: Path) -> Path:
    return next((run_dir / "release" / "gguf").glob("*-Q4_K_M.gguf"))


def _evidence(run_dir: Path, name: str) -> Path:
    return run_dir / "evidence" / f"{name}.json"


def _push_refused(run_dir: Path, hub: HubServer, names: str, *extra: str) -> str:
    """`shipkit push` is refused in one line naming `names`, and no request reached the Hub."""
    line = assert_refused(run_cli("push", run_dir, "--repo", REPO, *extra), "release", names=names)
    assert hub.requests == [], hub.requests
    return line


# --- the clean release still pushes (not a hostile input) ------------------------------------


def test_a_clean_release_re_derives_the_same_scoreboard_and_pushes(run_dir, hub):
    outcome = run_cli("push", run_dir, "--repo", REPO)
    assert outcome.exit_code == 0, outcome.stderr
    assert "gate scoreboard: PASS (" in outcome.stdout and "verified" in outcome.stdout


# --- evidence edited after the scoreboard ----------------------------------------------------


def _summary(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda run_dir: _edit_json(_evidence(run_dir, "training-summary"), lambda data: change(data["summary"]))


def _set(key: str, value: object) -> Callable[[dict], object]:
    return lambda data: data.__setitem__(key, value)


EVIDENCE_EDITS = {
    # the case: the scoreboard passed, then the training summary says the run diverged
    "training diverged": (_summary(_set("convergence", "diverged")),
                          "gate train.convergence DISCHARGED recorded, FAILED now"),
    "training worsening": (_summary(_set("convergence", "worsening")), "gate train.convergence"),
    "training memorized": (_summary(lambda s: s["memorization"].update(verdict="memorization-suspect")),
                           "gate train.memorization"),
    "training stopped early": (_summary(lambda s: s.update(stop_reason="divergence", status="stopped",
                                                          stop_message="loss diverged")), "gate train.completed"),
    "training best val loss raised": (_summary(lambda s: s.update(best_val_loss=s["best_val_loss"] + 5)),
                                      "evidence/gates.json is stale or edited: gate train.val_loss_decreasing"),
    "training summary deleted": (lambda r: _evidence(r, "training-summary").unlink(), "gate train.completed"),
    "parity kl_mean edited, verdict kept": (
        lambda r: _edit_json(_evidence(r, "parity"),
                             lambda p: p["engines"]["torch"]["metrics"].update(kl_mean=0.011)),
        "gate card.evidence_current DISCHARGED recorded, FAILED now"),
    "parity verdict FAIL": (lambda r: _edit_json(_evidence(r, "parity"), _set("verdict", "FAIL")),
                            "parity gate: FAIL"),
    "parity evidence deleted": (lambda r: _evidence(r, "parity").unlink(), "parity gate: MISSING"),
    "parity not JSON": (lambda r: _evidence(r, "parity").write_text("{"), "parity.json: not valid JSON"),
    "release.json evidence hash edited": (
        lambda r: _edit_json(_evidence(r, "release"), lambda m: m["evidence"].update(parity="0" * 64)),
        "gate card.evidence_current"),
    "release.json file hash edited": (
        lambda r: _edit_json(_evidence(r, "release"), lambda m: m["repos"][0]["files"][0].update(sha256="0" * 64)),
        "changed since the card was rendered"),
    "release.json checkpoint hash edited": (
        lambda r: _edit_json(_evidence(r, "release"), lambda m: m["checkpoint"].update(sha256="0" * 64)),
        "ckpt/best.apr: CHANGED since the card was rendered"),
    "release.json not JSON": (lambda r: _evidence(r, "release").write_text("]"), "release.json: not valid JSON"),
    "release.json schema broken": (lambda r: _edit_json(_evidence(r, "release"), _set("repos", "all")),
                                   "release.json: field repos"),
    "GGUF byte flipped": (lambda r: _flip_byte(_release_gguf(r), -100), "Q4_K_M.gguf: changed since the card"),
    "GGUF header lies": (lambda r: _patch_u64(_release_gguf(r), 8, HUGE), "Q4_K_M.gguf: changed since the card"),
    "GGUF deleted": (lambda r: _release_gguf(r).unlink(), "Q4_K_M.gguf: listed in evidence/release.json but missing"),
    "checkpoint byte flipped": (lambda r: _flip_byte(r / "ckpt" / "best.apr", -5000), "ckpt/best.apr: INVALID"),
    "checkpoint swapped for another valid one": (lambda r: _rewrite_checkpoint(r / "ckpt" / "best.apr"),
                                                 "ckpt/best.apr: CHANGED since the card was rendered"),
    "checkpoint deleted": (lambda r: (r / "ckpt" / "best.apr").unlink(), "ckpt/best.apr: MISSING"),
    "card edited": (lambda r: _append(r / "release" / "card" / "README.md", "\nBest model ever.\n"),
                    "README.md: changed since the card was rendered"),
    "GGUF card edited": (lambda r: _append(r / "release" / "card" / "gguf" / "README.md", "\nlossless!\n"),
                         "gguf/README.md: changed since the card was rendered"),
    "HF config edited": (lambda r: _append(r / "release" / "hf" / "config.json", " "),
                         "config.json: changed since the card was rendered"),
    "loss plot deleted": (lambda r: (r / "release" / "card" / "loss.png").unlink(), "loss.png: listed"),
}


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _patch_u64(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, offset, value)
    path.write_bytes(bytes(data))


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _rewrite_checkpoint(path: Path) -> None:
    """A checksum-valid checkpoint with other weights in place of `path`."""
    from shipkit.apr import read_apr, write_apr

    checkpoint = read_apr(path)
    tensors = dict(checkpoint.tensors)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 1.5
    write_apr(path, tensors, checkpoint.metadata)


@pytest.mark.parametrize("case", list(EVIDENCE_EDITS))
def test_push_refuses_evidence_changed_after_the_scoreboard(run_dir, hub, case):
    edit, names = EVIDENCE_EDITS[case]
    edit(run_dir)
    _push_refused(run_dir, hub, names)


# --- evidence/gates.json edited or stale -----------------------------------------------------


def _gates(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda run_dir: _edit_json(_evidence(run_dir, "gates"), change)


def _gate(record: dict, gate_id: str) -> dict:
    return next(gate for gate in record["gates"] if gate["id"] == gate_id)


def _mark(gate_id: str, status: str) -> Callable[[dict], None]:
    def change(record: dict) -> None:
        gate = _gate(record, gate_id)
        record["counts"][gate["status"]] -= 1
        record["counts"][status] += 1
        gate["status"] = status
    return change


GATES_EDITS = {
    "a discharged gate marked failed": (_gates(_mark("train.completed", "FAILED")),
                                        "gate train.completed FAILED recorded, DISCHARGED now"),
    "a partial gate marked discharged": (_gates(_mark("falsifiers.predictions", "DISCHARGED")),
                                         "gate falsifiers.predictions DISCHARGED recorded, PARTIAL now"),
    "a gate removed": (_gates(lambda r: r["gates"].remove(_gate(r, "card.numbers"))),
                       "gate card.numbers DISCHARGED now, absent from the record"),
    "a gate invented": (_gates(lambda r: r["gates"].append({**_gate(r, "train.completed"), "id": "train.vibes"})),
                        "gate train.vibes DISCHARGED in the record, no longer evaluated"),
    "a gate repeated": (_gates(lambda r: r["gates"].append(_gate(r, "train.completed"))),
                        "the recorded gates repeat or reorder gates"),
    "gates reordered": (_gates(lambda r: r["gates"].reverse()), "the recorded gates repeat or reorder gates"),
    "an evidence value edited": (_gates(lambda r: _gate(r, "checkpoint.sha256")["evidence"][0].update(value="0" * 64)),
                                 "gate checkpoint.sha256 DISCHARGED in both, but its evidence or category changed"),
    "an evidence entry dropped": (_gates(lambda r: _gate(r, "train.convergence")["evidence"].clear()),
                                  "gate train.convergence DISCHARGED in both, but its evidence or category changed"),
    "a category moved": (_gates(lambda r: _gate(r, "train.wraps").update(category="CARD")),
                         "gate train.wraps DISCHARGED in both, but its evidence or category changed"),
    "verdict flipped to FAIL": (_gates(_set("verdict", "FAIL")), 'verdict "FAIL" recorded, "PASS" now'),
    "counts edited": (_gates(lambda r: r["counts"].update(DISCHARGED=r["counts"]["DISCHARGED"] + 1)), "counts"),
    "summary edited": (_gates(_set("summary", "99/99 DISCHARGED, 0 PARTIAL, 0 FAILED")), "summary"),
    "checkpoint renamed": (_gates(_set("checkpoint", "ckpt/epoch-001.apr")), 'checkpoint "ckpt/epoch-001.apr" recorded'),
    "imported flag flipped": (_gates(_set("imported", True)), "imported true recorded, false now"),
    "contract name edited": (_gates(lambda r: r["contract"].update(name="lenient")), "contract 'lenient' recorded"),
    "contract source names a missing file": (
        _gates(lambda r: r["contract"].update(source=f"/nonexistent/c.toml (over {r['contract']['source']})")),
        "its scoreboard cannot be re-evaluated"),
    "contract source is garbage": (_gates(lambda r: r["contract"].update(source="whatever")),
                                   "contract.source 'whatever' names no contract file"),
    "gates.json not JSON": (lambda r: _evidence(r, "gates").write_text("{\"verdict\": "), "gates.json: not valid JSON"),
    "gates.json status outside the schema": (_gates(lambda r: r["gates"][0].update(status="MAYBE")),
                                             "gates.json: field gates/0/status"),
    "gates.json verdict outside the schema": (_gates(_set("verdict", "OK")), "gates.json: field verdict"),
    "gates.json deleted": (lambda r: _evidence(r, "gates").unlink(), "scoreboard gate: MISSING (evidence/gates.json)"),
}


@pytest.mark.parametrize("case", list(GATES_EDITS))
def test_push_refuses_an_edited_or_stale_gates_json(run_dir, hub, case):
    edit, names = GATES_EDITS[case]
    edit(run_dir)
    _push_refused(run_dir, hub, names)


CONTRACT = '[contract]\nname = "shipkit-default"\n'


def _scored_under(run_dir: Path, contract: Path) -> None:
    """The scoreboard recorded under a contract file of the model's own (it passes)."""
    contract.write_text(CONTRACT)
    outcome = run_cli("gates", run_dir, "--contract", contract)
    assert outcome.exit_code == 0, outcome.stderr


def test_push_refuses_when_the_contract_was_edited_after_the_scoreboard(run_dir, hub, tmp_path):
    contract = tmp_path / "model.toml"
    _scored_under(run_dir, contract)
    contract.write_text(CONTRACT + '[train.thresholds.best_val_loss]\nmax = 0.01\nreason = "tightened later"\n')
    _push_refused(run_dir, hub, "gate train.best_val_loss FAILED now, absent from the record")


def test_push_refuses_when_the_contract_is_gone(run_dir, hub, tmp_path):
    contract = tmp_path / "model.toml"
    _scored_under(run_dir, contract)
    contract.unlink()
    _push_refused(run_dir, hub, "model.toml: cannot read the contract")


def test_dry_run_prints_the_plan_then_the_same_stale_refusal(run_dir, hub):
    EVIDENCE_EDITS["training diverged"][0](run_dir)
    outcome = run_cli("push", run_dir, "--repo", REPO, "--dry-run")
    assert f"repo {REPO}" in outcome.stdout and "gate scoreboard: FAIL (" in outcome.stdout
    assert_refused(outcome, "release", names="evidence/gates.json is stale or edited: gate train.convergence")
    assert hub.requests == []


def test_allow_failed_gates_does_not_waive_a_stale_scoreboard(run_dir, hub):
    EVIDENCE_EDITS["training diverged"][0](run_dir)
    _push_refused(run_dir, hub, "evidence/gates.json is stale or edited", "--allow-failed-gates")


def test_a_failing_scoreboard_scored_again_is_refused_naming_its_failed_gates_and_can_be_waived(run_dir, hub):
    EVIDENCE_EDITS["training diverged"][0](run_dir)
    run_cli("gates", run_dir)  # the record now says FAIL, as the evidence does
    _push_refused(run_dir, hub, "scoreboard gate: FAIL (")
    line = assert_refused(run_cli("push", run_dir, "--repo", REPO, "--dry-run"), "release")
    assert "FAILED: train.convergence" in line
    waived = run_cli("push", run_dir, "--repo", REPO, "--allow-failed-gates")
    assert waived.exit_code == 0, waived.stderr
    assert "gate scoreboard: FAIL" in waived.stdout and "(WAIVED)" in waived.stdout


# --- GGUF headers that lie -------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the parts of the clean GGUF's header sit (read with gguf-py from the valid file)."""

    size: int
    keys: dict[str, int]  # key -> offset of its entry
    tensors: dict[str, int]  # tensor -> offset of its info
    tensor_types: dict[str, GGMLQuantizationType]
    tensor_dims: dict[str, int]
    data_offset: int
    infos_end: int

    def key_value(self, key: str) -> int:
        """Offset of the value (after the name and the type) of `key`."""
        return self.keys[key] + 8 + len(key) + 4

    def tensor_field(self, name: str, field: str) -> int:
        """Offset of `n_dims`, `dims`, `type` or `offset` of tensor `name`."""
        dims_end = 4 + 8 * self.tensor_dims[name]
        return self.tensors[name] + 8 + len(name) + {"n_dims": 0, "dims": 4, "type": dims_end,
                                                      "offset": dims_end + 4}[field]


@pytest.fixture(scope="module")
def layout(carded) -> Layout:
    path = _release_gguf(carded)
    reader = GGUFReader(path)
    keys = {name: field.offset for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    last = reader.tensors[-1].field
    return Layout(path.stat().st_size, keys, {t.name: t.field.offset for t in reader.tensors},
                  {t.name: t.tensor_type for t in reader.tensors}, {t.name: len(t.shape) for t in reader.tensors},
                  reader.data_offset,
                  last.offset + sum(int(part.nbytes) for part in last.parts))


def _u32(at: Callable[[Layout], int], value: int) -> Callable[[bytearray, Layout], None]:
    return lambda data, layout: struct.pack_into("<I", data, at(layout), value)


def _u64(at: Callable[[Layout], int], value: int | Callable[[Layout, int], int]) -> Callable[[bytearray, Layout], None]:
    def patch(data: bytearray, layout: Layout) -> None:
        offset = at(layout)
        struct.pack_into("<Q", data, offset, value(layout, offset) if callable(value) else value)
    return patch


def _cut(at: Callable[[Layout], int]) -> Callable[[bytearray, Layout], None]:
    return lambda data, layout: data.__delitem__(slice(at(layout), None))


def _rename(old: str, new: str) -> Callable[[bytearray, Layout], None]:
    """Give key or tensor `old` the name `new` (same length)."""
    def patch(data: bytearray, layout: Layout) -> None:
        start = (layout.keys.get(old) or layout.tensors[old]) + 8
        data[start:start + len(old)] = new.encode()
    return patch


def _q4_k_tensor(layout: Layout) -> str:
    return next(name for name, kind in layout.tensor_types.items() if kind == GGMLQuantizationType.Q4_K)


def _last_tensor(layout: Layout) -> str:
    return list(layout.tensors)[-1]


ARCH = "general.architecture"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPES = "tokenizer.ggml.token_type"
EMBEDDING = "token_embd.weight"

# name -> (patch of the clean file's bytes, what the refusal must say); `g` is the clean file's Layout
GGUF_LIES = {
    "tensor count 2^60": (_u64(lambda g: 8, HUGE), "tensors and 26 keys, more than"),
    "key count 2^60": (_u64(lambda g: 16, HUGE), "keys, more than"),
    "tensor count 2^32": (_u64(lambda g: 8, 1 << 32), "more than its"),
    "key count one too many": (_u64(lambda g: 16, 27), "(truncated or a lying length)"),
    "tensor count one too many": (_u64(lambda g: 8, 22), "runs past the end of the file"),
    "key name length 2^60": (_u64(lambda g: 24, HUGE), f"key 0 name at byte 32 needs {HUGE:,} bytes"),
    "string value length 2^60": (_u64(lambda g: g.key_value(ARCH), HUGE), f"key '{ARCH}' at byte"),
    "string value one byte past the end": (_u64(lambda g: g.key_value(ARCH), lambda g, at: g.size - at - 8 + 1),
                                           "truncated or a lying length"),
    "array length 2^60": (_u64(lambda g: g.key_value(TOKENS) + 4, HUGE), f"key '{TOKENS}': {HUGE:,} strings cannot fit"),
    "array item length 2^60": (_u64(lambda g: g.key_value(TOKENS) + 12, HUGE), f"key '{TOKENS}' item 0 at byte"),
    "numeric array length 2^60": (_u64(lambda g: g.key_value(TOKEN_TYPES) + 4, HUGE),
                                  f"key '{TOKEN_TYPES}' ({HUGE:,} items)"),
    "array of arrays": (_u32(lambda g: g.key_value(TOKENS), 9), f"key '{TOKENS}': an array of arrays"),
    "unknown value type": (_u32(lambda g: g.keys[ARCH] + 8 + len(ARCH), 99), f"key '{ARCH}': unknown value type 99"),
    "key name not UTF-8": (lambda data, g: data.__setitem__(g.keys[ARCH] + 8, 0xFF), "key 0 name is not UTF-8"),
    "duplicate tensor name": (_rename("blk.0.attn_k.weight", "blk.0.attn_q.weight"), "Found duplicated tensor"),
    "alignment not a power of two": (_rename("general.file_type", "general.alignment"),
                                     "general.alignment must be a uint32 power of two"),
    "alignment zero": (lambda data, g: (_rename("general.file_type", "general.alignment")(data, g),
                                        struct.pack_into("<I", data, g.key_value("general.file_type"), 0)),
                       "general.alignment must be a uint32 power of two"),
    "tensor name length 2^60": (_u64(lambda g: g.tensors[EMBEDDING], HUGE), "tensor 0 name at byte"),
    "tensor dimensions 2^31": (_u32(lambda g: g.tensor_field(EMBEDDING, "n_dims"), 1 << 31),
                               f"tensor '{EMBEDDING}': 2,147,483,648 dimensions, at most 4"),
    "tensor of five dimensions": (_u32(lambda g: g.tensor_field(EMBEDDING, "n_dims"), 5), "5 dimensions, at most 4"),
    "tensor shape 2^40 x 2^40": (lambda data, g: struct.pack_into("<QQ", data, g.tensor_field(EMBEDDING, "dims"),
                                                                  1 << 40, 1 << 40), "runs past the end of the file"),
    "tensor rows beyond the file": (_u64(lambda g: g.tensor_field(EMBEDDING, "dims") + 8, 1 << 20),
                                    f"tensor '{EMBEDDING}': data at bytes"),
    "tensor type 99": (_u32(lambda g: g.tensor_field(EMBEDDING, "type"), 99), "unknown GGML type 99"),
    "tensor type 2^31": (_u32(lambda g: g.tensor_field(EMBEDDING, "type"), 1 << 31), "unknown GGML type"),
    "row not a whole number of blocks": (lambda data, g: struct.pack_into(
        "<Q", data, g.tensor_field(_q4_k_tensor(g), "dims"), 100), "not a multiple of its type's 256-value blocks"),
    "tensor offset 2^60": (lambda data, g: struct.pack_into("<Q", data, g.tensor_field(EMBEDDING, "offset"), HUGE),
                           "runs past the end of the file"),
    "last tensor offset one block past the end": (lambda data, g: struct.pack_into(
        "<Q", data, g.tensor_field(_last_tensor(g), "offset"), g.size - g.data_offset), "runs past the end"),
    "bad magic": (lambda data, g: data.__setitem__(slice(0, 4), b"FUGG"), "magic b'FUGG', not a GGUF file"),
    "version 99": (_u32(lambda g: 4, 99), "GGUF version 99"),
    "version 1": (_u32(lambda g: 4, 1), "GGUF version 1"),
    # truncated at every region boundary (and inside each region)
    "empty file": (_cut(lambda g: 0), "0 bytes, shorter than the 24-byte GGUF header"),
    "cut inside the magic": (_cut(lambda g: 3), "3 bytes, shorter than"),
    "cut after the version": (_cut(lambda g: 8), "8 bytes, shorter than"),
    "cut after the tensor count": (_cut(lambda g: 16), "16 bytes, shorter than"),
    "cut after the counts": (_cut(lambda g: 24), "more than its 24 bytes can hold"),
    "cut inside the first key": (_cut(lambda g: 30), "more than its 30 bytes can hold"),
    "cut inside the token array": (_cut(lambda g: g.key_value(TOKENS) + 200), f"key '{TOKENS}'"),
    "cut after the keys": (_cut(lambda g: g.tensors[EMBEDDING]), "tensor 0 name length at byte"),
    "cut inside the tensor infos": (_cut(lambda g: g.tensor_field(EMBEDDING, "offset") + 3),
                                    f"tensor '{EMBEDDING}' offset"),
    "cut after the tensor infos": (_cut(lambda g: g.infos_end), "runs past the end"),
    "cut at the data": (_cut(lambda g: g.data_offset), "runs past the end"),
    "cut inside the data": (_cut(lambda g: (g.data_offset + g.size) // 2), "runs past the end"),
    "cut one byte short": (_cut(lambda g: g.size - 1), "runs past the end"),
}


@pytest.fixture(params=list(GGUF_LIES))
def lying_gguf(request, carded, layout, tmp_path) -> tuple[Path, str]:
    """(path, what the refusal must say) of a copy of the release GGUF whose header lies."""
    patch, says = GGUF_LIES[request.param]
    clean = _release_gguf(carded)
    data = bytearray(clean.read_bytes())
    patch(data, layout)
    path = tmp_path / clean.name
    path.write_bytes(bytes(data))
    return path, says


def test_parity_refuses_a_lying_gguf_header_naming_the_file(carded, tiny_tokens_dir, lying_gguf):
    path, says = lying_gguf
    outcome = run_cli("parity", carded / "ckpt" / "best.apr", path, "--tokens", tiny_tokens_dir,
                      "--n-tokens", "256", "--ctx", "64", "--engine", "torch")
    line = assert_refused(outcome, "release", names=str(path), exit_codes=(1,))
    assert says in line


def test_gates_fail_the_gguf_gate_of_a_lying_header_naming_the_file(run_dir, lying_gguf):
    path, says = lying_gguf
    shutil.copy(path, _release_gguf(run_dir))
    outcome = run_cli("gates", run_dir)
    assert_refused(outcome, "release", names="release.gguf.Q4_K_M", exit_codes=(1,))
    detail = next(line for line in outcome.stdout.splitlines() if line.startswith("FAILED release.gguf.Q4_K_M"))
    assert f"release/gguf/{path.name}: header does not parse" in detail and says in detail
