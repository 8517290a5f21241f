import sys

import pytest

from medseg.errors import MedsegError
from medseg.train import train

from conftest import tiny_config


def test_tensorboard_scalars_per_epoch(phantoms_2d, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_config(phantoms_2d, tmp_path / "tb_run", tensorboard=str(tmp_path / "tb"), patience=0))
    events = EventAccumulator(str(tmp_path / "tb" / run.name))
    events.Reload()
    assert {"train_loss", "val_dice", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val_dice")] == [1, 2]


def test_mlflow_run_with_params_metrics_and_artifacts(phantoms_2d, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's database store keeps artifacts in ./mlruns

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train(tiny_config(phantoms_2d, tmp_path / "ml_run", mlflow=uri, patience=0))
    client = MlflowClient(tracking_uri=uri)
    [found] = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert found.info.status == "FINISHED" and found.data.params["lr"] == "0.001"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "val_dice")] == [1, 2]
    assert "best_val_dice" in found.data.metrics
    assert {"curves.png", "train_summary.json"} <= {a.path for a in client.list_artifacts(found.info.run_id)}


@pytest.mark.parametrize("flag, module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_tracking_package_fails_before_any_work(phantoms_2d, tmp_path, monkeypatch, flag, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(MedsegError, match="pip install"):
        train(tiny_config(phantoms_2d, tmp_path / "run", **{flag: str(tmp_path / "t")}))
    assert not (tmp_path / "run").exists()
