"""The quantizers without importance: compiled (kquant_rows' C on the CPU, torch_quants with
native_search's kernels on CUDA) and pure torch == plain reference == ggml itself, on random
and adversarial blocks, on CPU and (where present) CUDA. With importance, and Q2_K / Q3_K:
tests/test_kquants_imatrix.py; dequantizers == ggml's: tests/test_row_quants.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from quant_helpers import ggml_quantize

from shipkit.quantize import dequant, kquants, reference, torch_quants
from shipkit.quantize.formats import QType

QTYPES = [QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K]
BLOCK = 256  # a whole block of every type above


def adversarial_blocks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = (rng.standard_normal(BLOCK) * 0.02).astype(np.float32)
    outlier = normal.copy()
    outlier[17] = 3.0
    half_denormal = normal.copy()
    half_denormal[:100] = rng.standard_normal(100).astype(np.float32) * 1e-39
    return {
        "zeros": np.zeros(BLOCK, np.float32),
        "negative_zeros": np.full(BLOCK, -0.0, np.float32),
        "zeros_first_negative": np.where(np.arange(BLOCK) % 32 == 0, -0.0, 0.0).astype(np.float32),
        "zeros_and_positives": np.where(np.arange(BLOCK) % 3 == 1, -0.0, np.abs(normal)).astype(np.float32),
        "all_equal": np.full(BLOCK, 0.25, np.float32),
        "all_equal_negative": np.full(BLOCK, -0.125, np.float32),
        "denormals": np.full(BLOCK, 1e-40, np.float32),
        "half_denormal": half_denormal,
        "one_outlier": outlier,
        "negative_only": -np.abs(normal),
        "positive_only": np.abs(normal),
        "huge": (rng.random(BLOCK) * -3e38).astype(np.float32),
        "full_float_range": np.linspace(-3e38, 3e38, BLOCK, dtype=np.float32),
        "fp16_overflow": np.full(BLOCK, 7e4, np.float32) * np.sign(normal),
        "heavy_tails": (rng.standard_t(2, BLOCK) * 0.05).astype(np.float32),
    }


ADVERSARIAL = adversarial_blocks()


@pytest.fixture(params=["compiled", "torch"])
def search_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the compiled code (where it builds) and with the pure torch quantizers."""
    monkeypatch.setattr(kquants, "USE_KERNELS", request.param == "compiled")
    monkeypatch.setattr(torch_quants, "USE_SEARCH_KERNELS", request.param == "compiled")
    return request.param


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_vectorised_equals_reference_on_adversarial_block(qtype: QType, case: str,
                                                          search_path: str) -> None:
    block = ADVERSARIAL[case]
    with np.errstate(all="ignore"):
        expected = reference.quantize(block, qtype)
    assert kquants.quantize(block, qtype).tobytes() == expected


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_vectorised_equals_reference_on_random_blocks(qtype: QType, search_path: str) -> None:
    values = (np.random.default_rng(3).standard_normal(4 * BLOCK) * 0.02).astype(np.float32)
    assert kquants.quantize(values, qtype).tobytes() == reference.quantize(values, qtype)


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_vectorised_equals_ggml_on_many_blocks(qtype: QType) -> None:
    rng = np.random.default_rng(11)
    values = (rng.standard_normal((2048, BLOCK)) * 0.02).astype(np.float32)
    values[:len(ADVERSARIAL)] = np.stack(list(ADVERSARIAL.values()))
    assert kquants.quantize(values, qtype).tobytes() == ggml_quantize(values, qtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_cuda_bytes_equal_cpu_bytes(qtype: QType, search_path: str) -> None:
    rng = np.random.default_rng(13)
    values = (rng.standard_normal((4096, BLOCK)) * 0.02).astype(np.float32)
    values[:len(ADVERSARIAL)] = np.stack(list(ADVERSARIAL.values()))
    with np.errstate(all="ignore"):
        assert np.array_equal(kquants.quantize(values, qtype, device="cuda"),
                              kquants.quantize(values, qtype, device="cpu"))


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, BLOCK, elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True)),
       st.sampled_from([QType.Q4_K, QType.Q6_K, QType.Q8_0]))
def test_vectorised_equals_reference_on_fuzzed_blocks(block: np.ndarray, qtype: QType) -> None:
    with np.errstate(all="ignore"):
        expected = reference.quantize(block, qtype)
    assert kquants.quantize(block, qtype).tobytes() == expected


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantized_values_are_close_to_the_originals(qtype: QType) -> None:
    values = (np.random.default_rng(6).standard_normal((8, 512)) * 0.02).astype(np.float32)
    restored = dequant.dequantize(kquants.quantize(values, qtype), qtype, values.shape)
    assert np.abs(restored - values).max() < 0.25 * np.abs(values).max()
