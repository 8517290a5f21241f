"""The NumPy side of `medseg.arrays` computes what PyTorch computes: inference under onnxruntime (no PyTorch)
and under PyTorch differ only in the network's arithmetic."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg import arrays
from medseg.models.blocks import pad_to_multiple


@pytest.mark.parametrize("shape,size", [((2, 3, 37, 51), (64, 64)), ((1, 2, 584, 565), (128, 128)),
                                        ((1, 1, 5, 7), (13, 3)), ((1, 2, 9, 14, 6), (12, 7, 6)),
                                        ((1, 1, 36, 50, 35), (40, 56, 40))])
def test_linear_resize_matches_pytorch(shape, size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = arrays.resize(x, size)
    theirs = arrays.resize(torch.from_numpy(x), size).numpy()
    assert ours.shape == theirs.shape == shape[:2] + size and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5


def test_nearest_resize_matches_pytorch_nearest_exact_except_at_exact_ties():
    """Every size pair up to 80: the same source voxel as PyTorch wherever an output centre does not fall exactly
    on a boundary between input voxels (there PyTorch's float rounding goes either way; ours takes the upper)."""
    values = np.arange(80, dtype=np.float32)
    compared = 0
    for n_in in range(1, 80):
        for n_out in range(1, 80):
            ours = arrays.resize_nearest(values[:n_in], (n_out,))
            theirs = F.interpolate(torch.from_numpy(values[:n_in])[None, None], size=n_out, mode="nearest-exact")
            tie = (2 * np.arange(n_out) + 1) * n_in % (2 * n_out) == 0
            np.testing.assert_array_equal(ours[~tie], theirs[0, 0].numpy()[~tie])
            compared += int((~tie).sum())
            assert set(ours) <= set(values[:n_in])
    assert compared > 200_000
    volume = np.random.default_rng(0).integers(0, 4, (9, 14, 6)).astype(np.uint8)
    assert arrays.resize_nearest(volume, (12, 7, 6)).shape == (12, 7, 6)
    np.testing.assert_array_equal(arrays.resize_nearest(volume, (18, 28, 12))[1::2, 1::2, 1::2], volume)


def test_activation_flip_rotate_and_padding_match_pytorch():
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 5)).astype(np.float32) * 30  # large logits: stable?
    t = torch.from_numpy(x)
    for sigmoid in (False, True):
        np.testing.assert_allclose(arrays.activation(x, sigmoid), arrays.activation(t, sigmoid).numpy(), atol=1e-6)
    np.testing.assert_array_equal(arrays.flip(x, (2, 3)), arrays.flip(t, (2, 3)).numpy())
    square = x[..., :5, :]
    np.testing.assert_array_equal(arrays.rot90(square, 1), arrays.rot90(torch.from_numpy(square), 1).numpy())
    np.testing.assert_array_equal(arrays.pad_centre(x, (9, 4)), arrays.pad_centre(t, (9, 4)).numpy())
    assert arrays.pad_centre(x, (9, 4)).shape == (2, 3, 9, 5)
    np.testing.assert_array_equal(arrays.crop_centre(arrays.pad_centre(x, (9, 8)), (6, 5)), x)
    padded, index = arrays.pad_edge_to_multiple(x, 4)
    theirs, their_index = pad_to_multiple(t, 4)
    np.testing.assert_array_equal(padded, theirs.numpy())
    assert index == their_index and padded.shape == (2, 3, 8, 8)
