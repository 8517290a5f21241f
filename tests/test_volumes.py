"""3D training on patches, foreground oversampling and Gaussian sliding-window inference."""
import json

import numpy as np
import pytest
import torch

from medseg.checkpoint import load_run
from medseg.data import load_cases
from medseg.datasets import find_cases
from medseg.errors import MedsegError
from medseg.config import TrainConfig
from medseg.infer import (forward_probabilities, gaussian_weights, predict_probabilities, sliding_window, tta_axes,
                          tta_rotates,
                          window_starts)
from medseg.models import UNet
from medseg.samplers import PatchSampler, SliceSampler
from medseg.train import train
from conftest import tiny_config


def test_gaussian_weights_peak_in_the_centre():
    weights = gaussian_weights((9, 12, 7))
    assert weights.shape == (9, 12, 7) and weights.max() == 1 and weights.min() > 0
    assert weights[4, 5, 3] > weights[0, 0, 0]


def test_windows_cover_with_overlap():
    assert window_starts(10, 16, 0.5) == [0]
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 68 and max(np.diff(starts)) <= 16


def test_sliding_window_equals_one_pass_when_the_patch_covers_the_input():
    model = UNet(1, 3, base_channels=4, depth=2, spatial_dims=3, norm="instance").eval()
    volume = torch.rand(1, 1, 12, 16, 8)
    with torch.no_grad():
        direct = model(volume).softmax(1)[0]
    np.testing.assert_allclose(sliding_window(model, volume, (12, 16, 8)), direct, atol=1e-5)
    tiled = sliding_window(model, volume, (8, 8, 8), overlap=0.5)
    assert tiled.shape == (3, 12, 16, 8)
    np.testing.assert_allclose(tiled.sum(0), 1, atol=1e-5)


def test_mirroring_is_symmetric():
    model = UNet(1, 2, base_channels=4, depth=1, spatial_dims=3).eval()
    volume = torch.rand(1, 1, 8, 8, 8)
    mirrored = sliding_window(model, volume, (8, 8, 8), mirror=(0, 1, 2))
    flipped = sliding_window(model, volume.flip(2), (8, 8, 8), mirror=(0, 1, 2)).flip(1)
    np.testing.assert_allclose(mirrored, flipped, atol=1e-5)


def test_mirroring_only_along_the_axes_trained_with_flips():
    """TTA must not flip where training never did (the hippocampus' anterior and posterior lie along one axis)."""
    cfg = TrainConfig(data="x", dims=2, mirror_tta=True, flip_axes=[0])
    assert tta_axes(cfg) == (0,)
    assert tta_axes(TrainConfig(data="x", dims=3, mirror_tta=True)) == (0, 1, 2)
    assert tta_axes(TrainConfig(data="x", dims=2, mirror_tta=False)) == ()
    model = UNet(1, 2, base_channels=4, depth=1).eval()
    image = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        rows_only = forward_probabilities(model, image, mirror=(0,))
        expected = (model(image).softmax(1) + model(image.flip(2)).softmax(1).flip(2)) / 2
        both = forward_probabilities(model, image, mirror=(0, 1))
    np.testing.assert_allclose(rows_only, expected, atol=1e-6)
    assert not torch.allclose(both, expected)


def test_rotation_tta_averages_all_eight_symmetries():
    """A network trained with quarter turns and both flips (data with no up) is averaged over the dihedral group, so
    its prediction turns with the input, also for a slice that is not square; networks trained without turns, or
    3D ones, are not turned."""
    assert tta_rotates(TrainConfig(data="x", dims=2, mirror_tta=True, rotate90=True))
    assert not tta_rotates(TrainConfig(data="x", dims=2, mirror_tta=True))
    assert not tta_rotates(TrainConfig(data="x", dims=2, mirror_tta=False, rotate90=True))
    assert not tta_rotates(TrainConfig(data="x", dims=3, mirror_tta=True, rotate90=True))
    model = UNet(1, 2, base_channels=4, depth=2).eval()
    image = torch.rand(1, 1, 12, 16)
    with torch.no_grad():
        averaged = forward_probabilities(model, image, mirror=(0, 1), rotate=True)
        turned = forward_probabilities(model, image.rot90(1, (-2, -1)), mirror=(0, 1), rotate=True)
        flips_only = forward_probabilities(model, image, mirror=(0, 1))
        flips_turned = forward_probabilities(model, image.rot90(1, (-2, -1)), mirror=(0, 1))
    assert averaged.shape == (1, 2, 12, 16)
    np.testing.assert_allclose(turned, averaged.rot90(1, (-2, -1)), atol=1e-6)
    assert not torch.allclose(flips_turned, flips_only.rot90(1, (-2, -1)), atol=1e-4)


def test_foreground_oversampling(phantoms_3d, tmp_path):
    cfg = tiny_config(phantoms_3d, tmp_path, dims=3, patch=[8, 8, 8], foreground_fraction=0.5, batch_size=8)
    sampler = PatchSampler(load_cases(find_cases(phantoms_3d).cases, cfg), cfg, torch.Generator().manual_seed(0))
    labels = torch.cat([sampler.epoch_batches(1).__next__()[1] for _ in range(25)])
    assert labels.shape == (200, 8, 8, 8)
    with_foreground = (labels.flatten(1) > 0).any(1).float().mean()
    assert sampler.centred / 200 == pytest.approx(0.5, abs=0.1)
    assert with_foreground >= 0.5  # centred patches always hold foreground, random ones sometimes do


def test_3d_unet_learns_phantoms(phantoms_3d, tmp_path):
    run = train(tiny_config(phantoms_3d, tmp_path / "run", dims=3, patch=[16, 16, 16], base_channels=8, depth=2,
                            norm="instance", activation="leaky_relu", epochs=6, steps_per_epoch=12, batch_size=2,
                            lr=1e-2, optimizer="sgd", lr_schedule="poly"))
    history = json.loads((run / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert max(row["val_dice"] for row in history) > 0.4
    trained = load_run(run)
    assert trained.model.spatial_dims == 3
    probs = predict_probabilities(trained, np.random.rand(1, 20, 18, 30).astype(np.float32))
    assert probs.shape == (3, 20, 18, 30)


def test_dims_3_needs_volumes(phantoms_2d, tmp_path):
    with pytest.raises(MedsegError, match="--dims 3 trains on volumes"):
        train(tiny_config(phantoms_2d, tmp_path / "run", dims=3))


def write_volumes(folder, spacings, seed=0):
    """Phantom volumes of one 36 mm extent at different voxel spacings, in the MSD layout."""
    import nibabel as nib

    from medseg.synth import make_phantom

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for i, spacing in enumerate(spacings):
        shape = tuple(round(36 / s) for s in spacing)
        image, label = make_phantom(rng, shape, num_classes=1)
        affine = np.diag([*spacing, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"c{i}.nii.gz")
    return folder


def test_volumes_are_resampled_to_the_target_spacing_and_back(tmp_path):
    from medseg.data import load_case
    from medseg.evaluate import evaluate_run
    from medseg.plan import choose_target_spacing, fingerprint

    data = write_volumes(tmp_path / "d", [(1.0, 1.0, 4.0), (1.0, 1.0, 4.0), (1.5, 1.5, 4.0), (1.0, 1.0, 2.0)])
    fp = fingerprint(find_cases(data))
    target, why = choose_target_spacing(fp)  # z: median 4 mm is over 3x the 1 mm in-plane: anisotropic
    assert target[:2] == [1.0, 1.0] and target[2] == pytest.approx(2.6) and "anisotropic" in why
    cfg = tiny_config(data, tmp_path / "run", dims=3, patch=[16, 16, 8], target_spacing=[1.0, 1.0, 4.0],
                      epochs=1, steps_per_epoch=2, batch_size=2)
    loaded = load_case(find_cases(data).cases[2], cfg)  # 24x24x9 voxels of 1.5x1.5x4 mm
    assert loaded.image.array.shape == (1, 36, 36, 9) and loaded.label.shape == (36, 36, 9)
    assert loaded.image.spacing == (1.0, 1.0, 4.0)
    run = train(cfg)
    summary = evaluate_run(run, data=data, out=tmp_path / "ev", progress=False)
    per_case = (tmp_path / "ev" / "per_case.csv").read_text().splitlines()[1:]
    assert len({line.split(",")[0] for line in per_case}) == 4  # every case scored on its own grid, whatever its spacing
    assert summary["cases"] == 1  # and only the test case counted: the others were trained or selected on
    from medseg.io import read_image
    from medseg.predict import predict_files

    (mask,) = predict_files(run, [data / "imagesTr" / "c3.nii.gz"], tmp_path / "out", progress=False)
    assert read_image(mask).spatial_shape == (36, 36, 18)


def test_deep_supervision_trains(phantoms_3d, tmp_path):
    run = train(tiny_config(phantoms_3d, tmp_path / "run", dims=3, patch=[16, 16, 16], depth=2,
                            deep_supervision=True, epochs=1, steps_per_epoch=2, batch_size=2))
    trained = load_run(run)
    assert trained.model.deep_supervision and len(trained.model.aux_heads) == 1
    assert predict_probabilities(trained, np.random.rand(1, 16, 16, 16).astype(np.float32)).shape == (3, 16, 16, 16)


def test_context_run_trains_and_predicts_volumes(phantoms_3d, tmp_path):
    from medseg.checkpoint import load_run
    from medseg.io import read_image
    from medseg.datasets import find_cases
    from medseg.infer import predict_image
    from medseg.train import train

    run = train(tiny_config(phantoms_3d, tmp_path / "ctx", fit="pad", context=2))
    trained = load_run(run)
    assert trained.in_channels == 1 and trained.model.encoder[0][0].in_channels == 5
    image = read_image(find_cases(phantoms_3d).cases[0].images[0])
    assert predict_image(trained, image).shape == image.spatial_shape
    with pytest.raises(MedsegError, match="--context"):
        tiny_config(phantoms_3d, tmp_path / "bad", dims=3, context=1).validate()


def test_slices_train_on_a_sample_that_is_not_square(phantoms_3d, tmp_path):
    """A 2D network on volumes pads each side of its slices only as far as that side needs (--patch 32,16): the
    batches have that shape, and prediction pads each slice to it and crops back to the slice's own size."""
    cfg = tiny_config(phantoms_3d, tmp_path / "run", fit="pad", size=32, patch=[32, 16], epochs=1)
    cases = load_cases(find_cases(phantoms_3d).cases[:2], cfg)
    images, labels = SliceSampler(cases, cfg, torch.Generator().manual_seed(0)).batch([0, 1, 2])
    assert images.shape == (3, 1, 32, 16) and labels.shape == (3, 32, 16)
    trained = load_run(train(cfg))
    assert trained.config.patch_size == (32, 16)
    volume = np.random.rand(1, 20, 24, 12).astype(np.float32)
    assert predict_probabilities(trained, volume).shape == (3, 20, 24, 12)


@pytest.mark.parametrize("settings,message", [({"patch": [32, 16], "rotate90": True}, "square"),
                                              ({"patch": [32, 16, 16]}, "give 2 sides"),
                                              ({"patch": [32, 2]}, "at least 2\\*\\*depth")])
def test_a_2d_sample_that_cannot_be_trained_is_refused(settings, tmp_path, message):
    with pytest.raises(MedsegError, match=message):
        tiny_config(tmp_path, tmp_path / "run", fit="pad", **settings).validate()


def test_a_case_at_two_spacings_gets_masks_that_agree(tmp_path):
    """Prediction runs at the network's target spacing and masks come back on each input's own grid: the same
    object stored at 1 mm and at 2 mm (along x) is seen by the network at 1 mm both times, and the two masks agree
    once the fine one is brought onto the coarse grid."""
    import torch

    from medseg.infer import TrainedModel, predict_image
    from medseg.io import Image

    seen = []

    class Threshold(torch.nn.Module):  # a 'network' whose answer is the object: intensity above 0.5
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.cat([torch.zeros_like(x[:, :1]), 10 * (x[:, :1] - 0.5)], 1)

    cfg = TrainConfig(data="x", dims=2, axis=2, fit="pad", size=16, normalization="unit", target_spacing=[1.0, 1.0, 1.0])
    trained = TrainedModel(Threshold(), cfg, ["background", "ball"], 1, tmp_path, torch.device("cpu"))
    grid = np.stack(np.meshgrid(np.arange(40) + 0.5, np.arange(24) + 0.5, np.arange(8) + 0.5, indexing="ij"))
    ball = (((grid - np.array([20, 12, 4])[:, None, None, None]) / np.array([9, 7, 3])[:, None, None, None]) ** 2
            ).sum(0) <= 1
    fine = Image(ball[None].astype(np.float32) * 255, (1.0, 1.0, 1.0), np.eye(4))
    coarse_array = ball.reshape(20, 2, 24, 8).mean(1)  # the same object sampled at 2 mm along x
    coarse = Image(coarse_array[None].astype(np.float32) * 255, (2.0, 1.0, 1.0), np.diag([2.0, 1.0, 1.0, 1.0]))
    fine_mask = predict_image(trained, fine)
    seen.clear()
    coarse_mask = predict_image(trained, coarse)
    assert coarse_mask.shape == (20, 24, 8) and set(seen) == {(40, 24)}  # predicted at 1 mm, written at 2 mm
    down = fine_mask.reshape(20, 2, 24, 8).max(1)
    agree = 2 * (down & coarse_mask).sum() / (down.sum() + coarse_mask.sum())
    assert agree > 0.9
