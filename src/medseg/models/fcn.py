"""FCN-8s (Long et al. 2015): a VGG-style encoder with five poolings, convolutionalised fully connected layers,
and class scores fused from coarse to fine: stride 32 scores upsampled x2 and added to pool4's scores, that x2
again and added to pool3's, then upsampled x8 to the input.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.blocks import ConvBlock, conv_norm_act, crop, layers, pad_to_multiple


class FCN8s(nn.Module):
    """Input (B, in_channels, *spatial), any size (padded to a multiple of 32 and cropped back) -> logits
    (B, num_classes, *spatial). Widths base_channels * (1, 2, 4, 8, 8); the "fc" layers have 16 * base_channels.
    `depth` is accepted for a common signature; FCN-8s has five poolings by definition."""
    encoder_modules = ("stages",)  # the VGG-style feature stages (--freeze-encoder-epochs)

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 16, depth: int = 5,
                 dropout: float = 0.0, spatial_dims: int = 2, norm: str = "batch", activation: str = "relu",
                 deep_supervision: bool = False):
        super().__init__()
        if deep_supervision:
            raise ValueError("fcn has no deep supervision; use a U-Net")
        kinds = layers(spatial_dims)
        block = {"spatial_dims": spatial_dims, "norm": norm, "activation": activation}
        w = base_channels
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.stages = nn.ModuleList(ConvBlock(c, o, **block) for c, o in zip([in_channels] + widths[:-1], widths))
        self.pool = kinds.pool(2)
        self.fc = nn.Sequential(*conv_norm_act(8 * w, 16 * w, spatial_dims, norm, activation, kernel=3),
                                kinds.drop(dropout) if dropout > 0 else nn.Identity(),
                                *conv_norm_act(16 * w, 16 * w, spatial_dims, norm, activation, kernel=1))
        self.score_fr = kinds.conv(16 * w, num_classes, 1)
        self.score_pool4 = kinds.conv(8 * w, num_classes, 1)
        self.score_pool3 = kinds.conv(4 * w, num_classes, 1)
        self.up2 = kinds.up(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.up2_pool4 = kinds.up(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.up8 = kinds.up(num_classes, num_classes, 16, stride=8, padding=4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, index = pad_to_multiple(x, 32)
        pooled = []
        for stage in self.stages:
            x = self.pool(stage(x))
            pooled.append(x)
        pool3, pool4 = pooled[2], pooled[3]
        scores = self.up2(self.score_fr(self.fc(x))) + self.score_pool4(pool4)
        scores = self.up2_pool4(scores) + self.score_pool3(pool3)
        return crop(self.up8(scores), index)
