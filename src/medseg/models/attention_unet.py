"""Attention U-Net (Oktay et al. 2018): the U-Net whose skip connections pass through attention gates.

A gate looks at the skip features and the decoder's upsampled features (the gating signal, which carries
coarser context) and computes a per-voxel weight in [0, 1] that scales the skip before concatenation, so the
decoder hears less from regions that the coarse context says are irrelevant.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.blocks import layers, norm_layer
from medseg.models.unet import UNet


class AttentionGate(nn.Module):
    """alpha = sigmoid(psi(relu(W_x skip + W_g gate))); returns skip * alpha. Shapes (B, C, *spatial) alike."""

    def __init__(self, channels: int, spatial_dims: int, norm: str = "batch"):
        super().__init__()
        conv = layers(spatial_dims).conv
        inner = max(channels // 2, 1)
        self.skip = nn.Sequential(conv(channels, inner, 1, bias=False), norm_layer(norm, inner, spatial_dims))
        self.gate = nn.Sequential(conv(channels, inner, 1, bias=False), norm_layer(norm, inner, spatial_dims))
        self.psi = nn.Sequential(nn.ReLU(inplace=True), conv(inner, 1, 1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(self.skip(skip) + self.gate(gate))


class AttentionUNet(UNet):
    """`UNet` (same arguments, same shapes) with an attention gate on every skip connection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        widths = [block[0].out_channels for block in self.encoder]
        self.gates = nn.ModuleList(AttentionGate(w, self.spatial_dims, self.norm) for w in reversed(widths))

    def merge(self, level: int, up: torch.Tensor, skip: torch.Tensor, block: nn.Module) -> torch.Tensor:
        return block(torch.cat([up, self.gates[level](skip, up)], dim=1))
