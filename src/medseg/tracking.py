"""Optional experiment tracking: TensorBoard scalars (`--tensorboard DIR`) and MLflow (`--mlflow URI`).

Both are off by default and neither package is needed to train; asking for one that is not installed fails
before any work with the pip command that adds it. The run folder stays the record of truth (history.json);
trackers get a copy of each epoch's row, the settings, and the final summary.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from medseg.errors import MedsegError


class Tracker:
    """Made at the start of training (a missing package fails there), started once the run folder exists."""

    def __init__(self, cfg):
        self.cfg, self.writer, self.mlflow = cfg, None, None
        self._writer_class = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise MedsegError("--tensorboard needs the tensorboard package: pip install tensorboard") from exc
            self._writer_class = SummaryWriter
        if cfg.mlflow:
            try:
                import mlflow
            except ImportError as exc:
                raise MedsegError("--mlflow needs the mlflow package: pip install mlflow-skinny (or mlflow)") from exc
            self.mlflow = mlflow

    def start(self, run: Path, mlflow_run_id: str | None = None) -> None:
        """Open the trackers; a resumed run continues its MLflow run (`mlflow_run_id`) and its TensorBoard folder."""
        if self._writer_class:
            self.writer = self._writer_class(log_dir=str(Path(self.cfg.tensorboard) / run.name))
        if self.mlflow:
            self.mlflow.set_tracking_uri(self.cfg.mlflow)
            self.mlflow.set_experiment("medseg")
            if mlflow_run_id:
                self.mlflow.start_run(run_id=mlflow_run_id)
            else:
                self.mlflow.start_run(run_name=run.name)
                self.mlflow.log_params({k: str(v)[:500] for k, v in asdict(self.cfg).items() if k != "progress"})

    @property
    def run_id(self) -> str | None:
        active = self.mlflow.active_run() if self.mlflow else None
        return active.info.run_id if active else None

    def log_epoch(self, row: dict) -> None:
        scalars = {k: float(v) for k, v in row.items()
                   if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()
        if self.mlflow:
            self.mlflow.log_metrics(scalars, step=row["epoch"])

    def finish(self, summary: dict, files: list[Path]) -> None:
        if self.writer:
            self.writer.close()
        if self.mlflow:
            self.mlflow.log_metrics({k: float(summary[k]) for k in ("best_val_dice", "best_epoch", "seconds")
                                     if isinstance(summary.get(k), (int, float))})
            for path in files:
                if path.exists():
                    self.mlflow.log_artifact(str(path))
            self.mlflow.end_run()

    def abort(self) -> None:
        """Close what is open after a failed training, marking the MLflow run as failed."""
        if self.writer:
            self.writer.close()
        if self.mlflow:
            self.mlflow.end_run(status="FAILED")
