import numpy as np
import torch
from scipy import ndimage

from medseg.arrays import resize as resize_image
from medseg.augment import augment, pad_or_crop, resize_label
from medseg.transforms import from_slices, normalize_percentile, to_slices


def test_percentile_normalisation_to_unit_range():
    rng = np.random.default_rng(0)
    array = rng.normal(1000, 50, size=(2, 40, 40)).astype(np.float32)
    array[0, 0, 0] = 1e6  # an outlier must not squash the rest
    out = normalize_percentile(array)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert 0.3 < np.median(out[0]) < 0.7
    assert normalize_percentile(np.full((1, 4, 4), 7.0)).max() == 0


def test_slices_round_trip_along_each_axis():
    label = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    for axis in (0, 1, 2, -1):
        slices = to_slices(label[None], axis)
        assert len(slices) == label.shape[axis % 3]
        np.testing.assert_array_equal(from_slices([s[0] for s in slices], axis), label)
    assert len(to_slices(np.zeros((1, 8, 8)), -1)) == 1


def test_resize_labels_by_nearest_neighbour_only():
    label = torch.tensor(np.random.default_rng(0).integers(0, 3, size=(2, 37, 51)))
    resized = resize_label(label, (64, 64))
    assert resized.shape == (2, 64, 64)
    assert set(resized.unique().tolist()) <= {0, 1, 2}
    assert resize_image(torch.rand(2, 1, 37, 51), (64, 64)).shape == (2, 1, 64, 64)


def test_pad_or_crop_centres_and_randomises():
    image = torch.arange(36.0).reshape(1, 1, 6, 6)
    padded, label = pad_or_crop(image, torch.ones(1, 6, 6, dtype=torch.long), (10, 8))
    assert padded.shape == (1, 1, 10, 8) and label.sum() == 36 and padded[0, 0, 2, 1] == 0
    cropped, _ = pad_or_crop(image, None, (2, 2))
    assert cropped.flatten().tolist() == [14, 15, 20, 21]
    generator = torch.Generator().manual_seed(0)
    crops = {tuple(pad_or_crop(image, None, (2, 2), generator)[0].flatten().tolist()) for _ in range(20)}
    assert len(crops) > 1


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    blocks = torch.tensor(rng.integers(0, 3, size=(8, 4, 4)))
    label = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 32x32 made of 8x8 blocks
    image = label[:, None].float()
    generator = torch.Generator().manual_seed(0)
    aug_image, aug_label = augment(image, label, generator, affine_p=0, intensity_p=0)
    assert torch.equal(aug_image[:, 0].long(), aug_label)
    assert not torch.equal(aug_label, label)  # something was flipped or rotated
    aug_image, aug_label = augment(image, label, generator, affine_p=1, intensity_p=0)
    assert set(aug_label.unique().tolist()) <= {0, 1, 2}
    agree = (aug_image[:, 0].round().long() == aug_label).float().mean()
    assert agree > 0.8  # bilinear image and nearest label differ only along edges


def test_warps_mirror_image_and_label_alike_past_the_sample():
    # no label 0 anywhere: a warp that reaches outside the sample must not invent it (ISBI's label 0 is membrane)
    blocks = torch.tensor(np.random.default_rng(2).integers(1, 3, size=(64, 4, 4)))
    label = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)  # 64x64 made of 16x16 blocks
    image = label[:, None].float()
    generator = torch.Generator().manual_seed(0)
    aug_image, aug_label = augment(image, label, generator, affine_p=1, intensity_p=0, max_scale=0.3,
                                   max_rotation_deg=30)
    assert not torch.equal(aug_label, label)
    assert set(aug_label.unique().tolist()) <= {1, 2}
    corners = torch.zeros(64, 64, dtype=torch.bool)
    corners[:8, :8] = corners[:8, -8:] = corners[-8:, :8] = corners[-8:, -8:] = True
    agree = aug_image[:, 0].round().long() == aug_label
    assert agree[:, corners].float().mean() > 0.9  # the corners, often outside the sample, agree as the middle


def test_rotations_only_when_asked_and_jitter_keeps_negative_intensities():
    label = torch.zeros(64, 8, 8, dtype=torch.long)
    label[:, 0, 1] = 1  # a marker off every diagonal: flips move it to four places, rotations to eight
    image = label[:, None].float()
    generator = torch.Generator().manual_seed(0)
    places = lambda out: {tuple(torch.nonzero(l)[0].tolist()) for l in out}  # noqa: E731
    flipped = augment(image, label, generator, affine_p=0, intensity_p=0)[1]
    rotated = augment(image, label, generator, affine_p=0, intensity_p=0, rotate90=True)[1]
    assert len(places(flipped)) == 4 and len(places(rotated)) == 8
    columns_only = augment(image, label, generator, affine_p=0, intensity_p=0, flip_axes=[1])[1]
    assert places(columns_only) == {(0, 1), (0, 6)}
    assert places(augment(image, label, generator, affine_p=0, intensity_p=0, flip_axes=[])[1]) == {(0, 1)}
    zscored = torch.randn(16, 1, 16, 16)
    jittered = augment(zscored, torch.zeros(16, 16, 16, dtype=torch.long), generator, affine_p=0, intensity_p=1)[0]
    assert (jittered < -0.5).float().mean() > 0.1  # z-scored data keep their negative half (no clamp at 0)
    # flips aside, each jittered sample is a monotone remap of its original: ranks survive
    for out, original in zip(jittered, zscored):
        ranks = [np.argsort(np.argsort(v.flatten().numpy())) for v in (out, original)]
        same = [np.array_equal(ranks[0], np.argsort(np.argsort(o.flatten().numpy())))
                for o in (original, original.flip(-1), original.flip(-2), original.flip(-1).flip(-2))]
        assert any(same)


def test_elastic_deformation_bends_the_inside_and_keeps_the_edges():
    blocks = torch.tensor(np.random.default_rng(1).integers(0, 3, size=(16, 8, 8)))
    label = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)  # 128x128 made of 16x16 blocks
    image = label[:, None].float()
    generator = torch.Generator().manual_seed(0)
    plain = dict(affine_p=0, intensity_p=0, flip_axes=[])
    assert torch.equal(augment(image, label, generator, **plain)[1], label)  # elastic off by default
    bent_image, bent_label = augment(image, label, generator, elastic_p=1, **plain)
    assert all((b != l).any() for b, l in zip(bent_label, label))  # every sample bent somewhere inside
    assert (bent_image[:, 0].round().long() == bent_label).float().mean() > 0.95  # image and label together
    for rows, cols in [(0, slice(None)), (-1, slice(None)), (slice(None), 0), (slice(None), -1)]:
        assert torch.equal(bent_label[:, rows, cols], label[:, rows, cols])  # edges still: nothing pulled in
    half = augment(image, label, generator, elastic_p=0.5, **plain)[1]
    assert 0 < sum(torch.equal(h, l) for h, l in zip(half, label)) < len(label)  # chosen per sample


def test_context_slices_stack_neighbours_as_channels():
    volume = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)  # (C, D, H, W)
    plain = to_slices(volume, axis=0)
    stacked = to_slices(volume, axis=0, context=1)
    assert len(stacked) == 3 and stacked[0].shape == (6, 2, 2)
    # channel-major: for each image channel, slices i-1, i, i+1 (the edge slice repeated at the ends)
    assert np.array_equal(stacked[1], np.concatenate([volume[0, 0:3], volume[1, 0:3]]))
    assert np.array_equal(stacked[0][[0, 1, 2]], volume[0, [0, 0, 1]])
    assert np.array_equal(stacked[1][[1, 4]], plain[1])


def test_rotations_are_rigid_on_samples_that_are_not_square():
    # a disc in a 64x40 sample, rotated by up to 40 degrees with no scaling: it must stay a disc (before, the angle
    # was applied in coordinates normalised per axis, and a 64x48 sample got off-diagonal terms of 0.375 / 0.667)
    rows, cols = np.mgrid[:64, :40]
    disc = ((rows - 32) ** 2 + (cols - 20) ** 2 <= 12**2).astype(np.int64)
    label = torch.from_numpy(disc)[None].repeat(16, 1, 1)
    generator = torch.Generator().manual_seed(3)
    _, warped = augment(label[:, None].float(), label, generator, affine_p=1, intensity_p=0, max_scale=0,
                        max_rotation_deg=40, flip_axes=[])
    for sample in warped.numpy():
        components, _ = ndimage.label(sample)
        sample = (components == components[32, 20]).astype(np.int64)  # not the mirror images reflected in
        ys, xs = np.nonzero(sample)
        cy, cx = ys.mean(), xs.mean()
        edge = sample & ~ndimage.binary_erosion(sample)
        radii = np.hypot(*(np.nonzero(edge) - np.array([[cy], [cx]])))
        assert abs(sample.sum() - disc.sum()) < 0.05 * disc.sum()
        assert radii.max() - radii.min() <= 2.0  # a disc within a pixel either way, not an ellipse
