"""The one zip extractor (model packages, uploaded DICOM series) refuses zip slip and zip bombs before writing."""
import zipfile

import pytest

from medseg.errors import MedsegError
from medseg.io import extract_zip


def test_a_member_outside_the_archive_is_refused_and_nothing_is_written(tmp_path):
    archive = tmp_path / "slip.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("fine.txt", "ok")
        z.writestr("../../escaped.txt", "no")
    with pytest.raises(MedsegError, match="outside the archive"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_a_zip_bomb_is_refused_by_its_unpacked_size(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", b"\0" * 20_000_000)  # 20 MB of zeros packs into ~20 kB
    assert archive.stat().st_size < 100_000
    with pytest.raises(MedsegError, match="GiB unpacked"):
        extract_zip(archive, tmp_path / "out", max_bytes=10_000_000)
    assert not (tmp_path / "out").exists()


def test_too_many_files_are_refused_and_a_fair_archive_unpacks(tmp_path):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(30):
            z.writestr(f"slice{i:03d}.dcm", b"x")
    with pytest.raises(MedsegError, match="30 files, more than the 20 allowed"):
        extract_zip(archive, tmp_path / "out", max_files=20)
    assert len(list(extract_zip(archive, tmp_path / "ok").iterdir())) == 30
