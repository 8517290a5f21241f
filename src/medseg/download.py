"""`medseg download TASK`: fetch a Medical Segmentation Decathlon task, resumable and checksum-verified.

The archive is downloaded to `DEST/TASK.tar.part` (an interrupted download resumes with an HTTP Range request),
renamed `DEST/TASK.tar` when complete, checked against the MD5 published with the MONAI mirror of the decathlon,
then unpacked into `DEST/TASK`. An archive placed at `DEST/TASK.tar` by hand is verified and unpacked the same way.
Offline, or when the server cannot be reached, it stops with a message saying how to get the archive by hand.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from medseg.console import show_bars
from medseg.errors import MedsegError

MSD_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com"
MSD_MD5 = {
    "Task01_BrainTumour": "240a19d752f0d9e9101544901065d872",
    "Task02_Heart": "06ee59366e1e5124267b774dbd654057",
    "Task03_Liver": "a90ec6c4aa7f6a3d087205e23d4e6397",
    "Task04_Hippocampus": "9d24dba78a72977dbd1d2e110310f31b",
    "Task05_Prostate": "35138f08b1efaef89d7424d2bcc928db",
    "Task06_Lung": "8afd997733c7fc0432f71255ba4e52dc",
    "Task07_Pancreas": "4f7080cfca169fa8066d17ce6eb061e4",
    "Task08_HepaticVessel": "641d79e80ec66453921d997fbf12a29c",
    "Task09_Spleen": "410d4a301da4e5b2f6f86ec3ddba524e",
    "Task10_Colon": "bad7a188931dc2f6acf72b08eb6202d0",
}


def resolve_task(name: str) -> str:
    """'Task04_Hippocampus', 'Task04', '4' and 'hippocampus' all name the same task."""
    wanted = name.strip().lower()
    for task in MSD_MD5:
        number, organ = task[4:6], task[7:].lower()
        if wanted in (task.lower(), f"task{number}", number, number.lstrip("0"), organ):
            return task
    raise MedsegError(f"unknown task {name!r}; choose one of {', '.join(MSD_MD5)}")


def download_task(name: str, dest: str | Path = ".", base_url: str = MSD_URL, md5: str | None = None,
                  timeout: float = 30, progress: bool = True) -> Path:
    """Download and unpack a decathlon task into DEST/TASK; return that folder. Safe to run again."""
    task = resolve_task(name)
    dest = Path(dest)
    target = dest / task
    if (target / "dataset.json").exists():
        return target
    url = f"{base_url.rstrip('/')}/{task}.tar"
    archive = dest / f"{task}.tar"  # where a download finishes, or where a user puts an archive fetched by hand
    if not archive.exists():
        partial = dest / f"{task}.tar.part"
        _fetch(url, partial, timeout, progress)
        partial.replace(archive)
    expected = md5 or MSD_MD5[task]
    actual = file_md5(archive)
    if actual != expected:
        archive.unlink()
        raise MedsegError(f"{archive}: checksum mismatch (MD5 {actual}, expected {expected}); the corrupt archive "
                          "was deleted, run the command again")
    _unpack(archive, dest, task)
    archive.unlink()
    return target


def _fetch(url: str, partial: Path, timeout: float, progress: bool) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            partial.parent.mkdir(parents=True, exist_ok=True)
            resumed = response.status == 206
            mode = "ab" if resumed else "wb"  # a server that ignores Range sends everything again
            total = int(response.headers.get("Content-Length", 0)) + (have if resumed else 0)
            with open(partial, mode) as handle, tqdm(total=total or None, initial=have if resumed else 0,
                                                     unit="B", unit_scale=True, disable=not show_bars(progress),
                                                     desc=partial.name[:-5]) as bar:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the previous download had finished
            return
        raise MedsegError(f"{url}: server answered {exc.code} {exc.reason}; try again later") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MedsegError(f"{url}: cannot download ({reason}); are you offline? Save that file by hand as "
                          f"{partial.with_suffix('')} and run the command again to verify and unpack it") from exc


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _unpack(archive: Path, dest: Path, task: str) -> None:
    """Unpack into a staging folder (skipping macOS '._' files), then move the task folder in place."""
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".unpack-"))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if not Path(m.name).name.startswith("._")]
            tar.extractall(staging, members=members, filter="data")  # "data" refuses paths outside staging
        unpacked = staging / task
        if not (unpacked / "dataset.json").exists():
            raise MedsegError(f"{archive}: archive has no {task}/dataset.json; it is not a decathlon task")
        unpacked.rename(dest / task)
    except tarfile.TarError as exc:
        raise MedsegError(f"{archive}: archive cannot be unpacked ({exc}); delete it and download again") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
