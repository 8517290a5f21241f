"""Segmentation networks behind one registry: `create_model(name, **kwargs)`.

Every model takes the same keyword arguments (in_channels, num_classes, base_channels, depth, dropout,
spatial_dims, norm, activation, deep_supervision), accepts inputs of any size in 2D or 3D, and returns logits
(B, num_classes, *spatial). Deep supervision is a U-Net-family option; the others refuse it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from medseg.models.attention_unet import AttentionUNet
from medseg.models.deeplab import DeepLabV3Plus
from medseg.models.fcn import FCN8s
from medseg.models.resenc_unet import ResEncUNet
from medseg.models.segnet import SegNet
from medseg.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet, "attention_unet": AttentionUNet, "resenc_unet": ResEncUNet, "deeplabv3plus": DeepLabV3Plus,
    "segnet": SegNet, "fcn": FCN8s,
}
DESCRIPTIONS = {
    "unet": "U-Net (Ronneberger 2015), the seed's design; spatial_dims=3 is the 3D U-Net",
    "attention_unet": "U-Net with attention gates on the skips (Oktay 2018)",
    "resenc_unet": "U-Net with a residual, strided-conv encoder (nnU-Net ResEnc)",
    "deeplabv3plus": "DeepLabv3+: ASPP on a ResNet-style encoder, output stride 16 (Chen 2018)",
    "segnet": "SegNet: max-unpooling with the pooling indices, no skip concatenation (Badrinarayanan 2017)",
    "fcn": "FCN-8s: score fusion from pool3 and pool4 (Long 2015)",
}

CHANNELS_LAST = (UNet, AttentionUNet)  # the 2D networks placed channels-last on a CPU (`place`)


def create_model(name: str = "unet", **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move `model` to `device`; a 2D network on a CPU is held channels-last (NHWC), where oneDNN's convolutions
    ran an eager training step 1.16-1.37x faster here than PyTorch's default layout (docs/benchmarks.md,
    channels-last). Training, validation and prediction all place a network this way, so they run the same
    kernels and a validation score equals what `medseg evaluate` computes. 3D networks keep the default layout (no
    gain measured), and so do the other architectures: the residual encoder's backward pass crashed PyTorch 2.13's
    CPU kernels channels-last."""
    model.to(device)
    if device.type == "cpu" and type(model) in CHANNELS_LAST and model.spatial_dims == 2:
        model.to(memory_format=torch.channels_last)
    return model


def count_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Forward-pass floating-point operations (2 per multiply-add, as torch's flop counter counts them) for one
    input of `shape` (B, C, *spatial); a training step costs about three times as much."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(shape))
    model.train(was_training)
    return int(counter.get_total_flops())


def describe_models(size: int = 128, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2,
                    base_channels: int = 16, depth: int = 4) -> list[dict]:
    """Name, description, parameters and forward GFLOPs of every registered model at one input size."""
    rows = []
    for name in MODELS:
        model = create_model(name, in_channels=in_channels, num_classes=num_classes, base_channels=base_channels,
                             depth=depth, spatial_dims=spatial_dims)
        flops = count_flops(model, (1, in_channels, *(size,) * spatial_dims))
        rows.append({"name": name, "description": DESCRIPTIONS[name],
                     "parameters": sum(p.numel() for p in model.parameters()), "gflops": flops / 1e9})
    return rows


__all__ = ["MODELS", "AttentionUNet", "DeepLabV3Plus", "FCN8s", "ResEncUNet", "SegNet", "UNet", "count_flops",
           "create_model", "describe_models"]
