"""Mixed precision where the device gains from it: bf16 (or fp16 with loss scaling) autocast on CUDA GPUs, plain
fp32 on CPUs.

`--precision auto` (the default) picks bf16 on a GPU that supports it, fp16 on an older one, and fp32 on a CPU,
where bf16 measured about 100x slower than fp32 on this project's machines: mixed precision is never switched on
for a CPU, and asking for it there is refused. Softmax, losses and the sliding window's blending run in fp32
under autocast (PyTorch's autocast lists), so probabilities stay fp32.
"""
from __future__ import annotations

import contextlib

import torch

from medseg.errors import MedsegError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, setting: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `device` under `setting`; None for full fp32."""
    if setting == "fp32":
        return None
    if device.type != "cuda":
        if setting != "auto":
            raise MedsegError(f"--precision {setting} is for CUDA GPUs; on {device.type.upper()} medseg trains in fp32 "
                              "(bf16 on a CPU is about 100x slower)")
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[setting]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for `dtype` on `device` (none for fp32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None):
    """fp16 needs its loss scaled so small gradients do not underflow; bf16 and fp32 do not (None)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
