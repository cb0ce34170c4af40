"""nn.Modules of nvae_fast: thin owners of parameters that call the fused ops, and NVAE's cells."""

from nvae_fast.nn.batchnorm import BatchNorm2d, BatchNormSwish
from nvae_fast.nn.cells import Cell, DecCombinerCell, EncCombinerCell, InvertedResidual, InvertedResidualCell
from nvae_fast.nn.conv import Conv2D
from nvae_fast.nn.flows import ARConv2d, PairedARFlow

__all__ = ["ARConv2d", "BatchNorm2d", "BatchNormSwish", "Cell", "Conv2D", "DecCombinerCell", "EncCombinerCell",
           "InvertedResidual", "InvertedResidualCell", "PairedARFlow"]
