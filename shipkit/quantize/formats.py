"""Block layouts and constants of the GGML quant formats we write (constants only, no logic).

Byte layouts follow ggml's `block_*` structs (ggml-common.h); every block is little-endian and
packed without padding. `QK_K` blocks are "super-blocks" of 256 weights split into sub-blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QType

QK_K = 256  # weights in a k-quant super-block
QK8_0 = 32  # weights in a Q8_0 / Q5_0 / Q5_1 block

# ggml-quants.c: a group whose largest |x| is below this is stored as all zeros (Q6_K).
GROUP_MAX_EPS = 1e-15

# ggml's nearest_int adds 1.5 * 2**23 so the float add rounds to an integer (half to even).
NEAREST_INT_MAGIC = 12582912.0


@dataclass(frozen=True)
class BlockLayout:
    """How many weights a block holds and how many bytes it takes."""

    weights: int
    nbytes: int


BLOCK_LAYOUTS: dict[QType, BlockLayout] = {
    QType.F32: BlockLayout(1, 4),
    QType.F16: BlockLayout(1, 2),
    QType.Q8_0: BlockLayout(QK8_0, 2 + QK8_0),  # d:f16, qs:int8[32]
    QType.Q5_0: BlockLayout(QK8_0, 2 + 4 + 16),  # d:f16, qh:u32, qs:u8[16]
    QType.Q5_1: BlockLayout(QK8_0, 2 + 2 + 4 + 16),  # d:f16, m:f16, qh:u32, qs:u8[16]
    QType.Q4_K: BlockLayout(QK_K, 2 + 2 + 12 + QK_K // 2),  # d, dmin:f16, scales:u8[12], qs:u8[128]
    QType.Q5_K: BlockLayout(QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # ... qh:u8[32], qs:u8[128]
    QType.Q6_K: BlockLayout(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql, qh, scales:i8, d
}


@dataclass(frozen=True)
class SearchParams:
    """Arguments of ggml's make_qkx2_quants for one k-quant: levels and the scale search grid."""

    nmax: int
    rmin: float
    rdelta: float
    nstep: int


# quantize_row_q4_K_ref / quantize_row_q5_K_ref (no importance matrix).
Q4_K_SEARCH = SearchParams(nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
Q5_K_SEARCH = SearchParams(nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)

# quantize_row_q6_K_ref: make_qx_quants(16, 32, x, L, rmse_type=1) over iscale offsets -9..9 (x0.1).
Q6_K_NMAX = 32
Q6_K_TRIES = tuple(step for step in range(-9, 10) if step != 0)

