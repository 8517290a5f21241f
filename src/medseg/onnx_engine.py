"""Networks exported to ONNX, and run by onnxruntime in place of PyTorch's, without PyTorch.

`export_onnx` writes one member's network with dynamic batch and spatial axes; the exported graph expects each
spatial side to be a multiple of 2**depth, and `OnnxNetwork` pads (edge values, centred) and crops around it
exactly as the PyTorch network does inside its forward pass. Everything around the network (slicing, TTA,
sliding windows, resampling, post-processing) is medseg's one inference path (`medseg.infer`, on NumPy arrays
here), so the two engines differ only in arithmetic (measured: probabilities within 1e-4, identical masks).

A model package exported with `--onnx` carries each member's network and its settings as data
(`inference.json`): `load_onnx_models` reads them without PyTorch, so `medseg predict PACKAGE --engine
onnxruntime` runs on a machine where PyTorch is not installed (tested with its import blocked).
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from medseg.arrays import pad_edge_to_multiple
from medseg.errors import MedsegError

# auto: medseg.compiling.AdaptiveNetwork (or onnxruntime for a package where PyTorch is missing); compiled:
# medseg.compiling.FrozenNetwork
ENGINES = ("auto", "torch", "onnxruntime", "compiled")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MedsegError("--engine onnxruntime needs the onnxruntime package: pip install 'medseg[deploy]'") from exc
    return onnxruntime


INFERENCE_SETTINGS = "inference.json"  # beside a package member's network.onnx: what prediction needs, as data


def export_onnx(trained, path: Path) -> Path:
    """The member's network as ONNX: input `image` (B, C, *spatial), output `logits` (B, K, *spatial), batch and
    every spatial side dynamic (sides multiples of 2**depth; `OnnxNetwork` pads to them)."""
    import torch

    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError as exc:
            raise MedsegError(f"exporting to ONNX needs the {package} package: pip install 'medseg[deploy]'") from exc
    # a copy in PyTorch's default layout: a channels-last network (`medseg.models.place`) fixes the batch size
    # in the exported graph's guards
    model = copy.deepcopy(trained.model).cpu().eval().to(memory_format=torch.contiguous_format)
    cfg = trained.config
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


def inference_settings(trained) -> dict:
    """What predicting with a member needs besides its network: the settings (pre-processing, TTA, sliding window),
    class names, input channels and the post-processing chosen on validation."""
    from dataclasses import asdict

    return {"config": asdict(trained.config), "class_names": trained.class_names, "in_channels": trained.in_channels,
            "postprocess_classes": trained.postprocess_classes,
            "min_sizes": {str(k): v for k, v in trained.min_sizes.items()}}


class OnnxNetwork:
    """Stands where the PyTorch network stood: called on a batch (B, C, *spatial), NumPy in and out."""

    takes_numpy = True  # `medseg.infer` hands it NumPy arrays, not tensors

    def __init__(self, path: Path, multiple: int, threads: int | None = None):
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged or foreign file
            raise MedsegError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}); export it again") from exc
        self.multiple, self.path = multiple, Path(path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        padded, index = pad_edge_to_multiple(np.asarray(x, np.float32), self.multiple)
        (logits,) = self.session.run(["logits"], {"image": np.ascontiguousarray(padded)})
        return logits if index is None else logits[index]


def load_onnx_models(run: str | Path, threads: int | None = None) -> list | None:
    """The members of a model package exported with --onnx, each network in onnxruntime, read without PyTorch;
    None where RUN is not such a package (a run, or a package without ONNX networks)."""
    from medseg.config import TrainConfig
    from medseg.infer import TrainedModel
    from medseg.package import is_package, package_members

    if not is_package(run):
        return None
    members = package_members(run)
    if not all((m / "network.onnx").is_file() and (m / INFERENCE_SETTINGS).is_file() for m in members):
        return None
    models = []
    for member in members:
        settings = json.loads((member / INFERENCE_SETTINGS).read_text())
        config = TrainConfig(**settings["config"])
        network = OnnxNetwork(member / "network.onnx", 2 ** config.depth, threads)
        models.append(TrainedModel(network, config, settings["class_names"], settings["in_channels"], member, "cpu",
                                   settings["postprocess_classes"],
                                   {int(k): v for k, v in settings.get("min_sizes", {}).items()}))
    return models


def use_onnxruntime(models: list, threads: int | None = None) -> list:
    """Swap each member's network for its ONNX twin: the package's `network.onnx` where there is one, else one
    exported now (beside the checkpoint in a temporary folder; this needs PyTorch)."""
    from medseg.package import is_package

    for trained in models:
        path = trained.run / "network.onnx"
        # only a package's own network.onnx, which its manifest vouched for: in a run folder one could be anything
        if not (path.exists() and trained.run.parent.name == "members" and is_package(trained.run.parent.parent)):
            folder = Path(tempfile.mkdtemp(prefix="medseg-onnx-"))
            atexit.register(shutil.rmtree, folder, True)
            path = export_onnx(trained, folder / "network.onnx")
        trained.model = OnnxNetwork(path, 2 ** trained.config.depth, threads)
        trained.device = "cpu"
    return models
