"""GGUF export: llama.cpp loads our files, computes the same logits and tokens, and its own
quantizer produces exactly our bytes; load_gguf_model reads them back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from quant_helpers import gguf_tensors, llama_cpp_quantize, write_random_checkpoint
from tokenizers import Tokenizer

from shipkit.cli import main
from shipkit.config import ModelConfig
from shipkit.errors import IntegrityError
from shipkit.model import CausalLM
from shipkit.quantize import load_gguf_model, write_gguf

llama_cpp = pytest.importorskip("llama_cpp")

TINY_VOCAB = 2048  # conftest's TINY_VOCAB_SIZE
LLAMA_8_LAYERS = ModelConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=256,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
# Rows of 160 and 320 weights: no K-quant fits, every tensor takes llama.cpp's fallback type.
LLAMA_ODD_WIDTH_TIED = ModelConfig(vocab_size=TINY_VOCAB, hidden_size=160, intermediate_size=320,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
QWEN2_TIED = ModelConfig(architecture="qwen2", vocab_size=TINY_VOCAB, hidden_size=256,
                         intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, tie_word_embeddings=True)
PROMPT = 'def load(path):\n    """Read a JSON file."""\n    with open(path) as handle:\n'
TRICKY_STRINGS = [
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά",
    "emoji 🤖🚀 and 👩‍👩‍👧 family, flags 🇫🇷",
    "tabs\tand\t\ttabs\n\n\nnewlines\r\n",
    "long      whitespace        runs            end   ",
    "    indented = {'a': [1, 2, 3]}  # comment\n\tif x != y: return x ** 2",
    "numbers 1234567890 3.14159 1e-10 0xdeadbeef",
    "it's we're they'll I'd you've SHE'S",
    "   leading and trailing   ",
]


@pytest.fixture(scope="module")
def run_dir(tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("quant") / "run"
    (run / "ckpt").mkdir(parents=True)
    shutil.copy(tiny_tokens_dir / "tokenizer.json", run / "tokenizer.json")
    return run


@pytest.fixture(scope="module")
def llama_ckpt(run_dir: Path) -> tuple[Path, torch.nn.Module]:
    path = run_dir / "ckpt" / "llama.apr"
    return path, write_random_checkpoint(path, LLAMA_8_LAYERS)


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    model = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=128, verbose=False)
    model.eval(ids)
    return np.array(model.scores[:len(ids)])


def prompt_ids(run_dir: Path) -> list[int]:
    return Tokenizer.from_file(str(run_dir / "tokenizer.json")).encode(PROMPT).ids


@pytest.mark.parametrize("file_type", ["F32", "F16"])
def test_llama_cpp_logits_match_torch_model_of_the_file(llama_ckpt, run_dir: Path,
                                                        tmp_path: Path, file_type: str) -> None:
    gguf_path = write_gguf(llama_ckpt[0], tmp_path / "model.gguf", file_type).path
    config, weights = load_gguf_model(gguf_path)  # F16: the weights as rounded in the file
    model = CausalLM(config)
    model.load_weights(weights)
    ids = prompt_ids(run_dir)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    error = np.abs(llama_cpp_logits(gguf_path, ids) - expected).max() / np.abs(expected).max()
    assert error <= 1e-3


def test_qwen2_logits_match_torch_model(run_dir: Path, tmp_path: Path) -> None:
    model = write_random_checkpoint(run_dir / "ckpt" / "qwen2.apr", QWEN2_TIED, seed=1)
    gguf_path = write_gguf(run_dir / "ckpt" / "qwen2.apr", tmp_path / "q.gguf", "F32").path
    ids = prompt_ids(run_dir)
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0].numpy()
    error = np.abs(llama_cpp_logits(gguf_path, ids) - expected).max() / np.abs(expected).max()
    assert error <= 1e-3


def test_llama_cpp_tokenizes_tricky_strings_like_tokenizers(llama_ckpt, run_dir: Path,
                                                            tmp_path: Path) -> None:
    gguf_path = write_gguf(llama_ckpt[0], tmp_path / "model.gguf", "Q8_0").path
    model = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    for text in TRICKY_STRINGS:
        assert model.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text).ids, text


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_K_S", "Q6_K", "Q8_0", "F16"])
def test_every_tensor_bit_identical_to_llama_cpp_quantize(llama_ckpt, tmp_path: Path,
                                                         file_type: str) -> None:
    path = llama_ckpt[0]
    f32 = write_gguf(path, tmp_path / "f32.gguf", "F32").path
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", file_type)
    ours = write_gguf(path, tmp_path / "ours.gguf", file_type).path
    assert gguf_tensors(ours) == gguf_tensors(tmp_path / "theirs.gguf")


@pytest.mark.parametrize("config", [LLAMA_ODD_WIDTH_TIED, QWEN2_TIED], ids=["odd-width", "qwen2"])
def test_fallback_and_tied_models_bit_identical_to_llama_cpp(config: ModelConfig, run_dir: Path,
                                                             tmp_path: Path) -> None:
    path = run_dir / "ckpt" / f"{config.architecture}-{config.hidden_size}.apr"
    write_random_checkpoint(path, config, seed=2)
    f32 = write_gguf(path, tmp_path / "f32.gguf", "F32").path
    llama_cpp_quantize(f32, tmp_path / "theirs.gguf", "Q4_K_M")
    assert gguf_tensors(write_gguf(path, tmp_path / "ours.gguf", "Q4_K_M").path) == \
        gguf_tensors(tmp_path / "theirs.gguf")


def test_q4_k_m_mix_gives_tied_embedding_q6_k_and_no_output(run_dir: Path, tmp_path: Path) -> None:
    path = run_dir / "ckpt" / "qwen2.apr"
    write_random_checkpoint(path, QWEN2_TIED, seed=1)
    tensors = gguf_tensors(write_gguf(path, tmp_path / "m.gguf", "Q4_K_M").path)
    assert tensors["token_embd.weight"][0] == "Q6_K" and "output.weight" not in tensors


def test_load_gguf_model_round_trips_f32_exactly(llama_ckpt, tmp_path: Path) -> None:
    path, model = llama_ckpt
    config, weights = load_gguf_model(write_gguf(path, tmp_path / "m.gguf", "F32").path)
    assert config == LLAMA_8_LAYERS
    original = model.weights()
    assert weights.keys() == original.keys()
    assert all(torch.equal(weights[name], original[name]) for name in original)


def test_load_gguf_model_q4_k_m_weights_stay_close(llama_ckpt, tmp_path: Path) -> None:
    path, model = llama_ckpt
    _, weights = load_gguf_model(write_gguf(path, tmp_path / "m.gguf", "Q4_K_M").path)
    original = model.weights()["model.layers.3.self_attn.q_proj.weight"]
    restored = weights["model.layers.3.self_attn.q_proj.weight"]
    assert (restored - original).norm() < 0.15 * original.norm()


def test_cli_names_the_file_in_an_output_folder(llama_ckpt, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["quantize", str(llama_ckpt[0]), "--q4k", "--out",
                                       str(tmp_path / "gguf"), "--name", "Tiny"])
    assert result.exit_code == 0, result.output
    size = sum(t.numel() for t in llama_ckpt[1].weights().values())
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [f"Tiny-{size / 1e6:.1f}M-Q4_K_M.gguf"]


def test_cli_nan_weight_names_the_tensor_and_exits_1(run_dir: Path, tmp_path: Path) -> None:
    path = run_dir / "ckpt" / "nan.apr"
    model = write_random_checkpoint(path, QWEN2_TIED)
    weights = model.weights()
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    from shipkit.apr import read_apr, write_apr
    write_apr(path, weights, read_apr(path).metadata)
    result = CliRunner().invoke(main, ["quantize", str(path), "--type", "Q8_0", "--out",
                                       str(tmp_path / "x.gguf")])
    assert result.exit_code == 1
    assert "model.layers.1.mlp.up_proj.weight" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_write_gguf_rejects_nan_with_integrity_error(run_dir: Path, tmp_path: Path) -> None:
    path = run_dir / "ckpt" / "nan2.apr"
    model = write_random_checkpoint(path, QWEN2_TIED)
    weights = model.weights()
    weights["model.norm.weight"][0] = float("nan")
    from shipkit.apr import read_apr, write_apr
    write_apr(path, weights, read_apr(path).metadata)
    with pytest.raises(IntegrityError, match="model.norm.weight"):
        write_gguf(path, tmp_path / "x.gguf", "F32")


def test_cli_unknown_type_is_a_usage_error(llama_ckpt, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["quantize", str(llama_ckpt[0]), "--type", "Q3_K",
                                       "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2
