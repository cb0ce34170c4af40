"""nvae_fast: the NVAE hierarchical VAE with fused CUDA and Triton kernels.

Backends are chosen per call (see :mod:`nvae_fast.backend`); ``nvae_fast.backend.status()`` tells
which are usable on this machine.
"""

from nvae_fast import backend
from nvae_fast.backend import set_backend, use_backend
from nvae_fast.config import NVAEConfig
from nvae_fast.model import NVAE
from nvae_fast.nn import BatchNormSwish
from nvae_fast.ops import bn_swish, bn_swish_ref

__version__ = "0.1.0"

__all__ = ["NVAE", "NVAEConfig", "BatchNormSwish", "backend", "bn_swish", "bn_swish_ref", "set_backend", "use_backend"]
