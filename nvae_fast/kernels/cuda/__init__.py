"""Python launchers of the hand-written CUDA kernels in csrc/ (extension nvae_fast._C)."""
