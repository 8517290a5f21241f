"""DeepLabv3+ (Chen et al. 2018) on a small ResNet-style encoder of our own (torchvision is not available).

Encoder: a stride-2 stem, then residual stages at strides 4, 8 and 16, the last one dilated (output stride 16).
ASPP: parallel 1x1 and dilated 3x3 convolutions (rates 6, 12, 18) and a global-pooling branch, fused by a 1x1.
Decoder: the ASPP output upsampled to stride 4, joined with reduced stride-4 features, two 3x3 convs, and
upsampled to the input size. Any input size: upsampling goes to the exact sizes of the features it meets.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.models.blocks import ACTIVATIONS, ResidualBlock, conv_norm_act, layers


class ASPP(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, norm: str, activation: str,
                 rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        conv, self.mode = layers(spatial_dims).conv, layers(spatial_dims).interpolation
        self.branches = nn.ModuleList(
            [nn.Sequential(*conv_norm_act(in_channels, out_channels, spatial_dims, norm, activation, kernel=1))]
            + [nn.Sequential(*conv_norm_act(in_channels, out_channels, spatial_dims, norm, activation, dilation=r))
               for r in rates])
        # the pooled branch has one value per channel: a norm layer would be undefined there, so none
        self.pooled = nn.Sequential(conv(in_channels, out_channels, 1), ACTIVATIONS[activation]())
        self.project = nn.Sequential(*conv_norm_act(out_channels * (len(rates) + 2), out_channels, spatial_dims,
                                                    norm, activation, kernel=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """Input (B, in_channels, *spatial), any size -> logits (B, num_classes, *spatial). Widths: stem
    base_channels, stages base_channels * (1, 2, 4, 8); `depth` is accepted for a common signature and unused."""
    encoder_modules = ("stem", "low", "mid", "high")  # the ResNet-style backbone (--freeze-encoder-epochs)

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 16, depth: int = 4,
                 dropout: float = 0.0, spatial_dims: int = 2, norm: str = "batch", activation: str = "relu",
                 deep_supervision: bool = False):
        super().__init__()
        if deep_supervision:
            raise ValueError("deeplabv3plus has no deep supervision; use a U-Net")
        block = {"spatial_dims": spatial_dims, "norm": norm, "activation": activation}
        conv, self.mode = layers(spatial_dims).conv, layers(spatial_dims).interpolation
        w = base_channels
        self.stem = nn.Sequential(*conv_norm_act(in_channels, w, spatial_dims, norm, activation, stride=2))
        self.low = nn.Sequential(ResidualBlock(w, w, stride=2, **block), ResidualBlock(w, w, **block))  # /4
        self.mid = nn.Sequential(ResidualBlock(w, 2 * w, stride=2, **block), ResidualBlock(2 * w, 2 * w, **block))
        self.high = nn.Sequential(ResidualBlock(2 * w, 4 * w, stride=2, **block),  # /16
                                  ResidualBlock(4 * w, 8 * w, dilation=2, **block),
                                  ResidualBlock(8 * w, 8 * w, dilation=4, **block))
        self.aspp = ASPP(8 * w, 4 * w, spatial_dims, norm, activation)
        self.dropout = layers(spatial_dims).drop(dropout) if dropout > 0 else nn.Identity()
        self.reduce = nn.Sequential(*conv_norm_act(w, max(w // 2, 8), spatial_dims, norm, activation, kernel=1))
        self.decoder = nn.Sequential(
            *conv_norm_act(4 * w + max(w // 2, 8), 4 * w, spatial_dims, norm, activation),
            *conv_norm_act(4 * w, 4 * w, spatial_dims, norm, activation))
        self.head = conv(4 * w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        low = self.low(self.stem(x))
        context = self.dropout(self.aspp(self.high(self.mid(low))))
        context = F.interpolate(context, size=low.shape[2:], mode=self.mode, align_corners=False)
        features = self.decoder(torch.cat([context, self.reduce(low)], 1))
        return F.interpolate(self.head(features), size=size, mode=self.mode, align_corners=False)
