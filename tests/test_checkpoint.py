"""Checkpoints are data: loading one must never run code that whoever wrote it put inside."""
import pytest
import torch

from medseg.checkpoint import load_run
from medseg.cli import main
from medseg.errors import MedsegError


class WritesAFile:
    """Unpickling this calls exec, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def crafted_checkpoint(path, marker, model):
    state = {"model": model, "model_name": "unet", "model_args": {}, "config": {}, "class_names": [],
             "payload": WritesAFile(marker)}
    torch.save(state, path)
    return path


def test_the_crafted_checkpoint_would_run_code_if_unpickled(tmp_path):
    """The attack is real: a plain unpickling writes the marker (so the refusals below are worth something)."""
    path = crafted_checkpoint(tmp_path / "evil.pt", tmp_path / "marker", {})
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").read_text() == "ran"


def test_a_checkpoint_that_needs_pickle_is_refused_and_runs_nothing(trained_2d, phantoms_2d, tmp_path):
    weights = torch.load(trained_2d / "best.pt", weights_only=True)["model"]
    marker = tmp_path / "marker"
    run = tmp_path / "handed_over"
    run.mkdir()
    crafted_checkpoint(run / "best.pt", marker, weights)
    with pytest.raises(MedsegError, match=r"best.pt: refused; this checkpoint holds Python objects beyond tensors and plain values \(exec\)"):
        load_run(run)
    assert main(["train", str(phantoms_2d), "--out", str(tmp_path / "tuned"),
                 "--init-from", str(run), "--epochs", "1", "--quiet"]) == 2
    assert main(["predict", str(run), str(phantoms_2d), "--out", str(tmp_path / "pred"), "--quiet"]) == 2
    assert not marker.exists()


def test_medseg_checkpoints_load_as_weights_only(trained_2d):
    for name in ("best.pt", "last.pt"):
        state = torch.load(trained_2d / name, weights_only=True)
        assert state["model"] and state["class_names"] == ["background", "ellipse", "ring"]


def test_a_truncated_checkpoint_is_named(trained_2d, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((trained_2d / "best.pt").read_bytes()[:1000])
    with pytest.raises(MedsegError, match=r"best.pt: checkpoint cannot be read"):
        load_run(run)
