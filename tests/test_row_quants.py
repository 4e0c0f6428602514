"""The row quantizers of `row_quants.ROW_QUANTIZERS` give ggml_quantize_chunk's bytes, with and
without an importance vector, and `dequant.dequantize` gives ggml's own dequantized values, for
every type, on random and awkward rows (llama-cpp-python's libggml-base is the reference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from quant_helpers import ggml_dequantize, ggml_quantize_rows

from shipkit.errors import InputError, IntegrityError
from shipkit.quantize import dequant, row_quants
from shipkit.quantize.formats import BLOCK_LAYOUTS, QType
from shipkit.quantize.row_quants import ROW_QUANTIZERS

COLUMNS = 768  # three IQ4_XS super-blocks, 24 blocks of the 32-weight types
ROW_QTYPES = sorted(ROW_QUANTIZERS, key=lambda qtype: qtype.name)
# ggml's quantizers for these take the importance; Q8_0, BF16 and F16 ignore it.
WEIGHTED = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.IQ4_NL, QType.IQ4_XS]


def awkward_rows(columns: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = (rng.standard_normal(columns) * 0.02).astype(np.float32)
    one_outlier = normal.copy()
    one_outlier[300] = 40.0
    leading_negative_zero = np.zeros(columns, np.float32)
    leading_negative_zero[::32] = -0.0  # every block starts with -0.0: ggml stores d = -0
    sparse = normal.copy()
    sparse[::3] = 0.0
    quiet_block = normal.copy()
    quiet_block[256:512] = 0.0  # one all-zero IQ4_XS super-block in a live row
    return {
        "zeros": np.zeros(columns, np.float32),
        "negative_zeros": np.full(columns, -0.0, np.float32),
        "leading_negative_zero": leading_negative_zero,
        "one_outlier": one_outlier,
        "constant": np.full(columns, 0.25, np.float32),
        "constant_negative": np.full(columns, -0.125, np.float32),
        "tiny": normal * np.float32(1e-30),
        "denormals": np.full(columns, 1e-40, np.float32),
        "negative_only": -np.abs(normal),
        "positive_only": np.abs(normal),
        "sparse": sparse,
        "quiet_block": quiet_block,
        "ties": (rng.integers(-16, 16, columns) * 0.1).astype(np.float32),
        "integers": rng.integers(-4, 4, columns).astype(np.float32),
        "extremes": np.linspace(-3e38, 3e38, columns, dtype=np.float32),
        "fp16_overflow": np.full(columns, 7e4, np.float32) * np.sign(normal),
        "heavy_tails": (rng.standard_t(2, columns) * 0.05).astype(np.float32),
    }


def sample_rows(count: int = 200, seed: int = 3) -> np.ndarray:
    """Random rows (enough for several row chunks, so several threads) and the awkward ones."""
    random = (np.random.default_rng(seed).standard_normal((count, COLUMNS)) * 0.02).astype(np.float32)
    return np.concatenate([random, np.stack(list(awkward_rows(COLUMNS).values()))])


def random_importance(columns: int, seed: int = 1) -> np.ndarray:
    """Positive and spread over decades, as imatrix entries (mean squared activations) are."""
    return (10.0 ** np.random.default_rng(seed).uniform(-3, 2, columns)).astype(np.float32)


def degenerate_importance(kind: str, columns: int = COLUMNS) -> np.ndarray:
    values = {"ones": np.ones(columns), "zeros": np.zeros(columns), "huge": np.full(columns, 1e30),
              "tiny": np.full(columns, 1e-30), "half_zero": np.tile([0.0, 1.0], columns // 2)}[kind]
    return values.astype(np.float32)


@pytest.mark.parametrize("with_importance", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("qtype", ROW_QTYPES, ids=lambda qtype: qtype.name)
def test_row_quantizer_equals_ggml(qtype: QType, with_importance: bool) -> None:
    rows = sample_rows()
    importance = random_importance(COLUMNS) if with_importance else None
    with np.errstate(all="ignore"):
        expected = ggml_quantize_rows(rows, qtype, importance)
        encoded = ROW_QUANTIZERS[qtype](rows, importance)
    layout = BLOCK_LAYOUTS[qtype]
    assert encoded.shape == (rows.shape[0], COLUMNS // layout.weights * layout.nbytes)
    assert encoded.dtype == np.uint8
    assert encoded.tobytes() == expected


@pytest.mark.parametrize("kind", ["ones", "zeros", "huge", "tiny", "half_zero"])
@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda qtype: qtype.name)
def test_row_quantizer_equals_ggml_with_degenerate_importance(qtype: QType, kind: str) -> None:
    rows = sample_rows(count=16)
    importance = degenerate_importance(kind)
    with np.errstate(all="ignore"):
        assert ROW_QUANTIZERS[qtype](rows, importance).tobytes() == \
            ggml_quantize_rows(rows, qtype, importance)


@pytest.mark.parametrize("qtype", WEIGHTED, ids=lambda qtype: qtype.name)
def test_importance_changes_the_bytes(qtype: QType) -> None:
    """So the comparisons above cover ggml's weighted search, not its plain one twice."""
    rows = sample_rows(count=16)
    plain = ROW_QUANTIZERS[qtype](rows, None)
    assert not np.array_equal(plain, ROW_QUANTIZERS[qtype](rows, random_importance(COLUMNS)))


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.BF16, QType.F16], ids=lambda qtype: qtype.name)
def test_importance_is_ignored_where_ggml_ignores_it(qtype: QType) -> None:
    rows = sample_rows(count=16)
    assert np.array_equal(ROW_QUANTIZERS[qtype](rows, None),
                          ROW_QUANTIZERS[qtype](rows, random_importance(COLUMNS)))


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, (4, 256), elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=True)),
       arrays(np.float32, 256, elements=st.floats(0, 1e3, width=32)),
       st.sampled_from(WEIGHTED), st.booleans())
def test_row_quantizer_equals_ggml_on_fuzzed_rows(rows: np.ndarray, importance: np.ndarray,
                                                  qtype: QType, with_importance: bool) -> None:
    weights = importance if with_importance else None
    with np.errstate(all="ignore"):
        assert ROW_QUANTIZERS[qtype](rows, weights).tobytes() == \
            ggml_quantize_rows(rows, qtype, weights)


def test_row_quantizer_refuses_a_width_that_is_not_whole_blocks() -> None:
    with pytest.raises(InputError, match="multiple of 256"):
        ROW_QUANTIZERS[QType.IQ4_XS](np.zeros((2, 96), np.float32), None)


def test_row_quantizer_refuses_importance_of_another_width() -> None:
    with pytest.raises(InputError, match=r"importance of shape \(64,\): expected \(96,\)"):
        ROW_QUANTIZERS[QType.Q4_0](np.zeros((2, 96), np.float32), np.ones(64, np.float32))


@pytest.mark.parametrize("qtype", [qtype for qtype in dequant.DEQUANTIZABLE if qtype != QType.F32],
                         ids=lambda qtype: qtype.name)
def test_dequantize_equals_ggml(qtype: QType) -> None:
    """On ggml's own blocks of the sample rows, and on random bytes (any scale, any level)."""
    rows = sample_rows(count=32)
    random_bytes = np.random.default_rng(9).integers(0, 256, len(ggml_quantize_rows(rows, qtype)),
                                                     dtype=np.uint8)
    for data in (ggml_quantize_rows(rows, qtype), random_bytes.tobytes()):
        with np.errstate(all="ignore"):
            ours = dequant.dequantize(np.frombuffer(data, np.uint8), qtype, rows.shape)
        expected = ggml_dequantize(data, qtype, rows.size).reshape(rows.shape)
        assert ours.dtype == np.float32
        # equal_nan: random F16/BF16 bytes hold NaNs, whose payloads are not values
        assert np.array_equal(ours, expected, equal_nan=True)


def test_dequantize_f32_is_the_values_themselves() -> None:
    rows = sample_rows(count=4)
    assert np.array_equal(dequant.dequantize(rows.view(np.uint8), QType.F32, rows.shape), rows)


def test_dequantize_refuses_a_type_it_was_not_checked_on() -> None:
    with pytest.raises(IntegrityError, match="GGML type IQ2_XXS is not supported"):
        dequant.dequantize(np.zeros(66, np.uint8), QType.IQ2_XXS, (256,))


def test_compiled_types_say_they_need_a_c_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_quants, "_library", lambda: None)
    with pytest.raises(InputError, match="IQ4_XS: .* no C compiler worked"):
        ROW_QUANTIZERS[QType.IQ4_XS](np.zeros((1, 256), np.float32), None)
