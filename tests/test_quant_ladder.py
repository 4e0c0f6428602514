"""The quant ladder: every file type, with and without an importance matrix and with llama.cpp's
output/embedding type overrides, written tensor for tensor as llama.cpp's own `llama-quantize`
writes it from the same F32 GGUF (and the same imatrix file, made by `llama-imatrix`)."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from llama_tools import run_tool
from quant_helpers import gguf_tensors, write_random_checkpoint
from tokenizer_helpers import held_out_documents

from shipkit.cli import main
from shipkit.config import ModelConfig
from shipkit.quantize import load_gguf_model, write_gguf
from shipkit.quantize.mix import FILE_TYPES, Mix, ModelShape

TINY_VOCAB = 2048  # conftest's TINY_VOCAB_SIZE
MODELS = {
    # 16 layers: use_more_bits' pattern and Q3_K_M's first-sixteenth ffn_down rule both show;
    # 4 heads per KV head: Q2_K's and IQ4's GQA rules for attn_v apply.
    "llama": ModelConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=1),
    # ffn_down rows of 320 weights: no 256-weight block fits, each K-quant/IQ4_XS falls back;
    # the tied embedding takes the output head's rules; 2 heads per KV head.
    "qwen2": ModelConfig(architecture="qwen2", vocab_size=TINY_VOCAB, hidden_size=256,
                         intermediate_size=320, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True),
    # Rows of 160 (not a 256 multiple: output head Q8_0) and 336 (not even a 32 multiple: F16).
    "odd-width": ModelConfig(vocab_size=TINY_VOCAB, hidden_size=160, intermediate_size=336,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
LADDER = list(FILE_TYPES)
IMATRIX_CONTEXT = 128  # tokens per llama-imatrix chunk
IMATRIX_CHUNKS = 6
# (file type, --output-tensor-type, --token-embedding-type): the `_L` files publishers ship (Q8_0
# head and embedding), a bigger head only, an embedding of its own type, and overrides in files
# whose other tensors are not quantized or are IQ4.
# The types whose fallbacks and narrow-row rules differ: every one of them meets the qwen2 and
# odd-width shapes with an imatrix too (the full ladder runs on those shapes without one, and on
# the llama shape with and without), which keeps the suite's share of llama-quantize runs small.
FALLBACK_TYPES = ["Q2_K", "Q3_K_M", "Q4_0", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K"]
CASES = ([("llama", name, imatrix) for name in LADDER for imatrix in (False, True)]
         + [("qwen2", name, False) for name in LADDER]
         + [(model, name, True) for model in ("qwen2", "odd-width") for name in FALLBACK_TYPES]
         + [("odd-width", name, False) for name in FALLBACK_TYPES])
OVERRIDES = [("Q4_K_M", "Q8_0", "Q8_0"), ("Q5_K_M", "Q8_0", "Q8_0"), ("Q4_K_M", "Q6_K", None),
             ("Q2_K", None, "Q4_K"), ("F16", "Q8_0", "Q8_0"), ("IQ4_XS", "BF16", "Q5_0")]

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model name -> folder with ckpt/model.apr, tokenizer.json, f32.gguf and imatrix.gguf
    (llama-imatrix's, on held-out stdlib code, output head included)."""
    root = tmp_path_factory.mktemp("ladder")
    text = root / "calibration.txt"
    text.write_text("\n".join(held_out_documents()))
    folders = {}
    for seed, (name, config) in enumerate(MODELS.items()):
        folder = root / name
        (folder / "ckpt").mkdir(parents=True)
        shutil.copy(tiny_tokens_dir / "tokenizer.json", folder / "tokenizer.json")
        write_random_checkpoint(folder / "ckpt" / "model.apr", config, seed=seed)
        write_gguf(folder / "ckpt" / "model.apr", folder / "f32.gguf", "F32")
        run_tool("llama-imatrix", "-m", folder / "f32.gguf", "-f", text, "-o", folder / "imatrix.gguf",
                 "-c", IMATRIX_CONTEXT, "--chunks", IMATRIX_CHUNKS, "--process-output", "--no-ppl",
                 "-t", 2)
        folders[name] = folder
    return folders


def llama_quantize(folder: Path, out_name: str, file_type: str, *, imatrix: bool = False,
                   output_type: str | None = None, embedding_type: str | None = None) -> Path:
    """llama-quantize [--imatrix imatrix.gguf] [--output-tensor-type T] [--token-embedding-type T]
    f32.gguf OUT TYPE, run in `folder` so that it records the imatrix by its file name."""
    options = ["--imatrix", "imatrix.gguf"] if imatrix else []
    options += ["--output-tensor-type", output_type] if output_type else []
    options += ["--token-embedding-type", embedding_type] if embedding_type else []
    run_tool("llama-quantize", *options, "f32.gguf", out_name, file_type, 2, cwd=folder)
    return folder / out_name


def shipkit_quantize(folder: Path, out_name: str, file_type: str, *, imatrix: bool = False,
                     output_type: str | None = None, embedding_type: str | None = None) -> Path:
    return write_gguf(folder / "ckpt" / "model.apr", folder / out_name, file_type,
                      imatrix=folder / "imatrix.gguf" if imatrix else None,
                      output_tensor_type=output_type, token_embedding_type=embedding_type).path


def gguf_keys(path: Path) -> dict[str, object]:
    """Every metadata key of a GGUF with its value (the header's own fields left out)."""
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()
            if not name.startswith("GGUF.")}


@pytest.mark.parametrize("model,file_type,imatrix", CASES,
                         ids=[f"{m}-{t}-{'imatrix' if i else 'plain'}" for m, t, i in CASES])
def test_every_tensor_bit_identical_to_llama_quantize(models, model: str, file_type: str,
                                                      imatrix: bool) -> None:
    folder = models[model]
    theirs = llama_quantize(folder, f"theirs-{file_type}.gguf", file_type, imatrix=imatrix)
    ours = shipkit_quantize(folder, f"ours-{file_type}.gguf", file_type, imatrix=imatrix)
    assert gguf_tensors(ours) == gguf_tensors(theirs)
    assert gguf_keys(ours) == gguf_keys(theirs)  # general.file_type and the quantize.imatrix.* keys


@pytest.mark.parametrize("file_type,output_type,embedding_type", OVERRIDES)
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_output_and_embedding_overrides_bit_identical_to_llama_quantize(
        models, model: str, file_type: str, output_type: str | None, embedding_type: str | None) -> None:
    folder = models[model]  # qwen2's tied embedding is the output head: the output type reaches it
    overrides = {"output_type": output_type, "embedding_type": embedding_type}
    theirs = llama_quantize(folder, "theirs-l.gguf", file_type, imatrix=True, **overrides)
    ours = shipkit_quantize(folder, "ours-l.gguf", file_type, imatrix=True, **overrides)
    assert gguf_tensors(ours) == gguf_tensors(theirs)


def test_q4_k_l_gives_q8_0_head_and_embedding(models) -> None:
    tensors = gguf_tensors(shipkit_quantize(models["llama"], "l.gguf", "Q4_K_M", output_type="Q8_0",
                                            embedding_type="Q8_0"))
    assert tensors["output.weight"][0] == tensors["token_embd.weight"][0] == "Q8_0"
    assert tensors["blk.0.ffn_down.weight"][0] == "Q6_K" and tensors["blk.1.attn_q.weight"][0] == "Q4_K"


@pytest.mark.parametrize("file_type", LADDER)
def test_load_gguf_model_reads_every_ladder_type_back(models, file_type: str) -> None:
    folder = models["llama"]
    config, weights = load_gguf_model(shipkit_quantize(folder, f"load-{file_type}.gguf", file_type))
    assert config == MODELS["llama"]
    _, original = load_gguf_model(folder / "f32.gguf")
    for name, values in original.items():
        error = (weights[name] - values).norm() / values.norm()
        assert error < 0.5, f"{name}: relative error {error:.3f} in {file_type}"


def test_result_records_the_imatrix_file(models) -> None:
    folder = models["llama"]
    result = write_gguf(folder / "ckpt" / "model.apr", folder / "record.gguf", "Q4_K_S",
                        imatrix=folder / "imatrix.gguf")
    record = result.to_dict()["imatrix"]
    assert record["file"] == "imatrix.gguf"
    assert record["sha256"] == hashlib.sha256((folder / "imatrix.gguf").read_bytes()).hexdigest()
    assert record["chunks"] == IMATRIX_CHUNKS


def test_cli_quantize_with_imatrix_and_overrides(models) -> None:
    folder = models["qwen2"]
    result = CliRunner().invoke(main, ["quantize", str(folder / "ckpt" / "model.apr"), "--type", "q3_k_m",
                                       "--imatrix", str(folder / "imatrix.gguf"), "--output-tensor-type",
                                       "q8_0", "--out", str(folder / "cli.gguf")])
    assert result.exit_code == 0, result.output
    assert "Q3_K_M" in result.output and "imatrix imatrix.gguf" in result.output
    assert gguf_tensors(folder / "cli.gguf")["token_embd.weight"][0] == "Q8_0"


@pytest.mark.parametrize("flaw", ["other-names", "other-widths", "truncated"])
def test_cli_refuses_a_bad_imatrix_in_one_line(models, tmp_path: Path, flaw: str) -> None:
    checkpoint, bad = models["qwen2"] / "ckpt" / "model.apr", models["llama"] / "imatrix.gguf"
    if flaw == "other-widths":  # the qwen2's names, ffn_down rows of 256 where its matrix has 320
        checkpoint = tmp_path / "ckpt" / "narrow.apr"
        write_random_checkpoint(checkpoint, dataclasses.replace(MODELS["qwen2"], intermediate_size=256))
        shutil.copy(models["qwen2"] / "tokenizer.json", tmp_path / "tokenizer.json")
        bad = models["qwen2"] / "imatrix.gguf"
    elif flaw == "truncated":
        bad = tmp_path / "truncated.gguf"
        data = (models["qwen2"] / "imatrix.gguf").read_bytes()
        bad.write_bytes(data[:len(data) // 2])
    result = CliRunner().invoke(main, ["quantize", str(checkpoint), "--type", "Q4_K_M", "--imatrix", str(bad),
                                       "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert bad.name in result.output and (flaw == "truncated" or "blk." in result.output), result.output
    assert not (tmp_path / "x.gguf").exists()


def test_override_type_that_does_not_fit_is_refused(models, tmp_path: Path) -> None:
    folder = models["odd-width"]  # rows of 160 weights: no 256-weight block fits the head
    result = CliRunner().invoke(main, ["quantize", str(folder / "ckpt" / "model.apr"), "--type", "Q4_K_M",
                                       "--output-tensor-type", "Q6_K", "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "output.weight" in result.output, result.output


def test_imatrix_changes_the_bytes(models) -> None:
    """The importance matrix reaches the quantizer (the bit-identity tests would also pass if
    both tools ignored it)."""
    folder = models["llama"]
    plain = gguf_tensors(shipkit_quantize(folder, "plain.gguf", "Q4_K_M"))
    weighted = gguf_tensors(shipkit_quantize(folder, "weighted.gguf", "Q4_K_M", imatrix=True))
    assert plain["blk.1.attn_q.weight"] != weighted["blk.1.attn_q.weight"]
    assert plain["token_embd.weight"] == weighted["token_embd.weight"]  # no matmul input: no entry


@pytest.mark.parametrize("file_type", ["Q3_K_S", "Q4_K_M"])
def test_a_70b_layout_gets_llama_quantize_attn_v_types(tiny_tokens_dir: Path, tmp_path: Path,
                                                       file_type: str) -> None:
    """80 layers with grouped KV heads is llama.cpp's LLM_TYPE_70B, whose Q3_K/Q4_K attn_v become
    Q5_K (types only: the mix against llama-quantize's choice, no shipkit quantization)."""
    config = ModelConfig(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=80, num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "ckpt").mkdir()
    shutil.copy(tiny_tokens_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    write_random_checkpoint(tmp_path / "ckpt" / "model.apr", config)
    write_gguf(tmp_path / "ckpt" / "model.apr", tmp_path / "f32.gguf", "F32")
    theirs = llama_quantize(tmp_path, "theirs.gguf", file_type)
    chosen = {tensor.name: Mix(FILE_TYPES[file_type]).tensor_type(
        tensor.name, tuple(int(size) for size in reversed(tensor.shape)), ModelShape.of(config)).name
        for tensor in gguf.GGUFReader(theirs).tensors}
    assert chosen == {name: qtype for name, (qtype, _) in gguf_tensors(theirs).items()}
    assert chosen["blk.11.attn_v.weight"] == "Q5_K"  # not a more-bits layer of Q4_K_M
