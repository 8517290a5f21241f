"""Checkpoints written atomically, and a trained run loaded back as (model, config, metadata)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from medseg.config import TrainConfig
from medseg.errors import MedsegError, write_error
from medseg.infer import TrainedModel
from medseg.models import create_model, place


def save_checkpoint(path: Path, state: dict, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint. A
    checksum of every tensor and value goes inside, verified on reading. With `keep_previous`, the checkpoint it
    replaces stays as NAME.prev.pt, the fallback when NAME.pt turns out damaged."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(handle)
    try:
        buffer = io.BytesIO()  # serialised in memory, written by Python: a full disk raises OSError, not torch's
        torch.save({**state, "checksum": checksum(state)}, buffer)
        with open(tmp, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if keep_previous and path.exists():
            link = Path(tmp).with_suffix(".prev")
            os.link(path, link)  # a second name for the old file: the old file stays complete under both
            os.replace(link, previous_path(path))
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp).with_suffix(".prev").unlink(missing_ok=True)


def previous_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checksum(state) -> str:
    """SHA-256 over a checkpoint's tensors (dtype, shape and bytes) and plain values, in key order."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


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
    stored = state.pop("checksum", None)  # checkpoints written before checksums existed have none
    if stored is not None and stored != checksum(state):
        raise MedsegError(f"{path}: {what} is damaged (its checksum does not match its contents); retrain or "
                          "restore it")
    return state


def read_checkpoint_or_previous(path: Path, what: str = "checkpoint") -> tuple[dict, Path]:
    """`read_checkpoint`, falling back to the NAME.prev.pt kept beside a damaged or missing one (said on stderr);
    returns the state and the file it came from."""
    previous = previous_path(path)
    try:
        return read_checkpoint(path, what), path
    except MedsegError as exc:
        if not previous.exists():
            raise
        state = read_checkpoint(previous, what)
        print(f"warning: {exc}; using the one before it, {previous.name} (epoch {state.get('epoch', '?')})",
              file=sys.stderr, flush=True)
        return state, previous


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


@contextmanager
def torch_threads(count: int | None):
    """PyTorch on `count` CPU threads (None: as it is) inside the block, and the caller's count back after it, so
    that a notebook's later work keeps its own. Given back only where it changed: setting it again as a DDP rank
    ended made that rank abort at exit (once in five runs)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def load_run(run: str | Path, which: str = "best", device: str = "auto", unfinished: bool = False) -> TrainedModel:
    """Load RUN/best.pt (or last.pt, or a checkpoint file given directly) into an eval-mode model. A run whose
    training did not finish (no train_summary.json: killed, or still running) is refused unless `unfinished`: its
    post-processing decision may be missing, and its checkpoint is not the one training would have ended with."""
    run = Path(run)
    path = run if run.is_file() else run / f"{which}.pt"
    if not unfinished and not run.is_file() and (run / "config.json").exists() \
            and not (run / "train_summary.json").exists():
        raise MedsegError(f"{run}: training did not finish (no train_summary.json: it was stopped, or is still "
                          f"running); continue it with 'medseg train --resume {run}'")
    if not path.exists() and not previous_path(path).exists():
        raise MedsegError(f"{run}: no checkpoint {path.name} found; train first with 'medseg train DATA --out {run}'")
    state, path = read_checkpoint_or_previous(path) if not run.is_file() else (read_checkpoint(path), path)
    target = resolve_device(device)
    model = create_model(state["model_name"], **state["model_args"])
    model.load_state_dict(state["model"])
    place(model, target).eval()
    postprocessing = path.parent / "postprocessing.json"
    decision = json.loads(postprocessing.read_text()) if postprocessing.exists() else {}
    config = TrainConfig(**state["config"])
    in_channels = state["model_args"]["in_channels"] // config.slices_per_input  # the image's own channels
    return TrainedModel(model, config, state["class_names"], in_channels, path.parent, target,
                        decision.get("classes", []), {int(k): v for k, v in decision.get("min_sizes", {}).items()})


def load_models(run: str | Path, device: str = "auto") -> list[TrainedModel]:
    """One run, the members of an ensemble folder (`medseg ensemble`) or of a model package (`medseg export`), or
    every `fold_*` run under a cross-validation folder (for an ensemble)."""
    from medseg.ensemble import is_ensemble, member_paths
    from medseg.package import is_package, package_members
    from medseg.signing import TRUST_ENV

    run = Path(run)
    if is_package(run):
        return [load_run(member, device=device) for member in package_members(run)]
    if os.environ.get(TRUST_ENV):  # only signed packages: a run folder's files vouch for nothing
        raise MedsegError(f"{run}: a run folder, not a signed package, and a trusted key is set (--trust or "
                          f"{TRUST_ENV}); export it with 'medseg export RUN --out model.zip --sign KEY'")
    if is_ensemble(run):
        return [load_run(member, device=device) for member in member_paths(run)]
    if run.is_dir() and not (run / "best.pt").exists():
        folds = sorted(p for p in run.glob("fold_*") if (p / "best.pt").exists())
        if folds:
            return [load_run(fold, device=device) for fold in folds]
    return [load_run(run, device=device)]
