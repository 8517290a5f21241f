"""The few building blocks every network here is made of, for 2D and 3D (`spatial_dims`), and the padding that
lets every network take any input size."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batch", "instance")
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True)}


def layers(spatial_dims: int) -> SimpleNamespace:
    """The torch layer classes for 2D or 3D."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    two = spatial_dims == 2
    return SimpleNamespace(
        conv=nn.Conv2d if two else nn.Conv3d, up=nn.ConvTranspose2d if two else nn.ConvTranspose3d,
        pool=nn.MaxPool2d if two else nn.MaxPool3d, unpool=nn.MaxUnpool2d if two else nn.MaxUnpool3d,
        drop=nn.Dropout2d if two else nn.Dropout3d, interpolation="bilinear" if two else "trilinear")


def norm_layer(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def conv_norm_act(in_channels: int, out_channels: int, spatial_dims: int, norm: str, activation: str,
                  kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    conv = layers(spatial_dims).conv
    return [conv(in_channels, out_channels, kernel, stride=stride, padding=dilation * (kernel // 2),
                 dilation=dilation, bias=False),
            norm_layer(norm, out_channels, spatial_dims), ACTIVATIONS[activation]()]


class ConvBlock(nn.Sequential):
    """Two (conv 3x3 -> norm -> activation), with optional dropout between them."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, dropout: float = 0.0,
                 norm: str = "batch", activation: str = "relu"):
        first = conv_norm_act(in_channels, out_channels, spatial_dims, norm, activation)
        second = conv_norm_act(out_channels, out_channels, spatial_dims, norm, activation)
        super().__init__(*first, *([layers(spatial_dims).drop(dropout)] if dropout > 0 else []), *second)


class ResidualBlock(nn.Module):
    """Two 3x3 convs with a shortcut (He et al. 2016); the first conv may stride or dilate, and the shortcut is a
    strided 1x1 conv where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, stride: int = 1,
                 dilation: int = 1, norm: str = "batch", activation: str = "relu"):
        super().__init__()
        conv = layers(spatial_dims).conv
        self.body = nn.Sequential(
            *conv_norm_act(in_channels, out_channels, spatial_dims, norm, activation, stride=stride,
                           dilation=dilation),
            conv(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            norm_layer(norm, out_channels, spatial_dims))
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            conv(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(norm, out_channels, spatial_dims))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple | None]:
    """Pad the spatial axes of (B, C, *spatial) with edge values up to a multiple of `multiple`; returns the padded
    tensor and the index that crops an output of the padded size back (None when nothing was padded)."""
    spatial = x.shape[2:]
    extras = [(-size) % multiple for size in spatial]
    if not any(extras):
        return x, None
    pads = []
    for extra in reversed(extras):
        pads += [extra // 2, extra - extra // 2]
    index = (slice(None), slice(None), *(slice(e // 2, e // 2 + s) for e, s in zip(extras, spatial)))
    return F.pad(x, pads, mode="replicate"), index  # unlike reflect, replicate works for any size


def crop(x: torch.Tensor, index: tuple | None) -> torch.Tensor:
    return x if index is None else x[index]
