"""Shared fixtures: small phantom datasets made on the fly, a tiny training configuration, the shared data."""
from __future__ import annotations

from pathlib import Path

import pytest

from medseg.config import TrainConfig
from medseg.synth import write_synthetic_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def shared_dataset(*parts: str) -> Path:
    """Path into ../shared/datasets, or skip the test with the reason when it is absent (a user's machine)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present: the shared datasets live beside the repository in development and CI")
    return path


@pytest.fixture(scope="session")
def phantoms_2d(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("ph2d"), cases=12, dim=2, size=32, num_classes=2)


@pytest.fixture(scope="session")
def phantoms_3d(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("ph3d"), cases=5, dim=3, size=24, num_classes=2)


def save_png(path: Path, array) -> Path:
    """An 8-bit PNG, folders made as needed; returns its path."""
    import numpy as np
    from PIL import Image as PILImage

    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A network and schedule small enough to train in a few seconds on two cores."""
    settings = dict(data=str(data), out=str(out), size=32, base_channels=4, depth=2, epochs=2, steps_per_epoch=3,
                    batch_size=4, lr=1e-3, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def trained_2d(phantoms_2d, tmp_path_factory) -> Path:
    from medseg.train import train

    return train(tiny_config(phantoms_2d, tmp_path_factory.mktemp("runs") / "run2d"))


@pytest.fixture(scope="session")
def trained_3d(phantoms_3d, tmp_path_factory) -> Path:
    from medseg.train import train

    return train(tiny_config(phantoms_3d, tmp_path_factory.mktemp("runs") / "run3d", fit="pad"))
