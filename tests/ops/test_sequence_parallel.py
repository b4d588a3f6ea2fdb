"""Context-parallel attention (fastflow/ops/sequence_parallel.py): Ulysses, Ring and USP on 2 and 4
gloo CPU ranks against the single-process ``ops.attention`` over all tokens; the log-sum-exp
attention against fp64; the communication log against a hand count; a compiled run; the errors.

One spawn per world size runs every scenario of that size (a spawn costs seconds of imports) and
returns a report per scenario, which the tests below check one by one."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.ops.reference import attention_lse_ref
from fastflow.ops.sequence_parallel import _merge
from tests.dist_util import check_ranks, run_ranks

B, D = 2, 8
FP32_RTOL = 1e-5
BF16_RTOL = 1.6e-2  # four bf16 ulps of the largest output: the blocks and the merge each round once

# name -> (ulysses, ring, lengths, heads, dtype)
SCENARIOS = {
    2: {
        "ulysses_even": (2, 1, (4, 4), 4, torch.float32),
        "ulysses_uneven": (2, 1, (5, 3), 4, torch.float32),
        "ring_even": (1, 2, (4, 4), 3, torch.float32),
        "ring_uneven": (1, 2, (5, 3), 3, torch.float32),
        "ulysses_bf16": (2, 1, (5, 3), 4, torch.bfloat16),
        "ring_bf16": (1, 2, (5, 3), 4, torch.bfloat16),
    },
    4: {
        "ulysses_even": (4, 1, (3, 3, 3, 3), 4, torch.float32),
        "ulysses_uneven": (4, 1, (7, 6, 1, 4), 4, torch.float32),
        "ring_even": (1, 4, (3, 3, 3, 3), 3, torch.float32),
        "ring_uneven": (1, 4, (7, 6, 1, 4), 3, torch.float32),
        "usp_even": (2, 2, (3, 3, 3, 3), 4, torch.float32),
        "usp_uneven": (2, 2, (7, 6, 1, 4), 6, torch.float32),
        "usp_bf16": (2, 2, (7, 6, 1, 4), 4, torch.bfloat16),
    },
}


# -- what runs on each rank -----------------------------------------------------------------------
@functools.cache
def _groups(u: int, r: int):
    """(ulysses group, ring group) of this rank for a world of u * r ranks laid out ring-major
    (global rank = ring_rank * u + ulysses_rank); every rank creates every group, in one order."""
    me, ulysses, ring = dist.get_rank(), None, None
    if u > 1:
        for i in range(r):
            ranks = [i * u + j for j in range(u)]
            group = dist.new_group(ranks)
            ulysses = group if me in ranks else ulysses
    if r > 1:
        for j in range(u):
            ranks = [i * u + j for i in range(r)]
            group = dist.new_group(ranks)
            ring = group if me in ranks else ring
    return ulysses, ring


def _sp(u: int, r: int, lengths) -> ops.SequenceParallel:
    ulysses, ring = _groups(u, r)
    return ops.SequenceParallel(ulysses, u, ring, r, tuple(lengths))


def _inputs(heads: int, lengths, dtype, seed: int = 0):
    """The whole sequence's q, k, v [B, H, L, D] as the models hand them over (views of [B, L, H,
    D]), the same on every rank, and this rank's token slice."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    full = [torch.randn(B, total, heads, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]
    me = dist.get_rank()
    start = sum(lengths[:me])
    return full, [t[:, :, start : start + lengths[me]] for t in full], slice(start, start + lengths[me])


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _check_scenario(u, r, lengths, heads, dtype) -> dict:
    full, local, mine = _inputs(heads, lengths, dtype)
    sp = _sp(u, r, lengths)
    got = ops.sp_attention(*local, sp)
    want = ops.attention(*full)[:, :, mine]
    only_local = ops.attention(*local)  # what a rank would get without the others' tokens
    return {
        "err": _rel(got, want),
        "err_without_others": _rel(only_local, want),
        "plain": type(got) is torch.Tensor,
        "layout": got.shape == want.shape and got.dtype == want.dtype and got.transpose(1, 2).is_contiguous(),
        "scaled_err": _rel(ops.sp_attention(*local, sp, scale=0.3), ops.attention(*full, 0.3)[:, :, mine]),
    }


def _comm_log(u, r, lengths, heads) -> list[tuple]:
    _, local, _ = _inputs(heads, lengths, torch.float32)
    with ops.count_comm() as log:
        ops.sp_attention(*local, _sp(u, r, lengths))
    return [(c.kind, c.collective, c.group_size, c.sent_bytes, c.received_bytes) for c in log]


def _compiled(u, r, lengths, heads, backend) -> float:
    full, local, mine = _inputs(heads, lengths, torch.float32, seed=1)
    sp = _sp(u, r, lengths)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: ops.sp_attention(q, k, v, sp), backend=backend, fullgraph=True)
    return _rel(fn(*local), ops.attention(*full)[:, :, mine])


def _heads_error(u, r, lengths) -> str:
    _, local, _ = _inputs(3, lengths, torch.float32)
    try:
        ops.sp_attention(*local, _sp(u, r, lengths))
    except InputError as e:
        return str(e)
    return "no error"


def _rank_main(world_size: int) -> dict:
    report = {name: _check_scenario(*case) for name, case in SCENARIOS[world_size].items()}
    if world_size == 2:
        report["comm_ulysses"] = _comm_log(2, 1, (5, 3), 4)
        report["comm_ring"] = _comm_log(1, 2, (5, 3), 4)
        report["heads_error"] = _heads_error(2, 1, (5, 3))
        report["compiled"] = _compiled(1, 2, (5, 3), 4, "inductor")
    else:
        report["comm_usp"] = _comm_log(2, 2, (7, 6, 1, 4), 4)
        report["heads_error"] = _heads_error(2, 2, (7, 6, 1, 4))
        report["compiled"] = _compiled(2, 2, (7, 6, 1, 4), 4, "aot_eager")
    return report


@functools.cache
def _reports(world_size: int) -> list[dict]:
    return check_ranks(run_ranks(_rank_main, world_size, world_size, timeout=300))


# -- the checks ------------------------------------------------------------------------------------
CASES = [(w, name) for w, table in SCENARIOS.items() for name in table]


@pytest.mark.parametrize(("world_size", "name"), CASES, ids=[f"{w}ranks-{n}" for w, n in CASES])
def test_matches_single_process_attention(world_size, name):
    dtype = SCENARIOS[world_size][name][-1]
    tol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
    for rank, report in enumerate(_reports(world_size)):
        rep = report[name]
        assert rep["err"] <= tol and rep["scaled_err"] <= tol, (rank, rep)
        assert rep["err_without_others"] > 0.1, (rank, rep)  # the other ranks' tokens matter here
        assert rep["plain"] and rep["layout"], (rank, rep)


@pytest.mark.parametrize("world_size", [2, 4])
def test_compiled_without_graph_breaks(world_size):
    for report in _reports(world_size):
        assert report["compiled"] <= FP32_RTOL


@pytest.mark.parametrize("world_size", [2, 4])
def test_heads_not_divisible_by_ulysses(world_size):
    for report in _reports(world_size):
        assert "3 attention heads" in report["heads_error"] and "ulysses size of 2" in report["heads_error"]
        assert "ring" in report["heads_error"]


def _a2a(kind, size, rows_out, rows_in, row_bytes):
    return (kind, "all_to_all_single", size, rows_out * row_bytes, rows_in * row_bytes)


def test_comm_log_counts_bytes_by_hand():
    f32, h = 4, 4
    ulysses, ring = (r["comm_ulysses"] for r in _reports(2)), (r["comm_ring"] for r in _reports(2))
    # Ulysses: q, k, v rows (one token, H/2 heads) to the other rank; then the outputs back
    qkv, out = 3 * B * (h // 2) * D * f32, B * (h // 2) * D * f32
    assert list(ulysses) == [
        [_a2a("ulysses_qkv", 2, 5, 3, qkv), _a2a("ulysses_out", 2, 3, 5, out)],
        [_a2a("ulysses_qkv", 2, 3, 5, qkv), _a2a("ulysses_out", 2, 5, 3, out)],
    ]
    kv = 2 * B * h * D * f32  # Ring: one hop of this rank's K and V, all heads
    assert list(ring) == [[_a2a("ring_kv", 2, 5, 3, kv)], [_a2a("ring_kv", 2, 3, 5, kv)]]


def test_comm_log_usp():
    lengths, heads = (7, 6, 1, 4), 4
    row = B * (heads // 2) * D * 4  # one token's H/U heads in fp32
    qkv, out, kv = 3 * row, row, 2 * row
    for rank, report in enumerate(_reports(4)):
        ring_rank, mate = divmod(rank, 2)[0], rank ^ 1  # ulysses partner: the other rank of the pair
        pair = lengths[2 * ring_rank : 2 * ring_rank + 2]
        other_pair = lengths[2 * (1 - ring_rank) : 2 * (1 - ring_rank) + 2]
        assert report["comm_usp"] == [
            _a2a("ulysses_qkv", 2, lengths[rank], lengths[mate], qkv),
            _a2a("ring_kv", 2, sum(pair), sum(other_pair), kv),
            _a2a("ulysses_out", 2, lengths[mate], lengths[rank], out),
        ], rank


# -- single process --------------------------------------------------------------------------------
def _fp64_attention(q, k, v, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.double(), lse


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])  # 30: scores in the hundreds, exp would overflow fp32
def test_attention_lse_ref_matches_fp64(logit_scale):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (9, 13, 13))
    q = q * logit_scale
    want_out, want_lse = _fp64_attention(q, k, v, 16**-0.5)
    for chunk in (1 << 26, 2 * 3 * 13 * 4 * 2):  # one chunk, and two query rows per chunk
        out, lse = attention_lse_ref(q, k, v, max_chunk_bytes=chunk)
        assert lse.dtype == torch.float32 and out.dtype == q.dtype
        assert out.transpose(1, 2).is_contiguous()  # the layout of ops.attention
        # fp32 scores of size |s| carry |s| * 2^-24 each: 1e-5 absolute on outputs of size ~1
        torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)
    out, lse = ops.attention_lse(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.2)
    want_out, want_lse = _fp64_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.2)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-4)


def test_merging_two_key_blocks_is_attention_over_both():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) * 3 for n in (5, 11, 11))
    a, b = ops.attention_lse(q, k[:, :, :4], v[:, :, :4]), ops.attention_lse(q, k[:, :, 4:], v[:, :, 4:])
    out, lse = _merge(a[0].float(), a[1], *b)
    want_out, want_lse = ops.attention_lse(q, k, v)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-5)


def test_attention_lse_falls_back_when_a_kernel_refuses(monkeypatch):
    """The CUDA kernels' eager fallback, on CPU: torch's flash / efficient SDPA ops raise there
    (NotImplementedError, a RuntimeError), so each is tried once, then the reference runs."""
    from fastflow.ops import sequence_parallel as sp_module

    failed: set = set()
    monkeypatch.setattr(sp_module, "_FAILED", failed)
    names = ("flash", "efficient")
    monkeypatch.setattr(
        sp_module, "_cuda_kernel", lambda q, k, v: next((n for n in names if (n, q.dtype, 8) not in failed), None)
    )
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (4, 6, 6))
    want = attention_lse_ref(q, k, v)
    for tried in (names[:1], names, names):
        got = ops.attention_lse(q, k, v)
        assert failed == {(n, torch.float32, 8) for n in tried}
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_one_rank_is_plain_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    sp = ops.SequenceParallel(None, 1, None, 1, (6,))
    assert (sp.sp_rank, sp.ring_rank, sp.ulysses_rank) == (0, 0, 0)
    torch.testing.assert_close(ops.sp_attention(q, k, v, sp), ops.attention(q, k, v), rtol=0, atol=0)
    with pytest.raises(InputError, match="holds 5 tokens but sp.lengths says 6"):
        ops.sp_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], sp)
    with pytest.raises(InputError, match="one shape"):
        ops.sp_attention(q, k[:, :, :5], v, sp)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((None, 2, None, 1, (3, 3)), "no ulysses_group"),
        ((None, 1, None, 2, (3, 3)), "no ring_group"),
        ((None, 1, None, 1, (3, 3)), "must give 1 token counts"),
        ((None, 1, None, 1, (0,)), "each an integer >= 1"),
        ((None, 0, None, 1, ()), "positive integer"),
    ],
)
def test_bad_sequence_parallel(args, match):
    with pytest.raises(InputError, match=match):
        ops.SequenceParallel(*args)


# -- torch's fake process group: one process as rank r of a bigger world (the comm bench's way) ------
def _fake_world(rank: int, world_size: int, ulysses: int, ring: int, lengths, heads: int) -> list[tuple]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
        sp = ops.SequenceParallel(mesh.get_group("ulysses"), ulysses, mesh.get_group("ring"), ring, lengths)
        q, k, v = (torch.empty(1, heads, lengths[sp.sp_rank], 128, dtype=torch.bfloat16, device="meta") for _ in "qkv")
        with ops.count_comm() as log:
            out = ops.sp_attention(q, k, v, sp)
        assert out.shape == q.shape and out.device.type == "meta"
        return [(c.kind, c.group_size, c.sent_bytes, c.received_bytes) for c in log]
    finally:
        dist.destroy_process_group()


def test_fake_process_group_counts_a_rank_of_eight():
    lengths = (600, 600, 600, 600, 600, 600, 600, 392)  # 4608 tokens over 8 ranks
    (log,) = check_ranks(run_ranks(_fake_world, 1, 5, 8, 4, 2, lengths, 24, init=False, timeout=120))
    row = 24 // 4 * 128 * 2  # one token's H/U heads in bf16
    ring = [4 * 600, 600 * 3 + 392]  # tokens per ring rank; rank 5 is ring rank 1, ulysses rank 1
    others = 600 + 600 + 392  # the tokens of the other three ranks of its ulysses group (4..7)
    assert log == [
        ("ulysses_qkv", 4, 3 * 3 * 600 * row, 3 * others * row),
        ("ring_kv", 2, 2 * ring[1] * row, 2 * ring[0] * row),
        ("ulysses_out", 4, others * row, 3 * 600 * row),
    ]
