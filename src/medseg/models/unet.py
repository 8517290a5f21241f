"""The U-Net of Ronneberger et al. (2015) as the seed designed it, for 2D and 3D.

Per level: two 3x3 conv + batch norm + ReLU; max-pool down; 2x2 transposed conv up; skip concatenation;
1x1 head. Defaults are the seed's: 64-128-256-512 encoder, 1024 bottleneck (base_channels=64, depth=4).
nnU-Net's choices are options: norm="instance" (robust to batch size 2) and activation="leaky_relu".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


NORMS = ("batch", "instance")
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True)}


def _layers(spatial_dims: int):
    if spatial_dims == 2:
        return nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d, nn.Dropout2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.MaxPool3d, nn.ConvTranspose3d, nn.Dropout3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class ConvBlock(nn.Sequential):
    """Two (conv 3x3 -> norm -> activation), with optional dropout between them."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, dropout: float = 0.0,
                 norm: str = "batch", activation: str = "relu"):
        conv, _, _, drop = _layers(spatial_dims)

        def conv_norm_act(channels_in: int) -> list[nn.Module]:
            return [conv(channels_in, out_channels, 3, padding=1, bias=False),
                    _norm(norm, out_channels, spatial_dims), ACTIVATIONS[activation]()]

        layers = conv_norm_act(in_channels) + ([drop(dropout)] if dropout > 0 else []) + conv_norm_act(out_channels)
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net with `depth` poolings. Input (B, in_channels, *spatial) of any size -> logits (B, num_classes, *spatial).

    Inputs whose sides are not multiples of 2**depth are padded (edge values) and the output cropped back.
    Encoder widths are base_channels * 2**i for i < depth; the bottleneck has base_channels * 2**depth.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_channels: int = 64, depth: int = 4,
                 dropout: float = 0.0, spatial_dims: int = 2, norm: str = "batch", activation: str = "relu",
                 deep_supervision: bool = False):
        super().__init__()
        _, pool, up, _ = _layers(spatial_dims)
        block = {"spatial_dims": spatial_dims, "norm": norm, "activation": activation}
        self.depth, self.spatial_dims = depth, spatial_dims
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList()
        channels = in_channels
        for width in widths[:-1]:
            self.encoder.append(ConvBlock(channels, width, **block))
            channels = width
        self.pool = pool(2)
        self.bottleneck = ConvBlock(widths[-2], widths[-1], dropout=dropout, **block)
        self.up = nn.ModuleList(up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth)))
        self.decoder = nn.ModuleList(ConvBlock(2 * widths[i], widths[i], **block) for i in reversed(range(depth)))
        conv1x1 = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.head = conv1x1(widths[0], num_classes, 1)
        # Deep supervision (nnU-Net): extra heads on the coarser decoder levels, used in training only.
        self.deep_supervision = deep_supervision
        self.aux_heads = nn.ModuleList(conv1x1(widths[i], num_classes, 1) for i in range(1, depth)
                                       if deep_supervision)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits at full resolution; in training with deep supervision, a list: full resolution first, then
        each coarser decoder level (1/2, 1/4, ... of the padded input)."""
        spatial = x.shape[2:]
        multiple = 2**self.depth
        pads = []
        for size in reversed(spatial):
            extra = (-size) % multiple
            pads += [extra // 2, extra - extra // 2]
        if any(pads):
            x = F.pad(x, pads, mode="replicate")  # unlike reflect, works for any input size
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        levels = []
        for up, block, skip in zip(self.up, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
            levels.append(x)
        logits = self.head(x)
        if any(pads):
            index = [slice(None), slice(None)]
            for d, size in enumerate(spatial):
                before = pads[2 * (len(spatial) - 1 - d)]
                index.append(slice(before, before + size))
            logits = logits[tuple(index)]
        if self.deep_supervision and self.training:
            coarser = levels[-2::-1]  # 1/2, 1/4, ... (the decoder runs coarse to fine)
            return [logits] + [head(level) for head, level in zip(self.aux_heads, coarser)]
        return logits
