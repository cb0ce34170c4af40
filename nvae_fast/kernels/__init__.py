"""Fast backends of the fused ops: ``triton`` (Triton kernels) and ``cuda`` (launchers of nvae_fast._C).

Nothing here validates user input: the op layer (nvae_fast.ops) does, then dispatches here.
"""
