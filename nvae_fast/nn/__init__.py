"""nn.Modules of nvae_fast: thin owners of parameters that call the fused ops."""

from nvae_fast.nn.batchnorm import BatchNormSwish

__all__ = ["BatchNormSwish"]
