"""Offline compile tooling for the Triton kernels (not imported at run time).

``cases`` lists the specialisations the models and benchmarks use; ``compile`` compiles each of
them for sm_90/sm_80 without a GPU and writes the register/spill table (``python -m
vlm.kernels.offline.compile``).
"""
