import math

import numpy as np
import pytest
import torch

from medseg.losses import make_loss, soft_dice_loss
from medseg.errors import MedsegError
from medseg.metrics import case_metrics, confusion, maximal_f_score, metrics_from_counts, threshold_counts


def test_known_values():
    target = np.array([[1, 1, 0, 0], [2, 2, 0, 0]])
    pred = np.array([[1, 0, 0, 0], [2, 2, 2, 0]])
    per_class = case_metrics(pred, target, 3)
    assert per_class[1]["dice"] == pytest.approx(2 / 3)
    assert per_class[1]["iou"] == pytest.approx(0.5)
    assert per_class[1]["precision"] == 1 and per_class[1]["recall"] == 0.5
    assert per_class[2]["dice"] == pytest.approx(0.8) and per_class[2]["precision"] == pytest.approx(2 / 3)
    assert per_class[2]["specificity"] == pytest.approx(5 / 6) and per_class[2]["accuracy"] == pytest.approx(7 / 8)
    assert confusion(pred, target, 3).sum(1).tolist() == [8, 8, 8]


def test_empty_case_policy():
    both_empty = metrics_from_counts(0, 0, 0, 10)  # nothing to find, nothing claimed: says nothing about the class
    assert math.isnan(both_empty["dice"]) and math.isnan(both_empty["iou"])
    assert math.isnan(both_empty["precision"]) and math.isnan(both_empty["recall"])
    assert both_empty["specificity"] == 1 and both_empty["accuracy"] == 1
    false_positive = metrics_from_counts(0, 3, 0, 7)  # nothing to find, something claimed
    assert false_positive["dice"] == 0 and false_positive["precision"] == 0 and math.isnan(false_positive["recall"])
    missed = metrics_from_counts(0, 0, 3, 7)  # something to find, nothing claimed
    assert missed["dice"] == 0 and missed["recall"] == 0 and math.isnan(missed["precision"])


def test_losses():
    target = torch.tensor([[[0, 1], [1, 0]]])
    perfect = torch.tensor([[[[9.0, -9], [-9, 9]], [[-9.0, 9], [9, -9]]]])
    assert soft_dice_loss(perfect, target) < 1e-3
    assert soft_dice_loss(-perfect, target) > 0.99
    ce, bce = make_loss("ce", 2), make_loss("bce", 2)
    assert bce(perfect, target) == ce(perfect, target)
    # two-class softmax is a sigmoid of the logit difference: BCE on it is the seed's BCE
    logits = torch.randn(1, 2, 3, 3)
    p = torch.sigmoid(logits[:, 1] - logits[:, 0])
    seed_bce = torch.nn.functional.binary_cross_entropy(p, torch.ones(1, 3, 3) * (torch.arange(9).view(1, 3, 3) % 2))
    assert bce(logits, torch.arange(9).view(1, 3, 3) % 2) == pytest.approx(float(seed_bce), rel=1e-5)
    with pytest.raises(MedsegError, match="bce"):
        make_loss("bce", 3)


def test_dice_with_label_0_counts_every_class():
    target = torch.tensor([[[0, 0, 1, 1], [0, 1, 1, 1]]])
    logits = torch.randn(1, 2, 2, 4, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits.softmax(1)
    one_hot = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float()
    dice = (2 * (probs * one_hot).sum((0, 2, 3)) + 1e-5) / ((probs + one_hot).sum((0, 2, 3)) + 1e-5)
    assert soft_dice_loss(logits, target) == pytest.approx(1 - float(dice[1]), rel=1e-6)
    assert soft_dice_loss(logits, target, background=True) == pytest.approx(1 - float(dice.mean()), rel=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert make_loss("dice_ce_all", 2)(logits, target) == pytest.approx(float(ce + 1 - dice.mean()), rel=1e-6)
    # calling label-0 pixels foreground costs more once label 0 counts: the membranes of ISBI
    all_foreground = torch.tensor([-5.0, 5.0]).view(1, 2, 1, 1).expand(1, 2, 2, 4)
    assert soft_dice_loss(all_foreground, target, background=True) > soft_dice_loss(all_foreground, target) + 0.3


def _brute_force_border_weights(target, w0, sigma=5.0):
    """Reference: every pixel's distance to every object, sorted; no box, no reach."""
    from scipy import ndimage

    objects, count = ndimage.label(target > 0)
    distances = np.sort(np.stack([ndimage.distance_transform_edt(objects != i) for i in range(1, count + 1)]), 0)
    return 1 + w0 * np.exp(-(distances[0] + distances[1]) ** 2 / (2 * sigma**2))


def test_border_weights_are_the_unet_papers_map():
    from medseg.losses import border_weights

    target = torch.zeros(2, 40, 90, dtype=torch.long)
    target[0, 5:35, 5:28] = 1
    target[0, 5:35, 31:55] = 1  # a gap of 3 pixels: columns 28-30
    target[0, 5:35, 80:88] = 1  # 25 pixels from the second square
    target[1, 10:20, 10:20] = 1  # one object alone: no second object, every weight 1
    weights = border_weights(target, 10.0)
    expected = _brute_force_border_weights(target[0].numpy(), 10.0)
    far = np.abs(weights[0].numpy() - expected) > 1e-4
    # where the two transforms differ, the reference's extra weight lies beyond the reach (it counts under exp(-8))
    assert (expected[far] - 1 < 10 * np.exp(-8) + 1e-4).all()
    gap, beside, inside = (float(weights[0, 20, c]) for c in (29, 27, 15))
    corner = float(weights[0, 0, 0])
    assert gap == pytest.approx(1 + 10 * math.exp(-16 / 50), rel=1e-4)  # 2 pixels to each square
    assert beside == pytest.approx(gap, rel=1e-4)  # the objects' pixels by the gap weigh as the gap: no class favoured
    assert inside < 1.1 and corner < 1.1
    assert torch.equal(weights[1], torch.ones(40, 90))


def test_border_weight_changes_only_the_cross_entropy():
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[0, 2:10, 2:5] = 1
    target[0, 2:10, 7:10] = 1
    logits = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert make_loss("dice_ce", 2, border_weight=0)(logits, target) == make_loss("dice_ce", 2)(logits, target)
    from medseg.losses import border_weights

    weights = border_weights(target, 10.0)
    per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    weighted = float((per_pixel * weights).sum() / weights.sum())
    assert weighted != pytest.approx(float(ce), rel=1e-3)
    assert make_loss("ce", 2, border_weight=10)(logits, target) == pytest.approx(weighted, rel=1e-6)
    dice = float(soft_dice_loss(logits, target))
    assert make_loss("dice_ce", 2, border_weight=10)(logits, target) == pytest.approx(weighted + dice, rel=1e-6)
    from medseg.config import TrainConfig

    with pytest.raises(MedsegError, match="cross-entropy"):
        TrainConfig(data="x", loss="focal", border_weight=10).validate()


def test_focal_and_tversky_losses():
    from medseg.losses import focal_loss, tversky_loss

    target = torch.tensor([[[0, 1], [1, 0]]])
    perfect = torch.tensor([[[[9.0, -9], [-9, 9]], [[-9.0, 9], [9, -9]]]])
    assert focal_loss(perfect, target) < 1e-6 < focal_loss(-perfect, target)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    ce = float(torch.nn.functional.cross_entropy(logits, labels))
    assert focal_loss(logits, labels, gamma=0) == pytest.approx(ce, rel=1e-5)  # gamma 0 is plain cross-entropy
    assert focal_loss(logits, labels) < focal_loss(logits, labels, gamma=0)
    assert tversky_loss(logits, labels, 0.5, 0.5) == pytest.approx(float(soft_dice_loss(logits, labels)), rel=1e-5)
    # with beta > alpha, predicting nothing (all misses) costs more than predicting everything (all false alarms)
    everything = torch.tensor([[[[-9.0, -9], [-9, -9]], [[9.0, 9], [9, 9]]]])
    assert tversky_loss(-everything, target) > tversky_loss(everything, target)
    for name in ("focal", "tversky"):
        assert make_loss(name, 3)(logits, labels) > 0


def test_region_of_interest_limits_what_counts():
    target = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
    pred = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])  # false positives only in the second row
    roi = np.array([[True] * 4, [False] * 4])
    assert case_metrics(pred, target, 2, roi)[1]["dice"] == 1.0
    assert case_metrics(pred, target, 2)[1]["dice"] == pytest.approx(4 / 8)
    assert case_metrics(pred, target, 2, roi)[1]["accuracy"] == 1.0
    with pytest.raises(ValueError):
        case_metrics(pred, target, 2, roi[:1])


def _brute_force_distances(a, b, spacing):
    """Reference: distances of every boundary point to the nearest boundary point of the other mask, both ways."""
    from scipy import ndimage

    def edge(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1)))

    pa, pb = edge(a) * np.array(spacing), edge(b) * np.array(spacing)
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return np.concatenate([d.min(1), d.min(0)])


def _brute_force_hd95(a, b, spacing):
    """Reference: every boundary point against every other, no distance transform."""
    from scipy import ndimage

    def edge(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(m.ndim, 1)))

    pa, pb = edge(a) * np.array(spacing), edge(b) * np.array(spacing)
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 1.2)])
def test_hd95_matches_brute_force_in_mm(spacing):
    from medseg.metrics import surface_metrics

    def hd95(a, b, spacing=None):
        return surface_metrics(a, b, spacing)["hd95"]

    rng = np.random.default_rng(3)
    for _ in range(3):
        a = np.zeros((12, 14, 10), bool)
        b = np.zeros_like(a)
        a[2:8, 3:11, 2:7] = True
        b[3:9, 2:10, 3:9] = True
        a &= rng.random(a.shape) > 0.1
        assert hd95(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), abs=1e-9)
    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    assert hd95(square, square, (1, 1)) == 0
    assert hd95(square, np.roll(square, 2, axis=0), (0.5, 1)) == pytest.approx(1.0)  # 2 rows of 0.5 mm
    empty = np.zeros_like(square)
    assert hd95(square, empty, (2, 1)) == pytest.approx(math.hypot(40, 20))  # one empty: the worst, the diagonal
    assert math.isnan(hd95(empty, empty))


def test_assd_and_nsd_on_shifted_squares():
    from medseg.metrics import surface_metrics

    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    shifted = np.roll(square, 2, axis=0)  # rows 7..16: top and bottom edges 2 apart, side edges overlap
    result = surface_metrics(square, shifted, (1, 1), tolerance=1.0)
    assert 0 < result["nsd"] < 1 and result["assd"] > 0
    bf = _brute_force_distances(square, shifted, (1, 1))
    assert result["assd"] == pytest.approx(bf.mean()) and result["nsd"] == pytest.approx((bf <= 1).mean())
    assert surface_metrics(square, np.zeros_like(square))["nsd"] == 0
    assert all(math.isnan(v) for v in surface_metrics(np.zeros_like(square), np.zeros_like(square)).values())


def test_scored_metrics_with_boundary_per_class():
    from medseg.metrics import scored_metrics

    target = np.zeros((10, 10), np.uint8)
    target[2:5, 2:5], target[6:9, 6:9] = 1, 2
    scores = scored_metrics(target, target, ["background", "a", "b"], spacing=(1, 1), boundary=True)
    assert list(scores) == ["a", "b"] and all(s["dice"] == 1 and s["hd95"] == 0 for s in scores.values())


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 1.3)])
def test_boundary_metrics_agree_with_monai(spacing):
    """MONAI is the independent reference (a test-only dependency): HD95, ASSD and NSD within 1e-6 on random
    blobs, anisotropic spacing included. MONAI returns float32 and takes its percentile in float32 (the quantile
    index 0.95 * (n - 1) itself is rounded), so HD95 is checked to 1e-6 against MONAI's boundary distances with
    the percentile taken in float64, and against MONAI's float32 result to 1e-4."""
    monai_metrics = pytest.importorskip("monai.metrics")
    from monai.metrics.utils import get_mask_edges, get_surface_distance
    from scipy import ndimage

    from medseg.metrics import surface_metrics

    rng = np.random.default_rng(7)
    for _ in range(4):
        pred, target = (ndimage.gaussian_filter(rng.random((24, 28, 20)), 2) > 0.5 for _ in range(2))
        ours = surface_metrics(pred, target, spacing, tolerance=2.0)
        y_pred = torch.from_numpy(np.stack([~pred, pred])[None].astype(np.float32))
        y = torch.from_numpy(np.stack([~target, target])[None].astype(np.float32))
        hd = monai_metrics.compute_hausdorff_distance(y_pred, y, percentile=95, spacing=list(spacing))
        assd = monai_metrics.compute_average_surface_distance(y_pred, y, symmetric=True, spacing=list(spacing))
        nsd = monai_metrics.compute_surface_dice(y_pred, y, class_thresholds=[2.0], spacing=list(spacing))
        directed = [np.asarray(get_surface_distance(*get_mask_edges(torch.from_numpy(x), torch.from_numpy(z)),
                                                    distance_metric="euclidean", spacing=list(spacing)), np.float64)
                    for x, z in ((pred, target), (target, pred))]
        assert ours["hd95"] == pytest.approx(max(np.percentile(d, 95) for d in directed), abs=1e-6)
        assert ours["hd95"] == pytest.approx(float(hd[0, 0]), abs=1e-4)
        assert ours["assd"] == pytest.approx(float(assd[0, 0]), abs=1e-6)
        assert ours["nsd"] == pytest.approx(float(nsd[0, 0]), abs=1e-6)


def test_maximal_f_score_pools_images_and_picks_the_best_threshold():
    """ISBI's pixel error: 1 - the best F-score over thresholds, positives = label > 0, counts summed over images."""
    target = np.array([[1, 1, 1, 0]], bool)
    probability = np.array([[0.9, 0.6, 0.3, 0.45]])
    thresholds = np.array([0.25, 0.5, 0.75])
    counts = threshold_counts(probability, target, thresholds)
    # > 0.25: all four positive (TP 3, FP 1); > 0.5: TP 2, FN 1; > 0.75: TP 1, FN 2
    assert counts.tolist() == [[3, 1, 0, 0], [2, 0, 1, 1], [1, 0, 2, 1]]
    assert maximal_f_score(counts, thresholds) == pytest.approx((6 / 7, 0.25))
    # a second image where the low threshold over-claims: pooled, the middle one wins
    other = threshold_counts(np.array([[0.4, 0.4, 0.9, 0.1]]), np.array([[0, 0, 1, 0]], bool), thresholds)
    f, threshold = maximal_f_score(counts + other, thresholds)
    assert threshold == 0.5 and f == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))


def test_crafted_masks_for_each_case_of_the_empty_policy():
    """Two classes, three cases: the headline mean must not be lifted by a class that is absent everywhere it is
    undefined (the old policy scored it 1.0: a true 0.667 read as 0.952), and a class predicted where the ground
    truth has none must count 0."""
    from medseg.evaluate import summarise
    from medseg.metrics import scored_metrics
    from medseg.scoring import mean_dice

    names = ["background", "a", "b"]
    truth = np.zeros((3, 8, 8), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 1:5, 1:5] = 1
    pred[0, 1:5, 1:3] = 1  # case 0: class a half found (Dice 2*8/(8+16) = 0.667), class b absent from both
    truth[1, 2:4, 2:4] = 1
    pred[1, 2:4, 2:4] = 1  # case 1: class a perfect, class b absent from both
    pred[2, 5:7, 5:7] = 2  # case 2: nothing to find at all, class b claimed anyway
    rows = []
    for case in range(3):
        scores = scored_metrics(pred[case], truth[case], names, spacing=(1, 1), boundary=True)
        rows += [{"case": str(case), "class": n, **m} for n, m in scores.items()]
    by = {(r["case"], r["class"]): r for r in rows}
    assert by["0", "a"]["dice"] == pytest.approx(2 / 3) and by["1", "a"]["dice"] == 1
    assert math.isnan(by["2", "a"]["dice"]) and math.isnan(by["2", "a"]["hd95"])  # absent from both: NaN
    assert math.isnan(by["0", "b"]["dice"]) and math.isnan(by["1", "b"]["nsd"])
    assert by["2", "b"]["dice"] == 0 and by["2", "b"]["nsd"] == 0  # absent from truth, predicted: 0
    assert by["2", "b"]["hd95"] == pytest.approx(math.hypot(8, 8))
    summary = summarise(rows, names[1:], "crafted", "run")
    a, b = summary["per_class"]["a"]["dice"], summary["per_class"]["b"]["dice"]
    assert a["mean"] == pytest.approx((2 / 3 + 1) / 2) and a["n"] == 2 and a["undefined"] == 1
    assert b["mean"] == 0 and b["n"] == 1 and b["undefined"] == 2
    assert summary["mean_dice"] == pytest.approx(((2 / 3 + 1) / 2 + 0) / 2) == mean_dice(rows)
