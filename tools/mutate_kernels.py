"""Mutation check of the kernel tests: small wrong changes to the Triton kernels must fail a test.

Each mutation replaces one exact snippet of a kernel source (the snippet must occur exactly once,
so a refactor that removes it fails this tool loudly instead of silently testing nothing), runs the
named tests under the Triton interpreter, and restores the file. A mutation that no test catches
is a hole in the tests. The model-level check (the attention output scaled by 1.01 must fail the
bf16 FLUX model test at head dims 64 / 128) is the one the issue tracker reported escaping.

    python tools/mutate_kernels.py [--only NAME ...] [--list]

Exit 0 when every mutation is caught. Refuses to run on a kernel file with uncommitted changes
(it edits the files in place and restores them from memory, and on a crash from git).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


ATT = "fastflow/kernels/attention.py"
QKR = "fastflow/kernels/qk_norm_rope.py"
MODEL_ATTENTION = "tests/kernels/test_model_kernels.py::test_flux_attention_kernel_inside_the_model_fp32"
MUTATIONS = (
    Mutation(
        "attention output x 1.01 (model test)",
        ATT,
        "out = acc / l_i[:, None]",
        "out = acc / l_i[:, None] * 1.01",
        (MODEL_ATTENTION,),
    ),
    Mutation(
        "attention output x 1.01",
        ATT,
        "out = acc / l_i[:, None]",
        "out = acc / l_i[:, None] * 1.01",
        ("tests/kernels/test_attention.py",),
    ),
    Mutation(
        "attention without the online-softmax rescale",
        ATT,
        "acc = acc * alpha[:, None]",
        "acc = acc",
        ("tests/kernels/test_attention.py",),
    ),
    Mutation(
        "attention tail unmasked",
        ATT,
        '        s = tl.where((start + tl.arange(0, BLOCK_N))[None, :] < N, s, float("-inf"))',
        "        s = s",
        ("tests/kernels/test_attention.py",),
    ),
    Mutation(
        "attention exp2 without the log2(e) factor",
        ATT,
        "sm_scale * 1.4426950408889634",
        "sm_scale",
        ("tests/kernels/test_attention.py",),
    ),
    Mutation(
        "qk_norm_rope rotation sign",
        QKR,
        "even * cos - odd * sin",
        "even * cos + odd * sin",
        ("tests/kernels/test_qk_norm_rope.py",),
    ),
    Mutation(
        "qk_norm_rope joint offset ignored",
        QKR,
        "* L_OUT + T_OFF + t) * D",
        "* L_OUT + t) * D",
        ("tests/kernels/test_qk_norm_rope.py",),
    ),
    Mutation(
        "qk_norm_rope eps dropped",
        QKR,
        "/ D + eps)",
        "/ D + 1e-2)",
        ("tests/kernels/test_qk_norm_rope.py",),
    ),
    Mutation(
        "layernorm_modulate: scale instead of 1 + scale",
        "fastflow/kernels/layernorm_modulate.py",
        "return diff * rstd * (1.0 + scale) + shift",
        "return diff * rstd * scale + shift",
        ("tests/kernels/test_layernorm_modulate.py",),
    ),
    Mutation(
        "layernorm_modulate: biased variance off by one",
        "fastflow/kernels/layernorm_modulate.py",
        "tl.sum(diff * diff, axis=0) / C + eps",
        "tl.sum(diff * diff, axis=0) / (C - 1) + eps",
        ("tests/kernels/test_layernorm_modulate.py",),
    ),
    Mutation(
        "gated_residual: gate dropped",
        "fastflow/kernels/gated_residual.py",
        "(x + gate * y).to(out_ptr.dtype.element_ty)",
        "(x + y).to(out_ptr.dtype.element_ty)",
        ("tests/kernels/test_gated_residual.py",),
    ),
    Mutation(
        "gated_residual_layernorm_modulate: LayerNorm of x instead of the residual",
        "fastflow/kernels/gated_residual_layernorm_modulate.py",
        "    return r.to(tl.float32)",
        "    return x",
        ("tests/kernels/test_gated_residual_layernorm_modulate.py",),
    ),
    Mutation(
        "geglu: value read from the gate half",
        "fastflow/kernels/geglu.py",
        "h = tl.load(x_ptr + src, mask=mask",
        "h = tl.load(x_ptr + src + INNER, mask=mask",
        ("tests/kernels/test_geglu.py",),
    ),
    Mutation(
        "gelu_tanh constant",
        "fastflow/kernels/gelu_tanh.py",
        "(x + 0.044715 * x * x * x)",
        "(x + 0.045 * x * x * x)",
        ("tests/kernels/test_gelu_tanh.py",),
    ),
    Mutation(
        "groupnorm_silu: Chan combine without the between-split term",
        "fastflow/kernels/groupnorm_silu.py",
        "var = (tl.sum(m2_i, axis=0) + tl.sum(n_i * delta * delta, axis=0)) / count",
        "var = tl.sum(m2_i, axis=0) / count",
        ("tests/kernels/test_groupnorm_silu.py",),
    ),
    Mutation(
        "groupnorm_silu: SiLU dropped",
        "fastflow/kernels/groupnorm_silu.py",
        "(y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty)",
        "y.to(out_ptr.dtype.element_ty)",
        ("tests/kernels/test_groupnorm_silu.py",),
    ),
    Mutation(
        "fp8_quantize: scale not stored as amax / 448",
        "fastflow/kernels/fp8_quantize.py",
        "tl.store(scale_ptr + row, tl.math.div_rn(amax, _FP8_MAX))",
        "tl.store(scale_ptr + row, tl.math.div_rn(amax, _FP8_MAX) * 1.01)",
        ("tests/kernels/test_fp8.py",),
    ),
    Mutation(
        "fp8_gemm: bias dropped",
        "fastflow/kernels/fp8_gemm.py",
        "acc = acc + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]",
        "acc = acc",
        ("tests/kernels/test_fp8.py",),
    ),
    Mutation(
        "fp8_gemm: weight scale dropped",
        "fastflow/kernels/fp8_gemm.py",
        "acc = acc * b_scale[None, :]",
        "acc = acc",
        ("tests/kernels/test_fp8.py",),
    ),
    Mutation(
        "attention_gelu_concat: GELU dropped",
        "fastflow/kernels/attention_gelu_concat.py",
        "gelu_tanh_f32(x).to(out_ptr.dtype.element_ty)",
        "x.to(out_ptr.dtype.element_ty)",
        ("tests/kernels/test_attention_gelu_concat.py",),
    ),
)


def _dirty(paths) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()]


def run(mutation: Mutation) -> tuple[bool, float, str]:
    """(caught, seconds, last output line) for one mutation; the file is restored in every case."""
    path = ROOT / mutation.path
    source = path.read_text()
    if source.count(mutation.original) != 1:
        raise SystemExit(
            f"mutation {mutation.name!r}: the snippet occurs {source.count(mutation.original)} times in "
            f"{mutation.path} (must be once): update tools/mutate_kernels.py with the kernel"
        )
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    try:
        path.write_text(source.replace(mutation.original, mutation.mutated))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(source)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode not in (0, 1):  # 2-5: collection error, usage, no tests: not a catch
        raise SystemExit(f"mutation {mutation.name!r}: pytest exited {proc.returncode}:\n{proc.stdout[-2000:]}")
    return proc.returncode == 1, time.perf_counter() - start, lines[-1] if lines else ""


def _interrupt(signum, frame):
    """SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally blocks restore the kernels."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="mutation names (substring match)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(o in m.name for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    dirty = _dirty(sorted({m.path for m in chosen}))
    if dirty:
        print("refusing to mutate files with uncommitted changes:\n" + "\n".join(dirty), file=sys.stderr)
        return 2
    missed = []
    try:
        for m in chosen:
            caught, seconds, last = run(m)
            print(f"{'caught' if caught else 'MISSED':<7} {seconds:6.1f} s  {m.name}  ({last})", flush=True)
            if not caught:
                missed.append(m.name)
    finally:
        if _dirty(sorted({m.path for m in chosen})):  # a crash between write and restore
            subprocess.run(["git", "checkout", "--", *sorted({m.path for m in chosen})], cwd=ROOT, check=False)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
