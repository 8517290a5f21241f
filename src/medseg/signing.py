"""Signed model packages: who exported a package, not only whether it was damaged.

A package's manifest (package.json) lists a SHA-256 for every file, which catches damage but not tampering: whoever
changes a file can rewrite its hash. `medseg export --sign KEY` signs the manifest's bytes with an Ed25519 private
key and writes the signature beside it (package.sig); `predict`, `evaluate`, `serve` and `pacs` with `--trust
PUBKEY` (or MEDSEG_TRUST_KEY) refuse a package that is unsigned, signed by another key, or whose manifest changed
since it was signed. `medseg keygen PATH` makes a key pair (PATH private, 0600; PATH.pub public).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from medseg.errors import MedsegError

SIGNATURE = "package.sig"
TRUST_ENV = "MEDSEG_TRUST_KEY"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    except ImportError as exc:
        raise MedsegError("signed packages need the cryptography package: pip install cryptography") from exc
    return InvalidSignature, serialization, Ed25519PrivateKey, Ed25519PublicKey


def keygen(path: str | Path) -> tuple[Path, Path]:
    """Write an Ed25519 key pair: PATH (private, PEM, mode 0600) and PATH.pub (public, PEM)."""
    _, serialization, private_type, _ = _crypto()
    path = Path(path)
    if path.exists() or Path(f"{path}.pub").exists():
        raise MedsegError(f"{path}: a key is there already; choose another path (keys are never overwritten)")
    key = private_type.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as out:
        out.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(f"{path}.pub").write_bytes(public)
    return path, Path(f"{path}.pub")


def sign(manifest_bytes: bytes, private_key: str | Path) -> dict:
    """The signature record of a manifest: the algorithm, the key's fingerprint and the signature."""
    _, serialization, private_type, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise MedsegError(f"--sign {private_key}: not an unencrypted Ed25519 private key in PEM ({type(exc).__name__})"
                          "; make one with 'medseg keygen PATH'") from exc
    if not isinstance(key, private_type):
        raise MedsegError(f"--sign {private_key}: an {type(key).__name__}, not an Ed25519 key")
    return {"algorithm": "ed25519", "key": fingerprint(key.public_key()),
            "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}


def fingerprint(public_key) -> str:
    """SHA-256 of the raw public key, hex: names a key in a signature and in error lines."""
    _, serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def trusted_key(path: str | Path | None = None):
    """The public key packages must be signed with (`path`, else MEDSEG_TRUST_KEY), or None when none is set."""
    path = path or os.environ.get(TRUST_ENV)
    if not path:
        return None
    _, serialization, _, public_type = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise MedsegError(f"--trust {path}: not a public key in PEM ({type(exc).__name__}); use the .pub file "
                          "'medseg keygen' wrote") from exc
    if not isinstance(key, public_type):
        raise MedsegError(f"--trust {path}: an {type(key).__name__}, not an Ed25519 key")
    return key


def verify(folder: Path, shown: Path, key) -> None:
    """Refuse the package in FOLDER unless its manifest carries a valid signature by `key`."""
    invalid, _, _, _ = _crypto()
    record_path = folder / SIGNATURE
    if not record_path.is_file():
        raise MedsegError(f"{shown}: not signed, and a trusted key is set (--trust or {TRUST_ENV}); refused")
    try:
        record = json.loads(record_path.read_text())
        signature = base64.b64decode(record["signature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedsegError(f"{shown}: {SIGNATURE} cannot be read; refused") from exc
    try:
        key.verify(signature, (folder / "package.json").read_bytes())
    except invalid:
        raise MedsegError(f"{shown}: its signature does not match (signed by key {record.get('key')}, trusted key "
                          f"{fingerprint(key)}), or its manifest changed after signing; refused") from None
