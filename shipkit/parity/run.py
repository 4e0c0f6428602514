"""`run_parity`: load the base, its quantized files and the val windows, check they belong
together, measure with the engines asked for (the base model's forward is shared by every file
and by the engine agreement), run the tokenizer check on the primary file, gate, and write
`RUN_DIR/evidence/parity.json`."""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shipkit import quantize
from shipkit.config import ModelConfig
from shipkit.contract import ParityContract, Threshold, load_contract
from shipkit.device import resolve_device
from shipkit.errors import InputError
from shipkit.evidence import PARITY_EVIDENCE, write_evidence
from shipkit.layout import TOKENIZER_FILE
from shipkit.parity.diagnosis import check_same_tensors, tensor_errors
from shipkit.parity.gate import FileMeasured, Measured, parity_evidence
from shipkit.parity.gguf_facts import gguf_facts
from shipkit.parity.inputs import (
    Windows,
    at_scored_positions,
    eval_batches,
    eval_windows,
    scored_targets,
)
from shipkit.parity.llama_engine import LlamaCppEngine
from shipkit.parity.llama_runtime import LlamaCppModel
from shipkit.parity.metrics import PositionStats, agrees, position_stats
from shipkit.parity.options import LLAMA_CPP, TORCH, ParityOptions
from shipkit.parity.tokenizer import check_tokenizer, skipped_section
from shipkit.parity.torch_engine import TorchEngine, scored_logits
from shipkit.parity.weights import LoadedModel, load_model_file

# Windows the torch engine re-runs on the base GGUF to tell which side of a failed engine
# agreement is wrong; a handful suffices, a conversion bug shows on every window.
SIDE_PROBE_WINDOWS = 4
# Config fields a GGUF takes from the tokenizer's contract, not from config.json (Llama 3.1's
# config.json lists three EOS ids, its tokenizer names <|eot_id|>): they do not change the logits.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id")


def run_parity(options: ParityOptions) -> dict[str, Any]:
    """Measure, gate, and (with `run_dir`) write `RUN_DIR/evidence/parity.json`.

    Returns the evidence dict (its `verdict` is "PASS" or "FAIL"); never raises on a failed
    gate (the CLI does). Raises InputError for unusable inputs.
    """
    contract = load_contract(options.contract)
    windows = eval_windows(options.tokens_dir, options.n_tokens, options.ctx)
    base = load_model_file(options.base)
    _check_distinct(options.quants)
    quants = [load_model_file(path) for path in options.quants]
    for quant in quants:
        if quant.format != "gguf":
            raise InputError(f"{quant.path}: the quantized model must be a .gguf file")
        _check_inputs(base, quant, windows)
    with tempfile.TemporaryDirectory(prefix="shipkit-parity-") as scratch:
        measured = _measure(options, base, quants, windows, contract.parity, Path(scratch))
    if LLAMA_CPP in options.engines:
        tokenizer = check_tokenizer(quants[0].path, options.tokens_dir, base.config.to_dict(),
                                    token_budget=options.tokenizer_tokens)
    else:
        tokenizer = skipped_section("the tokenizer check reads the GGUF with llama.cpp (--engine both)")
    facts = [gguf_facts(quant.path) for quant in quants]
    evidence = parity_evidence(options, contract, base, quants, facts, windows, measured, tokenizer)
    if options.run_dir is not None:
        write_evidence(options.run_dir, PARITY_EVIDENCE, evidence)
    return evidence


def _check_distinct(paths: tuple[Path, ...]) -> None:
    """Each file once, and no two of one name: a file's name identifies its section and gate."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.name in seen:
            raise InputError(f"{path}: given twice, or a second file named {path.name} (also {seen[path.name]})")
        seen[path.name] = path


def _check_inputs(base: LoadedModel, quant: LoadedModel, windows: Windows) -> None:
    differing = _config_differences(base.config, quant.config)
    if differing:
        raise InputError(f"{quant.path}: not a quant of {base.path} (config differs in {', '.join(differing)})")
    check_same_tensors(base.weights.shapes, quant.weights.shapes)
    if base.tokenizer_sha256 and base.tokenizer_sha256 != windows.tokenizer_sha256:
        raise InputError(f"{base.path}: trained with a different tokenizer than the tokens_dir folder's")
    if int(windows.tokens.max()) >= base.config.vocab_size:
        raise InputError(f"the val tokens hold id {int(windows.tokens.max())}, beyond the model's vocab_size {base.config.vocab_size}")
    if windows.ctx > base.config.max_position_embeddings:
        raise InputError(f"ctx {windows.ctx}: exceeds the model's max_position_embeddings {base.config.max_position_embeddings}")


def _config_differences(base: ModelConfig, quant: ModelConfig) -> list[str]:
    """Fields that differ; floats are compared at float32 precision, which is what GGUF stores."""
    differing = []
    for name, value in base.to_dict().items():
        if name in TOKEN_ID_FIELDS:
            continue
        other = getattr(quant, name)
        same = math.isclose(value, other, rel_tol=1e-6) if isinstance(value, float) else value == other
        if not same:
            differing.append(name)
    return differing


def _measure(
    options: ParityOptions, base: LoadedModel, quants: list[LoadedModel], windows: Windows,
    contract: ParityContract, scratch: Path,
) -> Measured:
    """Run the engines asked for: torch over every file (one shared trunk), llama.cpp over the
    primary and over the others where the contract's `every_file_engines` names it; both share
    the base model's forward among the files, and their base logits give the engine agreement."""
    device = resolve_device(options.device)
    primary, *others = quants
    torch_engine = (TorchEngine(base, primary, device, extra_quants=others)
                    if TORCH in options.engines else None)
    llama_engine = base_gguf = None
    llama_files = [0]
    if LLAMA_CPP in options.engines:
        base_gguf = _base_gguf(base, options.tokens_dir, scratch)
        if LLAMA_CPP in contract.every_file_engines:
            llama_files = list(range(len(quants)))
        llama_engine = LlamaCppEngine(base_gguf, primary.path, windows.ctx, options.threads,
                                      extra_quants=[quants[index].path for index in llama_files[1:]])
    agreement_parts: list[PositionStats] = []
    side = None
    torch_steps = (torch_engine.steps(windows, keep_base_logits=llama_engine is not None) if torch_engine
                   else itertools.repeat(None))
    try:
        for batch, torch_base in zip(eval_batches(windows, base.config.vocab_size, device), torch_steps):
            llama_base = llama_engine.step(batch, windows) if llama_engine else None
            if torch_base is not None and llama_base is not None:
                targets = scored_targets(batch, windows).reshape(-1)
                agreement_parts.append(position_stats(torch_base, llama_base, targets))
        agreement = PositionStats.concat(agreement_parts) if agreement_parts else None
        if agreement is not None and not agrees(agreement, contract.agreement):
            probe = windows.tokens[:SIDE_PROBE_WINDOWS]
            side = _agreement_side(base, base_gguf, probe, device, llama_engine.base, contract.agreement)
    finally:
        if llama_engine:
            llama_engine.close()
    files = []
    for index, quant in enumerate(quants):
        engines = {}
        if torch_engine:
            engines[TORCH] = torch_engine.results[index]
        if llama_engine and index in llama_files:
            engines[LLAMA_CPP] = llama_engine.results[llama_files.index(index)]
        errors = torch_engine.tensor_errors[index] if torch_engine else tensor_errors(base.weights, quant.weights)
        files.append(FileMeasured(engines, errors))
    agreement_model = None if base_gguf is None else (
        str(base_gguf) if base.format == "gguf" else f"{base.path} written as an F32 GGUF")
    return Measured(files, agreement, agreement_model, side)


def _base_gguf(base: LoadedModel, tokens_dir: Path, scratch: Path) -> Path:
    """The base model as a GGUF llama.cpp can load: the file itself, or an F32 conversion."""
    if base.format == "gguf":
        return base.path
    tokenizer = Path(tokens_dir) / TOKENIZER_FILE
    out = scratch / f"{base.path.stem}-F32.gguf"
    quantize.write_gguf(base.path, out, "F32", tokenizer_path=tokenizer)
    return out


def _agreement_side(base: LoadedModel, base_gguf: Path, probe: np.ndarray, device: torch.device,
                    llama_base: LlamaCppModel, thresholds: dict[str, Threshold]) -> str:
    """Torch on the base weights and llama.cpp on the base GGUF disagree: run a few windows
    through torch on the weights read back from that GGUF to tell which side is wrong."""
    if base.format == "gguf":
        return "conversion: shipkit's GGUF reader and llama.cpp read the base GGUF differently"
    windows = Windows(tokens=probe, tokenizer_sha256="")
    targets = scored_targets(probe, windows).reshape(-1)
    reference = scored_logits(base, windows, device)
    reread_logits = scored_logits(load_model_file(base_gguf), windows, device)
    llama_logits = at_scored_positions(torch.stack([llama_base.run(window)[0] for window in probe]), windows)
    if agrees(position_stats(reference, reread_logits, targets), thresholds):
        return ("conversion: the F32 GGUF round-trips through shipkit's reader but llama.cpp reads it "
                "differently (writer and reader share a layout bug, e.g. Q/K permutation or metadata)")
    if agrees(position_stats(llama_logits, reread_logits, targets), thresholds):
        return "conversion: the GGUF writer (both runtimes read the F32 GGUF alike, and it differs from the checkpoint)"
    return "conversion: the GGUF writer and reader (shipkit reads the F32 GGUF back matching neither the checkpoint nor llama.cpp)"
