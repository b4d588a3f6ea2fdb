"""Context parallelism for attention: Ulysses, Ring and both (USP) over torch.distributed.

The tokens of one sequence are spread over a sequence group of ``ulysses_size * ring_size`` ranks
(sequence-group rank ``ring_rank * ulysses_size + ulysses_rank``), each holding ``lengths[rank]``
tokens (uneven counts allowed, no padding). :func:`sp_attention` gives every rank what
``ops.attention`` would give for its own queries attending over the keys / values of all ranks:

* Ulysses: one ``all_to_all_single`` turns sequence shards into head shards (q, k and v packed in
  one message; H / U heads of the ulysses group's union of tokens; uneven counts through the split
  sizes), the local attention is ``ops.attention`` (so the tuned GPU backends apply), and one
  inverse all-to-all brings each rank its own tokens' outputs back with all heads.
* Ring: K / V (packed) go around the ring group in ``ring_size - 1`` hops, each hop an
  ``all_to_all_single`` with one non-zero send split (to the next rank) and one non-zero receive
  split (from the previous one), issued before the current block's attention so the transfer
  overlaps it. Each block's partial attention comes with its log-sum-exp (:func:`attention_lse`);
  the blocks are merged in fp32 (``logaddexp`` of the LSEs and rescaling, never an exp of a large
  number) and the result is cast to q's dtype once.
* USP: the Ulysses all-to-all in the ulysses group, the ring over the ring group on the head
  shard, then the inverse all-to-all.

Collectives are torch.distributed's functional collectives (``_functional_collectives``), which
torch.compile traces without graph breaks; eagerly they return ``AsyncCollectiveTensor`` s that
are waited for where the data is needed. Checked on CPU with gloo (2 and 4 ranks), eagerly and
under ``torch.compile(fullgraph=True)`` with both the "aot_eager" and "inductor" backends.

:func:`attention_lse` on CUDA uses torch's own kernels that return the log-sum-exp: the flash
attention aten op (fp16 / bf16, head dim a multiple of 8 up to 256, sm_80+), else the memory-
efficient one (any float dtype), else the plain-torch :func:`~.reference.attention_lse_ref`, which
is also what runs on CPU and the fallback when a kernel refuses the call (eagerly).

Counting communication: ``with count_comm() as log:`` collects a :class:`CommRecord` (kind,
group size, bytes sent to and received from the other ranks) per collective issued eagerly (the
log is a context variable; compiled code does not record; :func:`record_comm` logs collectives
issued elsewhere, as fastflow.parallel's gathers and broadcasts do). torch's fake process group lets one
process act as rank r of a world of any size, so the counts come from the real collectives without
the other ranks (their contents are garbage, their sizes are right; meta tensors work too)::

    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=8)
    mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    sp = SequenceParallel(mesh.get_group("ulysses"), ulysses, mesh.get_group("ring"), ring, lengths)
    with count_comm() as log:
        sp_attention(q, k, v, sp)
    sum(rec.sent_bytes for rec in log)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ..errors import InputError
from ._registry import OPS
from .reference import attention_layout, attention_lse_ref


@dataclass(frozen=True)
class SequenceParallel:
    """Where this rank's tokens sit in its sequence group.

    ``lengths[i]`` is the number of tokens held by sequence-group rank i (``ring_rank *
    ulysses_size + ulysses_rank``), every one >= 1; a group is None exactly when its size is 1.
    The ranks are read from the groups (``dist.get_rank(group)``)."""

    ulysses_group: dist.ProcessGroup | None
    ulysses_size: int
    ring_group: dist.ProcessGroup | None
    ring_size: int
    lengths: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(self.lengths))
        for name, size, group in (
            ("ulysses", self.ulysses_size, self.ulysses_group),
            ("ring", self.ring_size, self.ring_group),
        ):
            if not isinstance(size, int) or size < 1:
                raise InputError(f"{name}_size must be a positive integer, not {size!r}")
            if group is None:
                if size > 1:
                    raise InputError(f"{name}_size is {size} but no {name}_group was given: pass the process group")
                continue
            if dist.get_world_size(group) != size:
                raise InputError(
                    f"the {name} group has {dist.get_world_size(group)} ranks but {name}_size is {size}: "
                    "pass the group's size"
                )
            if dist.get_rank(group) < 0:
                raise InputError(f"this process is not a member of the {name} group it was given")
        count = self.ulysses_size * self.ring_size
        if len(self.lengths) != count or not all(isinstance(n, int) and n >= 1 for n in self.lengths):
            raise InputError(
                f"lengths must give {count} token counts (ulysses_size {self.ulysses_size} x ring_size "
                f"{self.ring_size}), each an integer >= 1; got {self.lengths}"
            )

    @property
    def ulysses_rank(self) -> int:
        return 0 if self.ulysses_group is None else dist.get_rank(self.ulysses_group)

    @property
    def ring_rank(self) -> int:
        return 0 if self.ring_group is None else dist.get_rank(self.ring_group)

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank


# -- communication log ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommRecord:
    """One collective, issued by :func:`sp_attention` or recorded with :func:`record_comm`.

    ``kind``: "ulysses_qkv" (q, k, v to head shards), "ulysses_out" (the inverse) or "ring_kv" (one
    hop of K / V) here; fastflow.parallel adds "gather_tokens", "gather_rows", "decode_rows",
    "broadcast_noise", "broadcast_seed" and "reduce_change". ``collective`` is the torch.distributed
    call. Bytes count what this rank sends to and receives from the other ranks of the group (the
    part of an all-to-all it keeps is not sent; an all-gather sends its buffer to every other rank;
    an all-reduce counts a ring's 2 (n - 1) / n of the buffer each way)."""

    kind: str
    collective: str
    group_size: int
    sent_bytes: int
    received_bytes: int


_COMM_LOGS: contextvars.ContextVar[tuple[list[CommRecord], ...]] = contextvars.ContextVar(
    "fastflow_sp_comm_logs", default=()
)


@contextlib.contextmanager
def count_comm() -> Iterator[list[CommRecord]]:
    """``with count_comm() as log:``: every collective that :func:`sp_attention` issues eagerly in
    this context (thread / task), and every one recorded through :func:`record_comm` (the gathers,
    broadcasts and reductions of fastflow.parallel), is appended to ``log``, a list of
    :class:`CommRecord`. Nested
    contexts each see the collectives issued inside them."""
    log: list[CommRecord] = []
    token = _COMM_LOGS.set((*_COMM_LOGS.get(), log))
    try:
        yield log
    finally:
        _COMM_LOGS.reset(token)


def record_comm(kind: str, collective: str, group_size: int, sent_bytes: int, received_bytes: int) -> None:
    """Log one collective in every open :func:`count_comm` context (nothing when none is open, or
    while compiling). Called just before the collective is issued."""
    if torch.compiler.is_compiling():
        return
    logs = _COMM_LOGS.get()
    if not logs:
        return
    rec = CommRecord(kind, collective, group_size, int(sent_bytes), int(received_bytes))
    for log in logs:
        log.append(rec)


def _record(kind: str, x: torch.Tensor, out_splits: list[int], in_splits: list[int], me: int) -> None:
    row = x.numel() // max(1, x.shape[0]) * x.element_size()  # bytes per row of dim 0
    sent, received = row * (sum(in_splits) - in_splits[me]), row * (sum(out_splits) - out_splits[me])
    record_comm(kind, "all_to_all_single", len(in_splits), sent, received)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, me: int, kind: str):
    """``funcol.all_to_all_single`` along dim 0 of a contiguous ``x`` (rows to rank j: in_splits[j];
    rows from rank j: out_splits[j]), logged. Eagerly the result is an ``AsyncCollectiveTensor``:
    :func:`_ready` waits for it."""
    if not torch.compiler.is_compiling():
        _record(kind, x, out_splits, in_splits, me)
    return funcol.all_to_all_single(x, out_splits, in_splits, group)


def _ready(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


# -- attention with its log-sum-exp ------------------------------------------------------------------
_FAILED: set[tuple[str, torch.dtype, int]] = set()  # (kernel, dtype, head dim) that raised once (eagerly)


def _cuda_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if not (q.is_cuda and q.dtype == k.dtype == v.dtype and all(t.stride(-1) == 1 for t in (q, k, v))):
        return None
    d = q.shape[-1]
    if d % 8 or v.shape[-1] != d:  # 16-byte aligned rows for both kernels
        return None
    if (
        q.dtype in (torch.float16, torch.bfloat16)
        and d <= 256
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
        and ("flash", q.dtype, d) not in _FAILED
    ):
        return "flash"
    if q.dtype in (torch.float16, torch.bfloat16, torch.float32) and ("efficient", q.dtype, d) not in _FAILED:
        return "efficient"
    return None


def _run_kernel(name: str, q, k, v, scale):
    aten = torch.ops.aten
    if name == "flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)[:2]
    return out, lse[:, :, : q.shape[2]].float()  # the efficient kernel may pad the LSE's query dim


def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp: (out [B, H, M, Dv] in q's dtype, lse [B, H, M] fp32, natural
    log of sum_j exp(scale * q.k_j)); q [B, H, M, D], k [B, H, N, D], v [B, H, N, Dv], scale
    defaulting to 1/sqrt(D). On CUDA torch's flash or memory-efficient SDPA kernel (see the module
    docstring); elsewhere, and when a kernel refuses the call, :func:`~.reference.attention_lse_ref`."""
    name = _cuda_kernel(q, k, v)
    if name is not None:
        if torch.compiler.is_compiling():
            return _run_kernel(name, q, k, v, scale)
        try:
            return _run_kernel(name, q, k, v, scale)
        except RuntimeError:
            _FAILED.add((name, q.dtype, q.shape[-1]))  # e.g. a build without it: not tried again
    return attention_lse_ref(q, k, v, scale)


def _merge(out: torch.Tensor, lse: torch.Tensor, block: torch.Tensor, block_lse: torch.Tensor):
    """Two partial attentions over disjoint keys, in fp32: weights exp(lse_i - lse), lse their
    logaddexp (every exponent <= 0, so nothing overflows)."""
    new = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new).unsqueeze(-1) + block.float() * torch.exp(block_lse - new).unsqueeze(-1)
    return out, new


# -- the schemes ---------------------------------------------------------------------------------------
def _local_attention(q, k, v, scale):
    # The op's own wrapper, looked up at call time rather than imported from .attention, so that
    # attention.py can itself dispatch to sp_attention without an import cycle.
    return OPS["attention"].call(q, k, v, scale)


def _to_heads(q, k, v, sp: SequenceParallel, lengths: tuple[int, ...]) -> torch.Tensor:
    """This rank's q, k, v [B, H, n, D] -> [sum(lengths), 3, B, H/U, D]: the ulysses group's tokens
    (in ulysses rank order) for this rank's H/U heads."""
    u = sp.ulysses_size
    h = q.shape[1]
    # [U, n, 3, B, H/U, D]: the rows for ulysses rank j are its heads of all of this rank's tokens
    send = torch.stack([t.unflatten(1, (u, h // u)).permute(1, 3, 0, 2, 4) for t in (q, k, v)], dim=2)
    n = q.shape[2]
    got = _all_to_all(send.flatten(0, 1), list(lengths), [n] * u, sp.ulysses_group, sp.ulysses_rank, "ulysses_qkv")
    return _ready(got)


def _to_sequence(o: torch.Tensor, dtype: torch.dtype, sp: SequenceParallel, lengths: tuple[int, ...], n: int):
    """The inverse of :func:`_to_heads` on the output o [B, H/U, sum(lengths), D] -> this rank's n
    tokens with all heads, [B, H, n, D] in the layout of ``ops.attention``, in ``dtype``."""
    u = sp.ulysses_size
    b, hu, _, d = o.shape
    send = o.permute(2, 0, 1, 3).to(dtype, memory_format=torch.contiguous_format)  # [sum(lengths), B, H/U, D]
    got = _ready(_all_to_all(send, [n] * u, list(lengths), sp.ulysses_group, sp.ulysses_rank, "ulysses_out"))
    out = got.view(u, n, b, hu, d).permute(2, 1, 0, 3, 4).contiguous().view(b, n, u * hu, d)  # [B, n, H, D]
    return out.transpose(1, 2)


def _ring(q, k, v, sp: SequenceParallel, lengths: tuple[int, ...], scale) -> torch.Tensor:
    """Attention of q over the K / V of every ring rank (``lengths[i]`` tokens on ring rank i), in
    fp32 [B, H, n, Dv]: K / V go to the next rank ring_size - 1 times, each hop issued before the
    attention of the block at hand."""
    size, me = sp.ring_size, sp.ring_rank
    nxt, prev = (me + 1) % size, (me - 1) % size
    kv = torch.stack((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)), dim=1)  # [T, 2, B, H, D]
    block_k, block_v = k, v
    out = lse = incoming = None
    for step in range(size):
        owner = (me - step) % size  # whose K / V this rank holds now
        if step < size - 1:
            send, recv = [0] * size, [0] * size
            send[nxt], recv[prev] = lengths[owner], lengths[(owner - 1) % size]
            incoming = _all_to_all(kv, recv, send, sp.ring_group, me, "ring_kv")
        block, block_lse = attention_lse(q, block_k, block_v, scale)
        out, lse = (block.float(), block_lse) if out is None else _merge(out, lse, block, block_lse)
        if step < size - 1:
            kv = _ready(incoming)
            block_k, block_v = (t.permute(1, 2, 0, 3) for t in kv.unbind(1))
    return out


def _check(q, k, v, sp: SequenceParallel) -> None:
    if not isinstance(sp, SequenceParallel):
        raise InputError(f"sp must be a SequenceParallel, not {type(sp).__name__}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise InputError(
            f"sp_attention takes q, k, v of one shape [B, H, L, D] (self-attention over the sharded "
            f"sequence); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise InputError("sp_attention takes q, k, v of one dtype on one device")
    held = sp.lengths[sp.sp_rank]
    if q.shape[2] != held:
        raise InputError(
            f"this rank (sequence-group rank {sp.sp_rank}) holds {q.shape[2]} tokens but sp.lengths says "
            f"{held}: build the SequenceParallel from the shards' real sizes"
        )
    heads, u = q.shape[1], sp.ulysses_size
    if heads % u:
        raise InputError(
            f"{heads} attention heads cannot be split over a ulysses size of {u}: pick a ulysses size "
            f"that divides {heads}, or use ring parallelism for the remaining factor"
        )


def sp_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel, scale: float | None = None
) -> torch.Tensor:
    """What ``ops.attention(q, k, v, scale)`` returns for this rank's queries attending over the keys
    and values of all the ranks of the sequence group.

    q, k, v [B, H, lengths[sp_rank], D], this rank's tokens with all H heads. Returns [B, H,
    lengths[sp_rank], D] in q's dtype and ``ops.attention``'s layout ([B, L, H, D] in memory).
    Every rank of the sequence group must call it (the same number of times, in the same order).
    Raises :class:`InputError` for shapes that disagree with ``sp`` or heads that the ulysses size
    does not divide."""
    _check(q, k, v, sp)
    u, r = sp.ulysses_size, sp.ring_size
    if u == 1 and r == 1:
        return _local_attention(q, k, v, scale)
    dtype, n = q.dtype, q.shape[2]
    if u > 1:
        first = sp.ring_rank * u
        group_lengths = sp.lengths[first : first + u]
        x = _to_heads(q, k, v, sp, group_lengths)
        q, k, v = (x[:, i].permute(1, 2, 0, 3) for i in range(3))  # [B, H/U, sum(group_lengths), D]
    if r == 1:
        out = _local_attention(q, k, v, scale)
    else:
        ring_lengths = tuple(sum(sp.lengths[i * u : (i + 1) * u]) for i in range(r))
        out = _ring(q, k, v, sp, ring_lengths, scale)
    if u > 1:
        return _to_sequence(out, dtype, sp, group_lengths, n)
    return attention_layout(out.to(dtype))
