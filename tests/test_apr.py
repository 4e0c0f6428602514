"""APR v2 container: writing, reading (zero-copy), metadata rules and atomicity."""

from __future__ import annotations

import os

import hypothesis.extra.numpy as hnp
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipkit.apr import inspect_apr, read_apr, validate_apr, write_apr
from shipkit.apr.format import ALIGNMENT
from shipkit.config import ModelConfig
from shipkit.errors import InputError, IntegrityError
from shipkit.model import CausalLM

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


def weights_metadata(config: ModelConfig = TINY) -> dict:
    return {"kind": "weights", "config": config.to_dict(),
            "tokenizer": {"file": "tokenizer.json", "sha256": "0" * 64},
            "producer": {"shipkit_version": "0.1.0", "run_id": "test", "epoch": 1, "step": 10}}


def test_weights_round_trip_with_metadata_and_config(tmp_path):
    weights = CausalLM(TINY).weights()
    path = tmp_path / "epoch-001.apr"
    write_apr(path, weights, weights_metadata())
    checkpoint = read_apr(path)
    assert list(checkpoint.tensors) == list(weights)
    assert all(torch.equal(checkpoint.tensors[name], tensor) for name, tensor in weights.items())
    assert checkpoint.metadata == weights_metadata()
    assert checkpoint.config == TINY
    assert checkpoint.version == 2


def test_config_is_none_without_one(tmp_path):
    write_apr(tmp_path / "r.apr", {"step": torch.tensor(3)}, {"kind": "resume"})
    assert read_apr(tmp_path / "r.apr").config is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.uint8, torch.float64, torch.int8, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_dtype_and_shape_round_trip_bit_exact(tmp_path, dtype, shape):
    tensor = torch.randint(0, 2 if dtype == torch.bool else 100, shape).to(dtype)
    write_apr(tmp_path / "t.apr", {"x": tensor}, {"kind": "resume"})
    loaded = read_apr(tmp_path / "t.apr").tensors["x"]
    assert loaded.dtype == dtype and loaded.shape == tensor.shape
    assert torch.equal(loaded, tensor)


tensor_arrays = st.sampled_from(["<f4", "<f2", "<i8", "<i4", "u1"]).flatmap(
    lambda dtype: hnp.arrays(
        dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
    )
)
name_characters = st.characters(codec="utf-8", categories=["L", "N"], include_characters="._-")
tensor_names = st.text(name_characters, min_size=1, max_size=40).filter(
    lambda name: ".." not in name
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=st.dictionaries(tensor_names, tensor_arrays, max_size=6))
def test_random_tensor_sets_round_trip(tmp_path, arrays):
    tensors = {name: torch.from_numpy(array.copy()) for name, array in arrays.items()}
    path = tmp_path / "random.apr"
    write_apr(path, tensors, {"kind": "resume", "note": "hypothesis"})
    assert validate_apr(path).ok
    loaded = read_apr(path).tensors
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():  # compare bits, so NaN payloads count too
        assert loaded[name].shape == tensor.shape
        assert loaded[name].numpy().tobytes() == tensor.numpy().tobytes()


def test_bf16_round_trips_bit_exact(tmp_path):
    tensor = torch.randn(7, 5).to(torch.bfloat16)
    write_apr(tmp_path / "b.apr", {"w": tensor}, {"kind": "resume"})
    loaded = read_apr(tmp_path / "b.apr").tensors["w"]
    assert torch.equal(loaded.view(torch.int16), tensor.view(torch.int16))


def test_read_tensors_are_views_of_one_file_mapping(tmp_path):
    path = tmp_path / "w.apr"
    write_apr(path, CausalLM(TINY).weights(), weights_metadata())
    tensors = read_apr(path).tensors
    offsets = {info.name: info.offset for info in inspect_apr(path).tensors}
    bases = {tensors[name].data_ptr() - offset for name, offset in offsets.items()}
    assert len(bases) == 1  # every tensor sits at its file offset within one mapping
    assert bases.pop() % 4096 == 0  # and that mapping starts at the file's first byte


def test_writing_to_a_read_tensor_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "w.apr"
    write_apr(path, {"w": torch.zeros(16)}, {"kind": "resume"})
    before = path.read_bytes()
    read_apr(path).tensors["w"].add_(1.0)
    assert path.read_bytes() == before
    assert validate_apr(path).ok


def test_data_is_64_byte_aligned_in_the_file(tmp_path):
    tensors = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5), "c": torch.ones(1).half()}
    path = tmp_path / "a.apr"
    write_apr(path, tensors, {"kind": "resume"})
    raw = path.read_bytes()
    assert raw.index(torch.ones(5).numpy().tobytes()) % ALIGNMENT == 0
    assert raw.index(torch.ones(1).half().numpy().tobytes()) % ALIGNMENT == 0


def test_write_rejects_a_tensor_count_the_config_does_not_imply(tmp_path):
    weights = CausalLM(TINY).weights()
    weights.pop("lm_head.weight")
    with pytest.raises(InputError, match="config implies 21 tensors, got 20"):
        write_apr(tmp_path / "w.apr", weights, weights_metadata())
    assert not (tmp_path / "w.apr").exists()


@pytest.mark.parametrize("kind", [None, "optimizer", 3])
def test_write_requires_a_known_kind(tmp_path, kind):
    with pytest.raises(InputError, match="metadata kind"):
        write_apr(tmp_path / "w.apr", {"x": torch.ones(1)}, {"kind": kind})


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "a..b", "a\x00b", "a\nb"])
def test_write_rejects_path_like_or_unprintable_names(tmp_path, name):
    with pytest.raises(InputError, match="tensor name"):
        write_apr(tmp_path / "w.apr", {name: torch.ones(1)}, {"kind": "resume"})


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(InputError, match="complex64 is not supported"):
        write_apr(tmp_path / "w.apr", {"z": torch.ones(2, dtype=torch.complex64)},
                  {"kind": "resume"})


def test_write_rejects_metadata_that_is_not_json(tmp_path):
    with pytest.raises(InputError, match="not JSON"):
        write_apr(tmp_path / "w.apr", {"x": torch.ones(1)},
                  {"kind": "resume", "loss": float("nan")})


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "epoch-001.apr"
    write_apr(path, {"x": torch.ones(4)}, {"kind": "resume"})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_apr(path, {"x": torch.zeros(1000)}, {"kind": "resume"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["epoch-001.apr"]


def test_non_contiguous_and_grad_tensors_are_written_by_value(tmp_path):
    base = torch.arange(12.0, requires_grad=True).reshape(3, 4)
    view = base.t()
    write_apr(tmp_path / "v.apr", {"v": view}, {"kind": "resume"})
    assert torch.equal(read_apr(tmp_path / "v.apr").tensors["v"], view.detach())


def test_read_raises_integrity_error_naming_the_corrupt_tensor(tmp_path):
    path = tmp_path / "w.apr"
    write_apr(path, {"a": torch.ones(8), "b": torch.ones(8)}, {"kind": "resume"})
    raw = bytearray(path.read_bytes())
    raw[raw.rindex(torch.ones(8).numpy().tobytes()) + 5] ^= 0x10  # inside b
    path.write_bytes(raw)
    with pytest.raises(IntegrityError, match="tensor b: checksum MISMATCH"):
        read_apr(path)


def test_read_without_verify_skips_tensor_checksums(tmp_path):
    path = tmp_path / "w.apr"
    write_apr(path, {"a": torch.ones(8)}, {"kind": "resume"})
    raw = bytearray(path.read_bytes())
    raw[raw.index(torch.ones(8).numpy().tobytes())] ^= 1
    path.write_bytes(raw)
    assert read_apr(path, verify=False).tensors["a"][0] != 1.0


def test_read_and_validate_of_a_missing_file_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_apr(tmp_path / "missing.apr")
    with pytest.raises(InputError, match="no such file"):
        validate_apr(tmp_path / "missing.apr")


def test_validate_reports_counts_and_size(tmp_path):
    path = tmp_path / "w.apr"
    write_apr(path, CausalLM(TINY).weights(), weights_metadata())
    report = validate_apr(path, expect_tensors=21)
    assert (report.ok, report.tensor_count, report.version) == (True, 21, 2)
    assert report.nbytes == path.stat().st_size


def test_validate_flags_a_tensor_count_other_than_expected(tmp_path):
    path = tmp_path / "w.apr"
    write_apr(path, CausalLM(TINY).weights(), weights_metadata())
    report = validate_apr(path, expect_tensors=219)
    assert report.problems == ["tensor count: expected 219 tensors, file has 21"]


def test_tied_config_expects_one_tensor_fewer(tmp_path):
    tied = ModelConfig(**{**TINY.to_dict(), "tie_word_embeddings": True})
    path = tmp_path / "tied.apr"
    write_apr(path, CausalLM(tied).weights(), weights_metadata(tied))
    assert validate_apr(path).tensor_count == 9 * 2 + 2
