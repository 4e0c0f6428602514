"""Model families beyond Llama/Qwen2 (Qwen3, Mistral, Llama 3.x RoPE scaling, head_dim apart from
hidden/heads): tiny random transformers models imported, run in torch and llama.cpp, quantized
byte for byte like llama.cpp, read back from GGUF, exported back to transformers; and the one-line
refusals of what shipkit does not run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_helpers import save_tiny_hf_model

from shipkit.apr import read_apr
from shipkit.config import ModelConfig, parameter_count
from shipkit.errors import InputError
from shipkit.hf_import import import_hf
from shipkit.model import CausalLM

# Small enough that the factors change some frequencies of a 32-wide head and not others:
# wavelengths below 32/4 = 8 are kept, above 32/1 divided by 8, those between blended.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# family and save_tiny_hf_model keywords of each case. 4 heads of 64 != hidden 96 makes o_proj's
# rows 256 wide (k-quants) while the other rows fall back; Mistral at 256 quantizes Q/K as K-quants.
CASES = {
    "qwen3": ("qwen3", {"hidden": 96, "head_dim": 64}),
    "mistral": ("mistral", {"hidden": 256}),
    "llama3-rope": ("llama", {"hidden": 128, "rope_scaling": LLAMA3_ROPE}),
    "llama-head-dim": ("llama", {"hidden": 96, "head_dim": 64}),
}
IDS = [(37 * position + 5) % 280 for position in range(96)]  # past original_max_position_embeddings
TORCH_REL_TOLERANCE = 1e-4
LLAMA_CPP_REL_TOLERANCE = 1e-3


@dataclass
class Imported:
    family: str
    hf_model: torch.nn.Module
    hf_dir: Path
    apr_path: Path
    expected: np.ndarray  # transformers' logits on IDS, (T, vocab)


@pytest.fixture(scope="module", params=list(CASES))
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    family, keywords = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_hf_model(root / "hf", family, unit_norms=True, **keywords)
    report = import_hf(root / "hf", root / "out" / "model.apr")
    with torch.no_grad():
        expected = hf_model(torch.tensor([IDS])).logits[0].numpy()
    return Imported(family, hf_model, root / "hf", report.apr_path, expected)


def relative_error(found: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(found - expected).max() / np.abs(expected).max())


def shipkit_logits(config: ModelConfig, weights: dict[str, torch.Tensor]) -> np.ndarray:
    model = CausalLM(config)
    model.load_weights(weights)
    with torch.no_grad():
        return model.eval()(torch.tensor([IDS]))[0].numpy()


def test_import_gives_the_logits_of_transformers(imported: Imported) -> None:
    checkpoint = read_apr(imported.apr_path)
    assert checkpoint.config.architecture == imported.family
    logits = shipkit_logits(checkpoint.config, checkpoint.tensors)
    assert relative_error(logits, imported.expected) <= TORCH_REL_TOLERANCE


def test_parameter_count_is_the_stored_weights(imported: Imported) -> None:
    checkpoint = read_apr(imported.apr_path)
    assert parameter_count(checkpoint.config) == sum(t.numel() for t in checkpoint.tensors.values())


def test_f32_gguf_runs_in_llama_cpp_with_the_logits_of_transformers(imported: Imported,
                                                                    tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from shipkit.quantize import write_gguf

    f32 = write_gguf(imported.apr_path, tmp_path / "f32.gguf", "F32").path
    runtime = llama_cpp.Llama(str(f32), logits_all=True, n_ctx=128, n_threads=1, verbose=False)
    runtime.eval(IDS)
    found = np.array(runtime.scores[: len(IDS)])
    assert relative_error(found, imported.expected) <= LLAMA_CPP_REL_TOLERANCE


def test_q4_k_m_tensors_bit_identical_to_llama_cpp(imported: Imported, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from quant_helpers import gguf_tensors, llama_cpp_quantize

    from shipkit.quantize import write_gguf

    f32 = write_gguf(imported.apr_path, tmp_path / "f32.gguf", "F32").path
    ours = write_gguf(imported.apr_path, tmp_path / "ours.gguf", "Q4_K_M").path
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", "Q4_K_M")
    assert gguf_tensors(ours) == gguf_tensors(tmp_path / "theirs.gguf")


def test_load_gguf_model_reads_back_the_config_and_weights(imported: Imported, tmp_path: Path) -> None:
    from shipkit.quantize import load_gguf_model, write_gguf

    checkpoint = read_apr(imported.apr_path)
    config, weights = load_gguf_model(write_gguf(imported.apr_path, tmp_path / "m.gguf", "F32").path)
    assert config == checkpoint.config
    assert weights.keys() == checkpoint.tensors.keys()
    assert all(torch.equal(weights[name], checkpoint.tensors[name]) for name in weights)


def test_export_loads_in_transformers_with_the_same_logits(imported: Imported, tmp_path: Path) -> None:
    import transformers

    from shipkit.export import export_hf

    export_hf(imported.apr_path, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["architectures"] == imported.hf_model.config.architectures
    assert written["model_type"] == imported.family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = reloaded(torch.tensor([IDS])).logits[0].numpy()
    assert relative_error(logits, imported.expected) <= TORCH_REL_TOLERANCE


def test_gguf_architecture_and_family_keys(imported: Imported, tmp_path: Path) -> None:
    from shipkit.quantize import write_gguf

    reader = gguf.GGUFReader(write_gguf(imported.apr_path, tmp_path / "m.gguf", "F32").path)
    arch = reader.get_field("general.architecture").contents()
    config = read_apr(imported.apr_path).config
    assert arch == {"qwen3": "qwen3", "mistral": "llama", "llama": "llama"}[imported.family]
    assert reader.get_field(f"{arch}.rope.dimension_count").contents() == config.head_dim
    key_length = reader.get_field(f"{arch}.attention.key_length")
    apart = config.head_dim != config.hidden_size // config.num_attention_heads
    assert (key_length.contents() if key_length else None) == (config.head_dim if apart else None)
    names = {tensor.name for tensor in reader.tensors}
    assert ("blk.0.attn_q_norm.weight" in names) == (imported.family == "qwen3")


def test_llama3_rope_freqs_hold_kept_blended_and_divided_frequencies(tmp_path: Path) -> None:
    from shipkit.quantize import write_gguf

    save_tiny_hf_model(tmp_path / "hf", "llama", hidden=128, rope_scaling=LLAMA3_ROPE)
    apr_path = import_hf(tmp_path / "hf", tmp_path / "out" / "model.apr").apr_path
    reader = gguf.GGUFReader(write_gguf(apr_path, tmp_path / "m.gguf", "F32").path)
    rope_freqs = next(tensor for tensor in reader.tensors if tensor.name == "rope_freqs.weight")
    factors = np.asarray(rope_freqs.data)
    assert gguf.GGMLQuantizationType(rope_freqs.tensor_type).name == "F32"
    assert factors.shape == (128 // 4 // 2,)
    assert factors[0] == 1.0 and factors[-1] == 8.0
    assert ((factors > 1.0) & (factors < 8.0)).any()


def test_old_config_dict_without_the_new_fields_still_loads() -> None:
    old = ModelConfig(hidden_size=256, num_attention_heads=4).to_dict()
    del old["head_dim"], old["rope_scaling"]
    config = ModelConfig.from_dict(old)
    assert (config.head_dim, config.rope_scaling) == (64, None)


# ---------------------------------------------------------------------------------------------
# Refusals: one line, naming config.json and the field


def _edited_folder(tmp_path: Path, family: str, **fields) -> Path:
    save_tiny_hf_model(tmp_path / "hf", family)
    config_path = tmp_path / "hf" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | fields))
    return tmp_path / "hf"


def _refusal(folder: Path, tmp_path: Path) -> str:
    with pytest.raises(InputError) as error:
        import_hf(folder, tmp_path / "out" / "model.apr")
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("family", "fields", "named"), [
    ("mistral", {"num_local_experts": 8, "num_experts_per_tok": 2}, "field num_local_experts"),
    ("qwen2", {"num_experts": 4}, "field num_experts"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "field use_sliding_window"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "field layer_types"),
    ("mistral", {"sliding_window": 32}, "field sliding_window"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},
     "field rope_parameters.rope_type: 'yarn'"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "field rope_scaling.rope_type: 'linear'"),
    ("qwen3", {"attention_bias": True}, "field attention_bias"),
    ("llama", {"model_type": "gemma"}, "field model_type: 'gemma' is not supported"),
], ids=["moe-mixtral", "moe-qwen", "qwen2-window", "qwen3-layer-types", "mistral-window", "yarn",
        "linear-v4", "qwen3-bias", "gemma"])
def test_import_refuses_in_one_line_naming_the_field(tmp_path: Path, family: str, fields: dict,
                                                     named: str) -> None:
    message = _refusal(_edited_folder(tmp_path, family, **fields), tmp_path)
    assert "config.json" in message and named in message


def test_mistral_window_as_long_as_the_context_is_accepted(tmp_path: Path) -> None:
    folder = _edited_folder(tmp_path, "mistral", sliding_window=128)  # = max_position_embeddings
    assert import_hf(folder, tmp_path / "out" / "model.apr").architecture == "mistral"


def test_sentencepiece_only_folder_is_refused_naming_the_tokenizer(tmp_path: Path) -> None:
    folder = _edited_folder(tmp_path, "llama")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x00")
    message = _refusal(folder, tmp_path)
    assert "tokenizer.json" in message and "SentencePiece" in message


def test_weights_that_do_not_fit_head_dim_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    folder = _edited_folder(tmp_path, "qwen3", head_dim=32)  # the weights hold heads of 128
    message = _refusal(folder, tmp_path)
    assert "self_attn" in message and "has shape" in message and "head_dim" in message
