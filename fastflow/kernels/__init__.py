"""Triton kernels, installed as ``fastflow.kernels``.

Only ``@triton.jit`` kernels and their small launchers live here: no nn.Module and no torch.library
(registration is done in ``fastflow/ops``). Modules are imported lazily by the ops' CUDA
implementations, so importing fastflow never requires triton.
"""
