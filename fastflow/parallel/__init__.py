"""Multi-process generation over torch.distributed: context parallelism (Ulysses, Ring, both),
CFG and data parallelism, applied to a built pipeline with ``pipe.enable_parallelism(...)``.

Launch with torchrun (``torchrun --nproc-per-node 4 script.py``, or ``--nnodes`` with a rendezvous
for several machines); the process group is NCCL on GPUs and gloo on CPUs.
"""

from ..pipelines.base import BasePipeline
from .apply import Parallel, enable
from .mesh import DIMS, ParallelConfig, build_mesh, ensure_process_group, launched
from .shard import split_sizes

BasePipeline.parallel_backend = staticmethod(enable)

__all__ = [
    "DIMS",
    "Parallel",
    "ParallelConfig",
    "build_mesh",
    "enable",
    "ensure_process_group",
    "launched",
    "split_sizes",
]
