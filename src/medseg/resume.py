"""Resuming a stopped run: what a checkpoint must carry beyond weights, and the checks before training goes on.

`medseg train --resume RUN` reads RUN/config.json and RUN/last.pt (or last.prev.pt, where last.pt is damaged):
model, optimiser, the schedule position (the epoch), every random state training draws from (the sampler's and
augmentation's generator, torch's, NumPy's and Python's), the early-stopping counters and the history. A seeded run
resumed ends with the weights of the same run never stopped (tests/test_resume.py: bit for bit on CPU).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError


def resume_run(run: str | Path, progress: bool = True) -> Path:
    """Continue a stopped run (killed, out of disk, machine gone) from its last completed epoch: the model,
    optimiser, schedule position, every random state (sampler, augmentation), early-stopping counters and history
    come from RUN/last.pt (or last.prev.pt, where last.pt is damaged); settings from RUN/config.json. A seeded run
    resumed ends with the weights of the same run never stopped."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise MedsegError(f"{run}: no config.json, so no run to resume (it was stopped before it started); start "
                          "it again with 'medseg train'")
    if (run / "train_summary.json").exists():
        raise MedsegError(f"{run}: training finished already (train_summary.json); nothing to resume")
    for stale in run.glob(".tmp-*"):  # what a kill left half-written; the files they were to replace are whole
        stale.unlink()
    from medseg.config import TrainConfig
    from medseg.train import train

    cfg = TrainConfig.load(run / "config.json")
    cfg.progress = progress
    return train(cfg, resume=run)


def read_resume_state(run: Path) -> dict | None:
    """RUN/last.pt with what resuming needs, or None when the run stopped before its first epoch ended."""
    from medseg.checkpoint import previous_path, read_checkpoint_or_previous

    path = run / "last.pt"
    if not path.exists() and not previous_path(path).exists():
        return None
    state, _ = read_checkpoint_or_previous(path, "last checkpoint")
    if "resume" not in state:
        raise MedsegError(f"{path}: written by a medseg without resume support; this run cannot be resumed")
    return state


def check_same_split(run: Path, split: dict) -> None:
    """The data must still give the run's cases: a resumed run on other cases would be a different experiment."""
    if not (run / "split.json").exists():
        raise MedsegError(f"{run}: stopped before its split was written, so there is nothing to resume; start it "
                          "again with 'medseg train ... --overwrite'")
    stored = json.loads((run / "split.json").read_text())
    for role in ("train", "val", "test"):
        if sorted(stored.get(role, [])) != sorted(split[role]):
            raise MedsegError(f"{run}: the data no longer holds the run's {role} cases (cases were added, removed "
                              "or renamed since it started); it cannot be resumed, start a new run")


def random_states(generator: torch.Generator) -> dict:
    """Every random state training draws from, as tensors and plain values (a checkpoint holds nothing else)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                        "has_gauss": int(has_gauss), "cached": float(cached)},
              "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
