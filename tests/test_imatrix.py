"""`shipkit imatrix` and `load_imatrix`: values against a direct torch computation, the file
against llama.cpp's own llama-quantize and llama-imatrix, and bad files refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hostile import assert_refused, run_cli
from llama_tools import run_tool
from quant_helpers import ggml_quantize_rows
from tokenizers import Tokenizer
from torch import nn

from shipkit.apr import read_apr
from shipkit.errors import InputError
from shipkit.imatrix import calibration_chunks, collect, compute_imatrix, load_imatrix
from shipkit.imatrix.format import (
    CHUNK_COUNT_KEY,
    CHUNK_SIZE_KEY,
    DATASETS_KEY,
    IMATRIX_TYPE,
)
from shipkit.model import CausalLM
from shipkit.quantize import write_gguf
from shipkit.quantize.tensor_names import gguf_name
from shipkit.tokenize import HEADER

SUITE = "imatrix"
CTX = 128
N_TOKENS = 16_384  # 128 chunks: a few seconds on the tiny model
DECODER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Per-column means of shipkit's imatrix against llama-imatrix's on the same tokens. They differ by
# llama.cpp summing each column token by token in float32 (shipkit sums in float64) and by its
# attention (flash attention with an F16 KV cache by default); measured on the tiny model: at most
# 4.0e-4 relative, median 7e-6 (docs/imatrix.md, "Agreement with llama-imatrix").
AGREEMENT_RTOL = 1e-3


@pytest.fixture(scope="module")
def checkpoint(tiny_run_dir: Path) -> Path:
    return tiny_run_dir / "ckpt" / "best.apr"


@pytest.fixture(scope="module")
def imatrix_file(checkpoint: Path, tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    outcome = run_cli("imatrix", checkpoint, "--tokens", tiny_tokens_dir, "--n-tokens", N_TOKENS,
                      "--ctx", CTX, "--out", out)
    assert outcome.exit_code == 0, outcome.stderr
    return out


@pytest.fixture(scope="module")
def f32_gguf(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(checkpoint, tmp_path_factory.mktemp("f32") / "model-F32.gguf", "F32").path


def train_tokens_from_disk(tokens_dir: Path, count: int) -> np.ndarray:
    """The first `count` tokens of the train split, read straight from the shard files."""
    manifest = json.loads((tokens_dir / "manifest.json").read_text())
    pieces, wanted = [], count
    for shard in manifest["splits"]["train"]["shards"]:
        tokens = np.fromfile(tokens_dir / shard["file"], dtype=manifest["dtype"], offset=HEADER.size)
        pieces.append(tokens[:wanted].astype(np.int64))
        wanted -= len(pieces[-1])
    return np.concatenate(pieces)


def direct_column_sums(checkpoint: Path, chunks: np.ndarray) -> dict[str, np.ndarray]:
    """The whole CausalLM in one forward, a hook on every decoder nn.Linear summing its squared
    input in float64: what the stage must equal, computed without it."""
    apr = read_apr(checkpoint)
    model = CausalLM(apr.config)
    model.load_weights({name: tensor.float() for name, tensor in apr.tensors.items()})
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def add(_module, inputs, _output) -> None:
            sums[name] = sums.get(name, 0) + inputs[0].double().square().sum(dim=(0, 1))
        return add

    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module_name.startswith("model.layers."):
            module.register_forward_hook(hook(gguf_name(module_name + ".weight")))
    with torch.no_grad():
        model(torch.from_numpy(chunks))
    return {name: total.numpy() for name, total in sums.items()}


def split_hash(tokens_dir: Path, split: str) -> str:
    manifest = json.loads((tokens_dir / "manifest.json").read_text())
    listing = "".join(shard["sha256"] + "\n" for shard in manifest["splits"][split]["shards"])
    return hashlib.sha256(listing.encode()).hexdigest()


# --- the values and the calibration record -------------------------------------------------------


def test_imatrix_equals_direct_torch_column_sums(imatrix_file: Path, checkpoint: Path,
                                                 tiny_tokens_dir: Path) -> None:
    chunks = train_tokens_from_disk(tiny_tokens_dir, N_TOKENS).reshape(-1, CTX)
    expected = direct_column_sums(checkpoint, chunks)
    matrix = load_imatrix(imatrix_file)
    layers = read_apr(checkpoint).config.num_hidden_layers
    assert sorted(matrix.importance) == sorted(f"blk.{i}.{m}.weight" for i in range(layers) for m in DECODER_MATRICES)
    for name, sums in expected.items():
        np.testing.assert_allclose(matrix.importance[name], sums / N_TOKENS, rtol=1e-5, err_msg=name)


def test_groups_of_chunks_sum_like_one_pass(checkpoint: Path, tiny_tokens_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    apr = read_apr(checkpoint)
    chunks = torch.from_numpy(train_tokens_from_disk(tiny_tokens_dir, 4096).reshape(-1, CTX))
    whole = collect.column_sums(apr.config, apr.tensors, chunks, torch.device("cpu"))
    monkeypatch.setattr(collect, "GROUP_TOKENS", 5 * CTX)  # 7 groups, the last one short
    monkeypatch.setattr(collect, "BATCH_TOKENS", 2 * CTX)
    for name, sums in collect.column_sums(apr.config, apr.tensors, chunks, torch.device("cpu")).items():
        np.testing.assert_allclose(sums, whole[name], rtol=1e-6, err_msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_imatrix(imatrix_file: Path, checkpoint: Path, tiny_tokens_dir: Path,
                                    tmp_path: Path) -> None:
    result = compute_imatrix(checkpoint, tiny_tokens_dir, tmp_path / "cuda.gguf", n_tokens=N_TOKENS, ctx=CTX,
                             device="cuda")
    cpu, cuda = load_imatrix(imatrix_file), load_imatrix(result.path)
    assert cuda.calibration == cpu.calibration
    for name, importance in cpu.importance.items():
        np.testing.assert_allclose(cuda.importance[name], importance, rtol=1e-5, err_msg=name)


def test_calibration_record_names_the_train_tokens_and_both_splits(imatrix_file: Path,
                                                                   tiny_tokens_dir: Path) -> None:
    matrix = load_imatrix(imatrix_file)
    calibration = matrix.calibration
    tokens = train_tokens_from_disk(tiny_tokens_dir, N_TOKENS)
    assert calibration["split"] == "train" and calibration["bos_id"] is None
    assert (calibration["tokens"], calibration["chunks"], calibration["ctx"]) == (N_TOKENS, N_TOKENS // CTX, CTX)
    assert calibration["tokens_sha256"] == hashlib.sha256(tokens.astype("<u4").tobytes()).hexdigest()
    assert calibration["split_sha256"] == calibration["train_sha256"] == split_hash(tiny_tokens_dir, "train")
    assert calibration["val_sha256"] == split_hash(tiny_tokens_dir, "val") != calibration["train_sha256"]
    manifest_bytes = (tiny_tokens_dir / "manifest.json").read_bytes()
    assert calibration["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert (matrix.chunk_count, matrix.chunk_size) == (N_TOKENS // CTX, CTX)
    assert matrix.datasets == [f"shipkit-tokens train sha256:{calibration['train_sha256']}"]
    assert json.loads(imatrix_file.with_suffix(".json").read_text())["calibration"] == calibration
    matrix.check_not_val(tiny_tokens_dir)


def test_imatrix_computed_on_the_val_split_is_refused(checkpoint: Path, tiny_tokens_dir: Path,
                                                      tmp_path: Path) -> None:
    swapped = tmp_path / "swapped-tokens"  # a folder whose "train" split is the real val split
    shutil.copytree(tiny_tokens_dir, swapped)
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["splits"]["train"], manifest["splits"]["val"] = manifest["splits"]["val"], manifest["splits"]["train"]
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    result = compute_imatrix(checkpoint, swapped, tmp_path / "val.gguf", n_tokens=2048, ctx=CTX)
    matrix = load_imatrix(result.path)
    with pytest.raises(InputError, match="computed on the val split") as refused:
        matrix.check_not_val(tiny_tokens_dir)
    assert "\n" not in str(refused.value) and str(result.path) in str(refused.value)


def test_chunks_start_with_bos_where_the_tokenizer_adds_one(tiny_tokens_dir: Path) -> None:
    manifest = json.loads((tiny_tokens_dir / "manifest.json").read_text())
    chunks = calibration_chunks(tiny_tokens_dir, manifest, 1000, 100, bos_id=7)
    stream = train_tokens_from_disk(tiny_tokens_dir, 1000)
    assert chunks.shape == (10, 100) and (chunks[:, 0] == 7).all()
    assert (chunks[:, 1:] == stream.reshape(10, 100)[:, 1:]).all()


# --- llama.cpp reads it, and computes the same -----------------------------------------------------


def assert_llama_quantize_used(matrix, f32_gguf: Path, tmp_path: Path) -> None:
    """llama-quantize --imatrix wrote every tensor the imatrix covers as ggml quantizes it with
    `matrix.importance`: the arrays are the ones llama-quantize handed to ggml."""
    quantized = tmp_path / "q4_k_m.gguf"
    output = run_tool("llama-quantize", "--imatrix", matrix.path, f32_gguf, quantized, "Q4_K_M", "2")
    assert f"loaded {len(matrix.importance)} importance matrix entries" in output
    source = {tensor.name: np.asarray(tensor.data) for tensor in gguf.GGUFReader(f32_gguf).tensors}
    compared = 0
    for tensor in gguf.GGUFReader(quantized).tensors:
        if tensor.name in matrix.importance:
            mine = ggml_quantize_rows(source[tensor.name], tensor.tensor_type, matrix.importance[tensor.name])
            assert mine == np.asarray(tensor.data).tobytes(), tensor.name
            compared += 1
    assert compared == len(matrix.importance)


def test_llama_quantize_uses_exactly_the_loaded_importance(imatrix_file: Path, f32_gguf: Path,
                                                           tmp_path: Path) -> None:
    assert_llama_quantize_used(load_imatrix(imatrix_file), f32_gguf, tmp_path)


def test_zero_and_fractional_counts_read_as_llama_quantize_reads_them(imatrix_file: Path, f32_gguf: Path,
                                                                      tmp_path: Path) -> None:
    tensors = imatrix_tensors(imatrix_file)
    tensors[Q + ".counts"][:] = 0  # no data: every column weighs 1
    tensors["blk.1.ffn_down.weight.counts"][:] = N_TOKENS + 0.4  # llama.cpp rounds the count (lround)
    matrix = load_imatrix(write_imatrix_gguf(tmp_path / "counts.gguf", tensors))
    assert (matrix.importance[Q] == 1).all()
    np.testing.assert_array_equal(matrix.importance["blk.1.ffn_down.weight"],
                                  tensors["blk.1.ffn_down.weight.in_sum2"][0] / np.float32(N_TOKENS))
    assert_llama_quantize_used(matrix, f32_gguf, tmp_path)


def llama_imatrix_on_the_same_tokens(f32_gguf: Path, tokens_dir: Path, out: Path) -> str:
    """llama-imatrix over the calibration tokens, handed to it as text: the train split decoded
    up to the first document start past N_TOKENS (llama.cpp tokenizes that text back into exactly
    these tokens: checked), `--chunks` stopping it at the same chunk count."""
    import llama_cpp

    manifest = json.loads((tokens_dir / "manifest.json").read_text())
    stream = train_tokens_from_disk(tokens_dir, manifest["splits"]["train"]["tokens"])
    starts = np.flatnonzero(stream == manifest["eot_id"])
    end = int(starts[np.searchsorted(starts, N_TOKENS)])
    text = Tokenizer.from_file(str(tokens_dir / "tokenizer.json")).decode(stream[:end].tolist(),
                                                                          skip_special_tokens=False)
    vocab = llama_cpp.Llama(str(f32_gguf), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == stream[:end].tolist()
    prompt = out.with_suffix(".txt")
    prompt.write_bytes(text.encode())
    return run_tool("llama-imatrix", "-m", f32_gguf, "-bf", prompt, "--parse-special", "-c", CTX,
                    "--chunks", N_TOKENS // CTX, "--no-ppl", "-t", "2", "-o", out)


@pytest.fixture(scope="module")
def llama_imatrix_file(f32_gguf: Path, tiny_tokens_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama-imatrix") / "llama-imatrix.gguf"
    llama_imatrix_on_the_same_tokens(f32_gguf, tiny_tokens_dir, out)
    return out


def test_agrees_with_llama_imatrix_on_the_same_tokens(imatrix_file: Path, llama_imatrix_file: Path) -> None:
    ours, theirs = load_imatrix(imatrix_file), load_imatrix(llama_imatrix_file)
    assert sorted(ours.importance) == sorted(theirs.importance)
    assert theirs.calibration["tokens"] == N_TOKENS and theirs.chunk_count == N_TOKENS // CTX
    for name, importance in ours.importance.items():
        np.testing.assert_allclose(importance, theirs.importance[name], rtol=AGREEMENT_RTOL, err_msg=name)


def test_reads_llama_imatrix_legacy_dat_like_its_gguf(llama_imatrix_file: Path, f32_gguf: Path,
                                                      tmp_path: Path) -> None:
    legacy = tmp_path / "llama-imatrix.dat"
    run_tool("llama-imatrix", "-m", f32_gguf, "--in-file", llama_imatrix_file, "-c", CTX, "--output-format", "dat",
             "-o", legacy)
    from_gguf, from_dat = load_imatrix(llama_imatrix_file), load_imatrix(legacy)
    assert sorted(from_dat.importance) == sorted(from_gguf.importance)
    for name, importance in from_gguf.importance.items():
        np.testing.assert_allclose(from_dat.importance[name], importance, rtol=1e-6, err_msg=name)


def test_foreign_imatrix_cannot_prove_it_is_not_the_val_split(llama_imatrix_file: Path,
                                                              tiny_tokens_dir: Path) -> None:
    with pytest.raises(InputError, match="records no calibration split"):
        load_imatrix(llama_imatrix_file).check_not_val(tiny_tokens_dir)


# --- bad input -----------------------------------------------------------------------------------


def imatrix_tensors(path: Path) -> dict[str, np.ndarray]:
    return {tensor.name: np.array(tensor.data) for tensor in gguf.GGUFReader(path).tensors}


def write_imatrix_gguf(path: Path, tensors: dict[str, np.ndarray], *, keys: bool = True) -> Path:
    writer = gguf.GGUFWriter(path, arch="")
    if keys:
        writer.add_type(IMATRIX_TYPE)
        writer.add_array(DATASETS_KEY, ["test"])
        writer.add_uint32(CHUNK_COUNT_KEY, 1)
        writer.add_uint32(CHUNK_SIZE_KEY, CTX)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_with(checkpoint: Path, imatrix: Path, tmp_path: Path):
    return run_cli("quantize", checkpoint, "--type", "Q4_K_M", "--imatrix", imatrix, "--out", tmp_path / "q.gguf")


Q = "blk.0.attn_q.weight"


def mutated(imatrix_file: Path, change) -> dict[str, np.ndarray]:
    tensors = imatrix_tensors(imatrix_file)
    change(tensors)
    return tensors


BAD_IMATRIX_FILES = {
    "truncated": (lambda source, path: path.write_bytes(source.read_bytes()[: source.stat().st_size // 2]), None),
    "not-an-imatrix": (None, "not an importance matrix GGUF"),
    "counts-missing": (lambda source, path: write_imatrix_gguf(path, mutated(source, lambda t: t.pop(Q + ".counts"))),
                       Q + ".in_sum2 has no .counts"),
    "sums-do-not-split": (lambda source, path: write_imatrix_gguf(
        path, mutated(source, lambda t: t.update({Q + ".counts": np.ones((1, 3), np.float32)}))), Q),
    "non-finite": (lambda source, path: write_imatrix_gguf(
        path, mutated(source, lambda t: t[Q + ".in_sum2"].__setitem__((0, 5), np.nan))), Q + ".in_sum2"),
    "no-imatrix-keys": (lambda source, path: write_imatrix_gguf(path, imatrix_tensors(source), keys=False),
                        "imatrix.datasets"),
    "other-model-names": (lambda source, path: write_imatrix_gguf(path, {
        name.replace("blk.1.", "blk.7."): values for name, values in imatrix_tensors(source).items()}), "blk.7."),
    "other-model-widths": (lambda source, path: write_imatrix_gguf(path, mutated(
        source, lambda t: t.update({Q + ".in_sum2": t[Q + ".in_sum2"][:, :128].copy()}))), "128 columns"),
    "garbage": (lambda source, path: path.write_bytes(b"not an imatrix at all\n" * 10), "neither a GGUF nor"),
    "missing": (lambda source, path: None, None),
}


@pytest.mark.parametrize("case", sorted(BAD_IMATRIX_FILES))
def test_bad_imatrix_refused_by_quantize_in_one_line(case: str, imatrix_file: Path, f32_gguf: Path,
                                                     checkpoint: Path, tmp_path: Path) -> None:
    make, names = BAD_IMATRIX_FILES[case]
    bad = tmp_path / f"{case}.gguf"
    if case == "not-an-imatrix":
        shutil.copy(f32_gguf, bad)
    else:
        make(imatrix_file, bad)
    line = assert_refused(quantize_with(checkpoint, bad, tmp_path), SUITE, names=str(bad), exit_codes=(2,))
    if names is not None:
        assert names in line, line


@pytest.mark.parametrize(("options", "names"), [
    (("--ctx", "8"), "--ctx 8"),
    (("--ctx", "1024"), "--ctx 1024"),  # past the tiny preset's 512 positions
    (("--n-tokens", "64", "--ctx", "128"), "--n-tokens 64"),
    (("--n-tokens", str(1 << 25)), "--n-tokens"),
    (("--out-suffix", ".bin"), ".bin"),
])
def test_bad_imatrix_request_refused_in_one_line(options: tuple[str, ...], names: str, checkpoint: Path,
                                                 tiny_tokens_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / ("imatrix" + (options[1] if options[0] == "--out-suffix" else ".gguf"))
    extra = () if options[0] == "--out-suffix" else options
    outcome = run_cli("imatrix", checkpoint, "--tokens", tiny_tokens_dir, "--out", out, *extra)
    assert_refused(outcome, SUITE, names=names, exit_codes=(2,))
    assert not out.exists()


def test_imatrix_of_a_missing_checkpoint_is_refused(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    outcome = run_cli("imatrix", tmp_path / "none.apr", "--tokens", tiny_tokens_dir, "--out", tmp_path / "i.gguf")
    assert_refused(outcome, SUITE, names="none.apr", exit_codes=(2,))


def test_every_truncation_and_byte_flip_is_refused_or_read(imatrix_file: Path, llama_imatrix_file: Path,
                                                           f32_gguf: Path, tmp_path: Path) -> None:
    """Cut shipkit's GGUF, and llama.cpp's legacy .dat of the same kind, at spread offsets, and
    flip single bytes: each is an InputError or (a flipped value byte) a file that still reads."""
    legacy = tmp_path / "legacy.dat"
    run_tool("llama-imatrix", "-m", f32_gguf, "--in-file", llama_imatrix_file, "-c", CTX, "--output-format", "dat",
             "-o", legacy)
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad"
    for source in (imatrix_file, legacy):
        data = source.read_bytes()
        for cut in np.unique(np.linspace(0, len(data) - 1, 60).astype(int)):
            bad.write_bytes(data[:cut])
            if source == legacy and _legacy_entries_end(data) <= cut:
                continue  # the legacy trailer is optional, llama.cpp reads a file cut before it
            with pytest.raises(InputError, match=str(bad)):
                load_imatrix(bad)
        for offset in rng.integers(0, len(data), 60):
            flipped = bytearray(data)
            flipped[offset] ^= 0xFF
            bad.write_bytes(bytes(flipped))
            try:
                load_imatrix(bad)
            except InputError as error:
                assert "\n" not in str(error) and str(bad) in str(error)


def _legacy_entries_end(data: bytes) -> int:
    """Where a legacy .dat's entries end (its optional trailer starts)."""
    offset, entries = 4, int.from_bytes(data[:4], "little")
    for _ in range(entries):
        offset += 4 + int.from_bytes(data[offset:offset + 4], "little") + 4  # name length, name, ncall
        offset += 4 + 4 * int.from_bytes(data[offset:offset + 4], "little")  # nval, values
    return offset
