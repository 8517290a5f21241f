"""Mixed precision: chosen for GPUs, never switched on for a CPU (where bf16 is about 100x slower)."""
import pytest
import torch

from conftest import tiny_config
from medseg import precision
from medseg.errors import MedsegError


def test_a_cpu_trains_in_fp32_and_refuses_half_precision():
    cpu = torch.device("cpu")
    assert precision.autocast_dtype(cpu, "auto") is None and precision.autocast_dtype(cpu, "fp32") is None
    for setting in ("bf16", "fp16"):
        with pytest.raises(MedsegError, match="CUDA GPUs"):
            precision.autocast_dtype(cpu, setting)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_a_gpu_gets_bf16_where_supported_else_fp16_with_loss_scaling(monkeypatch):
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.autocast_dtype(gpu, "auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.autocast_dtype(gpu, "auto") is torch.float16
    assert precision.autocast_dtype(gpu, "fp32") is None and precision.autocast_dtype(gpu, "bf16") is torch.bfloat16
    assert precision.grad_scaler(gpu, torch.float16) is not None
    assert precision.grad_scaler(gpu, torch.bfloat16) is None and precision.grad_scaler(gpu, None) is None


def test_autocast_keeps_probabilities_in_fp32():
    """Under bf16 autocast (run here on the CPU, only to check the types), the network's logits are bf16 and
    the probabilities inference blends are fp32."""
    from medseg import arrays
    from medseg.models import create_model

    model = create_model("unet", in_channels=1, num_classes=3, base_channels=4, depth=2).eval()
    with precision.autocast(torch.device("cpu"), torch.bfloat16):
        logits = arrays.run_network(model, torch.randn(1, 1, 16, 16))
        probs = arrays.activation(logits)
    assert logits.dtype == torch.bfloat16 and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(1, 16, 16))


def test_a_training_run_records_its_precision(phantoms_2d, tmp_path):
    import json

    from medseg.train import train

    run = train(tiny_config(phantoms_2d, tmp_path / "run"))
    assert json.loads((run / "train_summary.json").read_text())["precision"] == "fp32"
    with pytest.raises(MedsegError, match="--precision half"):
        tiny_config(phantoms_2d, tmp_path / "bad", precision="half").validate()
