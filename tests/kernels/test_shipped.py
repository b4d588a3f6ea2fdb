"""Kernel facts live beside the kernels: every module the op registry names plans its launches and
exports the shipped shapes the kernel report compiles and the benches measure."""

import importlib
import inspect

import pytest
import torch

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.ops._registry import kernel_modules

MODULES = kernel_modules()


def test_every_op_with_a_kernel_names_its_module():
    assert len(MODULES) == 12
    with_kernels = {n: o for n, o in ops.OPS.items() if o.impls and not n.startswith("_test")}
    assert len(with_kernels) >= 20  # the int8 ops have none: their fast path is torch._int_mm
    for name, opdef in with_kernels.items():
        assert opdef.kernel_modules(), f"{name} has no Triton kernel module"


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("arch", [80, 89, 90, 100, 120])
def test_shipped_launches_bind_to_their_kernel(module, arch):
    launches = importlib.import_module(module).shipped(arch)
    fp8_below_sm89 = "fp8" in module and arch < 89  # dequantized at load: nothing ships
    assert (not launches) if fp8_below_sm89 else launches
    assert len({label for label, _ in launches}) == len(launches)
    for label, launch in launches:
        constexprs = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
        inspect.signature(launch.kernel.fn).bind(*launch.args, **constexprs)  # every parameter given once
        assert all(t.device.type == "meta" for t in (*launch.reads, *launch.writes)), label
        assert launch.bytes_moved > 0


def test_attention_configs_follow_the_architecture():
    from fastflow.kernels.attention import CONFIGS, shipped

    for arch, major in ((80, 8), (86, 8), (89, 8), (90, 9), (100, 10), (120, 8)):
        for label, launch in shipped(arch):
            d = launch.meta["HEAD_DIM"]
            assert (launch.meta["BLOCK_M"], launch.meta["BLOCK_N"]) == CONFIGS[(major, d)][:2], label


def test_bytes_moved_counts_one_read_and_one_write():
    from fastflow.kernels.layernorm_modulate import plan

    x = torch.empty(2, 5, 96, device="meta", dtype=torch.bfloat16)
    vec = torch.empty(2, 96, device="meta", dtype=torch.bfloat16)
    assert plan(x, vec, vec, 1e-6).bytes_moved == 2 * (2 * 2 * 5 * 96 + 2 * 2 * 96)


def test_rows_wider_than_the_row_kernels_are_refused():
    from fastflow.kernels.layernorm_modulate import plan

    x = torch.empty(1, 2, 70_000, device="meta")
    with pytest.raises(InputError, match="65536"):
        plan(x, x[:, 0], x[:, 0], 1e-6)


def test_kernel_report_reads_vector_widths_and_knows_every_arch():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "kernel_report.py"
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    ptx = "@%p1 ld.global.L1::evict_last.v4.b32 {%r1, %r2, %r3, %r4}, [%rd3];\n st.global.v2.b16 [%rd4], {%rs1, %rs2};"
    assert report._vector_widths(ptx) == ("128", "32")
    assert report._vector_widths("cp.async.bulk.tensor.2d") == ("-", "-")
    assert {80, 89, 90, 100, 120} <= set(report.SMEM_LIMIT)
