"""APR v2 integrity: every single-bit flip, truncation and appended byte is detected, and
crafted headers and indexes are rejected (before any large allocation) with a named defect."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tracemalloc

import pytest
import torch
from click.testing import CliRunner

from shipkit.apr import format as fmt
from shipkit.apr import inspect_apr, read_apr, validate_apr, write_apr
from shipkit.cli import main
from shipkit.config import ModelConfig
from shipkit.errors import IntegrityError
from shipkit.model import CausalLM

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
TINY_QWEN_TIED = ModelConfig(architecture="qwen2", vocab_size=48, hidden_size=16,
                             intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, tie_word_embeddings=True)
BIT_FLIPS_PER_FILE = 400  # x 3 files = 1200 random flips, plus every header and footer bit
TRUNCATIONS_PER_FILE = 100


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    """Real checkpoints as the trainer writes them: two weights files and a resume file."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    resume = {
        "optimizer.exp_avg.model.norm.weight": torch.randn(32),
        "optimizer.step": torch.tensor(12, dtype=torch.int64),
        "rng.torch": torch.randint(0, 255, (53,), dtype=torch.uint8),
        "data.position": torch.tensor([3, 1024], dtype=torch.int32),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "half": torch.randn(3, 5).half(),
    }
    sources = {
        "epoch-001.apr": (CausalLM(TINY).weights(), {"kind": "weights", "config": TINY.to_dict()}),
        "qwen-tied.apr": (CausalLM(TINY_QWEN_TIED).weights(),
                          {"kind": "weights", "config": TINY_QWEN_TIED.to_dict()}),
        "epoch-001.resume.apr": (resume, {"kind": "resume", "data": {"shard": 0, "offset": 77}}),
    }
    files = {}
    for name, (tensors, metadata) in sources.items():
        write_apr(folder / name, tensors, metadata)
        files[name] = (folder / name).read_bytes()
    return files


def flipped(raw: bytes, bit: int) -> bytes:
    data = bytearray(raw)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def problems_of(tmp_path, data: bytes, name: str = "case.apr") -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    return validate_apr(path).problems


def test_pristine_checkpoints_validate(tmp_path, checkpoint_files):
    for name, raw in checkpoint_files.items():
        assert problems_of(tmp_path, raw, name) == []


def test_every_random_bit_flip_is_detected(tmp_path, checkpoint_files):
    rng = random.Random(1234)
    undetected = []
    for name, raw in checkpoint_files.items():
        for bit in rng.sample(range(len(raw) * 8), BIT_FLIPS_PER_FILE):
            if not problems_of(tmp_path, flipped(raw, bit)):
                undetected.append((name, bit))
    assert undetected == []


def test_every_bit_flip_in_header_index_and_footer_is_detected(tmp_path, checkpoint_files):
    raw = checkpoint_files["epoch-001.resume.apr"]
    _, _, _, _, _, data_offset, *_ = fmt.HEADER_STRUCT.unpack(raw[: fmt.HEADER_SIZE])
    structural_bytes = [*range(data_offset), *range(len(raw) - fmt.FOOTER_SIZE, len(raw))]
    undetected = [byte * 8 + bit for byte in structural_bytes for bit in range(8)
                  if not problems_of(tmp_path, flipped(raw, byte * 8 + bit))]
    assert undetected == []


def test_every_truncation_is_detected(tmp_path, checkpoint_files):
    rng = random.Random(99)
    for raw in checkpoint_files.values():
        points = rng.sample(range(len(raw)), TRUNCATIONS_PER_FILE)
        points += [0, 1, fmt.HEADER_SIZE - 1, fmt.HEADER_SIZE, fmt.MIN_FILE_SIZE, len(raw) - 1,
                   len(raw) - fmt.FOOTER_SIZE]
        for point in points:
            problems = problems_of(tmp_path, raw[:point])
            assert problems and problems[0].startswith("truncated: expected"), point


@pytest.mark.parametrize("extra", [b"\x00", bytes(64), b"garbage after the footer"])
def test_appended_bytes_are_detected(tmp_path, checkpoint_files, extra):
    raw = checkpoint_files["epoch-001.apr"]
    problems = problems_of(tmp_path, raw + extra)
    assert problems[0] == (f"appended bytes: expected {len(raw)} bytes, "
                           f"found {len(raw) + len(extra)} ({len(extra)} extra)")


def test_a_flip_inside_a_tensor_names_that_tensor(tmp_path, checkpoint_files):
    raw = checkpoint_files["epoch-001.apr"]
    path = tmp_path / "w.apr"
    path.write_bytes(raw)
    target = "model.layers.1.self_attn.q_proj.weight"
    info = next(info for info in inspect_apr(path).tensors if info.name == target)
    problems = problems_of(tmp_path, flipped(raw, (info.offset + 17) * 8 + 3))
    assert problems == [f"tensor {target}: checksum MISMATCH"]


def test_cli_reports_sampled_corruptions_with_exit_1_and_no_traceback(tmp_path, checkpoint_files):
    rng = random.Random(7)
    runner = CliRunner()
    for name, raw in checkpoint_files.items():
        for case in range(10):
            if case % 2:
                damaged = flipped(raw, rng.randrange(len(raw) * 8))
            else:
                damaged = raw[: rng.randrange(len(raw))]
            path = tmp_path / name
            path.write_bytes(damaged)
            result = runner.invoke(main, ["validate", str(path)])
            assert result.exit_code == 1, result.output
            assert "Traceback" not in result.output
            assert f"error: {name}: " in result.output


def test_cli_process_exits_1_on_a_corrupt_file(tmp_path, checkpoint_files):
    raw = checkpoint_files["epoch-001.apr"]
    path = tmp_path / "epoch-001.apr"
    path.write_bytes(flipped(raw, (len(raw) - 100) * 8))
    result = subprocess.run([sys.executable, "-m", "shipkit", "validate", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert "epoch-001.apr: tensor lm_head.weight: checksum MISMATCH" in result.stdout


# --- crafted files: consistent header digest, hostile contents ---------------------------------

def craft(index: dict, data: bytes = b"", **header_fields: int) -> bytes:
    """An APR file with a valid header digest and footer around `index` and `data`."""
    encoded = json.dumps(index).encode()
    data_offset = fmt.align(fmt.HEADER_SIZE + len(encoded))
    region = encoded + bytes(data_offset - fmt.HEADER_SIZE - len(encoded))
    fields = {"magic": fmt.MAGIC, "version": fmt.VERSION, "flags": 0,
              "tensor_count": len(index.get("tensors", [])), "index_length": len(encoded),
              "data_offset": data_offset, "data_length": len(data),
              "file_size": data_offset + len(data) + fmt.FOOTER_SIZE}
    fields.update(header_fields)
    header = fmt.HEADER_STRUCT.pack(*fields.values(), 0)
    digest = fmt.header_digest(header, region).to_bytes(8, "little")
    footer = fmt.FOOTER_STRUCT.pack(fmt.FOOTER_MAGIC, fields["file_size"])
    return header[: fmt.HEADER_DIGEST_OFFSET] + digest + region + data + footer


def entry(name: str, tensor: torch.Tensor, offset: int) -> dict:
    raw = tensor.numpy().tobytes()
    return {"name": name, "dtype": fmt.DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
            "offset": offset, "nbytes": len(raw), "xxh3": fmt.digest_hex(fmt.checksum(raw))}


ONES = torch.ones(16)  # 64 bytes: one aligned slot
TWO_TENSORS = ONES.numpy().tobytes() * 2


def two_tensor_index(**second_overrides) -> dict:
    return {"metadata": {"kind": "resume"},
            "tensors": [entry("a", ONES, 0), {**entry("b", ONES, 64), **second_overrides}]}


def crafted_problems(tmp_path, data: bytes) -> list[str]:
    """Validate a crafted file, asserting nothing close to its claimed sizes was allocated."""
    tracemalloc.start()
    try:
        problems = problems_of(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    return problems


def test_the_crafting_helper_builds_valid_files(tmp_path):
    assert crafted_problems(tmp_path, craft(two_tensor_index(), TWO_TENSORS)) == []


@pytest.mark.parametrize(("fields", "message"), [
    ({"index_length": 1 << 62}, "index length 4611686018427387904 exceeds the limit"),
    ({"tensor_count": 1 << 40}, "tensor count 1099511627776 exceeds the limit"),
    ({"data_offset": 4096}, "data offset 4096 is not the 64-byte boundary after the index"),
    ({"data_length": 1 << 63}, "!= file size"),
    ({"flags": 1}, "flags 0x1 set"),
])
def test_crafted_header_fields_are_rejected(tmp_path, fields, message):
    problems = crafted_problems(tmp_path, craft(two_tensor_index(), TWO_TENSORS, **fields))
    assert any(message in problem for problem in problems), problems


def test_an_index_length_beyond_the_file_reads_as_truncated(tmp_path):
    index = two_tensor_index()
    encoded_length = len(json.dumps(index).encode())
    big = 32 << 20
    data = craft(index, TWO_TENSORS, index_length=big - 1,
                 data_offset=fmt.align(fmt.HEADER_SIZE + big - 1),
                 file_size=fmt.align(fmt.HEADER_SIZE + big - 1) + 128 + fmt.FOOTER_SIZE)
    problems = crafted_problems(tmp_path, data)
    assert problems[0].startswith("truncated: expected") and encoded_length < big


@pytest.mark.parametrize(("overrides", "message"), [
    ({"offset": -64}, "tensor b: offset and nbytes must be non-negative integers"),
    ({"offset": 32}, "tensor b: offset 32 is not 64-byte aligned"),
    ({"offset": 0}, "tensor b: offset 0 overlaps the previous tensor (ends at 64)"),
    ({"offset": 128}, "tensor b: offset 128 leaves a gap (expected 64)"),
    ({"offset": 1 << 62}, "beyond the data region"),
    ({"nbytes": 60}, "tensor b: nbytes 60 != F32 x [16] = 64 bytes"),
    ({"shape": [1 << 40, 1 << 40]}, "tensor b: nbytes 64 != F32 x"),
    ({"shape": [-16]}, "must be a list of at most 16 non-negative integers"),
    ({"shape": [1] * 17}, "must be a list of at most 16 non-negative integers"),
    ({"dtype": "F8"}, "dtype 'F8' is not one of"),
    ({"name": "a"}, "tensor a: listed twice"),
    ({"name": "../etc/passwd"}, "contains '/'"),
    ({"name": "model..weight"}, "contains '..'"),
    ({"name": "a\\b"}, "contains '\\\\'"),
    ({"name": "a\x00b"}, "contains a non-printable character"),
    ({"name": ""}, "empty or not a string"),
    ({"name": 5}, "empty or not a string"),
    ({"xxh3": "xyz"}, "is not 16 lowercase hex digits"),
])
def test_crafted_index_entries_are_rejected_with_the_defect_named(tmp_path, overrides, message):
    problems = crafted_problems(tmp_path, craft(two_tensor_index(**overrides), TWO_TENSORS))
    assert any(message in problem for problem in problems), problems


def test_header_tensor_count_must_match_the_index(tmp_path):
    problems = crafted_problems(tmp_path, craft(two_tensor_index(), TWO_TENSORS, tensor_count=3))
    assert "tensor count: header says 3, index lists 2" in problems


def test_data_region_longer_than_the_tensors_is_rejected(tmp_path):
    problems = crafted_problems(tmp_path, craft(two_tensor_index(), TWO_TENSORS + bytes(64)))
    assert "index: tensors end at 128 but the data region is 192 bytes" in problems


def test_nonzero_padding_between_tensors_is_detected(tmp_path):
    small = torch.ones(3, dtype=torch.uint8)
    index = {"metadata": {"kind": "resume"},
             "tensors": [entry("a", small, 0), entry("b", ONES, 64)]}
    data = b"\x01\x01\x01" + b"\x00" * 60 + b"\x07" + ONES.numpy().tobytes()
    problems = crafted_problems(tmp_path, craft(index, data))
    assert problems == ["tensor b: padding before it is not zero"]


def test_deeply_nested_metadata_is_rejected_not_crashed(tmp_path):
    depth = 100_000
    encoded = ("[" * depth + "]" * depth).encode()
    index_text = b'{"metadata": {"kind": "resume", "x": ' + encoded + b'}, "tensors": []}'
    data_offset = fmt.align(fmt.HEADER_SIZE + len(index_text))
    region = index_text + bytes(data_offset - fmt.HEADER_SIZE - len(index_text))
    header = fmt.HEADER_STRUCT.pack(fmt.MAGIC, fmt.VERSION, 0, 0, len(index_text), data_offset, 0,
                                    data_offset + fmt.FOOTER_SIZE, 0)
    digest = fmt.header_digest(header, region).to_bytes(8, "little")
    footer = fmt.FOOTER_STRUCT.pack(fmt.FOOTER_MAGIC, data_offset + fmt.FOOTER_SIZE)
    path = tmp_path / "deep.apr"
    path.write_bytes(header[: fmt.HEADER_DIGEST_OFFSET] + digest + region + footer)
    assert validate_apr(path).problems == ["index: not valid UTF-8 JSON (RecursionError)"]


def test_tensor_count_must_match_the_config(tmp_path):
    tensors = [entry("model.norm.weight", ONES, 0)]
    index = {"metadata": {"kind": "weights", "config": TINY.to_dict()}, "tensors": tensors}
    problems = crafted_problems(tmp_path, craft(index, ONES.numpy().tobytes()))
    assert problems == ["tensor count: the config implies 21 tensors, file has 1"]


def test_an_invalid_config_is_reported(tmp_path):
    config = {"hidden_size": 3, "num_attention_heads": 2}
    index = {"metadata": {"kind": "weights", "config": config}, "tensors": []}
    problems = crafted_problems(tmp_path, craft(index))
    assert problems[0].startswith("metadata config: invalid (config field hidden_size")


def test_unknown_magic_and_version_are_rejected(tmp_path, checkpoint_files):
    raw = checkpoint_files["epoch-001.apr"]
    assert problems_of(tmp_path, b"PK\x03\x04" + raw[4:])[0].startswith("header: not an APR file")
    newer = raw[:8] + (3).to_bytes(4, "little") + raw[12:]
    assert problems_of(tmp_path, newer) == [
        "header: APR version 3 is not supported (this reader reads 2)"]


def test_read_refuses_a_crafted_file(tmp_path):
    path = tmp_path / "evil.apr"
    path.write_bytes(craft(two_tensor_index(name="../../x"), TWO_TENSORS))
    with pytest.raises(IntegrityError, match=r"evil.apr: index entry 1: tensor name '../../x'"):
        read_apr(path, verify=False)
