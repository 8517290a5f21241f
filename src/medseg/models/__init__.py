"""Segmentation networks behind one registry: `create_model(name, **kwargs)`."""
from __future__ import annotations

import torch.nn as nn

from medseg.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet}


def create_model(name: str = "unet", **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "UNet", "create_model"]
