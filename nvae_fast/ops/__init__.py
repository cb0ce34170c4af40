"""Fused ops, one module each: reference, custom op + autograd, backend dispatch, functional API."""

from nvae_fast.ops.bn_swish import bn_swish, bn_swish_ref

__all__ = ["bn_swish", "bn_swish_ref"]
