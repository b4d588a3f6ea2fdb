"""Splitting one forward across ranks: batch rows over the ``batch`` group (data x cfg), tokens
over the ``sequence`` group (ring x ulysses).

The models do not change. A wrapped transformer's ``embed`` runs as before on the whole batch and
sequence (cheap: the input projections, the conditioning and the RoPE tables), then keeps this
rank's rows and tokens; each block's ``attention`` method becomes sequence-parallel attention
(:func:`fastflow.ops.sequence_parallel.sp_attention`) over the ranks' tokens; ``final`` runs the
final layer on this rank's target tokens and gathers the output from every rank, so every rank
returns the whole ``[B, ...]`` velocity. Shards are contiguous and may be uneven (no padding:
token counts need not divide), so gathering them in rank order gives the original order back.

ControlNet residuals reach the base model as keyword arguments of ``blocks`` (FLUX, MMDiT) or
``forward`` (the UNet); the wrapped methods cut whole ones to the rows and image tokens this rank's
``embed`` kept (:meth:`Shard.residuals`) and take those of a split net (:mod:`.control`) as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol

from ..errors import ParallelError
from ..models.flux import Flux
from ..models.mmdit import MMDiT
from ..models.unet import UNet
from ..ops.sequence_parallel import SequenceParallel, record_comm, sp_attention


def split_sizes(total: int, parts: int) -> list[int]:
    """Contiguous, as even as possible (the first ``total % parts`` shards one longer)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass
class Ranks:
    """This rank's place: ``batch`` ranks split rows, ``sequence`` ranks split tokens."""

    batch_group: object
    batch_size: int
    batch_rank: int
    seq_group: object
    seq_size: int
    seq_rank: int
    ulysses_group: object
    ulysses_size: int
    ring_group: object
    ring_size: int
    real_rows: int = 0  # rows of the running forward this rank computes for real (set by embed)

    def rows(self, b: int) -> tuple[slice, int]:
        """This rank's batch rows and how many of them are real. A rank whose share is empty (fewer
        rows than batch ranks) computes a copy of the last row and contributes nothing."""
        start, end = bounds(b, self.batch_size, self.batch_rank)
        if end > start:
            return slice(start, end), end - start
        return slice(b - 1, b), 0

    def sequence(self, lengths: list[int]) -> SequenceParallel:
        return SequenceParallel(self.ulysses_group, self.ulysses_size, self.ring_group, self.ring_size, tuple(lengths))


def _record_gather(kind: str, x: torch.Tensor, size: int) -> None:
    """An all-gather of ``x`` over ``size`` ranks: it goes to, and one like it comes from, each other rank."""
    if torch.compiler.is_compiling():  # compiled code does not record (no shape arithmetic traced for it)
        return
    nbytes = x.numel() * x.element_size() * (size - 1)
    record_comm(kind, "all_gather_single", size, nbytes, nbytes)


def gather_rows(x: torch.Tensor, ranks: Ranks, b: int, kind: str = "gather_rows") -> torch.Tensor:
    """[rows of this rank, ...] -> [b, ...] from every batch rank (uneven shares padded to the
    largest for the all-gather, then dropped). ``kind``: its name in :func:`~fastflow.ops.count_comm`'s log."""
    if ranks.batch_size == 1:
        return x
    sizes = split_sizes(b, ranks.batch_size)
    top = max(sizes)
    if x.shape[0] < top:
        x = torch.cat((x, x[-1:].expand(top - x.shape[0], *x.shape[1:])))
    elif x.shape[0] > top:
        x = x[:top]
    _record_gather(kind, x, ranks.batch_size)
    every = funcol.all_gather_single(x.contiguous(), 0, ranks.batch_group)
    every = every.view(ranks.batch_size, top, *x.shape[1:])
    return torch.cat([every[i, :n] for i, n in enumerate(sizes) if n])


def gather_tokens(x: torch.Tensor, ranks: Ranks, lengths: list[int]) -> torch.Tensor:
    """[B, this rank's tokens, C] -> [B, sum(lengths), C] in rank order (padded for the gather)."""
    if ranks.seq_size == 1:
        return x
    top = max(lengths)
    if x.shape[1] < top:
        x = torch.cat((x, x.new_zeros(x.shape[0], top - x.shape[1], *x.shape[2:])), dim=1)
    _record_gather("gather_tokens", x, ranks.seq_size)
    every = funcol.all_gather_single(x.transpose(0, 1).contiguous(), 0, ranks.seq_group)
    every = every.view(ranks.seq_size, top, *x.shape[:1], *x.shape[2:])
    return torch.cat([every[i, :n] for i, n in enumerate(lengths) if n]).transpose(0, 1)


@dataclass
class Shard:
    """What ``embed`` kept, so ``final`` can put the output back together."""

    b: int  # the whole batch
    real_rows: int
    txt: tuple[int, int]  # this rank's text tokens
    img: tuple[int, int]  # this rank's image tokens (FLUX: target + Kontext context)
    img_lengths: list[int]  # image tokens per sequence rank
    n_img: int  # target image tokens (the output)
    rows: slice  # this rank's batch rows (of the whole batch b)

    def residuals(self, values, what: str):
        """ControlNet residuals -> this rank's [rows, its target tokens, C]. Each may be whole ([b,
        target tokens, C]: cut here, as views) or already cut to this rank's rows and / or tokens by
        a split net (fastflow.parallel.control); whole and cut sizes differ whenever there is a split."""
        if values is None:
            return None
        start, end = self.img
        local = slice(start, max(start, min(end, self.n_img)))
        n_rows, n_tokens = self.rows.stop - self.rows.start, local.stop - local.start
        out = []
        for r in values:
            if r.ndim != 3 or r.shape[0] not in (self.b, n_rows) or r.shape[1] not in (self.n_img, n_tokens):
                raise ParallelError(
                    f"{what}: a residual of shape {list(r.shape)} matches neither the whole batch ({self.b} rows, "
                    f"{self.n_img} image tokens) nor this rank's share ({n_rows} rows, {n_tokens} tokens); "
                    "pass the ControlNet's whole residuals"
                )
            r = r[self.rows] if r.shape[0] == self.b else r
            out.append(r[:, local] if r.shape[1] == self.n_img else r)
        return out


def _token_split(ranks: Ranks, n_txt: int, n_img: int, what: str):
    if n_img < ranks.seq_size:
        raise ParallelError(
            f"{what}: {n_img} image tokens cannot be split over {ranks.seq_size} sequence-parallel ranks; "
            "use a larger image or fewer ulysses x ring ranks"
        )
    txt = bounds(n_txt, ranks.seq_size, ranks.seq_rank)
    img = bounds(n_img, ranks.seq_size, ranks.seq_rank)
    joint = [t + i for t, i in zip(split_sizes(n_txt, ranks.seq_size), split_sizes(n_img, ranks.seq_size), strict=True)]
    return txt, img, joint, split_sizes(n_img, ranks.seq_size)


class FluxSharding:
    """FLUX (dev, schnell, Kontext): img [B, N (+ M), C] and txt [B, T, C] split separately; the
    RoPE tables follow the tokens ([txt shard | img shard], the order the blocks join them)."""

    def __init__(self, model: Flux, ranks: Ranks):
        self.model, self.ranks = model, ranks
        self.embed, self.final, self.blocks = model.embed, model.final, model.blocks  # the unwrapped methods

    def attention_methods(self):
        for block in (*self.model.double_blocks, *self.model.single_blocks):
            yield block, "attention"

    def wrapped_blocks(self, state, start=0, end=None, controls=None, single_controls=None):
        """ControlNet residuals cut to this rank's rows and target tokens (the single blocks' too: they
        touch only the image part of this rank's [txt shard, img shard] stream)."""
        shard = state.shard
        controls = shard.residuals(controls, "FLUX ControlNet controls")
        single_controls = shard.residuals(single_controls, "FLUX ControlNet single_controls")
        return self.blocks(state, start, end, controls=controls, single_controls=single_controls)

    def wrapped_embed(self, *args, **kwargs):
        state = self.embed(*args, **kwargs)
        r = self.ranks
        b = state.vec.shape[0]
        rows, r.real_rows = r.rows(b)
        n_txt, n_all = state.txt.shape[1], state.img.shape[1]
        txt, img, joint, img_lengths = _token_split(r, n_txt, n_all, "FLUX")
        cos, sin = state.pe
        keep = torch.cat((torch.arange(*txt), n_txt + torch.arange(*img))).to(cos.device)
        state.pe = (cos[keep], sin[keep])
        state.img = state.img[rows, img[0] : img[1]]
        state.txt = state.txt[rows, txt[0] : txt[1]]
        state.vec = state.vec[rows]
        state.n_txt = txt[1] - txt[0]
        state.shard = Shard(b, r.real_rows, txt, img, img_lengths, state.n_img, rows)
        state.n_img = max(0, min(img[1], state.n_img) - img[0])  # this rank's target tokens
        self.sp = r.sequence(joint)
        return state

    def wrapped_final(self, state):
        shard = state.shard
        out = self.final(state)  # this rank's target tokens [rows, n, out]
        targets = [max(0, min(e, shard.n_img) - s) for s, e in _ranges(shard.img_lengths)]
        out = gather_tokens(out, self.ranks, targets)
        return gather_rows(out, self.ranks, shard.b)

    def attention(self, q, k, v):
        return sp_attention(q, k, v, self.sp)


class MMDiTSharding:
    """SD3 / SD3.5: x [B, h_p * w_p, C] and context [B, T, C] split separately; MMDiT-X's image-only
    attention (attn2) runs over the image shards alone."""

    def __init__(self, model: MMDiT, ranks: Ranks):
        self.model, self.ranks = model, ranks
        self.embed, self.final, self.blocks = model.embed, model.final, model.blocks

    def attention_methods(self):
        for block in self.model.joint_blocks:
            yield block, "attention"
            yield block, "attention_x"

    def wrapped_blocks(self, state, start=0, end=None, skip_layers=None, controls=None):
        """ControlNet residuals (image tokens, one per joint block) cut to this rank's rows and tokens."""
        controls = state.shard.residuals(controls, "SD3 ControlNet controls")
        return self.blocks(state, start, end, skip_layers=skip_layers, controls=controls)

    def wrapped_embed(self, *args, **kwargs):
        state = self.embed(*args, **kwargs)
        r = self.ranks
        b = state.c.shape[0]
        rows, r.real_rows = r.rows(b)
        txt, img, joint, img_lengths = _token_split(r, state.context.shape[1], state.x.shape[1], "SD3")
        state.x = state.x[rows, img[0] : img[1]]
        state.context = state.context[rows, txt[0] : txt[1]]
        state.c = state.c[rows]
        state.shard = Shard(b, r.real_rows, txt, img, img_lengths, sum(img_lengths), rows)
        self.sp, self.sp_x = r.sequence(joint), r.sequence(img_lengths)
        return state

    def wrapped_final(self, state):
        shard = state.shard
        out = self.model.final_layer(state.x, state.c)  # per token: [rows, this rank's tokens, p*p*C]
        out = gather_rows(gather_tokens(out, self.ranks, shard.img_lengths), self.ranks, shard.b)
        return out if state.tokens is not None else self.model.unpatchify(out, state.h_p, state.w_p)

    def attention(self, q, k, v):
        return sp_attention(q, k, v, self.sp)

    def attention_x(self, q, k, v):
        return sp_attention(q, k, v, self.sp_x)


def _ranges(lengths):
    start = 0
    for n in lengths:
        yield start, start + n
        start += n


class UNetSharding:
    """The SDXL UNet: batch rows only (its convolutions mix neighbouring tokens: no sequence split)."""

    def __init__(self, model: UNet, ranks: Ranks):
        if ranks.seq_size > 1:
            raise ParallelError(
                "the SDXL UNet cannot split its tokens (ulysses / ring): its convolutions need their neighbours; "
                "use cfg=2 (its CFG batch) and data= (images) instead"
            )
        self.model, self.ranks = model, ranks
        self.forward = model.forward

    def attention_methods(self):
        return iter(())

    def wrapped_forward(self, x, *args, down_residuals=None, mid_residual=None, **kwargs):
        """This rank's rows of the inputs and of the ControlNet residuals (``down_residuals`` [b, ...]
        per input block, ``mid_residual`` [b, ...]), then the output rows gathered."""
        b = x.shape[0]
        rows, self.ranks.real_rows = self.ranks.rows(b)
        sliced = [a[rows] if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == b else a for a in args]
        n = rows.stop - rows.start  # whole residuals are cut; a split net's come with this rank's rows
        residuals = [*(down_residuals or ()), *(() if mid_residual is None else (mid_residual,))]
        if any(r.shape[0] not in (b, n) for r in residuals):
            raise ParallelError(
                f"SDXL ControlNet residuals of {sorted({r.shape[0] for r in residuals})} rows for a batch of {b} "
                f"({n} on this rank): pass the ControlNet's whole residuals"
            )
        if down_residuals is not None:
            kwargs["down_residuals"] = [r[rows] if r.shape[0] == b else r for r in down_residuals]
        if mid_residual is not None:
            kwargs["mid_residual"] = mid_residual[rows] if mid_residual.shape[0] == b else mid_residual
        out = self.forward(x[rows], *sliced, **kwargs)
        return gather_rows(out, self.ranks, b)


def sharding_for(model, ranks: Ranks):
    if isinstance(model, Flux):
        return FluxSharding(model, ranks)
    if isinstance(model, MMDiT):
        return MMDiTSharding(model, ranks)
    if isinstance(model, UNet):
        return UNetSharding(model, ranks)
    raise ParallelError(f"{type(model).__name__} cannot be split across ranks (FLUX, SD3 and SDXL can)")


def install(model, sharding) -> None:
    """Replace the model's methods on the instance (the class is untouched)."""
    if isinstance(sharding, UNetSharding):
        model.forward = sharding.wrapped_forward
    else:
        model.embed = sharding.wrapped_embed
        model.blocks = sharding.wrapped_blocks  # ControlNet residuals follow the shards
        model.final = sharding.wrapped_final
    if sharding.ranks.seq_size > 1:  # with the tokens whole, attention is the model's own
        for block, name in sharding.attention_methods():
            setattr(block, name, functools.partial(_call_attention, sharding, name))
    model._fastflow_sharding = sharding


def _call_attention(sharding, name, q, k, v):
    return getattr(sharding, name)(q, k, v)


def uninstall(model) -> None:
    sharding = model.__dict__.pop("_fastflow_sharding", None)
    if sharding is None:
        return
    for attr in ("forward", "embed", "blocks", "final"):
        model.__dict__.pop(attr, None)
    for block, name in sharding.attention_methods():
        block.__dict__.pop(name, None)
