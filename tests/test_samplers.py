"""Class-aware sampling: a share of every batch is centred on a voxel of a class drawn uniformly among the classes
in the case, so a small lesion inside a large organ is seen as often as the organ, in 2D and 3D alike."""
import numpy as np
import pytest
import torch

from medseg.config import TrainConfig
from medseg.data import LoadedCase, class_points
from medseg.io import Image
from medseg.samplers import PatchSampler, SliceSampler


def organ_with_lesion(side: int = 128) -> LoadedCase:
    """A large organ (class 1) holding a 5-voxel lesion (class 2), off-centre."""
    label = np.zeros((side, side, side), np.uint8)
    label[8:120, 8:120, 8:120] = 1
    x, y, z = 80, 40, 60
    for dx, dy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        label[x + dx, y + dy, z] = 2
    image = Image(label[None].astype(np.float32), (1.0, 1.0, 1.0), np.eye(4))
    return LoadedCase("case", image, label)


def shares(sampler, batches: int):
    """(share of samples holding each class, share of batches holding each class)."""
    samples, holding = {1: 0, 2: 0}, {1: 0, 2: 0}
    for _, labels in sampler.epoch_batches(batches):
        for k in (1, 2):
            per_sample = (labels.flatten(1) == k).any(1)
            samples[k] += int(per_sample.sum())
            holding[k] += bool(per_sample.any())
    n = batches * sampler.cfg.batch_size
    return {k: v / n for k, v in samples.items()}, {k: v / batches for k, v in holding.items()}


@pytest.mark.parametrize("dims", [2, 3])
def test_a_five_voxel_lesion_is_a_sample_centre_as_often_as_the_organ(dims):
    cfg = TrainConfig(data="x", dims=dims, axis=2, fit="pad", size=16, batch_size=16, foreground_fraction=0.33,
                      augment=False)
    sampler = (SliceSampler if dims == 2 else PatchSampler)([organ_with_lesion()], cfg,
                                                            torch.Generator().manual_seed(0))
    centred = sampler.centred_count(16)
    assert centred == 5  # nnU-Net's count: the samples past round(16 x 0.67)
    per_sample, per_batch = shares(sampler, 300)
    # the rule: of 5 centred samples, each draws the lesion with probability 1/2; random samples almost never
    # hold 5 voxels of 128^3, so the lesion is in ~5/32 of samples and in all but (1/2)^5 of batches
    assert per_sample[2] == pytest.approx(centred / 16 / 2, abs=0.03)
    assert per_batch[2] == pytest.approx(1 - 0.5**centred, abs=0.03)
    assert per_sample[1] >= centred / 16  # every centred sample holds the organ (the lesion lies inside it)
    assert sampler.centred == 300 * centred
    line = sampler.shares_line(["background", "organ", "lesion"])
    assert line.startswith("samples holding each class: organ") and "lesion 1" in line and "5 of every 16" in line


def test_class_points_are_kept_per_class_and_capped():
    label = np.zeros((200, 200, 30), np.uint8)
    label[:, :, :20] = 1  # 800,000 voxels
    label[5, 6, 7] = 2
    points = class_points(label)
    assert sorted(points) == [1, 2] and points[2].tolist() == [[5, 6, 7]]
    assert len(points[1]) == 10_000 and (label[tuple(points[1].T)] == 1).all()
    np.testing.assert_array_equal(class_points(label)[1], points[1])  # a fixed sample: the same in every run


def test_training_says_what_the_first_epoch_sampled(phantoms_3d, tmp_path, capsys):
    from medseg.train import train
    from conftest import tiny_config

    train(tiny_config(phantoms_3d, tmp_path / "run", fit="pad", epochs=2))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling in epoch 1")]
    assert len(lines) == 1 and "ellipse" in lines[0] and "ring" in lines[0] and "of 12 samples" in lines[0]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_2_5d_slice_is_cut_without_copying_a_fortran_ordered_volume(axis):
    """Volumes are read in Fortran order (nibabel, MetaImage): np.take copied such a volume whole for every slice
    it cut (BraTS 2.5D batches took 2.5 s instead of 0.1 s). A batch may allocate its slices, not volumes."""
    import tracemalloc

    label = np.asfortranarray(np.zeros((160, 160, 120), np.uint8))
    label[40:120, 40:120, 30:90] = 1
    volume = np.moveaxis(np.asfortranarray(np.random.default_rng(0).random((160, 160, 120, 2), np.float32)), 3, 0)
    assert not volume.flags.c_contiguous
    case = LoadedCase("case", Image(volume, (1.0, 1.0, 1.0), np.eye(4)), label)
    cfg = TrainConfig(data="x", dims=2, axis=axis, fit="pad", size=64, batch_size=4, context=1, augment=False)
    sampler = SliceSampler([case], cfg, torch.Generator().manual_seed(0))
    case.class_points()  # made once per case, outside what is measured
    tracemalloc.start()
    image, _ = sampler.batch([0, 50, 100, 110])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.shape == (4, 6, 64, 64)
    assert peak < volume.nbytes / 4, f"{peak / 2**20:.1f} MiB to cut 4 slices of a {volume.nbytes / 2**20:.0f} MiB volume"
