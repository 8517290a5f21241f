import json

import pytest
import torch

from medseg.errors import MedsegError
from medseg.models import create_model
from medseg.train import train
from medseg.transfer import encoder_parameters, load_matching

from conftest import tiny_config


def source_weights(run):
    return torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]


def test_matching_tensors_load_and_the_rest_is_reported(trained_2d):
    source = source_weights(trained_2d)
    # the same network for two classes instead of three: everything but the output layer fits
    model = create_model("unet", in_channels=1, num_classes=2, base_channels=4, depth=2)
    account = load_matching(model, trained_2d)
    assert set(account["skipped"]) == {"head.weight", "head.bias"}
    assert "shape (3, 4" in account["skipped"]["head.weight"] and account["loaded"] == account["of"] - 2
    own = model.state_dict()
    assert all(torch.equal(own[k], source[k]) for k in own if not k.startswith("head"))


def test_init_from_with_a_frozen_encoder(trained_2d, phantoms_2d, tmp_path):
    source = source_weights(trained_2d)
    cfg = tiny_config(phantoms_2d, tmp_path / "tuned", init_from=str(trained_2d), freeze_encoder_epochs=1, epochs=1,
                      lr=1e-2)
    run = train(cfg)
    tuned = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    encoder = [k for k in tuned if k.startswith(("encoder", "bottleneck"))]
    decoder = [k for k in tuned if k.startswith("decoder") and k.endswith("weight")]
    # frozen for its only epoch: weights and batch-norm statistics as loaded; the decoder learned
    assert encoder and all(torch.equal(tuned[k], source[k]) for k in encoder)
    assert any(not torch.equal(tuned[k], source[k]) for k in decoder)
    account = json.loads((run / "init.json").read_text())
    assert account["loaded"] == account["of"] and account["skipped"] == {}
    assert json.loads((run / "train_summary.json").read_text())["init_from"]["loaded"] == account["loaded"]


def test_encoder_thaws_after_the_frozen_epochs(trained_2d, phantoms_2d, tmp_path):
    source = source_weights(trained_2d)
    run = train(tiny_config(phantoms_2d, tmp_path / "thawed", init_from=str(trained_2d), freeze_encoder_epochs=1,
                            epochs=2, patience=0, lr=1e-2))
    tuned = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]
    assert not torch.equal(tuned["encoder.0.0.weight"], source["encoder.0.0.weight"])


@pytest.mark.parametrize("name", ["unet", "attention_unet", "resenc_unet", "deeplabv3plus", "segnet", "fcn"])
def test_every_model_names_its_encoder(name):
    model = create_model(name, in_channels=1, num_classes=2, base_channels=4, depth=3)
    encoder = encoder_parameters(model)
    assert 0 < sum(p.numel() for p in encoder) < sum(p.numel() for p in model.parameters())


def test_a_checkpoint_that_does_not_fit_fails_before_the_run_folder(trained_2d, phantoms_2d, tmp_path):
    cfg = tiny_config(phantoms_2d, tmp_path / "run", init_from=str(trained_2d), model="fcn")
    with pytest.raises(MedsegError, match="no tensor matches"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_init_from_errors(trained_2d, tmp_path):
    model = create_model("unet", in_channels=1, num_classes=3, base_channels=4, depth=2)
    with pytest.raises(MedsegError, match="no checkpoint there"):
        load_matching(model, tmp_path / "nowhere")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedsegError, match=r"junk.pt: --init-from checkpoint cannot be read"):
        load_matching(model, tmp_path / "junk.pt")
    other = create_model("fcn", in_channels=1, num_classes=3, base_channels=4)
    with pytest.raises(MedsegError, match="no tensor matches"):
        load_matching(other, trained_2d)
