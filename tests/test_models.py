import pytest
import torch

from medseg.models import UNet, create_model, place


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


def test_deep_supervision_targets_line_up_at_any_size():
    """10x10 is not a multiple of 2**depth = 4: the network pads to 12x12, so its half-resolution output is 6x6
    over the padded input; each auxiliary target pixel must come from the 2x2 block of the padded target that
    output pixel covers (stretching 10 onto 6 would shift the labels by up to a pixel)."""
    from medseg.losses import deep_supervision_loss, scaled_target
    from medseg.models import UNet

    target = torch.randint(0, 3, (2, 10, 10))
    padded = torch.nn.functional.pad(target[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0].long()
    scaled = scaled_target(target, (6, 6), 2)
    assert scaled.shape == (2, 6, 6)
    for i in range(6):
        for j in range(6):
            block = padded[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, -1)
            assert all(scaled[b, i, j] in block[b] for b in range(2))
    assert torch.equal(scaled_target(target[:, :8, :8], (4, 4), 2), target[:, 1:8:2, 1:8:2])  # no padding
    model = UNet(1, 3, base_channels=4, depth=2, deep_supervision=True).train()
    outputs = model(torch.rand(2, 1, 10, 10))
    assert [tuple(o.shape[2:]) for o in outputs] == [(10, 10), (6, 6)]
    loss = deep_supervision_loss(torch.nn.functional.cross_entropy, outputs, target)
    loss.backward()
    assert torch.isfinite(loss)


ALL_MODELS = ["unet", "attention_unet", "resenc_unet", "deeplabv3plus", "segnet", "fcn"]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_takes_any_size_in_2d_and_3d(name):
    from medseg.models import MODELS

    assert list(MODELS) == ALL_MODELS
    for dims, shape in ((2, (2, 3, 37, 53)), (2, (1, 3, 17, 16)), (3, (1, 3, 12, 18, 10))):
        model = create_model(name, in_channels=3, num_classes=4, base_channels=4, depth=3, spatial_dims=dims).eval()
        with torch.no_grad():
            assert model(torch.rand(shape)).shape == (shape[0], 4, *shape[2:])


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_fits_one_batch(name):
    """Gradients reach every model's output: 40 Adam steps on one batch halve the loss. The targets are squares
    (shapes, not pixel noise, which a stride-4 decoder like DeepLab's cannot draw)."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=2, base_channels=8, depth=3)
    target = torch.zeros(4, 32, 32, dtype=torch.long)
    for i, (y, x) in enumerate([(2, 3), (10, 14), (16, 5), (6, 20)]):
        target[i, y:y + 10, x:x + 10] = 1
    image = target[:, None].float() + 0.3 * torch.rand(4, 1, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_architectures_are_what_their_names_say():
    from medseg.models import AttentionUNet, DeepLabV3Plus, FCN8s, ResEncUNet, SegNet
    from medseg.models.blocks import ResidualBlock

    attention = AttentionUNet(1, 2, base_channels=4, depth=3).eval()
    weights = []
    attention.gates[0].psi.register_forward_hook(lambda m, i, o: weights.append(o))
    with torch.no_grad():
        attention(torch.rand(1, 1, 16, 16))
    assert len(attention.gates) == 3 and weights[0].shape == (1, 1, 4, 4) and 0 <= weights[0].min() <= 1
    resenc = ResEncUNet(1, 2, base_channels=4, depth=3)
    assert [len(stage) for stage in resenc.encoder] == [1, 2, 3] and isinstance(resenc.pool, torch.nn.Identity)
    assert all(isinstance(b, ResidualBlock) for stage in resenc.encoder for b in stage)
    segnet = SegNet(1, 2, base_channels=4, depth=3)
    assert segnet.pool.return_indices and isinstance(segnet.unpool, torch.nn.MaxUnpool2d)
    assert segnet.decoder[0][0].in_channels == segnet.encoder[-1][-3].out_channels  # no concatenated skip
    deeplab = DeepLabV3Plus(1, 2, base_channels=4)
    assert [b[0].dilation for b in deeplab.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]
    fcn = FCN8s(1, 3, base_channels=4)
    assert fcn.score_pool3.in_channels == 16 and fcn.score_pool4.in_channels == 32 and fcn.up8.stride == (8, 8)
    for cls in (DeepLabV3Plus, SegNet, FCN8s):
        with pytest.raises(ValueError, match="deep supervision"):
            cls(1, 2, deep_supervision=True)


def test_flops_of_the_seed_unet():
    """The brief measures the seed's U-Net at 72 GFLOP per 128x128 training image: a forward pass is a third."""
    from medseg.models import count_flops, describe_models

    assert count_flops(UNet(), (1, 1, 128, 128)) / 1e9 == pytest.approx(24, rel=0.1)
    rows = describe_models(size=32, base_channels=4, depth=3)
    assert [r["name"] for r in rows] == ALL_MODELS and all(r["gflops"] > 0 and r["parameters"] > 0 for r in rows)


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_2d_networks_on_a_cpu_run_channels_last_with_the_default_layouts_results(name):
    kwargs = dict(in_channels=3, num_classes=3, base_channels=4, depth=3, spatial_dims=2)
    torch.manual_seed(0)
    placed = place(create_model(name, **kwargs), torch.device("cpu"))
    reference = create_model(name, **kwargs)
    reference.load_state_dict(placed.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in placed.parameters() if p.ndim == 4)
    x = torch.randn(2, 3, 37, 51)  # sides that pad inside the network
    out, expected = placed(x), reference(x)
    assert torch.allclose(out, expected, atol=1e-4)
    out.square().mean().backward()
    expected.square().mean().backward()
    for a, b in zip(placed.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3)


def test_3d_networks_and_the_other_architectures_keep_the_default_layout():
    cpu = torch.device("cpu")
    volume = place(create_model("unet", in_channels=1, num_classes=2, base_channels=4, depth=2, spatial_dims=3), cpu)
    residual = place(create_model("resenc_unet", in_channels=1, num_classes=2, base_channels=4, depth=3), cpu)
    for model in (volume, residual):
        assert all(p.is_contiguous() for p in model.parameters())
