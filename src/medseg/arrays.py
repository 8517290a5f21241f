"""The few array operations inference needs, for NumPy arrays and PyTorch tensors alike.

Inference runs one code path whatever runs the network: under PyTorch the arrays are tensors on the model's
device (a GPU keeps the whole sliding window on the GPU); under onnxruntime they are NumPy arrays and PyTorch is
never imported, so a server without it can run a model package. Each function takes either kind and returns the
same kind; the NumPy versions compute what PyTorch's do (tested side by side in tests/test_arrays.py).
"""
from __future__ import annotations

import numpy as np


def _numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def run_network(network, x):
    """The network's logits for a batch: a PyTorch module runs without recording gradients."""
    if _numpy(x):
        return network(x)
    import torch

    with torch.no_grad():
        return network(x)


def take(x: np.ndarray, indices, axis: int) -> np.ndarray:
    """`x` at `indices` along `axis`, copied. Indexing, not np.take: np.take first copies a non-contiguous array
    whole (a volume read in Fortran order, a reoriented view, a memory map), 0.1 s for each 2.5D BraTS slice."""
    return x[(slice(None),) * (axis % x.ndim) + (np.asarray(indices),)]


def flip(x, axes: tuple[int, ...]):
    return np.flip(x, axes) if _numpy(x) else x.flip(axes)


def rot90(x, turns: int, axes: tuple[int, int] = (-2, -1)):
    return np.rot90(x, turns, axes) if _numpy(x) else x.rot90(turns, axes)


def activation(logits, sigmoid: bool = False):
    """Softmax over the class axis (1), or an independent sigmoid per channel (region outputs)."""
    if not _numpy(logits):
        logits = logits.float()  # probabilities in fp32 also where the network ran in bf16/fp16
        return logits.sigmoid() if sigmoid else logits.softmax(1)
    logits = logits.astype(np.float32, copy=False)
    if sigmoid:
        return 1 / (1 + np.exp(-logits))
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def zeros(shape: tuple[int, ...], like):
    """Zeros of `like`'s kind, dtype (float32 for NumPy) and device."""
    return np.zeros(shape, np.float32) if _numpy(like) else like.new_zeros(shape)


def concat(arrays: list, axis: int = 0):
    if _numpy(arrays[0]):
        return np.concatenate(arrays, axis)
    import torch

    return torch.cat(arrays, axis)


def to_numpy(x) -> np.ndarray:
    return x if _numpy(x) else x.cpu().numpy()


def resize(x, size: tuple[int, ...]):
    """(B, C, *spatial) float -> (B, C, *size), linear along each spatial axis (bilinear in 2D, trilinear in 3D;
    pixel centres aligned, as PyTorch's `interpolate(align_corners=False)`)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if not _numpy(x):
        import torch.nn.functional as F

        return F.interpolate(x, size=tuple(size), mode="bilinear" if len(size) == 2 else "trilinear",
                             align_corners=False)
    out = x.astype(np.float32, copy=False)
    for axis, n_out in enumerate(size, start=2):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        # PyTorch's source coordinate for each output centre, clamped at the lower edge
        source = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0)
        low = np.minimum(np.floor(source).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        shape = [1] * out.ndim
        shape[axis] = n_out
        weight = (source - low).astype(np.float32).reshape(shape)
        out = np.take(out, low, axis) * (1 - weight) + np.take(out, high, axis) * weight
    return out


def resize_nearest(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Label maps (*spatial) -> (*size), nearest neighbour ("nearest-exact": each output voxel's centre takes the
    input voxel it falls in, in exact integer arithmetic; a centre on a boundary takes the upper voxel), so that
    no new label values appear. PyTorch's float version agrees except at some of those exact ties."""
    out = x
    for axis, n_out in enumerate(size):
        n_in = out.shape[axis]
        if n_in != n_out:
            # centre of output voxel i at (i + 1/2) * n_in / n_out input voxels
            out = np.take(out, (2 * np.arange(n_out) + 1) * n_in // (2 * n_out), axis)
    return out


def pad_centre(x, size: tuple[int, ...]):
    """Zero-pad the spatial axes of (B, C, *spatial) up to at least `size`, centred (as training pads)."""
    extra = [max(0, s - n) for s, n in zip(size, x.shape[2:])]
    if not any(extra):
        return x
    if _numpy(x):
        return np.pad(x, [(0, 0), (0, 0)] + [(e // 2, e - e // 2) for e in extra])
    import torch.nn.functional as F

    pads = []
    for e in reversed(extra):
        pads += [e // 2, e - e // 2]
    return F.pad(x, pads)


def crop_centre(x, spatial: tuple[int, ...]):
    """Undo `pad_centre`: the central `spatial` region of the last axes."""
    starts = [(n - s) // 2 for n, s in zip(x.shape[-len(spatial):], spatial)]
    return x[(..., *(slice(b, b + s) for b, s in zip(starts, spatial)))]


def pad_edge_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple | None]:
    """NumPy twin of `medseg.models.blocks.pad_to_multiple`: edge values, centred, up to a multiple of
    `multiple` on each spatial axis; returns the padded array and the index that crops an output back."""
    spatial = x.shape[2:]
    extras = [(-n) % multiple for n in spatial]
    if not any(extras):
        return x, None
    index = (slice(None), slice(None), *(slice(e // 2, e // 2 + n) for e, n in zip(extras, spatial)))
    return np.pad(x, [(0, 0), (0, 0)] + [(e // 2, e - e // 2) for e in extras], mode="edge"), index
