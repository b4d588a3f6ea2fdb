"""The CUDA C++ sources, shipped inside the package as ``fastflow._csrc`` so that NVRTC can compile
them at run time (fastflow/ops/nvrtc.py); setup.py builds ``fastflow._C`` from the same files."""
