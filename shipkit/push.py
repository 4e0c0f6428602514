"""Push a release to the Hugging Face Hub: the safetensors repo and the GGUF repo, one commit each.

Before anything leaves the machine the release is checked: the parity gate passed, for every
released GGUF of a ladder (one failed file stops the whole release, both repos); the `shipkit
gates` scoreboard, evaluated afresh from the evidence on disk, passes and equals the recorded
`evidence/gates.json` (failed gates may be waived, a stale or edited record may not); the
checkpoint validates; and every file still has the size and sha256 recorded in
`evidence/release.json`. After the commits the remote tree is listed and every file's size and
sha256 (the LFS oid; the git blob id for small files) is compared with the local bytes.

The token comes from `HF_TOKEN` or the huggingface_hub login and is only ever handed to the client:
no message, report or file of ours contains it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shipkit.apr import validate_apr
from shipkit.errors import (
    GateFailed,
    HubError,
    InputError,
    IntegrityError,
    ShipkitError,
)
from shipkit.evidence import (
    FAILED,
    GATES_EVIDENCE,
    PARITY_EVIDENCE,
    PASS,
    RELEASE_EVIDENCE,
    evidence_path,
    read_evidence,
)
from shipkit.fsutil import HASH_CHUNK_BYTES, sha256_file
from shipkit.gates import evaluate_gates, recorded_contract, scoreboard_changes
from shipkit.layout import RunDir
from shipkit.release import (
    CARD_IN_REPO,
    ReleaseFile,
    manifest_files,
    model_ggufs,
    read_manifest,
    repo_entry,
)

MISSING = "MISSING"
INCOMPLETE = "INCOMPLETE"  # the parity evidence passed but did not measure every released GGUF
ROLES = ("hf", "gguf")
# The evidence push reads, relative to RUN_DIR: the parity gate, the recorded scoreboard, the manifest.
PARITY_FILE = RunDir.evidence_file(PARITY_EVIDENCE)
GATES_FILE = RunDir.evidence_file(GATES_EVIDENCE)
RELEASE_FILE = RunDir.evidence_file(RELEASE_EVIDENCE)
SHOWN_CHANGES = 3  # scoreboard changes named in a refusal; the others are counted


@dataclass
class RepoPlan:
    role: str
    repo_id: str
    files: list[ReleaseFile]
    commit_oid: str | None = None
    verified: int = 0


@dataclass
class PushReport:
    run_id: str
    evidence_sha256: str  # sha256 of evidence/release.json, named in every commit message
    commit_message: str
    gates: dict[str, str]
    waived: list[str]
    repos: list[RepoPlan]
    private: bool
    revision: str | None
    dry_run: bool
    refusals: list[ShipkitError] = field(default_factory=list)  # why the release may not be pushed

    @property
    def total_files(self) -> int:
        return sum(len(repo.files) for repo in self.repos)

    @property
    def verified_files(self) -> int:
        return sum(repo.verified for repo in self.repos)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "evidence_sha256": self.evidence_sha256,
            "commit_message": self.commit_message,
            "gates": self.gates,
            "waived": self.waived,
            "private": self.private,
            "revision": self.revision,
            "dry_run": self.dry_run,
            "repos": [{"role": repo.role, "repo_id": repo.repo_id, "commit": repo.commit_oid,
                       "verified": repo.verified, "files": [f.to_dict() for f in repo.files]}
                      for repo in self.repos],
            "verified_files": self.verified_files,
            "total_files": self.total_files,
            "refusals": [str(error) for error in self.refusals],
        }


def push_release(
    run_dir: str | Path,
    repo: str | None = None,
    *,
    gguf_repo: str | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    allow_failed_gates: bool = False,
    endpoint: str | None = None,
) -> PushReport:
    """Check the release of `run_dir`, then (unless `dry_run`) push and verify it.

    `repo` / `gguf_repo` must be the repos the card was rendered for (`shipkit card --repo`);
    None means exactly those.
    Raises GateFailed when the parity gate (evidence/parity.json; of a ladder, any released GGUF
    it failed or did not measure) or the gates scoreboard (evaluated afresh) did not pass or evidence/gates.json is missing and `allow_failed_gates`
    is False; IntegrityError, whatever the flags, when evidence/gates.json differs from the
    scoreboard evaluated now (a stale or edited record) and when the checkpoint or a release
    file fails its check; InputError for a
    missing release or a repo the card does not name, HubError for a missing or rejected token,
    a refused request or an interrupted upload (re-running resumes: uploaded objects are kept),
    and when the remote files do not match the local ones. A dry run raises none of the gate
    refusals: it returns them in `report.refusals` beside the plan.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    plans = _plan(run_dir, manifest, repo, gguf_repo)
    parity, recorded = _evidence_or_none(run_dir, PARITY_EVIDENCE), _evidence_or_none(run_dir, GATES_EVIDENCE)
    scoreboard = _rescore(run_dir, recorded, manifest["checkpoint"]["path"]) if recorded else None
    unfit = _unfit_ggufs(manifest, parity) if parity else []
    gates = {"checkpoint": _checkpoint_verdict(run_dir, manifest),
             "parity": _parity_verdict(parity, unfit),
             "scoreboard": f"{scoreboard['verdict']} ({scoreboard['summary']})" if scoreboard else MISSING}
    evidence_sha256 = sha256_file(evidence_path(run_dir, RELEASE_EVIDENCE))
    report = PushReport(
        run_id=manifest["run_id"],
        evidence_sha256=evidence_sha256,
        commit_message=f"shipkit release {manifest['run_id']} ({RELEASE_FILE} sha256 {evidence_sha256})",
        gates=gates,
        waived=[],
        repos=plans,
        private=private,
        revision=revision,
        dry_run=dry_run,
    )
    if gates["checkpoint"] != "VALID":
        report.refusals.append(IntegrityError(
            f"{manifest['checkpoint']['path']}: {gates['checkpoint']}; refusing to push"))
    if gates["parity"] != PASS:
        _failed_gate(report, "parity", PARITY_FILE + (f": {'; '.join(unfit)}" if unfit else ""), allow_failed_gates)
    if recorded is not None:
        report.refusals += _stale_refusals(run_dir, recorded, scoreboard)
    if scoreboard is None or scoreboard["verdict"] != PASS:
        _failed_gate(report, "scoreboard", f"{GATES_FILE}{_failed_gates(scoreboard)}", allow_failed_gates)
    if dry_run:
        return report
    if report.refusals:
        raise report.refusals[0]
    _push(run_dir, report, endpoint)
    return report


def _plan(run_dir: Path, manifest: dict[str, Any], repo: str | None, gguf_repo: str | None) -> list[RepoPlan]:
    wanted = {"hf": repo, "gguf": gguf_repo}
    plans = []
    for role in ROLES:
        entry = repo_entry(manifest, role)
        if entry is None:
            if wanted[role] is not None and role == "gguf":
                raise InputError(f"gguf_repo {gguf_repo}: the release has no GGUF files ({RunDir.RELEASE_GGUF}/*.gguf)")
            continue
        if wanted[role] is not None and wanted[role] != entry["repo_id"]:
            raise InputError(f"{entry['card']}: rendered for {entry['repo_id']}, not {wanted[role]} "
                             f"(re-run `shipkit card` with that repo)")
        card = run_dir / entry["card"]
        card_file = ReleaseFile(CARD_IN_REPO, entry["card"],
                                card.stat().st_size if card.is_file() else 0, entry["card_sha256"])
        files = [*manifest_files(manifest, role), card_file]
        for release_file in files:
            _check_unchanged(run_dir, release_file)
        plans.append(RepoPlan(role, entry["repo_id"], files))
    return plans


def _check_unchanged(run_dir: Path, release_file: ReleaseFile) -> None:
    path = run_dir / release_file.local
    if not path.is_file():
        raise IntegrityError(f"{path}: listed in {RELEASE_FILE} but missing")
    if sha256_file(path) != release_file.sha256:
        raise IntegrityError(f"{path}: changed since the card was rendered (sha256 differs from "
                             f"{RELEASE_FILE}); re-run `shipkit card`")


def _parity_verdict(parity: dict[str, Any] | None, unfit: list[str]) -> str:
    if parity is None:
        return MISSING
    if unfit and parity["verdict"] == PASS:
        return INCOMPLETE  # it passed, but not on every released file
    return parity["verdict"]


def _unfit_ggufs(manifest: dict[str, Any], parity: dict[str, Any]) -> list[str]:
    """Each released model GGUF that a ladder's parity run failed or did not measure: one failed
    file stops the whole release (both repos), since the card and the manifest describe the
    ladder as measured. A one-file parity run's verdict is its file's, checked by the caller."""
    if "files" not in parity:
        return []
    lines = {line["sha256"]: line for line in parity["files"]}
    unfit = []
    for gguf in model_ggufs(manifest):
        line = lines.get(gguf.sha256)
        if line is None:
            unfit.append(f"{gguf.path_in_repo} not measured")
        elif line["verdict"] != PASS:
            unfit.append(f"{gguf.path_in_repo} {line['verdict']}")
    return unfit


def _evidence_or_none(run_dir: Path, name: str) -> dict[str, Any] | None:
    return read_evidence(run_dir, name) if evidence_path(run_dir, name).is_file() else None


def _failed_gate(report: PushReport, name: str, where: str, waive: bool) -> None:
    if waive:
        report.waived.append(name)
    else:
        report.refusals.append(GateFailed(f"{name} gate: {report.gates[name]} ({where}); refusing to push "
                                          "(allow_failed_gates releases it anyway)"))


def _rescore(run_dir: Path, recorded: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The scoreboard of the released checkpoint evaluated now, under the contract the recorded
    one names."""
    contract = recorded_contract(recorded)
    try:
        return evaluate_gates(run_dir, contract=contract, checkpoint=checkpoint)
    except InputError as error:
        raise IntegrityError(f"{GATES_FILE}: its scoreboard cannot be re-evaluated ({error}); "
                             f"re-run `shipkit gates {run_dir}`") from None


def _stale_refusals(run_dir: Path, recorded: dict[str, Any], scoreboard: dict[str, Any]) -> list[ShipkitError]:
    """A refusal naming what changed when the recorded scoreboard is not the one evaluated now."""
    changes = scoreboard_changes(recorded, scoreboard)
    if not changes:
        return []
    more = f"; and {len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
    return [IntegrityError(f"{GATES_FILE} is stale or edited: {'; '.join(changes[:SHOWN_CHANGES])}{more}; "
                           f"re-run `shipkit gates {run_dir}` and look at what changed")]


def _failed_gates(scoreboard: dict[str, Any] | None) -> str:
    failed = [gate["id"] for gate in scoreboard["gates"] if gate["status"] == FAILED] if scoreboard else []
    return f", re-evaluated now; FAILED: {', '.join(failed)}" if failed else ""


def _checkpoint_verdict(run_dir: Path, manifest: dict[str, Any]) -> str:
    path = run_dir / manifest["checkpoint"]["path"]
    if not path.is_file():
        return MISSING
    report = validate_apr(path)
    if not report.ok:
        return f"INVALID ({report.problems[0]})"
    if sha256_file(path) != manifest["checkpoint"]["sha256"]:
        return "CHANGED since the card was rendered"
    return "VALID"


def _push(run_dir: Path, report: PushReport, endpoint: str | None) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    # huggingface_hub reads HF_ENDPOINT once, at import; honour its value at push time.
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=token)
    with _hub_errors(token, "token check"):
        api.whoami()
    for plan in report.repos:
        with _hub_errors(token, f"{plan.repo_id}: create repo"):
            api.create_repo(plan.repo_id, private=report.private, exist_ok=True)
            if report.revision:
                api.create_branch(plan.repo_id, branch=report.revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(run_dir / f.local))
                      for f in plan.files]
        with _hub_errors(token, f"{plan.repo_id}: upload (re-run `shipkit push` to resume; files that "
                                "arrived are not sent again)"):
            info = api.create_commit(plan.repo_id, operations, commit_message=report.commit_message,
                                     revision=report.revision)
        plan.commit_oid = info.oid
        with _hub_errors(token, f"{plan.repo_id}: list files"):
            remote = {entry.path: entry for entry in api.list_repo_tree(plan.repo_id, recursive=True,
                                                                        revision=report.revision)}
        problems = _verify(run_dir, plan, remote)
        if problems:
            raise HubError(f"{plan.repo_id}: {len(problems)} remote file(s) differ from the release: "
                           + "; ".join(problems))


def _verify(run_dir: Path, plan: RepoPlan, remote: dict[str, Any]) -> list[str]:
    """Compare every planned file with its remote entry: size, and the LFS sha256 or git blob id."""
    problems = []
    for release_file in plan.files:
        entry = remote.get(release_file.path_in_repo)
        if entry is None or not hasattr(entry, "size"):
            problems.append(f"{release_file.path_in_repo}: missing")
        elif entry.size != release_file.size:
            problems.append(f"{release_file.path_in_repo}: {entry.size} bytes, expected {release_file.size}")
        elif entry.lfs is not None and entry.lfs.sha256 != release_file.sha256:
            problems.append(f"{release_file.path_in_repo}: sha256 {entry.lfs.sha256}, expected {release_file.sha256}")
        elif entry.lfs is None and entry.blob_id != git_blob_sha1(run_dir / release_file.local):
            problems.append(f"{release_file.path_in_repo}: git blob {entry.blob_id} differs from the local file")
        else:
            plan.verified += 1
    return problems


def git_blob_sha1(path: Path) -> str:
    """The id git (and the Hub's tree listing) gives a small, non-LFS file."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _hub_errors(token: str, action: str) -> Iterator[None]:
    """Turn the client's exceptions into one-line HubErrors that never contain the token."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            message = (f"{action}: the Hub rejected the token (401 Unauthorized); check HF_TOKEN or run "
                       "`hf auth login`")
        else:
            server = error.server_message or str(error).splitlines()[0]
            message = f"{action}: the Hub answered {status}: {server}"
        raise HubError(_scrub(message, token)) from None
    except (httpx2.HTTPError, OSError, RuntimeError, ValueError) as error:
        cause = error.__cause__ or error
        raise HubError(_scrub(f"{action}: {type(cause).__name__}: {cause}", token)) from None
    except Exception as error:  # anything else the client raises may quote the token too
        raise HubError(_scrub(f"{action}: unexpected {type(error).__name__}: {error}", token)) from None


def _scrub(message: str, token: str) -> str:
    return " ".join(message.replace(token, "***").split())
