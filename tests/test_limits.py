"""Images that declare more than they hold (issue 33's memory bombs) are refused from their headers: in under a
second, with under 50 MB of resident memory growth, in one line naming the file."""
import gzip
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io import read_image
from medseg.limits import DEFAULT_MAX_VOXELS
from medseg.transforms import resampled_shape


def nifti_bomb(path: Path, shape, dtype=np.float32) -> Path:
    """A gzipped NIfTI header declaring `shape` with no voxels behind it (73 bytes on disk)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw))
    return path


def png_bomb(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height grey pixels and whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def dicom_file(path: Path, rows: int, columns: int, deflated_zeros: int = 0) -> Path:
    """A CT slice declaring rows x columns; with `deflated_zeros`, a Deflated-transfer-syntax file whose dataset
    inflates to that many bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality = "1.2.3", "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, columns, 1, 16, 16, 15
    ds.PixelRepresentation, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1]
    ds.PixelData = b"\0" * 64
    ds.save_as(path, enforce_file_format=True)
    if deflated_zeros:  # the meta group as written, then a deflated body of zeros under the Deflated syntax
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_file_meta_info

        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        write_file_meta_info(head, meta, enforce_standard=True)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = b"".join(compressor.compress(b"\0" * 2**20) for _ in range(deflated_zeros // 2**20))
        path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body + compressor.flush())
    return path


def test_each_bomb_is_refused_from_its_header(tmp_path):
    bombs = {
        "nifti_2000_cubed": nifti_bomb(tmp_path / "a.nii.gz", (2000, 2000, 2000)),
        "nifti_truncated": nifti_bomb(tmp_path / "b.nii.gz", (800, 800, 800), np.float64),  # under the voxel limit
        "png_ihdr": png_bomb(tmp_path / "c.png", 100_000, 100_000),
        "png_deflate": png_bomb(tmp_path / "d.png", 40_000, 40_000),  # 1.6e9 pixels, 100 bytes of data
    }
    (tmp_path / "e").mkdir()
    dicom_file(tmp_path / "e" / "huge.dcm", 60_000, 60_000)
    bombs["dicom_rows_columns"] = tmp_path / "e"
    (tmp_path / "f").mkdir()
    dicom_file(tmp_path / "f" / "deflated.dcm", 512, 512, deflated_zeros=300 * 2**20)
    bombs["dicom_deflated"] = tmp_path / "f"
    for name, path in bombs.items():
        with pytest.raises(MedsegError) as refused:
            read_image(path)
        assert "\n" not in str(refused.value) and ("limit" in str(refused.value) or "cannot hold" in str(refused.value)
                                                   or "inflating" in str(refused.value)), name
    with pytest.raises(MedsegError, match="resampled to 1 x 1 x 1 mm makes 2400 x 2400 x 2400"):
        resampled_shape((16, 16, 16), (150.0, 150.0, 150.0), [1.0, 1.0, 1.0])  # a header claiming 150 mm voxels


def test_bombs_cost_under_a_second_and_50_mb(tmp_path):
    """Measured in a fresh process whose address space is capped at 4 GB: a reader that allocated what a bomb
    declares fails there with MemoryError, not with medseg's one line."""
    nifti_bomb(tmp_path / "a.nii.gz", (2000, 2000, 2000))
    nifti_bomb(tmp_path / "b.nii.gz", (800, 800, 800), np.float64)
    png_bomb(tmp_path / "c.png", 40_000, 40_000)
    (tmp_path / "e").mkdir()
    dicom_file(tmp_path / "e" / "huge.dcm", 60_000, 60_000)
    (tmp_path / "f").mkdir()
    dicom_file(tmp_path / "f" / "deflated.dcm", 512, 512, deflated_zeros=300 * 2**20)
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "small.nii.gz"))
    script = f"""
import json, resource, time
resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
import numpy as np
from medseg.io import read_image
from medseg.errors import MedsegError
from medseg.transforms import resampled_shape, resize_volume
read_image({str(tmp_path / 'small.nii.gz')!r})  # imports and first allocations, not counted
out = {{}}
for name in ("a.nii.gz", "b.nii.gz", "c.png", "e", "f", "150 mm voxels"):
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:
        if name == "150 mm voxels":
            resize_volume(np.zeros((1, 16, 16, 16), np.float32), resampled_shape((16, 16, 16), (150.0,) * 3, [1.0] * 3))
        else:
            read_image({str(tmp_path)!r} + "/" + name)
        outcome = "read"
    except MedsegError:
        outcome = "refused"
    except Exception as exc:
        outcome = type(exc).__name__
    out[name] = [outcome, time.perf_counter() - started,
                 (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEDSEG_MAX_VOXELS": str(DEFAULT_MAX_VOXELS)})
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (outcome, seconds, growth_mb) in results.items():
        assert outcome == "refused" and seconds < 1.0 and growth_mb < 50, (name, outcome, seconds, growth_mb)


def test_real_scans_pass_and_the_limit_is_the_users(tmp_path, monkeypatch):
    """The default lets a 1024 x 1024 x 2000 CT through (checked from its header); MEDSEG_MAX_VOXELS lowers it."""
    from medseg.limits import check_voxels

    check_voxels("ct.nii.gz", (1024, 1024, 2000))
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert read_image(tmp_path / "v.nii.gz").array.shape == (1, 20, 20, 20)
    monkeypatch.setenv("MEDSEG_MAX_VOXELS", "7999")
    with pytest.raises(MedsegError, match="20 x 20 x 20 = 8,000 voxels, over the limit of 7,999"):
        read_image(tmp_path / "v.nii.gz")
