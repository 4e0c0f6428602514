"""Block layouts and constants of the GGML quant formats (constants only, no logic).

Block sizes come from gguf-py's `GGML_QUANT_SIZES` (ggml's type traits); byte layouts follow
ggml's `block_*` structs (ggml-common.h), little-endian and packed without padding. `QK_K` blocks
are "super-blocks" of 256 weights split into sub-blocks. What gguf-py lacks is defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QType

QK_K = gguf.QK_K  # weights in a k-quant super-block
QK8_0 = gguf.GGML_QUANT_SIZES[QType.Q8_0][0]  # weights in a Q8_0 / Q5_0 / Q5_1 block

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
    qtype: BlockLayout(weights, nbytes) for qtype, (weights, nbytes) in gguf.GGML_QUANT_SIZES.items()}


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

