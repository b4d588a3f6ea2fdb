"""Numerical emulation of FP8 GEMM accumulation on Hopper (sm_90 wgmma), to choose the Triton FP8
GEMM's ``max_num_imprecise_acc`` (docs/kernels.md, FP8 section).

The hardware, as measured by others (no NVIDIA document states it):
* DeepSeek-V3 technical report, section 3.5.2: each FP8 MMA aligns its products to the largest
  exponent by right shifts, keeps the highest 14 bits of each aligned product and truncates the
  rest, and accumulates into the register with 14-bit precision; DeepSeek promotes the partial sum
  to fp32 on the CUDA cores every 128 K elements (4 wgmma instructions).
* SageAttention2 (and its issue threads): the accumulator of the f32 += f8 x f8 MMA is "FP22",
  1 sign, 8 exponent and 13 stored mantissa bits: an accumulator value with more bits comes back
  with its 10 lowest mantissa bits cut (truncated, not rounded).
* Triton: ``tl.dot(..., max_num_imprecise_acc=n)`` for fp8 x fp8 -> fp32 on sm_90 adds the wgmma
  partial sum into a separate fp32 accumulator every n K elements (n <= the dot's K; 32: after every
  instruction; 0 is not "every instruction": Triton 3.9 then lowers the dot to mma.sync, no wgmma).
  Without it, sm_90's default is 2**30: the whole K loop stays in the wgmma accumulator and is
  never promoted (triton-lang/triton#2300; other GPUs: always fp32).

The model (:func:`emulate`): one wgmma instruction takes 32 K elements; the running partial C and
the 32 exact products are aligned to the largest exponent among them, each truncated toward zero to
14 significant bits at that exponent, summed exactly, and the sum truncated to 14 significant bits
(e8m13). Every ``interval`` K elements the partial is added to the fp32 accumulator with fp32
rounding and restarts at zero. Errors are measured against the exact (fp64) sum of the same FP8
codes, so only the accumulation is measured, not the quantization.

    python tools/fp8_accumulation.py          # the table in docs/kernels.md
"""

from __future__ import annotations

import numpy as np
import torch

MMA_K = 32  # K elements of one fp8 wgmma instruction
BITS = 14  # significant bits kept (13 stored + the leading one)
NEVER = 2**30  # Triton's default max_num_imprecise_acc on sm_90: no promotion


def _exponent(x: np.ndarray) -> np.ndarray:
    """floor(log2 |x|) (the leading bit's exponent); very small for 0."""
    _, e = np.frexp(x)
    return np.where(x == 0, -1000, e - 1)


def _truncate(x: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """x truncated toward zero to BITS significant bits counted from the bit 2**lead."""
    ulp = np.ldexp(1.0, (lead - BITS + 1).astype(np.int64))
    return np.trunc(x / ulp) * ulp


def _mma(c: np.ndarray, products: np.ndarray) -> np.ndarray:
    """One instruction: c [R] + products [R, 32] in the limited-precision accumulator."""
    terms = np.concatenate([c[:, None], products], axis=1)  # [R, 33]
    lead = _exponent(terms).max(axis=1, keepdims=True)
    s = _truncate(terms, lead).sum(axis=1)  # exact: every term is a multiple of the same ulp
    return _truncate(s, _exponent(s))


def interval_of(max_num_imprecise_acc: int, k: int) -> int:
    """K elements between promotions for a tl.dot setting (Triton promotes after the instruction
    that reaches the count, and at the end of every tl.dot)."""
    if max_num_imprecise_acc >= k:
        return k
    return max(MMA_K, -(-max_num_imprecise_acc // MMA_K) * MMA_K)


def emulate(a: np.ndarray, b: np.ndarray, interval: int) -> np.ndarray:
    """sum_k a[r, k] * b[r, k] per row r (a, b [R, K] fp8 values as fp64, K a multiple of 32) with
    the wgmma accumulator promoted to fp32 every ``interval`` K elements. Returns fp64 [R]."""
    rows, k = a.shape
    products = a * b  # exact: 4-bit x 4-bit significands
    acc = np.zeros(rows, dtype=np.float32)
    partial = np.zeros(rows)
    for start in range(0, k, MMA_K):
        partial = _mma(partial, products[:, start : start + MMA_K])
        if (start + MMA_K) % interval == 0 or start + MMA_K == k:
            acc = (acc + partial.astype(np.float32)).astype(np.float32)
            partial = np.zeros(rows)
    return acc.astype(np.float64)


def flux_operands(k: int, rows: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """FP8 codes of FLUX-like operands, paired row by row: activations per-token quantized
    (standard normal, 8 outlier channels x 50, log-normal token norms), weights per-channel
    quantized (Student-t with 4 degrees of freedom). Returns fp64 [rows, K] each."""
    from fastflow.ops.reference import fp8_quantize_ref

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:8]] *= 50.0
    x *= torch.exp(torch.randn(rows, 1, generator=g))
    chi2 = (torch.randn(4, rows, k, generator=g) ** 2).sum(dim=0)  # 4 degrees of freedom
    w = torch.randn(rows, k, generator=g) / torch.sqrt(chi2 / 4)  # Student-t, seeded
    qa, _ = fp8_quantize_ref(x, None, True)
    qb, _ = fp8_quantize_ref(w, None, True)
    return qa.double().numpy(), qb.double().numpy()


def errors(k: int, interval: int, rows: int = 2048, seed: int = 0) -> dict[str, float]:
    """Accumulation error against the exact sum: relative RMS over the outputs (||y - y64|| / ||y64||)
    and the largest error relative to the output's own magnitude scale (sum_k |a b|)."""
    a, b = flux_operands(k, rows, seed)
    exact = (a * b).sum(axis=1)
    got = emulate(a, b, interval)
    scale = np.abs(a * b).sum(axis=1)
    return {
        "rel_rms": float(np.linalg.norm(got - exact) / np.linalg.norm(exact)),
        "max_rel_abs": float((np.abs(got - exact) / scale).max()),
    }


MODES = {  # label -> max_num_imprecise_acc
    "Triton default on sm_90 (2**30: never promoted)": NEVER,
    "max_num_imprecise_acc=128 (every 4 wgmma; fastflow's)": 128,
    "max_num_imprecise_acc=32 (every wgmma)": 32,
}


def table(ks=(3072, 15360), rows: int = 2048) -> str:
    lines = ["| mode | K | interval | rel. RMS error | max error / sum abs |", "|---|---|---|---|---|"]
    for label, setting in MODES.items():
        for k in ks:
            iv = interval_of(setting, k)
            e = errors(k, iv, rows)
            lines.append(f"| {label} | {k} | {iv} | {e['rel_rms']:.2e} | {e['max_rel_abs']:.2e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
