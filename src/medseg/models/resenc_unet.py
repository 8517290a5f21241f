"""Residual-encoder U-Net, after nnU-Net's ResEnc presets (Isensee et al. 2024): an encoder of residual
blocks that downsamples by strided convolution, more blocks in the deeper stages, and the plain U-Net decoder.
"""
from __future__ import annotations

import torch.nn as nn

from medseg.models.blocks import ResidualBlock
from medseg.models.unet import UNet


def blocks_per_stage(depth: int) -> list[int]:
    """1, 2, 3, 4, 4, ... residual blocks per stage, encoder stages then the bottleneck (nnU-Net ResEnc M uses
    1, 3, 4, 6, 6, ...; fewer here, for CPU budgets)."""
    return [min(i + 1, 4) for i in range(depth + 1)]


class ResEncUNet(UNet):
    """`UNet` (same arguments, same shapes) whose encoder and bottleneck are stages of residual blocks; stage
    i > 0 starts with a stride-2 block instead of a max-pool."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 32, depth: int = 4,
                 dropout: float = 0.0, spatial_dims: int = 2, norm: str = "instance", activation: str = "leaky_relu",
                 deep_supervision: bool = False):
        super().__init__(in_channels, num_classes, base_channels, depth, dropout, spatial_dims, norm, activation,
                         deep_supervision)
        # UNet built the plain encoder; it is replaced here (a cost at construction only), so the decoder, heads
        # and forward stay the U-Net's own.
        block = {"spatial_dims": spatial_dims, "norm": norm, "activation": activation}
        widths = [base_channels * 2**i for i in range(depth + 1)]
        stages, channels = [], in_channels
        for i, (width, count) in enumerate(zip(widths, blocks_per_stage(depth))):
            stage = [ResidualBlock(channels, width, stride=1 if i == 0 else 2, **block)]
            stage += [ResidualBlock(width, width, **block) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            channels = width
        self.encoder = nn.ModuleList(stages[:-1])
        self.bottleneck = stages[-1]
        self.pool = nn.Identity()  # the next stage's first block strides
