"""`medseg ensemble`: separately trained runs (here 2D networks cutting the volumes along different axes) averaged
for prediction and evaluation, and refused where averaging would be wrong."""
import json

import nibabel as nib
import numpy as np
import pytest

from medseg.checkpoint import load_models, load_run
from medseg.cli import main
from medseg.ensemble import create_ensemble
from medseg.errors import MedsegError
from medseg.evaluate import evaluate_run, read_per_case
from medseg.infer import native_probabilities, to_labels
from medseg.io import read_image
from medseg.postprocess import keep_largest_component
from medseg.predict import predict_files
from medseg.train import train
from medseg.transforms import normalize
from conftest import tiny_config


def _member(phantoms_3d, out, axis):
    """A 2D network on one slice axis of the phantom volumes, trained long enough to find the phantoms."""
    return train(tiny_config(phantoms_3d, out, fit="pad", axis=axis, base_channels=8, epochs=4, steps_per_epoch=12,
                             lr=3e-3, batch_size=8))


@pytest.fixture(scope="module")
def members(phantoms_3d, tmp_path_factory):
    runs = tmp_path_factory.mktemp("members")
    return _member(phantoms_3d, runs / "axis2", -1), _member(phantoms_3d, runs / "axis0", 0)


def test_ensemble_averages_the_members_probabilities(members, phantoms_3d, tmp_path):
    assert main(["ensemble", *map(str, members), "--out", str(tmp_path / "both")]) == 0
    members = load_models(tmp_path / "both", device="cpu")
    assert [m.config.axis for m in members] == [-1, 0]
    source = phantoms_3d / "imagesTr" / "phantom_003.nii.gz"
    (mask,) = predict_files(tmp_path / "both", [source], tmp_path / "out", progress=False)
    image = read_image(source)
    normed = normalize(image.array, members[0].config.normalization)
    mean = sum(native_probabilities(m, normed, image.spacing, image.affine) for m in members) / 2
    expected = to_labels(mean, members[0])
    votes = [k for k in (1, 2) if 2 * sum(k in m.postprocess_classes for m in members) >= 2]  # half of them
    if votes:
        expected = keep_largest_component(expected, votes)
    written = np.asarray(nib.load(mask).dataobj)
    np.testing.assert_array_equal(written, expected)
    alone = [to_labels(native_probabilities(m, normed, image.spacing, image.affine), m) for m in members]
    assert (written > 0).sum() > 100 and all((written != a).any() for a in alone)  # neither member's own mask
    np.testing.assert_allclose(nib.load(mask).affine, image.affine, atol=1e-5)


def test_ensemble_is_evaluated_on_the_shared_held_out_cases(members, tmp_path):
    create_ensemble(list(members), tmp_path / "both")
    summary = evaluate_run(tmp_path / "both", figures=0, progress=False, device="cpu")
    split = json.loads((members[0] / "split.json").read_text())
    assert summary["mean_dice"] > 0.3
    assert summary["cases"] == len(split["test"]) and summary["run"] == str(tmp_path / "both")
    assert (tmp_path / "both" / "evaluation" / "per_case.csv").exists()
    scored = {row["case"] for row in read_per_case(tmp_path / "both")}
    assert scored == set(split["test"])  # the test cases of both members, and only those
    selection = evaluate_run(tmp_path / "both", out=tmp_path / "sel", cases="val", figures=0, progress=False)
    assert selection["cases"] == len(split["val"]) and "selection" in selection["cases_role"]


def test_runs_that_cannot_be_averaged_are_refused(trained_3d, phantoms_3d, tmp_path):
    zscore = train(tiny_config(phantoms_3d, tmp_path / "z", fit="pad", normalization="zscore", epochs=1))
    with pytest.raises(MedsegError, match="normalisation"):
        create_ensemble([trained_3d, zscore], tmp_path / "bad")
    with pytest.raises(MedsegError, match="at least two"):
        create_ensemble([trained_3d], tmp_path / "one")
    other_split = train(tiny_config(phantoms_3d, tmp_path / "s", fit="pad", seed=7, epochs=1))
    assert json.loads((other_split / "split.json").read_text())["test"] != \
        json.loads((trained_3d / "split.json").read_text())["test"]
    create_ensemble([trained_3d, other_split], tmp_path / "mixed")
    with pytest.raises(MedsegError, match="test cases differ"):
        evaluate_run(tmp_path / "mixed", figures=0, progress=False, device="cpu")
    with pytest.raises(MedsegError, match="validated by some members and trained on by others"):
        evaluate_run(tmp_path / "mixed", cases="val", figures=0, progress=False, device="cpu")
    assert load_run(trained_3d).config.normalization != "zscore"


def test_report_of_an_ensemble_shows_each_member(members, tmp_path):
    from medseg.report import write_report

    create_ensemble(list(members), tmp_path / "both")
    page, markdown = write_report(tmp_path / "both", progress=False, device="cpu")
    text = markdown.read_text()
    assert "An ensemble: the mean probability of axis2, axis0" in text
    assert "## Training (axis2)" in text and "## Training (axis0)" in text and "Configuration of axis0" in text
    assert "test:" in page.read_text()
