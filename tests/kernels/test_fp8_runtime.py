"""The FP8 GEMM's run-time set-up off the GPU: Triton's allocator (TMA descriptors need scratch memory)
is set in every thread that launches, not once per process (Triton keeps it per thread / context)."""

import threading

import pytest
import torch

from fastflow.kernels import _common


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.fixture
def calls(monkeypatch):
    """Records triton.set_allocator calls; the real one is never called (no GPU here)."""
    seen = []
    monkeypatch.setattr(_common.triton, "set_allocator", lambda fn: seen.append((threading.get_ident(), fn)))
    return seen


def test_a_second_threads_first_launch_sets_the_allocator(calls):
    cuda = torch.device("cuda")  # a device object only: nothing touches a GPU
    _in_thread(lambda: _common.ensure_allocator(cuda))  # a first thread (e.g. the warm-up)
    assert len(calls) == 1
    _in_thread(lambda: _common.ensure_allocator(cuda))  # a server worker's first FP8 call
    assert len(calls) == 2  # (thread idents may be reused once a thread ends: not compared)
    _common.ensure_allocator(torch.device("cpu"))  # the interpreter needs none
    assert len(calls) == 2


def test_the_allocator_is_set_once_per_thread(calls):
    cuda = torch.device("cuda")

    def twice():
        before = len(calls)
        _common.ensure_allocator(cuda)
        _common.ensure_allocator(cuda)
        return len(calls) - before

    assert _in_thread(twice) == 1


def test_tritons_allocator_is_visible_in_the_thread_that_set_it():
    """With Triton's real set_allocator (a ContextVar, no GPU needed to set it): a thread that did not
    set it sees the null allocator, so setting it once per process cannot serve a worker pool."""
    from triton.runtime import _allocation

    def state():
        before = _allocation._allocator.get() is _common._scratch
        _common.ensure_allocator(torch.device("cuda"))
        return before, _allocation._allocator.get() is _common._scratch

    assert _in_thread(state) == (False, True)
    assert _in_thread(state) == (False, True)
