"""SHA-256 manifests of exported directories. A safetensors file carries no checksum, so a flipped byte in a weight
loads without a word; every directory an export writes gets a manifest of its files' digests, and lit_align's
loaders check it before reading the directory. The manifest is in ``sha256sum``'s format: inside the directory,
``sha256sum -c lit_align_checksums.sha256`` checks it by hand."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MANIFEST = "lit_align_checksums.sha256"

_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_verified: set[tuple[str, str, int, int]] = set()  # (file, digest, size, mtime): checked once per process


class ChecksumError(RuntimeError):
    """A file of an exported directory is missing or no longer has the SHA-256 digest its manifest recorded."""


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 digest of the file at ``path``, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write :data:`MANIFEST` into ``directory``, listing every file directly in it (a sub-directory that an export
    writes gets its own). Returns the manifest's path."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    partial = manifest.with_name(f".{MANIFEST}.partial")
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (manifest.name, partial.name))
    partial.write_text("".join(f"{file_sha256(directory / name)}  {name}\n" for name in names), encoding="utf-8")
    os.replace(partial, manifest)  # a reader sees the old manifest or the whole new one
    return manifest


def verify_checksums(directory: str | os.PathLike) -> None:
    """Check every file listed in ``directory``'s manifest, if it has one, and raise a :class:`ChecksumError` naming
    the first that is missing or whose digest differs. A directory without a manifest (a hub model, someone else's
    export) is not checked."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        match = _LINE.fullmatch(line)
        if match is None or match[2] in (".", "..") or Path(match[2]).name != match[2]:
            raise ChecksumError(f"{manifest}, line {number}: not '<sha256>  <file name>' ({line[:80]!r})")
        expected, path = match[1], directory / match[2]
        if not path.is_file():
            raise ChecksumError(f"{path} is missing: the export's manifest {manifest} lists it")
        stat = path.stat()
        key = (str(path.resolve()), expected, stat.st_size, stat.st_mtime_ns)
        if key in _verified:
            continue
        if file_sha256(path) != expected:
            raise ChecksumError(
                f"{path} is corrupted: its SHA-256 differs from the one recorded in {manifest} when it was exported. "
                "Restore the file or export again."
            )
        _verified.add(key)
