"""RELEASE gates: the card's license agrees with the upstream model and the contract, a GGUF of
each contract quant type for the checkpoint's architecture is in release/gguf, and release/hf
holds what transformers needs."""

from __future__ import annotations

import json

from shipkit.errors import ShipkitError
from shipkit.evidence import DISCHARGED, FAILED
from shipkit.gates.view import Gate, RunView, card_front_matter, ref, released_ggufs
from shipkit.layout import RunDir

UNKNOWN_LICENSE = "unknown"  # what `shipkit import` records when the upstream names none


def release_gates(view: RunView) -> list[Gate]:
    gates = [_license(view)]
    quants = view.contract.release.quants
    for name in quants.value if quants else ():
        gates.append(_gguf_gate(view, name, quants.reason))
    gates.append(_hf_folder(view))
    return gates


def _license(view: RunView) -> Gate:
    data, problem = card_front_matter(view.files.card)
    if data is None:
        return Gate("release.license", "RELEASE", FAILED, f"{RunDir.CARD}: {problem}")
    license_id = data.get("license")
    evidence = [ref(RunDir.CARD, "license", license_id)]
    upstream = (view.source or {}).get("license")
    if upstream is not None:
        evidence.append(ref(view.checkpoint, "producer.source.license", upstream))
    allowed = view.contract.release.licenses
    if not license_id or license_id == UNKNOWN_LICENSE:
        return Gate("release.license", "RELEASE", FAILED, "no license: pass `shipkit card --license ID`", evidence)
    if upstream not in (None, UNKNOWN_LICENSE) and upstream != license_id:
        return Gate("release.license", "RELEASE", FAILED,
                    f"the upstream model is {upstream}, the card says {license_id}", evidence)
    if allowed is not None and license_id not in allowed.value:
        return Gate("release.license", "RELEASE", FAILED,
                    f"{license_id} not in {list(allowed.value)}: {allowed.reason}", evidence)
    return Gate("release.license", "RELEASE", DISCHARGED, f"{license_id}", evidence)


def _gguf_gate(view: RunView, file_type: str, reason: str) -> Gate:
    """A GGUF in release/gguf whose header parses and declares `file_type` and the checkpoint's
    architecture."""
    from shipkit.quantize import mix
    from shipkit.quantize.gguf_load import open_gguf
    from shipkit.quantize.tensor_names import GGUF_ARCHITECTURES

    gate_id = f"release.gguf.{file_type}"
    wanted = int(mix.file_type(file_type).ftype)
    architecture = (view.metadata or {}).get("config", {}).get("architecture")
    architecture = GGUF_ARCHITECTURES.get(architecture, architecture)  # mistral runs as llama
    seen = []
    for path in released_ggufs(view.files):
        relative = view.files.relative(path)
        try:
            reader = open_gguf(path)
            found_type = int(reader.fields["general.file_type"].contents())
            found_arch = reader.fields["general.architecture"].contents()
        except (ShipkitError, LookupError, TypeError, ValueError) as error:  # a lying header, a missing or mistyped key
            seen.append(f"{relative}: header does not parse ({error})")
            continue
        evidence = [ref(relative, "general.file_type", found_type), ref(relative, "general.architecture", found_arch)]
        if found_type == wanted and found_arch == architecture:
            return Gate(gate_id, "RELEASE", DISCHARGED, f"{relative}: {reason}", evidence)
        seen.append(f"{relative}: file_type {found_type}, {found_arch}")
    found = "; ".join(seen) or f"{RunDir.RELEASE_GGUF} holds no .gguf"
    return Gate(gate_id, "RELEASE", FAILED,
                f"no {file_type} GGUF (file_type {wanted}) of a {architecture} model: {found}; "
                f"run `shipkit quantize CKPT --q4k --out {RunDir.RELEASE_GGUF}/`", [])


def _hf_folder(view: RunView) -> Gate:
    """release/hf holds the files transformers needs, config.json names the checkpoint's
    architecture, and the safetensors hold as many tensors as the checkpoint."""
    from safetensors import safe_open

    folder = view.files.release_hf
    required = view.contract.release.hf_files
    names = required.value if required else ()
    missing = [name for name in names if not (folder / name).is_file()]
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not weights:
        missing.append("*.safetensors")
    if missing:
        return Gate("release.hf", "RELEASE", FAILED,
                    f"{RunDir.RELEASE_HF} lacks {missing}: run `shipkit export CKPT --hf {RunDir.RELEASE_HF}`")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = 0
        for path in weights:
            with safe_open(str(path), framework="pt") as handle:
                tensors += len(list(handle.keys()))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        return Gate("release.hf", "RELEASE", FAILED, f"{RunDir.RELEASE_HF} does not load: {error}")
    evidence = [ref(f"{RunDir.RELEASE_HF}/config.json", "model_type", config.get("model_type")),
                ref(f"{RunDir.RELEASE_HF}/*.safetensors", "tensors", tensors)]
    architecture = (view.metadata or {}).get("config", {}).get("architecture")
    problems = []
    if config.get("model_type") != architecture:
        problems.append(f"config.json model_type {config.get('model_type')!r}, checkpoint {architecture!r}")
    if view.tensor_shapes and tensors != len(view.tensor_shapes):
        problems.append(f"{tensors} safetensors tensors, checkpoint {len(view.tensor_shapes)}")
    if problems:
        return Gate("release.hf", "RELEASE", FAILED, "; ".join(problems) + ": re-run `shipkit export`", evidence)
    return Gate("release.hf", "RELEASE", DISCHARGED,
                f"{len(weights)} safetensors file(s) and {', '.join(names) or 'no other required file'}", evidence)
