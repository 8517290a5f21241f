"""SegNet (Badrinarayanan et al. 2017): an encoder-decoder that upsamples with the encoder's max-pooling
indices (max-unpooling) instead of concatenating encoder features: memory-light, no skip concatenation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.blocks import ConvBlock, crop, layers, pad_to_multiple


class SegNet(nn.Module):
    """Input (B, in_channels, *spatial), any size -> logits (B, num_classes, *spatial). Widths
    base_channels * 2**i for `depth` levels; each level is two 3x3 conv + norm + activation, then a 2x max-pool
    whose indices the mirrored decoder level unpools with."""
    encoder_modules = ("encoder",)  # what --freeze-encoder-epochs holds still

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 16, depth: int = 4,
                 dropout: float = 0.0, spatial_dims: int = 2, norm: str = "batch", activation: str = "relu",
                 deep_supervision: bool = False):
        super().__init__()
        if deep_supervision:
            raise ValueError("segnet has no deep supervision; use a U-Net")
        kinds = layers(spatial_dims)
        block = {"spatial_dims": spatial_dims, "norm": norm, "activation": activation}
        widths = [base_channels * 2**i for i in range(depth)]
        self.depth = depth
        self.encoder = nn.ModuleList(ConvBlock(c, w, **block) for c, w in zip([in_channels] + widths[:-1], widths))
        self.pool, self.unpool = kinds.pool(2, return_indices=True), kinds.unpool(2)
        self.dropout = kinds.drop(dropout) if dropout > 0 else nn.Identity()
        # decoder level i maps widths[i] back to widths[i - 1] (the last keeps widths[0])
        self.decoder = nn.ModuleList(ConvBlock(widths[i], widths[max(i - 1, 0)], **block)
                                     for i in reversed(range(depth)))
        self.head = kinds.conv(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, index = pad_to_multiple(x, 2**self.depth)
        indices = []
        for block in self.encoder:
            x, where = self.pool(block(x))
            indices.append(where)
        x = self.dropout(x)
        for block, where in zip(self.decoder, reversed(indices)):
            x = block(self.unpool(x, where))
        return crop(self.head(x), index)
