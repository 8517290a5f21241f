"""A run survives being killed, a damaged checkpoint and a full disk: it resumes to the weights it would have had."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from medseg.checkpoint import load_run, read_checkpoint, read_checkpoint_or_previous
from medseg.cli import main
from medseg.errors import MedsegError
from medseg.synth import write_synthetic_dataset

# one thread: the same operations in the same order give the same bits, so "equal" below means bit for bit
SHORT_RUN = ["--recipe", "seed", "--base-channels", "4", "--depth", "2", "--size", "32", "--batch-size", "4",
             "--lr", "1e-2", "--steps", "120", "--steps-per-epoch", "3", "--patience", "0", "--threads", "1",
             "--quiet"]


def medseg(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medseg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("resume_data"), cases=24, dim=2, size=32)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume_runs") / "whole"
    done = medseg("train", data, "--out", run, *SHORT_RUN)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    return run


def weights(path: Path) -> dict:
    return read_checkpoint(path)["model"]


def test_killed_five_times_and_resumed_the_run_ends_with_the_weights_of_one_never_killed(data, uninterrupted,
                                                                                          tmp_path):
    run, chance, kills = tmp_path / "killed", random.Random(12), 0
    job = medseg("train", data, "--out", run, *SHORT_RUN)
    while not (run / "config.json").exists():  # before config.json there is no run to resume, only to restart
        assert job.poll() is None, job.stderr.read()
        time.sleep(0.05)
    while kills < 5:
        time.sleep(chance.uniform(0.2, 2.5))  # anywhere: loading, mid-epoch, mid-validation, mid-write
        assert job.poll() is None, "the run finished before it could be killed five times; lengthen SHORT_RUN"
        job.send_signal(signal.SIGKILL)
        job.wait()
        kills += 1
        job = medseg("train", "--resume", run, "--quiet")
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert "resuming" in out
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 41))  # 120 steps / 3: no gap, no repeat
    assert (run / "history.csv").read_text().count("\n") == 41
    whole, resumed = weights(uninterrupted / "last.pt"), weights(run / "last.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert all(torch.equal(a, b) for a, b in zip(weights(uninterrupted / "best.pt").values(),
                                                 weights(run / "best.pt").values()))
    assert json.loads((run / "train_summary.json").read_text())["best_val_dice"] == \
        json.loads((uninterrupted / "train_summary.json").read_text())["best_val_dice"]
    assert not list(run.glob(".tmp-*"))


# the run dies (as under SIGKILL) on the second of the two checkpoint writes of epoch TARGET, whichever comes second
DIE_BETWEEN_WRITES = """
import importlib, os, sys
train = importlib.import_module("medseg.train")  # the module: the package exports a function of that name
TARGET, written, save = int(sys.argv[1]), [], train.save_checkpoint
def dying_save(path, state, **kwargs):
    written.append(state["epoch"])
    if written.count(TARGET) == 2:
        os._exit(9)
    save(path, state, **kwargs)
train.save_checkpoint = dying_save
from medseg.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_killed_between_the_best_and_last_checkpoint_writes_the_resumed_best_is_the_true_best(data, uninterrupted,
                                                                                               tmp_path):
    best_epoch = json.loads((uninterrupted / "train_summary.json").read_text())["best_epoch"]
    assert best_epoch > 1, "the short run should improve after its first epoch"
    run = tmp_path / "between"
    died = subprocess.run([sys.executable, "-c", DIE_BETWEEN_WRITES, str(best_epoch), "train", str(data), "--out",
                           str(run), *SHORT_RUN], capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert read_checkpoint(run / "best.pt")["epoch"] == best_epoch
    assert all(torch.equal(a, b) for a, b in zip(weights(uninterrupted / "best.pt").values(),
                                                 weights(run / "best.pt").values()))


def stopped_copy(uninterrupted: Path, out: Path) -> Path:
    """The uninterrupted run as it would look killed after its last epoch, before its post-processing."""
    shutil.copytree(uninterrupted, out)
    for name in ("train_summary.json", "postprocessing.json", "curves.png"):
        (out / name).unlink()
    return out


def test_an_unfinished_run_is_not_evaluated_or_used_without_a_word(uninterrupted, tmp_path):
    run = stopped_copy(uninterrupted, tmp_path / "stopped")
    with pytest.raises(MedsegError, match="training did not finish .* .medseg train --resume"):
        load_run(run)
    assert main(["evaluate", str(run), "--quiet"]) == 2
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # nothing left to train: decides, summarises
    assert json.loads((run / "postprocessing.json").read_text())["classes"] == \
        json.loads((uninterrupted / "postprocessing.json").read_text())["classes"]
    with pytest.raises(MedsegError, match="finished already"):
        from medseg.resume import resume_run
        resume_run(run)


def flip_tensor_bytes(path: Path) -> None:
    """Change bytes inside the largest stored tensor, leaving the zip container readable."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(handle.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        handle.seek(start)
        chunk = handle.read(8)
        handle.seek(start)
        handle.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize("damage", ["truncated", "bytes flipped", "zero bytes"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_is_used(uninterrupted, tmp_path, capsys, damage):
    run = stopped_copy(uninterrupted, tmp_path / "damaged")
    last = run / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "zero bytes":
        last.write_bytes(b"")
    else:
        flip_tensor_bytes(last)
    with pytest.raises(MedsegError, match=r"last.pt: .*(damaged|cannot be read)"):
        read_checkpoint(last)
    state, used = read_checkpoint_or_previous(last)
    assert used.name == "last.prev.pt" and state["epoch"] == 39
    assert "last.pt" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # epoch 40 again, from epoch 39's checkpoint
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 41))
    whole, resumed = weights(uninterrupted / "last.pt"), weights(run / "last.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_damaged_checkpoint_without_a_previous_one_is_refused_by_name(uninterrupted, tmp_path):
    run = tmp_path / "alone"
    shutil.copytree(uninterrupted, run)
    (run / "best.prev.pt").unlink()
    flip_tensor_bytes(run / "best.pt")
    with pytest.raises(MedsegError, match=r"best.pt: .*(damaged|cannot be read)"):
        load_run(run)
    assert main(["predict", str(run), str(run), "--out", str(tmp_path / "pred"), "--quiet"]) == 2


def can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def test_a_full_disk_stops_training_with_one_line_and_keeps_every_earlier_file(data, uninterrupted, tmp_path):
    if not can_mount_tmpfs():
        pytest.skip("needs a small tmpfs: 'unshare -rm' (user and mount namespaces) is not allowed here")
    checkpoint = (uninterrupted / "last.pt").stat().st_size
    disk = tmp_path / "small_disk"
    disk.mkdir()
    # room for the run's small files and about three checkpoints: a few epochs fit, then a write fails
    size_kb = (3 * checkpoint + 48 * 1024) // 1024
    command = (f"mount -t tmpfs -o size={size_kb}k none {disk} && {sys.executable} -m medseg train {data} --out "
               f"{disk}/run {' '.join(SHORT_RUN)}; status=$?; cp -a {disk}/run {tmp_path}/kept; exit $status")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "the disk is full" in message[0] and "Traceback" not in done.stderr
    kept = tmp_path / "kept"
    config = json.loads((kept / "config.json").read_text())
    assert config["steps"] == 120
    state, _ = read_checkpoint_or_previous(kept / "last.pt")  # whole, checksum verified
    history = json.loads((kept / "history.json").read_text())
    assert 1 <= state["epoch"] < 40 and len(history) >= state["epoch"] - 1
    assert not list(kept.glob(".tmp-*"))


def test_out_of_accelerator_memory_names_the_batch_and_what_to_lower(data, tmp_path, monkeypatch):
    from conftest import tiny_config
    from medseg.train import train

    def exhausted(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    from medseg.models.unet import UNet
    monkeypatch.setattr(UNet, "forward", exhausted)
    with pytest.raises(MedsegError, match=r"out of CPU memory training batches of 4 32x32 slices at width 4 .*"
                                          r"lower --batch-size \(now 4\), then --size or --base-channels"):
        train(tiny_config(data, tmp_path / "oom"))


def test_resume_refuses_what_it_cannot_continue(data, tmp_path):
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert main(["train", str(data), "--resume", str(tmp_path / "nothing")]) == 2
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MedsegError, match="no config.json"):
        from medseg.resume import resume_run
        resume_run(tmp_path / "empty")


def test_a_stopped_ensemble_resumes_its_unfinished_members_and_becomes_an_ensemble(uninterrupted, tmp_path):
    from medseg.autotrain import resume
    from medseg.ensemble import is_ensemble

    folder = tmp_path / "planned"
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps({"configurations": {"auto": {"members": {"one": {}, "two": {}}}}}))
    shutil.copytree(uninterrupted, folder / "one")  # finished before the stop
    stopped_copy(uninterrupted, folder / "two")  # stopped after its last epoch
    assert resume(folder, progress=False) == folder
    assert is_ensemble(folder) and (folder / "two" / "train_summary.json").exists()
    assert main(["evaluate", str(folder), "--quiet", "--figures", "0"]) == 0
