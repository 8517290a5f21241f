"""How large an image medseg agrees to read, checked from its header before any array is made.

A 73-byte `.nii.gz` may declare 800^3 float64 voxels, and nibabel then allocates and zero-fills 4 GB before
finding that the data is missing; a PNG header may declare 100,000 x 100,000 pixels; a 16^3 volume declaring
150 mm voxels resamples to 2400^3. Every reader compares the header's voxels (times channels) with a limit sized
for real scans (a 1024 x 1024 x 2000 CT passes), and files whose compression could not hold what they declare
(deflate never inflates more than 1032:1) are refused as damaged or crafted, without inflating them.
The limit: `MEDSEG_MAX_VOXELS` in the environment, or `--max-voxels` on the commands that read images.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from medseg.errors import MedsegError, TooLarge

DEFAULT_MAX_VOXELS = 2**31  # voxels x channels: 1024 x 1024 x 2000 (2.10e9) passes
DEFLATE_RATIO = 1100  # deflate's largest expansion is 1032:1; beyond this a file does not hold what it declares
HEADER_SLACK = 2**20  # bytes a small file may declare beyond its ratio (headers, padding)


def max_voxels() -> int:
    """The limit in force: MEDSEG_MAX_VOXELS when set (a positive whole number), else DEFAULT_MAX_VOXELS."""
    value = os.environ.get("MEDSEG_MAX_VOXELS", "").strip()
    if not value:
        return DEFAULT_MAX_VOXELS
    try:
        limit = int(float(value))
    except ValueError:
        raise MedsegError(f"MEDSEG_MAX_VOXELS={value!r}: give a whole number of voxels, e.g. {DEFAULT_MAX_VOXELS}")
    if limit <= 0:
        raise MedsegError(f"MEDSEG_MAX_VOXELS={value!r}: give a positive number of voxels")
    return limit


def set_max_voxels(limit: int | None) -> None:
    """`--max-voxels N`: the limit for this process and the jobs it starts."""
    if limit is not None:
        if limit <= 0:
            raise MedsegError(f"--max-voxels {limit}: give a positive number of voxels")
        os.environ["MEDSEG_MAX_VOXELS"] = str(int(limit))


def check_voxels(path: str | Path, shape, channels: int = 1, what: str = "declares") -> None:
    """Refuse an image whose header `shape` (times `channels`) is over the limit, before it is read."""
    voxels = math.prod(int(n) for n in shape) * max(1, int(channels))
    limit = max_voxels()
    if voxels > limit:
        sides = " x ".join(str(int(n)) for n in shape) + (f" x {channels} channels" if channels > 1 else "")
        raise TooLarge(f"{Path(path).name}: {what} {sides} = {voxels:,} voxels, over the limit of {limit:,} "
                          "(MEDSEG_MAX_VOXELS or --max-voxels raise it for a real scan this large)")


def check_holds(path: str | Path, declared_bytes: int, compressed: bool) -> None:
    """Refuse a file that cannot hold the bytes its header declares: an uncompressed one shorter than them, a
    deflated one smaller than them over DEFLATE_RATIO (a truncated or crafted file, not a scan)."""
    size = Path(path).stat().st_size
    most = size * DEFLATE_RATIO + HEADER_SLACK if compressed else size
    if declared_bytes > most:
        raise TooLarge(f"{Path(path).name}: its header declares {declared_bytes:,} bytes of voxels, which a "
                          f"{size:,}-byte {'compressed ' if compressed else ''}file cannot hold; the file is "
                          "truncated or not what it claims")
