"""Networks exported to ONNX, and run by onnxruntime in place of PyTorch's.

`export_onnx` writes one member's network with dynamic batch and spatial axes; the exported graph expects each
spatial side to be a multiple of 2**depth, and `OnnxNetwork` pads (edge values, centred) and crops around it
exactly as the PyTorch network does inside its forward pass. Everything around the network (slicing, TTA,
sliding windows, resampling, post-processing) is medseg's one inference path, unchanged, so the two engines differ
only in the arithmetic of the network itself (measured: probabilities within 1e-4, identical masks).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from medseg.errors import MedsegError
from medseg.models.blocks import crop, pad_to_multiple

ENGINES = ("torch", "onnxruntime")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MedsegError("--engine onnxruntime needs the onnxruntime package: pip install 'medseg[deploy]'") from exc
    return onnxruntime


def export_onnx(trained, path: Path) -> Path:
    """The member's network as ONNX: input `image` (B, C, *spatial), output `logits` (B, K, *spatial), batch and
    every spatial side dynamic (sides multiples of 2**depth; `OnnxNetwork` pads to them)."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as exc:
            raise MedsegError(f"exporting to ONNX needs the {package} package: pip install 'medseg[deploy]'") from exc
    model, cfg = trained.model.cpu().eval(), trained.config
    multiple = 2 ** cfg.depth
    channels = model_input_channels(trained)
    spatial = (2 * multiple,) * cfg.dims
    dims = {0: torch.export.Dim("batch", max=1024)}
    for axis in range(cfg.dims):
        dims[2 + axis] = multiple * torch.export.Dim(f"side{axis}", min=1, max=4096 // multiple)
    example = torch.randn(1, channels, *spatial)
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # it logs that torchvision's operators are skipped: medseg uses none
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            warnings.simplefilter("ignore")  # the exporter reports its stages on stdout
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"],
                                        output_names=["logits"], dynamic_shapes={"x": dims}, external_data=False)
    finally:
        log.setLevel(level)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=False)
    return path


def model_input_channels(trained) -> int:
    return trained.in_channels * trained.config.slices_per_input


class OnnxNetwork(torch.nn.Module):
    """Stands where the PyTorch network stood: the same call, tensors in and out, onnxruntime in between."""

    def __init__(self, path: Path, multiple: int, threads: int | None = None):
        super().__init__()
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged or foreign file
            raise MedsegError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}); export it again") from exc
        self.multiple, self.path = multiple, Path(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, index = pad_to_multiple(x.detach().cpu().float(), self.multiple)
        (logits,) = self.session.run(["logits"], {"image": np.ascontiguousarray(padded.numpy())})
        return crop(torch.from_numpy(logits), index).to(x.device)


def use_onnxruntime(models: list, threads: int | None = None) -> list:
    """Swap each member's network for its ONNX twin: the package's `network.onnx` where there is one, else one
    exported now (beside the checkpoint in a temporary folder)."""
    for trained in models:
        path = trained.run / "network.onnx"
        if not path.exists():
            folder = Path(tempfile.mkdtemp(prefix="medseg-onnx-"))
            atexit.register(shutil.rmtree, folder, True)
            path = export_onnx(trained, folder / "network.onnx")
        trained.model = OnnxNetwork(path, 2 ** trained.config.depth, threads)
        trained.device = torch.device("cpu")
    return models
