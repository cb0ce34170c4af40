"""nn.Modules of nvae_fast: thin owners of parameters that call the fused ops."""

from nvae_fast.nn.batchnorm import BatchNorm2d, BatchNormSwish

__all__ = ["BatchNorm2d", "BatchNormSwish"]
