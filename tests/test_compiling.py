"""torch.compile of the training step: when `auto` uses it, that a compiled run trains the same function as an
eager one, and that a machine where compiling fails trains eagerly with the reason said."""
import json

import pytest
import torch

from conftest import tiny_config
from medseg import compiling
from medseg.errors import MedsegError
from medseg.train import train

CPU = torch.device("cpu")


def decision(device=CPU, processes=1, **settings) -> tuple[bool, str]:
    return compiling.decide(tiny_config("data", "out", **settings), device, processes)


def test_auto_compiles_only_time_budgeted_cpu_runs_long_enough_to_pay_for_it(monkeypatch):
    monkeypatch.setattr(compiling, "probe", lambda: None)  # the toolchain works (tested below for real)
    assert decision(time_budget=30)[0]
    assert decision(time_budget=30, steps=900, calibration={"seconds_per_step": 0.7})[0]  # a re-run of that run
    for off in (decision(time_budget=5), decision(), decision(time_budget=30, steps=100),
                decision(torch.device("cuda"), time_budget=30), decision(processes=2, time_budget=30)):
        assert not off[0] and off[1].startswith("off (auto")
    assert decision(compile="on", steps=10) == (True, "on (--compile on)")
    assert decision(compile="off", time_budget=30) == (False, "off (--compile off)")


def test_a_toolchain_that_cannot_compile_means_eager_training_under_auto_and_an_error_under_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
    monkeypatch.setattr(torch, "compile", broken)
    use, why = decision(time_budget=30)
    assert not use and why == "off (auto: torch.compile does not work here: InvalidCxxCompiler: No working C++ " \
                              "compiler found)"
    with pytest.raises(MedsegError, match="--compile on: torch.compile does not work here .*use --compile off"):
        decision(compile="on")


def test_a_compiled_run_trains_the_same_function_as_an_eager_one(phantoms_2d, tmp_path):
    assert compiling.probe() is None, "torch.compile should work on this machine (g++ is installed)"
    runs = {c: train(tiny_config(phantoms_2d, tmp_path / c, compile=c, steps=24, steps_per_epoch=6, lr=1e-2,
                                 threads=1)) for c in ("off", "on")}
    summaries = {c: json.loads((run / "train_summary.json").read_text()) for c, run in runs.items()}
    assert summaries["on"]["compile"] == "on (--compile on)" and summaries["off"]["compile"] == "off (--compile off)"
    losses = {c: [row["train_loss"] for row in json.loads((run / "history.json").read_text())]
              for c, run in runs.items()}
    assert losses["off"][-1] < losses["off"][0]  # it learns, so equal losses say something
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-3)  # same maths; the kernels may round differently


def test_a_frozen_network_predicts_what_the_eager_one_does_with_short_batches_padded():
    from medseg.infer import sliding_window
    from medseg.models import create_model

    torch.manual_seed(0)
    eager = create_model("unet", in_channels=1, num_classes=2, base_channels=4, depth=2, spatial_dims=3,
                         norm="instance").eval()
    frozen = compiling.FrozenNetwork(eager)
    shapes, compiled = [], frozen.compiled
    frozen.compiled = lambda x: shapes.append(tuple(x.shape)) or compiled(x)
    patch, volume = (16, 16, 16), torch.randn(1, 1, 26, 26, 26)  # 3 windows along each axis: 27
    with torch.no_grad():
        expected = sliding_window(eager, volume, patch, 0.5, batch_size=4)
        got = sliding_window(frozen, volume, patch, 0.5, batch_size=4)
    assert float((got - expected).abs().max()) < 1e-4
    assert shapes == [(4, 1, *patch)] * 7  # six batches of 4 windows and one of 3, padded to 4: one graph
    single = volume[..., :16, :16, :16]
    with torch.no_grad():  # three copies padded to 4 (the graph above): the zeros change nothing for the real ones
        triple = frozen(single.repeat(3, 1, 1, 1, 1))
        assert triple.shape[0] == 3 and float((triple - eager(single)).abs().max()) < 1e-4
