"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter.

TRITON_INTERPRET is set by the root conftest before anything imports triton.
"""

import os

import pytest

triton = pytest.importorskip("triton")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/kernels/" in str(item.fspath) and not INTERPRETING:
            item.add_marker(pytest.mark.skip(reason="interpreter tests (TRITON_INTERPRET=0 was set)"))


from . import interp_compat  # noqa: E402

interp_compat.install()
