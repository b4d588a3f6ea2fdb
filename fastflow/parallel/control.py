"""ControlNets split like the base model they serve, so each rank computes only its share of them.

The nets are called by the pipeline with the whole batch and sequence (pipelines/control.py) and
their residuals go to the base model's wrapped ``blocks`` / ``forward`` (:mod:`.shard`), which
takes either whole residuals (and cuts them) or residuals already cut to this rank's rows and
tokens. Wrapping a net's ``forward`` on the instance (the class is untouched), as the base model is:

- FLUX ControlNets (not union): the net's inputs are cut to this rank's text and image tokens, the
  same contiguous shards the base model's ``embed`` keeps, and its blocks' ``attention`` becomes
  sequence-parallel attention over them (the blocks are the base model's blocks); its residuals
  come out already cut. The rows stay whole (the nets see the positive prompt's rows only, and
  their residuals are repeated over CFG's branches). A union net prepends its mode token to the
  text, which would repeat on every rank: it runs whole and its residuals are cut to this rank's
  tokens (the nets' residuals are summed, so all must have one shape).
- SD3 and SDXL ControlNets: the rows are cut (CFG's branches and the images, over the ``batch``
  ranks); their tokens stay whole (SD3's net embeds the latent image inside its forward, SDXL's
  convolutions need their neighbours).
"""

from __future__ import annotations

import functools

from ..models.controlnet_flux import FluxControlNet
from ..models.controlnet_sd3 import MMDiTControlNet
from ..models.controlnet_unet import UNetControlNet
from ..ops.sequence_parallel import sp_attention
from .shard import Ranks, _call_attention, _token_split


class FluxNetSharding:
    """A FLUX ControlNet over the sequence ranks: its tokens split (``split``), or, for a net that
    cannot split them (a union net), run whole with its residuals cut to this rank's image tokens, so
    that every net's residuals have the same shape and can be summed. The rows stay whole."""

    def __init__(self, net: FluxControlNet, ranks: Ranks, split: bool):
        self.net, self.ranks, self.forward, self.split = net, ranks, net.forward, split
        self.sp = None

    def attention_methods(self):
        if self.split:
            for block in (*self.net.double_blocks, *self.net.single_blocks):
                yield block, "attention"

    def wrapped_forward(self, img, txt, y, timesteps, img_ids, txt_ids, guidance, control, mode=None, scale=1.0):
        (t0, t1), (i0, i1), joint, _ = _token_split(self.ranks, txt.shape[1], img.shape[1], "FLUX ControlNet")
        if not self.split:
            doubles, singles = self.forward(img, txt, y, timesteps, img_ids, txt_ids, guidance, control, mode, scale)
            return [d[:, i0:i1] for d in doubles], [s[:, i0:i1] for s in singles]
        self.sp = self.ranks.sequence(joint)
        img_ids = img_ids[..., i0:i1, :]  # [N, 3] or [B, N, 3]
        txt_ids = txt_ids[..., t0:t1, :]
        return self.forward(img[:, i0:i1], txt[:, t0:t1], y, timesteps, img_ids, txt_ids, guidance,
                            control[:, i0:i1], mode, scale)  # fmt: skip

    def attention(self, q, k, v):
        return sp_attention(q, k, v, self.sp)


class RowNetSharding:
    """An SD3 or SDXL ControlNet over the batch ranks: this rank's rows of every batched input."""

    def __init__(self, net, ranks: Ranks):
        self.net, self.ranks, self.forward = net, ranks, net.forward

    def attention_methods(self):
        return iter(())

    def wrapped_forward(self, x, *args, **kwargs):
        b = x.shape[0]
        rows, _ = self.ranks.rows(b)
        cut = [a[rows] if hasattr(a, "ndim") and a.ndim and a.shape[0] == b else a for a in args]
        return self.forward(x[rows], *cut, **kwargs)


def net_sharding(net, ranks: Ranks):
    """How ``net`` splits over ``ranks``, or None where it runs whole (its residuals are cut by the
    base model's wrapper then)."""
    if isinstance(net, FluxControlNet):
        if ranks.seq_size == 1:
            return None
        heads, u = net.config.num_heads, ranks.ulysses_size
        return FluxNetSharding(net, ranks, split=not net.union and not (u > 1 and heads % u))
    if isinstance(net, (MMDiTControlNet, UNetControlNet)) and ranks.batch_size > 1:
        return RowNetSharding(net, ranks)
    return None


def install_nets(nets, ranks: Ranks) -> None:
    """Split every net of ``nets`` that can be (again after a net was replaced; nets already split are
    left as they are)."""
    for net in nets:
        if "_fastflow_sharding" in net.__dict__:
            continue
        sharding = net_sharding(net, ranks)
        if sharding is None:
            continue
        net.forward = sharding.wrapped_forward
        for block, name in sharding.attention_methods():
            setattr(block, name, functools.partial(_call_attention, sharding, name))
        net._fastflow_sharding = sharding


def uninstall_nets(nets) -> None:
    for net in nets:
        sharding = net.__dict__.pop("_fastflow_sharding", None)
        if sharding is None:
            continue
        net.__dict__.pop("forward", None)
        for block, name in sharding.attention_methods():
            block.__dict__.pop(name, None)
