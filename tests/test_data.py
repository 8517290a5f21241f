"""Loading cases: geometry and consistency checks before anything is trained."""
import nibabel as nib
import numpy as np
import pytest

from medseg.config import TrainConfig
from medseg.data import load_case, load_cases
from medseg.datasets import Case
from medseg.errors import MedsegError


def test_mask_on_another_grid_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 2, 2, 1])), tmp_path / "seg.nii.gz")
    with pytest.raises(MedsegError, match="seg.nii.gz: spacing, orientation or origin differ"):
        load_case(Case("c", [tmp_path / "img.nii.gz"], tmp_path / "seg.nii.gz"))


def test_mixing_2d_and_3d_is_refused(tmp_path):
    from PIL import Image as PILImage

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "vol_seg.nii.gz")
    PILImage.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "img.png")
    PILImage.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "img_seg.png")
    cases = [Case("v", [tmp_path / "vol.nii.gz"], tmp_path / "vol_seg.nii.gz"),
             Case("i", [tmp_path / "img.png"], tmp_path / "img_seg.png")]
    with pytest.raises(MedsegError, match="img.png: a 2D image among 3D volumes"):
        load_cases(cases, TrainConfig(progress=False))


def test_batches_keep_their_size_with_fewer_slices_than_a_batch():
    import torch

    from medseg.data import LoadedCase
    from medseg.samplers import SliceSampler
    from medseg.io import Image

    cases = [LoadedCase(f"c{i}", Image(np.random.rand(1, 40, 40).astype(np.float32), (1.0, 1.0)),
                        (np.random.rand(40, 40) > 0.5).astype(np.uint8)) for i in range(2)]
    cfg = TrainConfig(size=32, batch_size=8, fit="pad")
    batches = list(SliceSampler(cases, cfg, torch.Generator().manual_seed(0)).epoch_batches(3))
    assert [tuple(image.shape) for image, _ in batches] == [(8, 1, 32, 32)] * 3


def test_nan_voxels_stop_with_the_file_named(tmp_path):
    volume = np.zeros((8, 8, 8), np.float32)
    volume[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
    with pytest.raises(MedsegError, match=r"scan.nii.gz: 1 voxel\(s\) are NaN or infinite"):
        load_case(Case("scan", [tmp_path / "scan.nii.gz"], tmp_path / "mask.nii.gz"), TrainConfig())
