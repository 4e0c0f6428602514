"""The k-quants Q2_K ... Q6_K with and without an importance vector: `kquants.quantize` equals
ggml_quantize_chunk (llama-cpp-python's libggml-base, what llama-quantize calls per tensor) byte
for byte on random, awkward and fuzzed rows; other types reach their quantizers; bad input and a
missing C compiler are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from quant_helpers import ggml_quantize_rows

from shipkit.errors import InputError
from shipkit.quantize import kquant_rows, kquants
from shipkit.quantize.formats import QType

KQUANTS = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]
COLUMNS = 768  # three super-blocks a row: the importance of block b starts at column 256 b


def awkward_rows(columns: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = (rng.standard_normal(columns) * 0.02).astype(np.float32)
    one_huge = normal.copy()
    one_huge[300] = 1e6
    sparse = normal.copy()
    sparse[::3] = 0.0
    return {
        "zeros": np.zeros(columns, np.float32),
        "negative_zeros": np.full(columns, -0.0, np.float32),
        "one_huge": one_huge,
        "tiny": normal * np.float32(1e-30),
        "denormals": np.full(columns, 1e-40, np.float32),
        "constant": np.full(columns, 0.25, np.float32),
        "constant_negative": np.full(columns, -0.125, np.float32),
        "negative_only": -np.abs(normal),
        "positive_only": np.abs(normal),
        "sparse": sparse,
        "integers": rng.integers(-4, 4, columns).astype(np.float32),
        "extremes": np.linspace(-3e38, 3e38, columns, dtype=np.float32),
        "huge_negative": (rng.random(columns) * -3e38).astype(np.float32),
        "fp16_overflow": np.full(columns, 7e4, np.float32) * np.sign(normal),
        "heavy_tails": (rng.standard_t(2, columns) * 0.05).astype(np.float32),
    }


def random_importance(columns: int, seed: int = 1) -> np.ndarray:
    """Positive and spread over decades, as imatrix entries (mean squared activations) are."""
    rng = np.random.default_rng(seed)
    return (10.0 ** rng.uniform(-3, 2, columns)).astype(np.float32)


def sample_rows(seed: int = 3) -> np.ndarray:
    """33 random rows and the awkward ones: an odd number of super-blocks (Q4_K/Q5_K pair them)."""
    random = (np.random.default_rng(seed).standard_normal((33, COLUMNS)) * 0.02).astype(np.float32)
    return np.concatenate([random, np.stack(list(awkward_rows(COLUMNS).values()))])


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_kquant_equals_ggml_on_random_and_awkward_rows(qtype: QType, with_importance: bool) -> None:
    rows = sample_rows()
    importance = random_importance(COLUMNS) if with_importance else None
    with np.errstate(all="ignore"):
        expected = ggml_quantize_rows(rows, qtype, importance)
        assert kquants.quantize(rows, qtype, importance=importance).tobytes() == expected


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_importance_reaches_ggml_and_shipkit_alike(qtype: QType) -> None:
    """The importance changes the bytes (so the test above compares two weighted paths)."""
    rows = sample_rows()[:33]
    weighted = kquants.quantize(rows, qtype, importance=random_importance(COLUMNS)).tobytes()
    assert weighted != kquants.quantize(rows, qtype).tobytes()


@pytest.mark.parametrize("importance_kind", ["ones", "zeros", "half_zero", "huge", "tiny"])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda q: q.name)
def test_kquant_equals_ggml_with_degenerate_importance(qtype: QType, importance_kind: str) -> None:
    rng = np.random.default_rng(5)
    importance = {
        "ones": np.ones(COLUMNS, np.float32),
        "zeros": np.zeros(COLUMNS, np.float32),
        "half_zero": np.where(rng.random(COLUMNS) < 0.5, 0.0, 1.0).astype(np.float32),
        "huge": (rng.random(COLUMNS) * 1e30).astype(np.float32),
        "tiny": (rng.random(COLUMNS) * 1e-30).astype(np.float32),
    }[importance_kind]
    rows = sample_rows(seed=4)
    with np.errstate(all="ignore"):
        expected = ggml_quantize_rows(rows, qtype, importance)
        assert kquants.quantize(rows, qtype, importance=importance).tobytes() == expected


@settings(max_examples=25, deadline=None)
@given(rows=arrays(np.float32, (3, 512), elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True)),
       importance=arrays(np.float32, 512, elements=st.floats(0, 1e3, width=32)),
       with_importance=st.booleans(), qtype=st.sampled_from(KQUANTS))
def test_kquant_equals_ggml_on_fuzzed_rows(rows: np.ndarray, importance: np.ndarray,
                                           with_importance: bool, qtype: QType) -> None:
    importance = importance if with_importance else None
    with np.errstate(all="ignore"):
        expected = ggml_quantize_rows(rows, qtype, importance)
        assert kquants.quantize(rows, qtype, importance=importance).tobytes() == expected


@pytest.mark.parametrize("qtype", [QType.Q3_K, QType.Q5_K], ids=lambda q: q.name)
def test_chunking_and_threads_do_not_change_the_bytes(qtype: QType, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, importance = sample_rows(), random_importance(COLUMNS)
    whole = kquants.quantize(rows, qtype, importance=importance, threads=1)
    monkeypatch.setitem(kquants.CHUNK_WEIGHTS, "cpu", 5 * COLUMNS)  # chunks of 5 rows, 15 blocks
    assert np.array_equal(kquants.quantize(rows, qtype, importance=importance, threads=2), whole)


def test_torch_tensors_of_any_float_dtype_are_quantized_as_float32() -> None:
    import torch

    rows = torch.from_numpy(sample_rows()[:8]).to(torch.bfloat16)
    importance = random_importance(COLUMNS)
    expected = ggml_quantize_rows(rows.float().numpy(), QType.Q4_K, importance)
    assert kquants.quantize(rows, QType.Q4_K, importance=importance).tobytes() == expected


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_1, QType.IQ4_XS], ids=lambda q: q.name)
def test_other_types_with_importance_reach_their_quantizers(qtype: QType) -> None:
    rows, importance = sample_rows()[:33], random_importance(COLUMNS)
    expected = ggml_quantize_rows(rows, qtype, importance)
    assert kquants.quantize(rows, qtype, importance=importance).tobytes() == expected


def test_q8_0_ignores_the_importance_as_ggml_does() -> None:
    rows, importance = sample_rows()[:33], random_importance(COLUMNS)
    expected = ggml_quantize_rows(rows, QType.Q8_0, importance)
    assert kquants.quantize(rows, QType.Q8_0, importance=importance).tobytes() == expected


def test_backend_names_who_encodes_each_case(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kquants.backend(QType.Q2_K) == "c-rows"
    assert kquants.backend(QType.Q4_K, "cuda", importance=True) == "c-rows"
    assert kquants.backend(QType.Q8_0, importance=True) == "torch"
    assert kquants.backend(QType.Q5_0, importance=True) == "row-quants"
    assert kquants.backend(QType.IQ4_XS) == "row-quants"
    monkeypatch.setattr(kquant_rows, "available", lambda: False)
    assert kquants.backend(QType.Q6_K) == "torch"
    assert kquants.backend(QType.Q3_K) == "unavailable"


def test_importance_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(InputError, match=r"Q4_K: importance of shape \(512,\) for rows of 768 columns"):
        kquants.quantize(sample_rows()[:2], QType.Q4_K, importance=np.ones(512, np.float32))


def test_rows_that_are_not_whole_super_blocks_are_refused() -> None:
    rows = np.zeros((2, 320), np.float32)
    with pytest.raises(InputError, match="Q3_K: rows of 320 weights are not whole blocks of 256"):
        kquants.quantize(rows, QType.Q3_K)


def test_without_a_c_compiler_the_types_only_c_encodes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kquant_rows, "available", lambda: False)
    rows = sample_rows()[:4]
    with pytest.raises(InputError, match="Q2_K: its quantizer is C compiled at run time"):
        kquants.quantize(rows, QType.Q2_K)
    with pytest.raises(InputError, match="Q6_K with importance: its quantizer is C compiled"):
        kquants.quantize(rows, QType.Q6_K, importance=random_importance(COLUMNS))


def test_without_a_c_compiler_torch_gives_the_same_plain_kquants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kquant_rows, "available", lambda: False)
    rows = sample_rows()[:33]
    for qtype in (QType.Q4_K, QType.Q5_K, QType.Q6_K):
        assert kquants.quantize(rows, qtype).tobytes() == ggml_quantize_rows(rows, qtype, None)
