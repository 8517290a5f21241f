"""torch.compile of the training step: when `auto` uses it, that a compiled run trains the same function as an
eager one, and that a machine where compiling fails trains eagerly with the reason said. For prediction: the frozen
network's padding, and which shapes `--engine auto` compiles and when."""
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


class _FakeClock:
    """perf_counter for AdaptiveNetwork: every eager call takes exactly one second."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_auto_engine_compiles_a_shape_only_once_it_has_cost_a_compile_eagerly(monkeypatch, capsys):
    compiles, frozen_calls = [], []

    class Frozen:  # stands for FrozenNetwork (a real one is tested above)
        def __init__(self, model):
            compiles.append(model)

        def __call__(self, x):
            frozen_calls.append(tuple(x.shape))
            return x * 0

    monkeypatch.setattr(compiling, "FrozenNetwork", Frozen)
    monkeypatch.setattr(compiling, "probe", lambda: None)
    monkeypatch.setattr(compiling, "time", _FakeClock())
    network = compiling.AdaptiveNetwork(torch.nn.Identity(), after_seconds=3)
    four, three, other = torch.ones(4, 1, 8, 8), torch.ones(3, 1, 8, 8), torch.ones(4, 1, 16, 16)
    for x in (four, three, four):  # 3 eager seconds on the padded shape (4, 1, 8, 8): batches of 3 count too
        assert torch.equal(network(x), x)
    assert network(other).sum() > 0 and not compiles  # another shape has its own account
    assert network(three).sum() == 0 and network(four).sum() == 0  # compiled from the 4th call of that shape
    assert len(compiles) == 1 and frozen_calls == [(3, 1, 8, 8), (4, 1, 8, 8)]
    assert network(other).sum() > 0  # 2 seconds so far: still eager
    assert capsys.readouterr().err.count("--engine auto: compiling the network for inputs of shape [4, 1, 8, 8]") == 1


def test_auto_engine_stays_eager_and_says_so_where_nothing_compiles(monkeypatch, capsys):
    monkeypatch.setattr(compiling, "probe", lambda: "InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(compiling, "time", _FakeClock())
    network = compiling.AdaptiveNetwork(torch.nn.Identity(), after_seconds=1)
    x = torch.ones(2, 1, 4, 4)
    assert all(torch.equal(network(x), x) for _ in range(5))
    assert network.frozen is None
    assert capsys.readouterr().err.count("staying eager, torch.compile does not work here (InvalidCxxCompiler") == 1


def test_auto_engine_leaves_networks_on_a_gpu_as_they_are():
    class Member:
        def __init__(self, device):
            self.device, self.model = torch.device(device), torch.nn.Identity()

    cpu, gpu = compiling.adapt_for_inference([Member("cpu"), Member("cuda")])
    assert isinstance(cpu.model, compiling.AdaptiveNetwork) and isinstance(gpu.model, torch.nn.Identity)


def test_auto_engine_compiles_after_the_first_batch_when_the_known_work_ahead_pays_for_it(monkeypatch):
    monkeypatch.setattr(compiling, "FrozenNetwork", lambda model: (lambda x: x * 0))
    monkeypatch.setattr(compiling, "probe", lambda: None)
    monkeypatch.setattr(compiling, "time", _FakeClock())
    x = torch.ones(2, 1, 4, 4)
    long_volume = compiling.AdaptiveNetwork(torch.nn.Identity(), after_seconds=5)
    long_volume.expect(6)  # 1 s per call measured on the first: 5 s ahead, the compile pays
    assert long_volume(x).sum() > 0 and long_volume(x).sum() == 0
    short_volume = compiling.AdaptiveNetwork(torch.nn.Identity(), after_seconds=5)
    short_volume.expect(5)  # 4 s ahead: eager to the end
    assert all(short_volume(x).sum() > 0 for _ in range(5))
