"""Transfer learning: start from another run's weights (`--init-from`) and hold the encoder still for the first
epochs (`--freeze-encoder-epochs`), so the new decoder and output layer settle before the encoder moves.

Tensors are matched by name and shape. A network trained with other input channels or classes keeps what fits
(typically everything but the first convolution or the output layer); what was loaded and what was skipped, and
why, is written to RUN/init.json and printed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from medseg.checkpoint import read_checkpoint
from medseg.errors import MedsegError
from medseg.io import write_text_atomic


def checkpoint_path(source: str | Path) -> Path:
    """A run folder (its best.pt) or a checkpoint file."""
    path = Path(source)
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise MedsegError(f"--init-from {source}: no checkpoint there (give a run folder with best.pt, or a .pt file)")
    return path


def load_matching(model: nn.Module, source: str | Path) -> dict:
    """Copy into `model` every tensor of the checkpoint with the same name and shape; return the account."""
    path = checkpoint_path(source)
    state = read_checkpoint(path, "--init-from checkpoint")
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise MedsegError(f"--init-from {path}: holds no state dict of tensors")
    own = model.state_dict()
    loaded, skipped = [], {}
    for name, tensor in own.items():
        if name not in weights:
            skipped[name] = "not in the checkpoint"
        elif weights[name].shape != tensor.shape:
            skipped[name] = f"shape {tuple(weights[name].shape)} there, {tuple(tensor.shape)} here"
        else:
            loaded.append(name)
    if not loaded:
        raise MedsegError(f"--init-from {path}: no tensor matches this network by name and shape (another --model "
                          "or --depth?)")
    model.load_state_dict({name: weights[name] for name in loaded}, strict=False)
    return {"source": str(path), "source_model": state.get("model_name") if isinstance(state, dict) else None,
            "loaded": len(loaded), "of": len(own), "skipped": skipped,
            "unused": sorted(set(weights) - set(own))}


def describe(account: dict) -> str:
    text = f"initialised {account['loaded']} of {account['of']} tensors from {account['source']}"
    if account["skipped"]:
        text += "; skipped: " + ", ".join(f"{k} ({why})" for k, why in list(account["skipped"].items())[:6])
        if len(account["skipped"]) > 6:
            text += f" and {len(account['skipped']) - 6} more (see init.json)"
    return text


def write_account(account: dict, run: Path) -> None:
    write_text_atomic(run / "init.json", json.dumps(account, indent=2))


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's encoder (the modules its class names in `encoder_modules`)."""
    names = getattr(model, "encoder_modules", None)
    if not names:
        raise MedsegError(f"--freeze-encoder-epochs: {type(model).__name__} does not say which part is its encoder")
    return [p for name in names for p in getattr(model, name).parameters()]


def set_encoder_frozen(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) gradients into the encoder. Its normalisation layers keep their running statistics
    in eval mode while frozen, so the pretrained statistics are not overwritten by the first batches."""
    for p in encoder_parameters(model):
        p.requires_grad_(not frozen)
    for name in model.encoder_modules:
        for module in getattr(model, name).modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train(not frozen and model.training)
