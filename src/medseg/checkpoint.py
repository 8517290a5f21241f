"""Checkpoints written atomically, and a trained run loaded back as (model, config, metadata)."""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medseg.config import TrainConfig
from medseg.errors import MedsegError
from medseg.models import create_model


@dataclass
class TrainedModel:
    model: torch.nn.Module
    config: TrainConfig
    class_names: list[str]
    in_channels: int  # channels of the input image (a 2.5D network sees config.slices_per_input times as many)
    run: Path
    device: torch.device
    postprocess_classes: list[int] = field(default_factory=list)  # keep-largest-component, chosen on validation


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(handle)
    try:
        torch.save(state, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_checkpoint(path: Path, what: str = "checkpoint") -> dict:
    """A checkpoint's tensors and plain values, read without unpickling anything else: a checkpoint is data a user
    may have been handed, and unpickling arbitrary objects would run code chosen by whoever wrote the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise MedsegError(f"{path}: refused; this {what} holds Python objects beyond tensors and plain values "
                              f"({found.group(1)}), and loading them could run code from the file (medseg loads "
                              "weights only; if you trust the file, save just its state dict with torch.save)") from exc
        raise MedsegError(f"{path}: {what} cannot be read (not a PyTorch checkpoint, or damaged); retrain or "
                          "restore it") from exc
    except Exception as exc:  # truncated, zero bytes, not a zip
        raise MedsegError(f"{path}: {what} cannot be read ({type(exc).__name__}); retrain or restore it") from exc
    if not isinstance(state, dict):
        raise MedsegError(f"{path}: {what} holds a {type(state).__name__}, not a dictionary of weights")
    return state


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MedsegError(f"--device {name}: not a device name (use auto, cpu, cuda, cuda:0 or mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedsegError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def load_run(run: str | Path, which: str = "best", device: str = "auto") -> TrainedModel:
    """Load RUN/best.pt (or last.pt, or a checkpoint file given directly) into an eval-mode model."""
    run = Path(run)
    path = run if run.is_file() else run / f"{which}.pt"
    if not path.exists():
        raise MedsegError(f"{run}: no checkpoint {path.name} found; train first with 'medseg train DATA --out {run}'")
    state = read_checkpoint(path)
    target = resolve_device(device)
    model = create_model(state["model_name"], **state["model_args"])
    model.load_state_dict(state["model"])
    model.to(target).eval()
    postprocessing = path.parent / "postprocessing.json"
    classes = json.loads(postprocessing.read_text())["classes"] if postprocessing.exists() else []
    config = TrainConfig(**state["config"])
    in_channels = state["model_args"]["in_channels"] // config.slices_per_input  # the image's own channels
    return TrainedModel(model, config, state["class_names"], in_channels, path.parent, target, classes)


def load_models(run: str | Path, device: str = "auto") -> list[TrainedModel]:
    """One run, the members of an ensemble folder (`medseg ensemble`), or every `fold_*` run under a
    cross-validation folder (for an ensemble)."""
    from medseg.ensemble import is_ensemble, member_paths

    run = Path(run)
    if is_ensemble(run):
        return [load_run(member, device=device) for member in member_paths(run)]
    if run.is_dir() and not (run / "best.pt").exists():
        folds = sorted(p for p in run.glob("fold_*") if (p / "best.pt").exists())
        if folds:
            return [load_run(fold, device=device) for fold in folds]
    return [load_run(run, device=device)]
