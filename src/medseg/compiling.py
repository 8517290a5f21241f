"""torch.compile for the training step where it pays for itself: time-budgeted runs on a CPU.

Measured here (benchmarks/compile_speed.py, benchmarks/channels_last.py, docs/benchmarks.md): a compiled 2D
training step took 0.73-0.74 of the eager one in PyTorch's default layout, and takes 0.94-0.99 of it now that 2D
networks run channels-last (`medseg.models.place`), so a budget sees a few per cent more steps; the one-off
compile costs 30-60 s (a few seconds once inductor's disk cache holds the graphs). `--compile auto` (the default)
compiles time-budgeted CPU runs of at least MIN_BUDGET_MINUTES, where the compile is under a tenth of the budget,
after a probe that the C++ toolchain inductor needs works here. It is not switched on by `auto` where it was
never measured (GPUs, several processes) or where a short run would only pay for it; `--compile on` asks for it
anywhere. The decision depends only on the settings, the device and the toolchain, so a re-run of config.json
decides as the run did; it is printed and kept in train_summary.json.

Validation stays eager: it runs the same weights, and its input sizes vary from case to case. Prediction can run
compiled (`medseg predict --engine compiled`, `FrozenNetwork`): the weights are frozen into the graph, which lets
inductor fold them and pre-pack the convolutions for oneDNN; measured for the 3D U-Net's sliding window in
benchmarks/sliding_window.py. `--engine auto` (the default, `AdaptiveNetwork` on a CPU) compiles only the input
shapes whose eager work would pay for the compile, so a few small cases never wait for one
(benchmarks/predict_engines.py).
"""
from __future__ import annotations

import time

import torch

from medseg.console import notice
from medseg.errors import MedsegError

MIN_BUDGET_MINUTES = 10.0
# Eager seconds after which compiling an input shape has paid for itself: a cold compile (empty inductor cache,
# the toolchain probe included) cost about 37 s here and a compiled batch of windows about half an eager one
# (benchmarks/predict_engines.py), so C / (1 - r) = 75 s. Renting until then costs at most (75 + 37) / 75 = 1.5x
# the better of eager and compiled on a job whose length is unknown, and nothing on jobs shorter than that.
COMPILE_AFTER_SECONDS = 75.0


def decide(cfg, device: torch.device, processes: int) -> tuple[bool, str]:
    """Whether to compile the training step of the run `cfg` (a TrainConfig), and why (one clause for the printed
    line and train_summary.json). A run re-made from its config.json decides as it did: its steps come from the
    calibration it keeps, so it counts as time-budgeted still."""
    if cfg.compile == "off":
        return False, "off (--compile off)"
    if cfg.compile == "auto":
        if device.type != "cpu":
            return False, f"off (auto: not measured on {device.type.upper()} here; --compile on to try it)"
        if processes > 1:
            return False, "off (auto: not used with several training processes)"
        budgeted = cfg.time_budget and (cfg.steps is None or cfg.calibration)
        if not budgeted or cfg.time_budget < MIN_BUDGET_MINUTES:
            return False, (f"off (auto: the 30-60 s compile pays back only in time-budgeted runs of at least "
                           f"{MIN_BUDGET_MINUTES:g} min)")
    failure = probe()
    if failure:
        if cfg.compile == "on":
            raise MedsegError(f"--compile on: torch.compile does not work here ({failure}); use --compile off")
        return False, f"off (auto: torch.compile does not work here: {failure})"
    why = ("--compile on" if cfg.compile == "on"
           else "auto: time-budgeted CPU run; 2D steps measured 0.94-0.99 of eager here")
    return True, f"on ({why})"


def probe() -> str | None:
    """None where torch.compile can build and run a small kernel here (it needs a C++ compiler on a CPU), else
    the first line of what went wrong."""
    try:
        kernel = torch.compile(lambda x: torch.relu(x) * 2 + 1, dynamic=False)
        if not torch.equal(kernel(torch.arange(-2.0, 2.0)), torch.tensor([1.0, 1.0, 1.0, 3.0])):
            return "a compiled test kernel computed a wrong result"
    except Exception as exc:  # no compiler, no headers, an unsupported platform: all mean "train eagerly"
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    finally:
        torch._dynamo.reset()  # the probe's graph is of no further use
    return None


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model as a compiled training step calls it; shares the model's parameters (its state dict is the
    model's). Fixed shapes: training batches all have one size, and a shape-generic graph would be slower."""
    return torch.compile(model, dynamic=False)


class FrozenNetwork:
    """Stands where the PyTorch network stood, compiled for inference with its weights frozen into the graph
    (inductor's `freezing`: constants folded, convolution weights pre-packed once instead of on every call).

    Each input shape compiles once (tens of seconds cold, a few with inductor's disk cache), so batches are
    zero-padded up to a power of two: a volume's last, shorter batch of windows reuses a graph instead of
    compiling another. Padding cannot change the real outputs: no layer mixes samples at inference (instance norm
    is per sample, batch norm uses its running statistics). The weights are read at the first call; later
    changes to the module are not seen."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.compiled = compiled(self.model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        n = x.shape[0]
        size = padded_batch(n)
        if size > n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        with torch.no_grad(), inductor.patch(freezing=True):
            return self.compiled(x)[:n]


def padded_batch(n: int) -> int:
    """The batch size FrozenNetwork runs `n` samples as: the next power of two."""
    return 1 << (n - 1).bit_length()


class AdaptiveNetwork:
    """`--engine auto` on a CPU: the network runs eagerly, and an input shape that has cost COMPILE_AFTER_SECONDS
    of eager time runs from then on through the frozen, compiled twin (FrozenNetwork): the rule of renting until
    the rent paid would have bought. Where the work ahead is known (`expect`: a volume's sliding window knows its
    windows), a shape compiles after its first batch if that work alone would pay back the compile. A job too short
    for a compile to pay back never compiles; a long one (a CT volume's hundreds of windows, a folder of many
    same-sized images) runs nearly all of its batches compiled. Shapes are counted as FrozenNetwork pads them, so
    a volume's last, shorter batch counts with the others. The first compile also probes the toolchain; where it cannot
    compile, prediction stays eager and says so once."""

    def __init__(self, model: torch.nn.Module, after_seconds: float = COMPILE_AFTER_SECONDS):
        self.model = model.eval()
        self.after_seconds = after_seconds
        self.eager_seconds: dict[tuple, float] = {}  # per padded input shape
        self.last_seconds: dict[tuple, float] = {}  # the latest eager call's, per shape
        self.expected_calls = 0  # calls still to come in the current job, where it said (`expect`)
        self.compiled_shapes: set[tuple] = set()
        self.frozen: FrozenNetwork | None = None
        self.failure: str | None = None  # why torch.compile does not work here, once a compile was wanted

    def expect(self, calls: int) -> None:
        """The job about to run calls the network `calls` times with one input shape (a volume's windows)."""
        self.expected_calls = calls

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (padded_batch(x.shape[0]), *x.shape[1:])
        if shape not in self.compiled_shapes and self._would_pay(shape) and self._compiler_works():
            notice(f"--engine auto: compiling the network for inputs of shape {list(shape)} (the eager work on "
                   f"them would pay for the compile; --engine torch stays eager)")
            self.compiled_shapes.add(shape)
        self.expected_calls = max(0, self.expected_calls - 1)
        if shape in self.compiled_shapes:
            return self.frozen(x)
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model(x)
        self.last_seconds[shape] = time.perf_counter() - started
        self.eager_seconds[shape] = self.eager_seconds.get(shape, 0.0) + self.last_seconds[shape]
        return out

    def _would_pay(self, shape: tuple) -> bool:
        """The eager time already spent on `shape`, or the known work ahead at its last call's speed, reaches the
        pay-back point."""
        ahead = self.expected_calls * self.last_seconds.get(shape, 0.0)
        return max(self.eager_seconds.get(shape, 0.0), ahead) >= self.after_seconds

    def _compiler_works(self) -> bool:
        if self.frozen is None and self.failure is None:
            self.failure = probe()
            if self.failure:
                notice(f"--engine auto: staying eager, torch.compile does not work here ({self.failure})")
            else:
                self.frozen = FrozenNetwork(self.model)
        return self.frozen is not None


def adapt_for_inference(models: list) -> list:
    """`--engine auto`: on a CPU, each member's network compiles the input shapes that recur (AdaptiveNetwork);
    elsewhere (a GPU, where it was not measured) the networks stay as they are."""
    for trained in models:
        if trained.device.type == "cpu":
            trained.model = AdaptiveNetwork(trained.model)
    return models


def freeze_for_inference(models: list) -> list:
    """Each member's PyTorch network swapped for its compiled, frozen twin (`--engine compiled`)."""
    failure = probe()
    if failure:
        raise MedsegError(f"--engine compiled: torch.compile does not work here ({failure}); use --engine torch")
    for trained in models:
        trained.model = FrozenNetwork(trained.model)
    return models
