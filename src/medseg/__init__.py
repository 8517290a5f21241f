"""medseg: medical image segmentation with U-Nets, from files to trained model, metrics, figures and masks.

The Python API mirrors the `medseg` command:

    from medseg import plan_and_train, TrainConfig, train, evaluate_run, predict_files
    run = plan_and_train("Task04_Hippocampus", "runs/hippo", time_budget=30)  # what `medseg train DATA` does
    run = train(TrainConfig(data="Task04_Hippocampus", out="runs/h64", size=64, fit="pad"))  # settings by hand
    summary = evaluate_run(run)  # on the run's test cases
    predict_files(run, ["new_scan.nii.gz"], out="masks")
"""
import sys
import types
from importlib import import_module

__version__ = "0.1.0"
# Imported on first use, so that `import medseg` does not load PyTorch: a model package predicts under onnxruntime
# on machines without it (see medseg.onnx_engine).
_EXPORTS = {"plan_and_train": "autotrain", "TrainConfig": "config", "Case": "datasets", "find_cases": "datasets",
            "split_cases": "datasets", "MedsegError": "errors", "evaluate_run": "evaluate", "Image": "io",
            "read_image": "io", "write_mask": "io", "predict_files": "predict", "write_synthetic_dataset": "synth",
            "train": "train"}
__all__ = ["Case", "Image", "MedsegError", "TrainConfig", "evaluate_run", "find_cases", "plan_and_train", "predict_files",
           "read_image", "split_cases", "train", "write_mask", "write_synthetic_dataset"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(import_module(f"medseg.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`import medseg.train` binds the submodule as an attribute of the package; the package's `train` stays the
    function (as when it was imported eagerly)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
