import pytest
import torch

from medseg.models import UNet, create_model


def test_default_geometry_is_the_seeds():
    model = UNet()
    widths = [block[0].out_channels for block in model.encoder]
    assert widths == [64, 128, 256, 512]
    assert model.bottleneck[0].out_channels == 1024
    assert isinstance(model.up[0], torch.nn.ConvTranspose2d) and model.up[0].kernel_size == (2, 2)
    assert model.head.kernel_size == (1, 1)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(31.0e6, rel=0.02)


@pytest.mark.parametrize("shape", [(1, 1, 128, 128), (2, 1, 37, 51), (1, 1, 5, 9)])
def test_any_input_size(shape):
    model = create_model("unet", in_channels=1, num_classes=3, base_channels=4, depth=3).eval()
    with torch.no_grad():
        assert model(torch.rand(shape)).shape == (shape[0], 3, *shape[2:])


def test_parameters_and_3d():
    model = UNet(in_channels=3, num_classes=4, base_channels=8, depth=2, dropout=0.3, spatial_dims=3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 10, 12, 7)).shape == (1, 4, 10, 12, 7)
    assert any(isinstance(m, torch.nn.Dropout3d) for m in model.modules())
    with pytest.raises(ValueError):
        create_model("segformer")


def test_deep_supervision_outputs_in_training_only():
    model = UNet(1, 3, base_channels=4, depth=3, spatial_dims=3, deep_supervision=True)
    outputs = model(torch.rand(2, 1, 16, 24, 8))
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 24, 8), (8, 12, 4), (4, 6, 2)]
    assert all(o.shape[:2] == (2, 3) for o in outputs)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 16, 24, 8)).shape == (1, 3, 16, 24, 8)


def test_deep_supervision_loss_weights_levels():
    from medseg.losses import deep_supervision_loss

    target = torch.randint(0, 2, (1, 8, 8))
    outputs = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)]
    seen = []

    def record(output, label):
        seen.append((tuple(output.shape[2:]), tuple(label.shape[1:])))
        return output.new_tensor(float(output.shape[-1]))

    assert float(deep_supervision_loss(record, outputs, target)) == pytest.approx((2 / 3) * 8 + (1 / 3) * 4)
    assert seen == [((8, 8), (8, 8)), ((4, 4), (4, 4))]
