"""The U-Net of Ronneberger et al. (2015) as the seed designed it, for 2D and 3D.

Per level: two 3x3 conv + batch norm + ReLU; max-pool down; 2x2 transposed conv up; skip concatenation;
1x1 head. Defaults are the seed's: 64-128-256-512 encoder, 1024 bottleneck (base_channels=64, depth=4).
nnU-Net's choices are options: norm="instance" (robust to batch size 2) and activation="leaky_relu".
"""
from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.blocks import ConvBlock, crop, layers, pad_to_multiple


class UNet(nn.Module):
    """U-Net with `depth` poolings. Input (B, in_channels, *spatial) of any size -> logits (B, num_classes, *spatial).

    Inputs whose sides are not multiples of 2**depth are padded (edge values) and the output cropped back.
    Encoder widths are base_channels * 2**i for i < depth; the bottleneck has base_channels * 2**depth.
    """
    encoder_modules = ("encoder", "bottleneck")  # what --freeze-encoder-epochs holds still

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 4,
                 dropout: float = 0.0, spatial_dims: int = 2, norm: str = "batch", activation: str = "relu",
                 deep_supervision: bool = False):
        super().__init__()
        kinds = layers(spatial_dims)
        block = {"spatial_dims": spatial_dims, "norm": norm, "activation": activation}
        self.depth, self.spatial_dims, self.norm = depth, spatial_dims, norm
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoder.append(ConvBlock(channels, width, **block))
            channels = width
        self.pool = kinds.pool(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], dropout=dropout, **block)
        self.up = nn.ModuleList(kinds.up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], **block) for i in reversed(range(depth)))
        conv1x1 = kinds.conv
        self.head = conv1x1(widths[0], num_classes, 1)
        # Deep supervision (nnU-Net): extra heads on the coarser decoder levels, used in training only.
        self.deep_supervision = deep_supervision
        self.aux_heads = nn.ModuleList(conv1x1(widths[i], num_classes, 1) for i in range(1, depth)
                                       if deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits at full resolution; in training with deep supervision, a list: full resolution first, then
        each coarser decoder level (1/2, 1/4, ... of the padded input)."""
        x, index = pad_to_multiple(x, 2**self.depth)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        levels = []
        for level, (up, block, skip) in enumerate(zip(self.up, self.decoder, reversed(skips))):
            x = self.merge(level, up(x), skip, block)
            levels.append(x)
        logits = crop(self.head(x), index)
        if self.deep_supervision and self.training:
            coarser = levels[-2::-1]  # 1/2, 1/4, ... (the decoder runs coarse to fine)
            return [logits] + [head(level) for head, level in zip(self.aux_heads, coarser)]
        return logits

    def merge(self, level: int, up: torch.Tensor, skip: torch.Tensor, block: nn.Module) -> torch.Tensor:
        """One decoder step: the upsampled features and the skip, concatenated (subclasses gate the skip)."""
        return block(torch.cat([up, skip], dim=1))
