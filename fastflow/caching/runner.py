"""Running a transformer forward block group by block group, so that a policy can reuse work.

A model that exposes ``embed`` / ``blocks(state, start, end)`` / ``final`` (FLUX and MMDiT) is
driven through a small adapter that knows its streams: FLUX carries ``img`` and ``txt`` until the
first single block joins them into ``x``; MMDiT carries ``x`` and ``context`` (gone after the last,
pre-only context block). A *residual* of a block range is ``output - input`` per stream, with the
input converted to the output's layout, so reusing one is ``state += residual`` whatever range it
covers. Model math is untouched: a forward that computes every block runs exactly the ops of
``model(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops

Residual = dict[str, torch.Tensor]


class FluxAdapter:
    def split(self, args, kwargs):
        kwargs = dict(kwargs)  # ControlNet residuals: added inside the block ranges
        controls = {k: kwargs.pop(k, None) for k in ("controls", "single_controls")}
        return args, kwargs, controls if any(v is not None for v in controls.values()) else {}

    def streams(self, state) -> dict[str, torch.Tensor]:
        return {"x": state.x} if state.x is not None else {"img": state.img, "txt": state.txt}

    def convert(self, streams: dict, keys) -> dict:
        if "x" in keys and "x" not in streams:
            return {"x": torch.cat((streams["txt"], streams["img"]), dim=1)}
        return streams

    def set_streams(self, state, streams: dict) -> None:
        if "x" in streams:
            state.x, state.img, state.txt = streams["x"], None, None
        else:
            state.img, state.txt = streams["img"], streams["txt"]

    def modulated_input(self, model, state) -> torch.Tensor:
        """Block 0's modulated LayerNorm of the image stream (what TeaCache watches)."""
        if len(model.double_blocks):
            shift, scale = model.double_blocks[0].img_mod(state.vec)[:2]
            return ops.layernorm_modulate(state.img, shift, scale)
        shift, scale, _ = model.single_blocks[0].modulation(state.vec)
        return ops.layernorm_modulate(state.joined(), shift, scale)

    # -- region-adaptive sampling (caching/ras.py): image tokens in and out of the block loop
    def pixels(self, model) -> int:
        return 4  # a packed token is 2x2 latent pixels, feature index c * 4 + pixel

    def text_count(self, args, kwargs) -> int:
        return (args[1] if len(args) > 1 else kwargs["txt"]).shape[1]

    def layout(self, state, index, n: int) -> dict:
        """Where the kept tokens sit in each whole stream (txt / x's text: all)."""
        t, extra = state.txt.shape[1], state.img.shape[1] - state.n_img  # extra: Kontext context tokens
        rest = torch.arange(n, n + extra, device=index.device)
        t_all = torch.arange(t, device=index.device)
        return {"img": torch.cat((index, rest)), "txt": None, "x": torch.cat((t_all, t + index, t + rest))}

    def select_controls(self, block_kwargs: dict, index, n: int) -> dict:
        return _select_controls(block_kwargs, ("controls", "single_controls"), index, n)

    def to_tokens(self, model, out):
        return out

    def from_tokens(self, model, tokens, state):
        return tokens


class MMDiTAdapter:
    def split(self, args, kwargs):
        kwargs = dict(kwargs)
        skip = kwargs.pop("skip_layers", None)
        controls = kwargs.pop("controls", None)  # ControlNet residuals: added inside the block ranges
        if len(args) > 4:
            args, skip = args[:4], args[4]
        return args, kwargs, {"skip_layers": skip, "controls": controls}

    def streams(self, state) -> dict[str, torch.Tensor]:
        return {"x": state.x} if state.context is None else {"x": state.x, "context": state.context}

    def convert(self, streams: dict, keys) -> dict:
        return {k: v for k, v in streams.items() if k in keys}

    def set_streams(self, state, streams: dict) -> None:
        state.x, state.context = streams["x"], streams.get("context")

    def modulated_input(self, model, state) -> torch.Tensor:
        block = model.joint_blocks[0].x_block
        mod = block.adaLN_modulation(state.c).chunk(block.n_mod, dim=-1)
        return ops.layernorm_modulate(state.x, mod[0], mod[1])

    def pixels(self, model) -> int:
        return model.config.patch_size**2  # feature index (p * P + q) * C + c: pixel-major

    def text_count(self, args, kwargs) -> int:
        return (args[2] if len(args) > 2 else kwargs["context"]).shape[1]

    def layout(self, state, index, n: int) -> dict:
        return {"x": index, "context": None}

    def select_controls(self, block_kwargs: dict, index, n: int) -> dict:
        return _select_controls(block_kwargs, ("controls",), index, n)

    def to_tokens(self, model, out):
        """[B, C, h, w] -> [B, h_p * w_p, p * p * C] (the inverse of unpatchify, exact)."""
        p = model.config.patch_size
        b, c, h, w = out.shape
        x = out.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def from_tokens(self, model, tokens, state):
        return model.unpatchify(tokens, state.h_p, state.w_p)


def _select_controls(block_kwargs: dict, keys, index, n: int) -> dict:
    """ControlNet residuals [B, N, C] at the kept image tokens (others, e.g. cut by a split net, as given)."""
    out = dict(block_kwargs)
    for key in keys:
        if out.get(key) is not None:
            out[key] = [r.index_select(1, index) if r.shape[1] == n else r for r in out[key]]
    return out


def adapter_for(model):
    """The stream adapter of a FLUX or MMDiT model; None for a model caching cannot drive."""
    from ..models.flux import Flux
    from ..models.mmdit import MMDiT

    if isinstance(model, Flux):
        return FluxAdapter()
    if isinstance(model, MMDiT):
        return MMDiTAdapter()
    return None


@dataclass
class CacheStats:
    """Work of one generation. A batch shares every decision (a block group is computed for all
    images of a forward or for none), so the counts hold for each image of the call."""

    transformer_calls: int = 0  # forwards the sampler requested
    blocks_computed: float = 0  # RAS counts a block on k of N image tokens as a fraction (caching/ras.py)
    blocks_total: int = 0  # what the forwards would have run without a cache

    @property
    def work_saved(self) -> float:
        return 1.0 - self.blocks_computed / self.blocks_total if self.blocks_total else 0.0

    def as_dict(self) -> dict:
        return {
            "transformer_calls": self.transformer_calls,
            "blocks_computed": round(self.blocks_computed, 4)
            if isinstance(self.blocks_computed, float)
            else self.blocks_computed,
            "blocks_total": self.blocks_total,
            "work_saved": round(self.work_saved, 4),
        }


class BlockRun:
    """One transformer forward under a policy: compute ranges of blocks or reuse residuals."""

    def __init__(self, adapter, model, state, block_kwargs: dict, stats: CacheStats, weight: float = 1.0):
        self.adapter, self.model, self.state, self.weight = adapter, model, state, weight
        self.block_kwargs, self.stats = block_kwargs, stats
        self.num_blocks = model.num_blocks
        skip = set(block_kwargs.get("skip_layers") or ())
        self._runs = [i not in skip for i in range(self.num_blocks)]
        stats.blocks_total += sum(self._runs)

    def compute(self, start: int, end: int) -> Residual:
        """Run blocks ``start`` .. ``end - 1``; returns their residual."""
        before = self.adapter.streams(self.state)
        self.model.blocks(self.state, start, end, **self.block_kwargs)
        done = sum(self._runs[start:end])
        self.stats.blocks_computed += done if self.weight == 1.0 else done * self.weight
        after = self.adapter.streams(self.state)
        before = self.adapter.convert(before, after.keys())
        return {k: after[k] - before[k] for k in after}

    def reuse(self, residual: Residual) -> None:
        """Apply a residual of the blocks it was computed for, instead of running them."""
        streams = self.adapter.convert(self.adapter.streams(self.state), residual.keys())
        self.adapter.set_streams(self.state, {k: streams[k] + residual[k] for k in residual})

    def modulated_input(self) -> torch.Tensor:
        return self.adapter.modulated_input(self.model, self.state)


@dataclass
class CacheRunner:
    """Per generation: the policy, one memory per guidance branch, the stats."""

    policy: object
    model: torch.nn.Module
    stats: CacheStats = field(default_factory=CacheStats)
    memory: dict = field(default_factory=dict)

    def __post_init__(self):
        self.adapter = adapter_for(self.model)

    def __call__(self, step, args, kwargs) -> torch.Tensor:
        self.stats.transformer_calls += 1
        args, kwargs, block_kwargs = self.adapter.split(args, kwargs)
        if getattr(self.policy, "selects_tokens", False):  # RAS (caching/ras.py) drives embed and final itself
            return self.policy.run(self, step, args, kwargs, block_kwargs)
        state = self.model.embed(*args, **kwargs)
        run = BlockRun(self.adapter, self.model, state, block_kwargs, self.stats)
        self.policy.forward(run, step, self.memory.setdefault(step.branch, {}))
        return self.model.final(run.state)
