"""Property-based tests (hypothesis): masks written and read back keep their values and geometry in every format,
and the metrics keep their bounds, symmetries and empty-case policy on any pair of label maps."""
import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medseg.datasets import labels_to_classes
from medseg.io import Image, read_image, write_mask
from medseg.metrics import metrics_from_counts, confusion, scored_metrics, surface_metrics

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def volumes_with_geometry(draw):
    """A label volume and an affine: positive spacings, any origin, a rotation about one axis."""
    shape = draw(st.tuples(*[st.integers(1, 9)] * 3))
    classes = draw(st.integers(2, 5))
    labels = draw(arrays(np.uint8, shape, elements=st.integers(0, classes - 1)))
    spacing = draw(st.tuples(*[st.floats(0.1, 5.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-500, 500)] * 3))
    angle = draw(st.floats(-math.pi, math.pi))
    rotation = np.eye(3)
    rotation[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return labels, affine, spacing, classes


def reference_volume(shape, affine, spacing, suffix) -> Image:
    meta = {"format": "nifti" if suffix.startswith(".nii") else "itk"}
    if suffix.startswith(".nii"):
        import nibabel as nib

        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_zooms(spacing)
        meta["header"] = header
    return Image(np.zeros((1, *shape), np.float32), tuple(spacing), affine, None, meta)


@SETTINGS
@given(volumes_with_geometry(), st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]))
def test_a_volume_mask_round_trips_values_and_geometry(volume, suffix):
    labels, affine, spacing, classes = volume
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mask(labels, reference_volume(labels.shape, affine, spacing, suffix), Path(tmp) / f"m{suffix}",
                          classes)
        back = read_image(path)
    np.testing.assert_array_equal(back.array[0], labels)
    np.testing.assert_allclose(back.affine, affine, rtol=1e-5, atol=1e-3)  # NIfTI stores float32
    np.testing.assert_allclose(back.spacing, spacing, rtol=1e-5)


@SETTINGS
@given(st.tuples(st.integers(1, 40), st.integers(1, 40)), st.integers(2, 6), st.data())
def test_a_2d_mask_round_trips_its_class_indices(shape, classes, data):
    labels = data.draw(arrays(np.uint8, shape, elements=st.integers(0, classes - 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mask(labels, Image(np.zeros((1, *shape), np.float32), (1.0, 1.0)), Path(tmp) / "m.png",
                          classes)
        stored = read_image(path).array
    np.testing.assert_array_equal(labels_to_classes(stored, path), labels)


@SETTINGS
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
              elements=st.floats(-1e6, 1e6, width=32)))
def test_a_numpy_volume_is_read_back_exactly(array):
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "v.npy", array)
        back = read_image(Path(tmp) / "v.npy")
    np.testing.assert_array_equal(back.array[0], array)


label_pairs = st.integers(2, 4).flatmap(lambda k: st.tuples(
    st.just(k), *[arrays(np.uint8, (6, 7), elements=st.integers(0, k - 1))] * 2))


@SETTINGS
@given(label_pairs)
def test_overlap_metrics_are_bounded_symmetric_and_consistent(pair):
    k, pred, truth = pair
    names = ["background"] + [f"c{i}" for i in range(1, k)]
    forward, backward = scored_metrics(pred, truth, names), scored_metrics(truth, pred, names)
    for name in names[1:]:
        a, b = forward[name], backward[name]
        for metric in ("dice", "iou", "precision", "recall", "specificity", "accuracy"):
            assert math.isnan(a[metric]) or 0.0 <= a[metric] <= 1.0
        assert a["accuracy"] == b["accuracy"]
        assert (math.isnan(a["dice"]) and math.isnan(b["dice"])) or math.isclose(a["dice"], b["dice"])
        assert math.isnan(a["precision"]) == math.isnan(b["recall"])  # precision one way is recall the other
        if not math.isnan(a["dice"]):
            assert math.isclose(a["dice"], 2 * a["iou"] / (1 + a["iou"]), abs_tol=1e-12)
            assert a["iou"] <= a["dice"] + 1e-12


@SETTINGS
@given(label_pairs)
def test_the_empty_case_policy_holds_for_every_class(pair):
    k, pred, truth = pair
    names = ["background"] + [f"c{i}" for i in range(1, k)]
    scores = scored_metrics(pred, truth, names)
    for c in range(1, k):
        in_pred, in_truth = (pred == c).any(), (truth == c).any()
        dice = scores[names[c]]["dice"]
        if not in_pred and not in_truth:
            assert math.isnan(dice)  # absent from both: undefined, never 1.0
        elif in_pred != in_truth:
            assert dice == 0.0  # a miss or a false alarm scores 0
        else:
            assert (dice > 0.0) == bool(((pred == c) & (truth == c)).any())
    np.testing.assert_array_equal(confusion(pred, truth, k).sum(1), pred.size)


@SETTINGS
@given(arrays(bool, (8, 9), elements=st.booleans()), arrays(bool, (8, 9), elements=st.booleans()),
       st.tuples(st.floats(0.2, 3.0), st.floats(0.2, 3.0)))
def test_boundary_metrics_are_symmetric_and_zero_for_identical_masks(a, b, spacing):
    ab, ba = surface_metrics(a, b, spacing), surface_metrics(b, a, spacing)
    for metric in ("hd95", "assd", "nsd"):
        assert (math.isnan(ab[metric]) and math.isnan(ba[metric])) or math.isclose(ab[metric], ba[metric])
    same = surface_metrics(a, a, spacing)
    if a.any():
        assert same["hd95"] == 0.0 and same["assd"] == 0.0 and same["nsd"] == 1.0
    else:
        assert all(math.isnan(v) for v in same.values())
    if a.any() != b.any():
        assert ab["nsd"] == 0.0 and ab["hd95"] == ab["assd"] > 0


@SETTINGS
@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_metrics_from_counts_follow_their_definitions(tp, fp, fn, tn):
    m = metrics_from_counts(tp, fp, fn, tn)
    if tp + fp + fn == 0:
        assert math.isnan(m["dice"]) and math.isnan(m["iou"])
    else:
        assert math.isclose(m["dice"], 2 * tp / (2 * tp + fp + fn))
    if tp + fp + fn + tn:
        assert math.isclose(m["accuracy"], (tp + tn) / (tp + fp + fn + tn))
    else:  # no pixels at all (an empty region of interest): nothing is defined, nothing divides by zero
        assert all(math.isnan(v) for v in m.values())
