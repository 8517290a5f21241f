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


def test_ct_like_set_two_sites_lesions_inside_the_organ_recognised_as_ct(tmp_path):
    from medseg.cli import main
    from medseg.plan import make_plan
    from medseg.synth_ct import write_ct_dataset

    assert main(["synth", "--kind", "ct", "--out", str(tmp_path / "ct"), "--cases", "10", "--size", "96"]) == 0
    data = tmp_path / "ct"
    meta = json.loads((data / "dataset.json").read_text())
    assert "modality" not in meta and meta["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    images = [read_image(p) for p in sorted((data / "imagesTr").iterdir())]
    labels = [read_image(p).array[0] for p in sorted((data / "labelsTr").iterdir())]
    assert {tuple(round(s, 3) for s in i.spacing) for i in images} == {(3.729, 3.729, 2.5), (4.792, 4.792, 5.0)}
    assert all(i.array.dtype == np.int16 and i.array.min() <= -1000 < 0 < i.array.max() for i in images)
    with_lesion = [label for label in labels if (label == 2).any()]
    assert 0 < len(with_lesion) < len(labels)  # some cases have none
    for image, label in zip(images, labels):  # lesions are darker than the organ around them
        if (label == 2).any():
            assert image.array[0][label == 2].mean() < image.array[0][label == 1].mean() - 15
    plan = make_plan(data, calibrate=False, alternatives=False)
    member = next(iter(plan["configurations"]["auto"]["members"].values()))
    # two sites' spacings: resampled to the median (at 96 px the slices are not 3x finer than thick: no p10 rule)
    median = [round(v, 4) for v in plan["fingerprint"]["spacing"]["median"]]
    assert member["normalization"] == "ct" and member["target_spacing"] == median
    again = write_ct_dataset(tmp_path / "again", cases=4, size=96)
    first = sorted((data / "imagesTr").iterdir())[0]
    np.testing.assert_array_equal(read_image(first).array, read_image(again / "imagesTr" / first.name).array)
