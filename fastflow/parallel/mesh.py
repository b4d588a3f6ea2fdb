"""The process group and the device mesh of a multi-process run.

torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` / ``MASTER_PORT``, or
torchrun's rendezvous for several nodes) starts the processes; :func:`ensure_process_group` joins
the default group when the user has not (NCCL when the pipeline runs on CUDA, gloo on the CPU),
and :func:`build_mesh` lays the world out as a :class:`~torch.distributed.device_mesh.DeviceMesh`
of four dimensions, outermost first: ``data``, ``cfg``, ``ring``, ``ulysses``. Ranks that differ
only in ``ulysses`` / ``ring`` hold different tokens of the same images (sequence parallelism);
ranks that differ in ``data`` / ``cfg`` hold different rows of a forward's batch (the CFG batch's
branches, or different images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ParallelError

DIMS = ("data", "cfg", "ring", "ulysses")


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks each kind of parallelism uses; their product is the world size."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    data: int = 1

    def __post_init__(self):
        for name in DIMS:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ParallelError(f"{name} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.data * self.cfg * self.ring * self.ulysses

    @property
    def sequence(self) -> int:
        """Ranks that share one forward's tokens (ulysses x ring)."""
        return self.ring * self.ulysses

    @property
    def batch(self) -> int:
        """Ranks that share one forward's batch rows (data x cfg)."""
        return self.data * self.cfg

    def describe(self) -> str:
        return ",".join(f"{n}={getattr(self, n)}" for n in DIMS[::-1] if getattr(self, n) > 1) or "none"

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """``"ulysses=2,ring=2"`` (the CLI's ``--parallel``); unnamed sizes are 1."""
        sizes = {}
        for part in (p.strip() for p in str(text).split(",")):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in DIMS:
                raise ParallelError(
                    f"--parallel takes name=size pairs from {', '.join(DIMS[::-1])} (e.g. ulysses=2,ring=2); "
                    f"got {part!r}"
                )
            if name in sizes:
                raise ParallelError(f"--parallel names {name} twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ParallelError(f"--parallel {name} must be an integer, got {value.strip()!r}") from None
        return cls(**sizes)


def launched() -> bool:
    """True in a process started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def ensure_process_group(device: torch.device) -> None:
    """Join the default process group from the launcher's environment when the user has not:
    NCCL for a CUDA device, gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed; multi-process runs need one that has")
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ParallelError(
            "parallelism needs several processes: launch with torchrun (e.g. `torchrun --nproc-per-node 4 "
            f"your_script.py`) or call torch.distributed.init_process_group first (missing: {', '.join(missing)})"
        )
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")


@dataclass(frozen=True)
class Mesh:
    """The built mesh and the groups the parallel wrappers use."""

    config: ParallelConfig
    mesh: object  # DeviceMesh
    rank: int
    world_size: int
    flat: dict  # "batch" / "sequence" -> the flattened 1-D mesh of that pair

    def group(self, name: str):
        """The process group of one mesh dimension (``data``, ``cfg``, ``ring``, ``ulysses``), or of a
        flattened pair (``batch`` = data x cfg, ``sequence`` = ring x ulysses); None for size 1."""
        size = {"batch": self.config.batch, "sequence": self.config.sequence}.get(name) or getattr(self.config, name)
        if size == 1:
            return None
        return self.flat[name].get_group() if name in self.flat else self.mesh.get_group(name)

    def local_rank(self, name: str) -> int:
        """This rank's index along a dimension (or a flattened pair)."""
        coord = dict(zip(DIMS, self.mesh.get_coordinate(), strict=True))
        c = self.config
        if name == "batch":
            return coord["data"] * c.cfg + coord["cfg"]
        if name == "sequence":
            return coord["ring"] * c.ulysses + coord["ulysses"]
        return coord[name]


def build_mesh(config: ParallelConfig, device: torch.device) -> Mesh:
    """The (data, cfg, ring, ulysses) mesh over the default group; the sizes must multiply to the
    world size."""
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(device)
    world = dist.get_world_size()
    if config.world_size != world:
        raise ParallelError(
            f"ulysses x ring x cfg x data = {config.world_size} ({config.describe()}) must equal the number of "
            f"processes, {world}: change the sizes or torchrun's --nproc-per-node / --nnodes"
        )
    shape = tuple(getattr(config, n) for n in DIMS)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=DIMS)
    flat = {}
    if config.batch > 1:
        flat["batch"] = mesh["data", "cfg"]._flatten("batch")
    if config.sequence > 1:
        flat["sequence"] = mesh["ring", "ulysses"]._flatten("sequence")
    return Mesh(config, mesh, dist.get_rank(), world, flat)
