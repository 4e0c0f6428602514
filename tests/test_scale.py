"""Issue 17: every stage streams, keeps the checkpoint's dtype, stays within bounded memory, and
refuses bad input in one line without leaving a partial file.

The memory tests run a stage as its own `python -m shipkit` process on a model larger than the
memory a streaming stage may take beyond its start-up, and sample the process tree's RssAnon
(anonymous memory; the page cache of mapped files is not counted)."""

from __future__ import annotations

import collections
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import safetensors
import torch
from hostile import assert_refused, run_cli
from quant_helpers import gguf_tensors, llama_cpp_quantize, write_random_checkpoint
from tokenizer_helpers import special_ids, write_family_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_scale import run_sampled  # noqa: E402  (one measure of memory, the benchmark's)

from shipkit.apr import TensorSpec, apr_writer, read_apr, validate_apr, write_apr
from shipkit.apr.convert import write_safetensors
from shipkit.config import ModelConfig, weight_shapes
from shipkit.errors import InputError
from shipkit.export import export_hf
from shipkit.hf_import import import_hf
from shipkit.model import CausalLM
from shipkit.parity import ParityOptions, run_parity
from shipkit.parity.inputs import eval_windows
from shipkit.parity.metrics import position_stats, summarize
from shipkit.parity.weights import load_model_file
from shipkit.quantize import load_gguf_model, write_gguf

SUITE = "scale"
TINY_VOCAB = 2048  # conftest's TINY_VOCAB_SIZE
QWEN2_SMALL = ModelConfig(architecture="qwen2", vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
# Larger than what a streaming stage may add to its start-up memory (STREAM_SLACK_BYTES), so a
# stage that held the model, in bf16 or float32, fails the bound: 128M parameters, 256 MB of bf16.
BIG = ModelConfig(architecture="qwen2", vocab_size=32768, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
# What streaming may add to a stage's start-up memory: a few 16 MiB chunks for import and export;
# for parity one layer of each model and the quant's LM head in float32 (~270 MB for BIG), still
# below one float32 copy of the model (512 MB).
STREAM_SLACK_BYTES = 128 << 20
PARITY_SLACK_BYTES = 400 << 20
POLL_SECONDS = 0.005
SMALL_DISK = "4m"


# ---------------------------------------------------------------- helpers and fixtures


def write_bf16_hf_folder(folder: Path, config: ModelConfig, *, shard_bytes: int = 64 << 20, seed: int = 0) -> None:
    """A qwen2-style HF folder of `config` in bf16: config.json, sharded safetensors and their
    index, a qwen2 tokenizer (smaller than the embedding, as import allows)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_family_tokenizer(folder, "qwen2")
    eot = special_ids(folder)["<|endoftext|>"]
    hf = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
          "num_key_value_heads": config.num_key_value_heads, "max_position_embeddings": config.max_position_embeddings,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": config.tie_word_embeddings,
          "bos_token_id": eot, "eos_token_id": eot, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(hf))
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, shape in weight_shapes(config).items():
        if shards[-1] and sum(t.numel() * 2 for t in shards[-1].values()) + math.prod(shape) * 2 > shard_bytes:
            shards.append({})
        values = torch.randn(shape, generator=generator) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
        shards[-1][name] = values.to(torch.bfloat16)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, {"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def peak_rss_anon(*args: str | Path, command: tuple[str, ...] = ("-m", "shipkit")) -> int:
    """Peak RssAnon (bytes) of `python -m shipkit ARGS` (or `python COMMAND ARGS`), which must succeed."""
    finished, peak = run_sampled([sys.executable, *command, *map(str, args)], POLL_SECONDS)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return peak


@pytest.fixture(scope="module")
def startup_rss() -> int:
    """A stage's start-up memory: the libraries every streaming stage loads before its first tensor
    (the CLI itself loads none of them, so `--help` is no baseline)."""
    return peak_rss_anon(command=("-c", "import torch, tokenizers, gguf, safetensors, shipkit.model"))


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big") / "hf"
    write_bf16_hf_folder(folder, BIG)
    return folder


@pytest.fixture(scope="module")
def big_apr(big_folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("big-apr") / "ckpt" / "model.apr"
    import_hf(big_folder, out)
    return out


@pytest.fixture(scope="module")
def big_tokens(big_apr: Path, tmp_path_factory) -> Path:
    """Val tokens of the stdlib's json package through BIG's tokenizer."""
    from shipkit.corpus import CorpusConfig, build_corpus
    from shipkit.tokenize import encode_corpus

    root = tmp_path_factory.mktemp("big-tokens")
    build_corpus([Path(sysconfig.get_paths()["stdlib"]) / "json"], root / "corpus", CorpusConfig(val_fraction=0.5))
    encode_corpus(root / "corpus", root / "tokens", tokenizer_path=big_apr.parent / "tokenizer.json")
    return root / "tokens"


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "hf"
    write_bf16_hf_folder(folder, QWEN2_SMALL, shard_bytes=1 << 20)
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(folder, target)
    return target


def refused_import(folder: Path, tmp_path: Path, names: str, exit_codes: tuple[int, ...] = (2,)) -> str:
    out = tmp_path / "out"
    line = assert_refused(run_cli("import", folder, "--out", out / "model.apr"), SUITE, names=names,
                          exit_codes=exit_codes)
    assert not (out / "model.apr").exists()
    return line


def leftovers(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.endswith((".tmp", ".old")))


# ---------------------------------------------------------------- the streaming APR writer


def test_streamed_apr_has_the_bytes_write_apr_gives(tmp_path: Path) -> None:
    weights = CausalLM(QWEN2_SMALL).weights()
    metadata = {"kind": "weights", "config": QWEN2_SMALL.to_dict()}
    write_apr(tmp_path / "whole.apr", weights, metadata)
    specs = [TensorSpec.of(name, tensor) for name, tensor in weights.items()]
    with apr_writer(tmp_path / "streamed.apr", specs, metadata) as writer:
        for name, tensor in weights.items():
            raw = tensor.contiguous().view(torch.uint8).numpy().reshape(-1)
            writer.write(name, (raw[start:start + 1000] for start in range(0, raw.size, 1000)))
    assert (tmp_path / "streamed.apr").read_bytes() == (tmp_path / "whole.apr").read_bytes()
    assert validate_apr(tmp_path / "streamed.apr").ok


def test_streamed_apr_converts_a_tensor_to_the_planned_dtype(tmp_path: Path) -> None:
    tensor = torch.randn(300, 7)
    with apr_writer(tmp_path / "m.apr", [TensorSpec("w", "BF16", (300, 7))], {"kind": "resume"}) as writer:
        writer.write_tensor("w", tensor)
    stored = read_apr(tmp_path / "m.apr").tensors["w"]
    assert stored.dtype == torch.bfloat16 and torch.equal(stored, tensor.to(torch.bfloat16))


@pytest.mark.parametrize(("written", "message"), [
    (lambda writer: writer.write("b", [bytes(8)]), "written out of order"),
    (lambda writer: writer.write("a", [bytes(7)]), "7 bytes written"),
    (lambda writer: None, "not written"),
], ids=["out-of-order", "short", "missing"])
def test_a_stream_that_breaks_its_plan_leaves_no_file(tmp_path: Path, written, message: str) -> None:
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (2,))]
    plan = apr_writer(tmp_path / "m.apr", specs, {"kind": "resume"})
    with pytest.raises(InputError, match=message), plan as writer:
        written(writer)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- dtype kept: import, export, convert


def test_import_keeps_bf16_byte_for_byte(small_folder: Path, tmp_path: Path) -> None:
    report = import_hf(small_folder, tmp_path / "ckpt" / "model.apr")
    assert report.dtypes == ["BF16"]
    stored = read_apr(tmp_path / "ckpt" / "model.apr").tensors
    index = json.loads((small_folder / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safetensors.safe_open(small_folder / shard, framework="pt") as handle:
            assert torch.equal(stored[name].view(torch.int16), handle.get_tensor(name).view(torch.int16)), name


def test_import_dtype_option_stores_float32(small_folder: Path, tmp_path: Path) -> None:
    outcome = run_cli("import", small_folder, "--out", tmp_path / "model.apr", "--dtype", "float32")
    assert outcome.exit_code == 0, outcome.stderr
    assert "in F32" in outcome.stdout
    assert {tensor.dtype for tensor in read_apr(tmp_path / "model.apr").tensors.values()} == {torch.float32}


def test_export_writes_the_checkpoint_dtype_and_stays_the_source_size(small_folder: Path, tmp_path: Path) -> None:
    import_hf(small_folder, tmp_path / "ckpt" / "model.apr")
    report = export_hf(tmp_path / "ckpt" / "model.apr", tmp_path / "hf")
    assert report.dtype == "bfloat16"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    source = sum(path.stat().st_size for path in small_folder.glob("*.safetensors"))
    exported = sum(path.stat().st_size for path in (tmp_path / "hf").glob("*.safetensors"))
    assert exported <= 1.1 * source
    stored = read_apr(tmp_path / "ckpt" / "model.apr").tensors
    with safetensors.safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        for name in handle.keys():
            assert torch.equal(handle.get_tensor(name).view(torch.int16), stored[name].view(torch.int16)), name


def test_export_dtype_option_converts_and_loads_in_transformers(small_folder: Path, tmp_path: Path) -> None:
    import transformers

    import_hf(small_folder, tmp_path / "ckpt" / "model.apr")
    outcome = run_cli("export", tmp_path / "ckpt" / "model.apr", "--hf", tmp_path / "hf", "--dtype", "float32")
    assert outcome.exit_code == 0, outcome.stderr
    assert "float32 tensors" in outcome.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    stored = read_apr(tmp_path / "ckpt" / "model.apr").tensors
    embedding = model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and torch.equal(embedding, stored["model.embed_tokens.weight"].float())


def test_export_of_mixed_dtypes_asks_for_a_dtype(tmp_path: Path) -> None:
    weights = CausalLM(QWEN2_SMALL).weights()
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.bfloat16)
    write_apr(tmp_path / "ckpt" / "m.apr", weights, {"kind": "weights", "config": QWEN2_SMALL.to_dict()})
    write_family_tokenizer(tmp_path / "ckpt", "qwen2")
    with pytest.raises(InputError, match="pass dtype"):
        export_hf(tmp_path / "ckpt" / "m.apr", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_sharded_export_is_readable_by_safetensors_itself(small_folder: Path, tmp_path: Path) -> None:
    import_hf(small_folder, tmp_path / "ckpt" / "model.apr")
    report = export_hf(tmp_path / "ckpt" / "model.apr", tmp_path / "hf", max_shard_bytes=200_000)
    assert report.shards > 1
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    stored = read_apr(tmp_path / "ckpt" / "model.apr").tensors
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in stored.values())
    for name, shard in index["weight_map"].items():
        with safetensors.safe_open(tmp_path / "hf" / shard, framework="pt") as handle:
            assert torch.equal(handle.get_tensor(name).view(torch.int16), stored[name].view(torch.int16))


def test_convert_round_trip_with_a_dtype(tmp_path: Path) -> None:
    weights = CausalLM(QWEN2_SMALL).weights()
    write_apr(tmp_path / "m.apr", weights, {"kind": "weights", "config": QWEN2_SMALL.to_dict()})
    assert run_cli("convert", tmp_path / "m.apr", tmp_path / "m.safetensors", "--dtype", "bfloat16").exit_code == 0
    assert run_cli("convert", tmp_path / "m.safetensors", tmp_path / "back.apr").exit_code == 0
    back = read_apr(tmp_path / "back.apr")
    assert back.config == QWEN2_SMALL
    assert all(torch.equal(back.tensors[name], tensor.to(torch.bfloat16)) for name, tensor in weights.items())


# ---------------------------------------------------------------- quantize: bf16 in, llama.cpp's bytes out


def test_q4_k_m_of_a_bf16_checkpoint_is_bit_identical_to_llama_cpp(tiny_tokens_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    path = tmp_path / "ckpt" / "bf16.apr"
    model = write_random_checkpoint(path, QWEN2_SMALL)
    bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in model.weights().items()}
    write_apr(path, bf16, read_apr(path).metadata)
    tokenizer = tiny_tokens_dir / "tokenizer.json"
    ours = write_gguf(path, tmp_path / "ours.gguf", "Q4_K_M", tokenizer_path=tokenizer)
    f32 = write_gguf(path, tmp_path / "f32.gguf", "F32", tokenizer_path=tokenizer)  # bf16 values exactly
    llama_cpp_quantize(f32.path, tmp_path / "theirs.gguf", "Q4_K_M")
    assert ours.tensor_types["Q4_K"] > 0
    assert gguf_tensors(ours.path) == gguf_tensors(tmp_path / "theirs.gguf")


# ---------------------------------------------------------------- parity: layer streaming, same numbers


def test_layer_streamed_torch_engine_gives_the_whole_model_metrics(tiny_run_dir: Path, tiny_tokens_dir: Path,
                                                                  tmp_path: Path) -> None:
    """The engine's metrics equal those of both models built whole (the engine before issue 17)."""
    base_path, quant_path = tiny_run_dir / "ckpt" / "best.apr", tmp_path / "q.gguf"
    write_gguf(base_path, quant_path, "Q4_K_M", tokenizer_path=tiny_tokens_dir / "tokenizer.json")
    evidence = run_parity(ParityOptions(base=base_path, quant=quant_path, tokens_dir=tiny_tokens_dir,
                                        n_tokens=1024, ctx=128, engines=("torch",), device="cpu"))
    base, windows = load_model_file(base_path), eval_windows(tiny_tokens_dir, 1024, 128)
    config, quant_weights = load_gguf_model(quant_path)
    whole = []
    for weights in (dict(base.weights), quant_weights):
        model = CausalLM(config)
        model.load_weights(weights)
        whole.append(model.eval())
    ids = torch.from_numpy(windows.tokens)
    with torch.inference_mode():
        logits = [model(ids)[:, windows.score_start:windows.ctx - 1].reshape(-1, config.vocab_size) for model in whole]
    targets = torch.from_numpy(windows.tokens[:, windows.score_start + 1:].copy()).reshape(-1)
    expected = summarize(position_stats(logits[0], logits[1], targets))
    measured = evidence["engines"]["torch"]["metrics"]
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


# ---------------------------------------------------------------- memory: bounded whatever the model's size


def test_import_memory_stays_bounded_by_chunks_not_the_model(big_folder: Path, tmp_path: Path,
                                                             startup_rss: int) -> None:
    model_bytes = sum(path.stat().st_size for path in big_folder.glob("*.safetensors"))
    assert model_bytes > STREAM_SLACK_BYTES
    peak = peak_rss_anon("import", big_folder, "--out", tmp_path / "model.apr")
    assert peak - startup_rss < STREAM_SLACK_BYTES, f"{peak / 2**20:.0f} MiB peak for {model_bytes / 2**20:.0f} MiB"


def test_export_memory_stays_bounded_by_chunks_not_the_model(big_apr: Path, tmp_path: Path,
                                                             startup_rss: int) -> None:
    peak = peak_rss_anon("export", big_apr, "--hf", tmp_path / "hf", "--dtype", "float32")
    assert peak - startup_rss < STREAM_SLACK_BYTES, f"{peak / 2**20:.0f} MiB peak"


def test_quantize_memory_stays_bounded_by_one_tensor(big_apr: Path, tmp_path: Path, startup_rss: int) -> None:
    peak = peak_rss_anon("quantize", big_apr, "--q4k", "--out", tmp_path / "m.gguf")
    largest_float32 = max(math.prod(shape) for shape in weight_shapes(BIG).values()) * 4
    assert peak - startup_rss < largest_float32 + STREAM_SLACK_BYTES, f"{peak / 2**20:.0f} MiB peak"


def test_parity_memory_stays_below_one_float32_model(big_apr: Path, big_tokens: Path, tmp_path: Path,
                                                     startup_rss: int) -> None:
    quant = tmp_path / "m.gguf"
    write_gguf(big_apr, quant, "Q4_K_M")
    contract = tmp_path / "c.toml"
    contract.write_text('[parity]\nrequired_engines = ["torch"]\n'
                        '[parity.thresholds.kl_mean]\nmax = 10.0\nreason = "random weights"\n')
    model_float32 = sum(math.prod(shape) for shape in weight_shapes(BIG).values()) * 4
    peak = peak_rss_anon("parity", big_apr, quant, "--tokens", big_tokens, "--engine", "torch", "--device", "cpu",
                         "--n-tokens", "512", "--ctx", "128", "--contract", contract)
    assert peak - startup_rss < PARITY_SLACK_BYTES < model_float32, f"{peak / 2**20:.0f} MiB peak"


# ---------------------------------------------------------------- bad input: one line, no partial file


def test_a_shard_missing_from_the_index_is_refused(small_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(small_folder, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = max(index["weight_map"].values())
    index["weight_map"] = {name: shard for name, shard in index["weight_map"].items() if shard != dropped}
    index_path.write_text(json.dumps(index))
    refused_import(folder, tmp_path, "tensors, but a qwen2 with 2 layers has")


def test_an_index_that_names_the_wrong_shard_is_refused(small_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(small_folder, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    held = collections.Counter(index["weight_map"].values())
    shard = next(shard for shard, count in held.items() if count > 1)  # still listed once the tensor moves
    other = next(other for other in held if other != shard)
    name = next(name for name, holder in index["weight_map"].items() if holder == shard)
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    refused_import(folder, tmp_path, f"tensor {name} is in {shard}, but the index maps it to {other}")


def test_an_index_naming_a_tensor_no_shard_holds_is_refused(small_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(small_folder, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = min(index["weight_map"].values())
    index_path.write_text(json.dumps(index))
    refused_import(folder, tmp_path, "tensor model.layers.9.mlp.up_proj.weight is in no shard")


@pytest.mark.parametrize(("change", "names"), [
    (lambda tensor: tensor[:, :-1].contiguous(), "has shape"),
    (lambda tensor: tensor.to(torch.int16), "has dtype I16"),
], ids=["shape", "dtype"])
def test_a_tensor_that_disagrees_with_config_json_is_refused(small_folder: Path, tmp_path: Path, change,
                                                             names: str) -> None:
    folder = copy_of(small_folder, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    with safetensors.safe_open(shard, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"] = change(tensors["model.layers.1.mlp.up_proj.weight"])
    write_safetensors(shard, tensors, {"format": "pt"})
    line = refused_import(folder, tmp_path, names)
    assert "model.layers.1.mlp.up_proj.weight" in line


def test_a_truncated_shard_is_refused_naming_it(small_folder: Path, tmp_path: Path) -> None:
    folder = copy_of(small_folder, tmp_path)
    shard = max(folder.glob("*.safetensors"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    refused_import(folder, tmp_path, shard.name)


@pytest.fixture
def small_disk(tmp_path_factory) -> Path:
    mount_point = tmp_path_factory.mktemp("small-disk")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(mount_point)],
                            check=False, capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_disk_that_fills_during_import_leaves_no_partial_apr(small_disk: Path, big_folder: Path) -> None:
    out = small_disk / "ckpt" / "model.apr"
    line = assert_refused(run_cli("import", big_folder, "--out", out), SUITE,
                          names=f"no space left on {out.parent}", exit_codes=(1,))
    assert "needed " in line and "model.apr" in line
    assert not out.exists() and leftovers(out.parent) == []


def test_a_disk_that_fills_during_export_keeps_the_old_folder(small_disk: Path, small_folder: Path,
                                                              tmp_path: Path) -> None:
    import_hf(small_folder, tmp_path / "ckpt" / "model.apr")
    assert run_cli("export", tmp_path / "ckpt" / "model.apr", "--hf", small_disk / "hf").exit_code == 0
    before = sorted(path.name for path in (small_disk / "hf").iterdir())
    outcome = run_cli("export", tmp_path / "ckpt" / "model.apr", "--hf", small_disk / "hf", "--dtype", "float32")
    assert_refused(outcome, SUITE, names=f"no space left on {small_disk}", exit_codes=(1,))
    assert sorted(path.name for path in (small_disk / "hf").iterdir()) == before
    assert leftovers(small_disk) == []
