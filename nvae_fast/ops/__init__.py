"""Fused ops, one module each: reference, custom op + autograd, backend dispatch, functional API."""

from nvae_fast.ops.bn_swish import bn_swish, bn_swish_ref
from nvae_fast.ops.dwconv_stage import dwconv_stage_backward, dwconv_stage_forward
from nvae_fast.ops.gen_cell import GenCellParams, GenCellRunningStats, gen_cell, gen_cell_ref
from nvae_fast.ops.normal_kl import GroupKL, flow_kl, normal_kl, normal_sample

__all__ = [
    "GenCellParams", "GenCellRunningStats", "GroupKL", "bn_swish", "bn_swish_ref", "dwconv_stage_backward",
    "dwconv_stage_forward", "flow_kl", "gen_cell", "gen_cell_ref", "normal_kl", "normal_sample",
]
