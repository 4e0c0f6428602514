"""PARITY gates, read from parity.json: it measured this checkpoint and the released GGUFs under
the gates' contract, with the required engines; each engine's checks, the engine agreement, the
tensor diagnosis and the tokenizer; one `parity.file.<name>` line per scored or unscored released
GGUF; and `quantize.imatrix_calibration`, that an imatrix behind a released GGUF never saw the
val split parity scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shipkit.errors import ShipkitError
from shipkit.evidence import DISCHARGED, FAIL, FAILED, PARTIAL, PASS, SKIPPED
from shipkit.fsutil import sha256_file
from shipkit.gates.view import PARITY, Gate, RunView, ref, released_ggufs
from shipkit.layout import RunDir

# Per verdict of a parity check group: what it makes of the gate.
VERDICT_STATUS = {PASS: DISCHARGED, FAIL: FAILED, SKIPPED: PARTIAL}


def parity_gates(view: RunView) -> list[Gate]:
    parity = view.parity.data
    if parity is None:
        detail = view.parity.problem or f"{PARITY} not found: run `shipkit parity CKPT GGUF --run-dir RUN_DIR`"
        return [Gate("parity.evidence", "PARITY", FAILED, detail)]
    released = {path: sha256_file(path) for path in released_ggufs(view.files)}
    gates = [_parity_measured_release(view, parity, released), _parity_contract(view, parity)]
    for engine in parity["contract"]["required_engines"]:
        ran = engine in parity["engines"]
        gates.append(Gate(f"parity.engine.{engine}", "PARITY", DISCHARGED if ran else FAILED,
                          "ran" if ran else "required by the contract but not run",
                          [ref(PARITY, "contract.required_engines", parity["contract"]["required_engines"])]))
    for engine, section in sorted(parity["engines"].items()):
        for metric, check in sorted(section["checks"].items()):
            gates.append(_parity_check(f"parity.{engine}.{metric}", f"engines.{engine}.checks.{metric}", check))
    agreement = parity["agreement"]
    status = VERDICT_STATUS[agreement["verdict"]]
    gates.append(Gate("parity.agreement", "PARITY", status, agreement["side"] or agreement["note"],
                      [ref(PARITY, "agreement.verdict", agreement["verdict"]),
                       *(ref(PARITY, f"agreement.metrics.{m}", c["value"]) for m, c in agreement["checks"].items())]))
    tensors = parity["tensors"]
    worst = tensors["worst"][0] if tensors["worst"] else None
    gates.append(Gate("parity.tensors", "PARITY", DISCHARGED if tensors["verdict"] == PASS else FAILED,
                      "; ".join(entry["cause"] for entry in tensors["flagged"]) or "every tensor within rel_rmse",
                      [ref(PARITY, "tensors.worst[0]", worst)]))
    gates.append(_parity_tokenizer(parity["tokenizer"]))
    gates += _parity_file_gates(view, parity, released)
    imatrix = _imatrix_calibration(view, parity, released)
    return gates + ([imatrix] if imatrix is not None else [])


def _parity_tokenizer(tokenizer: dict[str, Any]) -> Gate:
    """llama.cpp reading the GGUF tokenizes the val text, adds BOS/EOS and renders the chat
    template as the HF tokenizer does."""
    status = VERDICT_STATUS[tokenizer["verdict"]]
    if tokenizer["verdict"] == SKIPPED:
        return Gate("parity.tokenizer", "PARITY", status, tokenizer["note"],
                    [ref(PARITY, "tokenizer.verdict", SKIPPED)])
    documents = tokenizer["documents"]
    detail = (f"{documents['documents_compared'] - documents['documents_differing']}/"
              f"{documents['documents_compared']} val documents tokenized alike "
              f"(pre-tokenizer {tokenizer['pre']!r}), BOS/EOS {tokenizer['special_tokens']['verdict']}, "
              f"chat template {tokenizer['chat_template']['verdict']}")
    first = documents["first_difference"]
    if first is not None:
        detail += f"; first difference in document {first['document']} at token {first['position']}: {first['text']!r}"
    chat = tokenizer["chat_template"]
    if chat["verdict"] == FAIL or chat.get("builtin_first_difference") is not None:
        detail += f"; chat template: {chat['note']}"
    return Gate("parity.tokenizer", "PARITY", status, detail,
                [ref(PARITY, "tokenizer.verdict", tokenizer["verdict"]),
                 ref(PARITY, "tokenizer.documents.documents_differing", documents["documents_differing"])])


def _parity_check(gate_id: str, field_name: str, check: dict[str, Any]) -> Gate:
    sign = "<=" if check["direction"] == "max" else ">="
    value = "n/a" if check["value"] is None else f"{check['value']:.6g}"
    return Gate(gate_id, "PARITY", DISCHARGED if check["verdict"] == PASS else FAILED,
                f"{value} {sign} {check['limit']:g}: {check['reason']}",
                [ref(PARITY, f"{field_name}.value", check["value"])])


def _parity_measured_release(view: RunView, parity: dict[str, Any], released: dict[Path, str]) -> Gate:
    """Parity measured this checkpoint and one of the released GGUF files, not other bytes."""
    evidence = [ref(PARITY, "base.sha256", parity["base"]["sha256"]),
                ref(PARITY, "quant.sha256", parity["quant"]["sha256"])]
    problems = []
    if view.checkpoint_problem is None and sha256_file(view.run_dir / view.checkpoint) != parity["base"]["sha256"]:
        problems.append(f"its base is not {view.checkpoint}")
    if released and parity["quant"]["sha256"] not in released.values():
        problems.append(f"its GGUF is none of {RunDir.RELEASE_GGUF}/*.gguf")
    if problems:
        return Gate("parity.measured_release", "PARITY", FAILED, "; ".join(problems) + ": re-run `shipkit parity`",
                    evidence)
    if not released:
        return Gate("parity.measured_release", "PARITY", PARTIAL,
                    f"the checkpoint matches; {RunDir.RELEASE_GGUF} holds no GGUF yet", evidence)
    return Gate("parity.measured_release", "PARITY", DISCHARGED, "the checkpoint and a released GGUF", evidence)


def _parity_file_gates(view: RunView, parity: dict[str, Any], released: dict[Path, str]) -> list[Gate]:
    """`parity.file.<name>`: one line per file of a run over several files, FAILED when the file
    failed under its band; and every released GGUF must have been measured, so a released model
    file parity did not score is a FAILED line of its own (a released imatrix is not a model)."""
    gates = {}
    for index, entry in enumerate(parity.get("files", [])):
        gates[entry["name"]] = _parity_file(index, entry)
    measured = {parity["quant"]["sha256"], *(entry["sha256"] for entry in parity.get("files", []))}
    for path, sha256 in released.items():
        if sha256 in measured or _is_imatrix(path):
            continue
        relative = view.files.relative(path)
        gates[path.name] = Gate(f"parity.file.{path.name}", "PARITY", FAILED,
                                f"{relative} is released but parity did not measure these bytes: run `shipkit "
                                f"parity CKPT {RunDir.RELEASE_GGUF}/*.gguf --run-dir RUN_DIR`",
                                [ref(relative, "sha256", sha256)])
    return list(gates.values())


def _parity_file(index: int, entry: dict[str, Any]) -> Gate:
    metrics, field_name = entry["metrics"] or {}, f"files[{index}]"

    def shown(metric: str, fmt: str) -> str:
        value = metrics.get(metric)
        return "n/a" if value is None else format(value, fmt)

    detail = (f"{entry['file_type']}, {entry['bits_per_weight']:.2f} bpw, imatrix {'yes' if entry['imatrix'] else 'no'}: "
              f"KL mean {shown('kl_mean', '.3g')}, same-top {shown('same_top_pct', '.2f')}%, PPL ratio "
              f"{shown('ppl_ratio', '.5f')} under band {entry['band']['name']}")
    if entry["failed"]:
        detail += f"; failed {', '.join(entry['failed'])}"
    return Gate(f"parity.file.{entry['name']}", "PARITY", DISCHARGED if entry["verdict"] == PASS else FAILED, detail,
                [ref(PARITY, f"{field_name}.verdict", entry["verdict"]), ref(PARITY, f"{field_name}.sha256", entry["sha256"])])


def _is_imatrix(path: Path) -> bool:
    """Whether a .gguf holds an importance matrix (general.type "imatrix"), not a model."""
    from shipkit.imatrix.format import IMATRIX_TYPE
    from shipkit.quantize.gguf_load import open_gguf

    try:
        field = open_gguf(path).fields.get("general.type")
    except ShipkitError:
        return False  # not readable: the release gates report it; here it stays an unmeasured model
    return field is not None and field.contents() == IMATRIX_TYPE


def _made_with(record: dict[str, Any], matrix: Any) -> bool:
    """Whether a GGUF's llama-quantize keys describe `matrix`: the same entry count, and its dataset
    name (which llama-quantize cuts to 127 bytes) the start of the matrix's first."""
    dataset = matrix.datasets[0] if matrix.datasets else None
    same_dataset = (record["dataset"] is None and dataset is None) or (
        record["dataset"] is not None and dataset is not None and dataset.encode().startswith(record["dataset"].encode()))
    return same_dataset and record["entries"] in (None, len(matrix.importance))


def _imatrix_calibration(view: RunView, parity: dict[str, Any], released: dict[Path, str]) -> Gate | None:
    """`quantize.imatrix_calibration`: an imatrix behind a released GGUF was computed off the val
    split the parity gate scores. Read from each GGUF's llama-quantize keys (its dataset names the
    calibration split by hash) and from the imatrix file released beside it (its calibration
    record); absent when no released file was made with an imatrix."""
    from shipkit.imatrix import load_imatrix
    from shipkit.imatrix.format import split_sha256
    from shipkit.parity.gguf_facts import dataset_split, imatrix_keys
    from shipkit.quantize.gguf_load import open_gguf
    from shipkit.tokenize import read_manifest

    used = {}
    for path in released:
        try:
            record = imatrix_keys(open_gguf(path))
        except ShipkitError:
            continue  # an unreadable GGUF fails its release gate
        if record is not None:
            used[path] = record
    if not used:
        return None
    gate_id, tokens_dir = "quantize.imatrix_calibration", Path(parity["tokens"]["tokens_dir"])
    evidence = [ref(view.files.relative(path), "quantize.imatrix.dataset", record["dataset"])
                for path, record in used.items()]
    try:
        val_sha256 = split_sha256(read_manifest(tokens_dir), "val")
    except ShipkitError as error:
        return Gate(gate_id, "PARITY", PARTIAL, f"the val split parity scored cannot be read: {error}", evidence)
    failures, unconfirmed = [], []
    for path, record in used.items():
        relative, split = view.files.relative(path), dataset_split(record["dataset"])
        if split is not None and (split[0] != "train" or split[1] == val_sha256):
            failures.append(f"{relative}: its imatrix dataset {record['dataset']!r} is not the train split")
            continue
        beside = path.parent / record["file"] if record["file"] else None
        if beside is None or not beside.is_file():
            (unconfirmed if split is not None else failures).append(
                f"{relative}: its imatrix {record['file']!r} is not released beside it"
                + ("" if split is not None else ", and its dataset does not name a split"))
            continue
        try:
            matrix = load_imatrix(beside)
            matrix.check_not_val(tokens_dir)
        except ShipkitError as error:
            failures.append(str(error))
            continue
        if not _made_with(record, matrix):
            failures.append(f"{relative}: {view.files.relative(beside)} is not the imatrix it was made with "
                            f"(dataset or entry count differs)")
    if failures:
        return Gate(gate_id, "PARITY", FAILED, "; ".join(failures), evidence)
    if unconfirmed:
        return Gate(gate_id, "PARITY", PARTIAL, "the datasets name the train split, but " + "; ".join(unconfirmed),
                    evidence)
    return Gate(gate_id, "PARITY", DISCHARGED,
                f"{len(used)} released file(s) made with an imatrix computed on the train split, not the val split "
                f"parity scored (sha256 {val_sha256[:12]}…)", evidence)


def _parity_contract(view: RunView, parity: dict[str, Any]) -> Gate:
    measured_under = parity["contract"]["name"]
    evidence = [ref(PARITY, "contract.name", measured_under)]
    if measured_under != view.contract.name:
        return Gate("parity.contract", "PARITY", FAILED,
                    f"parity ran under contract {measured_under!r}, the gates under {view.contract.name!r}: "
                    "re-run `shipkit parity --contract`", evidence)
    return Gate("parity.contract", "PARITY", DISCHARGED, f"measured under contract {measured_under!r}", evidence)
