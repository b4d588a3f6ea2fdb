"""Launch heuristics shared by the row kernels (next power of two, a warps table)."""

from __future__ import annotations

import triton


def row_block(n: int) -> int:
    """Block covering a whole row of n elements (rows up to 32768 here: FLUX/SD3 widths and MLPs)."""
    return max(16, triton.next_power_of_2(n))


def row_warps(block: int) -> int:
    """Warps for a row block: about 8 elements per thread for wide rows, at least one warp."""
    return max(1, min(16, block // 256))
