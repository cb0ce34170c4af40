"""Triton kernels, one module per fused op; tested on the CPU under TRITON_INTERPRET=1."""
