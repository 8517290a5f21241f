import json

import numpy as np

from medseg.io import read_image
from medseg.synth import make_phantom, write_synthetic_dataset


def test_phantoms_are_seeded_and_hold_structures():
    a = make_phantom(np.random.default_rng(3), (48, 48), num_classes=3)
    b = make_phantom(np.random.default_rng(3), (48, 48), num_classes=3)
    np.testing.assert_array_equal(a[1], b[1])
    labels = [make_phantom(np.random.default_rng(s), (48, 48), 3)[1] for s in range(20)]
    assert all(label.max() > 0 for label in labels)
    assert {int(v) for label in labels for v in np.unique(label)} == {0, 1, 2, 3}
    counts = [len(np.unique(label)) - 1 for label in labels]
    assert min(counts) >= 1 and max(counts) == 3


def test_phantom_classes_differ_in_intensity_but_overlap_in_noise():
    image, label = make_phantom(np.random.default_rng(0), (64, 64, 64), num_classes=2)
    background, brighter, darker = (image[label == k] for k in range(3))
    assert brighter.mean() > background.mean() > darker.mean()
    assert brighter.min() < background.max()  # low contrast: thresholding alone cannot solve it


def test_written_in_msd_layout(tmp_path):
    write_synthetic_dataset(tmp_path / "d2", cases=3, dim=2, size=32, seed=1)
    write_synthetic_dataset(tmp_path / "d3", cases=2, dim=3, size=16, num_classes=1)
    meta = json.loads((tmp_path / "d2" / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "ellipse", "2": "ring"} and len(meta["training"]) == 3
    assert read_image(tmp_path / "d2" / "imagesTr" / "phantom_000.png").array.shape == (1, 32, 32)
    assert read_image(tmp_path / "d3" / "labelsTr" / "phantom_001.nii.gz").array.shape == (1, 16, 16, 16)
