"""``pipe.enable_parallelism(...)``: a built pipeline split over the processes of a torch.distributed
run. The transformer's methods are wrapped on the instance (:mod:`.shard`); each generation then
agrees on its start (rank 0's seeds and noise), shares every cache decision (the change metrics
are reduced over all ranks) and ends with the same latents, and so the same images, on every rank.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import threading
import warnings
import weakref

import torch
import torch.distributed as dist

from ..caching import change_reducer
from ..errors import ParallelError
from ..ops.sequence_parallel import record_comm
from .control import install_nets, uninstall_nets
from .mesh import ParallelConfig, build_mesh
from .shard import Ranks, gather_rows, install, sharding_for, uninstall


def _record_reduce(x: torch.Tensor, size: int) -> None:
    nbytes = 2 * (size - 1) * x.numel() * x.element_size() // size  # a ring all-reduce, each way
    record_comm("reduce_change", "all_reduce", size, nbytes, nbytes)


class ChangeReducer:
    """Cache metrics over every rank: per-image sums over the sequence ranks, the worst image over
    the batch ranks (a rank's empty share counts nothing), so every rank decides alike."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def __call__(self, diff: torch.Tensor, scale: torch.Tensor, count: int) -> float:
        r = self.ranks
        sums = torch.stack((diff.double(), scale.double(), torch.full_like(diff, count, dtype=torch.float64)))
        if r.seq_group is not None:
            _record_reduce(sums, r.seq_size)
            dist.all_reduce(sums, group=r.seq_group)
        mean_diff, mean_scale = sums[0] / sums[2], (sums[1] / sums[2]).clamp_min(1e-12)
        ratio = (mean_diff / mean_scale)[: r.real_rows]
        worst = torch.tensor([ratio.max().item() if ratio.numel() else 0.0], dtype=torch.float64)
        if r.batch_group is not None:
            _record_reduce(worst, r.batch_size)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=r.batch_group)
        return float(worst)


class Parallel:
    """The parallel plan applied to one pipeline (``pipe._parallel``)."""

    def __init__(self, pipe, config: ParallelConfig):
        if getattr(pipe, "_offload", None) is not None:
            raise ParallelError(
                "model CPU offload cannot be combined with parallelism (each rank holds the whole model on its "
                "GPU): call pipe.disable_model_cpu_offload() first, or use more ranks instead of offload"
            )
        self.config = config
        self._warned = False
        self.lock = threading.Lock()  # one generation at a time (their collectives would interleave)
        self.device = torch.device(pipe.device)
        local = os.environ.get("LOCAL_RANK")
        if self.device.type == "cuda" and local is not None and self.device.index not in (None, int(local)):
            raise ParallelError(
                f"this process is local rank {local} but its pipeline is on {self.device}: every rank would share "
                f"one GPU; load with device='cuda' (fastflow.load then uses cuda:{local} under torchrun) or "
                f"device='cuda:{local}'"
            )
        self.mesh = build_mesh(config, self.device)
        m = self.mesh
        self.ranks = Ranks(
            m.group("batch"), config.batch, m.local_rank("batch"),
            m.group("sequence"), config.sequence, m.local_rank("sequence"),
            m.group("ulysses"), config.ulysses, m.group("ring"), config.ring,
        )  # fmt: skip
        # every rank as one "batch" group (the decode's split); sequence fields unused
        self.world_ranks = Ranks(dist.group.WORLD, m.world_size, m.rank, None, 1, 0, None, 1, None, 1)
        self.model = pipe.transformer
        self._check_heads()
        self.sharding = sharding_for(self.model, self.ranks)
        install(self.model, self.sharding)
        self._pipe = weakref.ref(pipe)  # (the pipeline holds this plan: no cycle)
        self.nets = []  # the ControlNets split with the model (each generation checks the pipeline's)
        self._split_nets()

    def _split_nets(self) -> None:
        nets = list(getattr(self._pipe(), "controlnets", None) or [])
        uninstall_nets([net for net in self.nets if not any(net is n for n in nets)])
        install_nets(nets, self.ranks)
        self.nets = nets

    def _check_heads(self) -> None:
        heads = getattr(self.model.config, "num_heads", None)
        u = self.config.ulysses
        if heads is not None and u > 1 and heads % u:
            raise ParallelError(
                f"ulysses={u} splits attention heads, and this model has {heads}: pick a ulysses size that divides "
                f"{heads}, or use ring= for the rest of the ranks"
            )

    def remove(self) -> None:
        uninstall(self.model)
        uninstall_nets(self.nets)
        self.nets = []

    def describe(self) -> str:
        return self.config.describe()

    # the generation's hooks (pipelines/template.py calls them)

    def request(self, request: dict) -> dict:
        """Rank 0's seeds for a request that asks for random ones (every rank must draw the same)."""
        self._split_nets()  # ControlNets given to the pipeline since the last call are split too
        seed = request.get("seed")
        if request.get("generator") is not None:
            self._check_same_generators(request["generator"])
        # (also with latents=: image-to-image / inpainting / control encodings draw from the seeds too)
        if (seed is None or seed == -1) and request.get("generator") is None:
            pick = [random.randrange(2**63 - 2**16)]
            nbytes = sum(8 + len(pickle.dumps(o)) for o in pick)  # a size, then the pickled object
            self._record_broadcast("broadcast_seed", "broadcast_object_list", nbytes)
            dist.broadcast_object_list(pick, src=0)
            request = dict(request, seed=pick[0])
        return request

    def _check_same_generators(self, generator) -> None:
        """A user's generator(s) must be in the same state on every rank: the image-to-image,
        inpainting and ControlNet encodings draw from them on each rank (only the start noise is
        broadcast), so differing generators would make the ranks compute different images."""
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        states = [g.get_state() if isinstance(g, torch.Generator) else None for g in gens]
        mine = hashlib.sha256(b"".join(bytes(s.numpy()) if s is not None else b"-" for s in states)).hexdigest()
        every = [None] * self.mesh.world_size
        dist.all_gather_object(every, mine)
        if len(set(every)) > 1:
            raise ParallelError(
                "the generator(s) passed differ between ranks: pass generators seeded alike on every rank "
                "(or seed=, which rank 0 broadcasts)"
            )

    def plan(self, plan) -> None:
        """Every rank starts from rank 0's state (a user's generator or latents that differ between
        ranks would otherwise make each rank denoise another image)."""
        images = plan.noise.shape[0]
        if images < self.config.data and not self._warned:
            self._warned = True
            warnings.warn(
                f"data={self.config.data} but this call makes {images} image(s): {self.config.data - images} data "
                "rank(s) only repeat another's work; ask for more images per call, or use fewer data ranks",
                UserWarning,
                stacklevel=2,
            )
        noise = plan.noise.contiguous()
        self._record_broadcast("broadcast_noise", "broadcast", noise.numel() * noise.element_size())
        dist.broadcast(noise, src=0)
        plan.noise = noise

    def _record_broadcast(self, kind: str, collective: str, nbytes: int) -> None:
        """Rank 0 sends ``nbytes`` to every other rank (a direct exchange's count; trees and rings differ)."""
        n = self.mesh.world_size
        root = self.mesh.rank == 0
        record_comm(kind, collective, n, nbytes * (n - 1) if root else 0, 0 if root else nbytes)

    def decode(self, decode, latent: torch.Tensor) -> torch.Tensor:
        """The VAE decode split by images over every rank, then gathered (each image decoded once)."""
        b = latent.shape[0]
        if b == 1:
            return decode(latent)
        rows, _ = self.world_ranks.rows(b)
        return gather_rows(decode(latent[rows]), self.world_ranks, b, kind="decode_rows")

    def generation(self):
        return change_reducer(ChangeReducer(self.ranks))


def enable(pipe, ulysses: int = 1, ring: int = 1, cfg: int = 1, data: int = 1) -> Parallel:
    config = ParallelConfig(ulysses=ulysses, ring=ring, cfg=cfg, data=data)
    return Parallel(pipe, config)
