"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter, or, with
TRITON_INTERPRET=0 on a machine with a CUDA GPU, compiled on the GPU (bench/README.md, GPU run
book). Tests that build whole models on CPU tensors run under the interpreter only.

TRITON_INTERPRET is set by the root conftest before anything imports triton.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = not INTERPRETING and torch.cuda.is_available()
CPU_ONLY = ("test_model_kernels.py", "test_swapped_layers.py", "test_fp8_dispatch.py")  # test_fp8.py builds on DEVICE


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/kernels/" not in str(item.fspath):
            continue
        if not INTERPRETING and not ON_GPU:
            item.add_marker(pytest.mark.skip(reason="interpreter tests (TRITON_INTERPRET=0 and no CUDA GPU)"))
        elif ON_GPU and item.fspath.basename in CPU_ONLY:
            item.add_marker(pytest.mark.skip(reason="builds its inputs on CPU: run it with TRITON_INTERPRET=1"))


if INTERPRETING:
    from . import interp_compat

    interp_compat.install()
