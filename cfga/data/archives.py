"""Reading archives safely: tar members and paths that stay inside the dataset root, md5 checks,
and the extraction of a dataset's images.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from cfga.data.manifest import DatasetError, ManifestRow, _require_file
from cfga.files import md5_file

# Everything a damaged gzip/tar stream can raise while being read.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError)






def _corrupt(path: Path, err: BaseException) -> DatasetError:
    return DatasetError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {err}); re-download the archive."
    )


def _safe_relpath(p: str, source: str) -> str:
    """Normalised POSIX relative path; refuses absolute names and '..' (path traversal)."""
    if not p or p.startswith(("/", "\\")) or (len(p) > 1 and p[1] == ":") or "\\" in p:
        raise DatasetError(f"{source}: unsafe or empty image path {p!r}; the file is malformed.")
    parts = [q for q in PurePosixPath(p).parts if q != "."]
    if not parts or ".." in parts:
        raise DatasetError(f"{source}: unsafe image path {p!r} (contains '..'); refusing it.")
    return "/".join(parts)


def _member_name(name: str) -> str:
    # Some tar writers prefix members with './'.
    while name.startswith("./"):
        name = name[2:]
    return name


def verify_md5(path: str | os.PathLike, expected: str | None) -> None:
    """Check the md5 of ``path``; no-op when ``expected`` is None."""
    if expected is None:
        return
    path = Path(path)
    _require_file(path, "Archive")
    actual = md5_file(path)
    if actual.lower() != str(expected).strip().lower():
        raise DatasetError(
            f"md5 mismatch for {path}: expected {expected}, actual {actual}. "
            "re-download the archive or remove the md5: entry for your own archive."
        )


def _iter_tar(path: Path, drain: bool = True) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Stream the members of a .tgz once, in archive order.

    gzip.GzipFile (not tarfile's own stream) does the decompression because it raises on a
    truncated stream and checks the CRC; ``drain`` reads to the end of the gzip stream so the
    CRC check runs even though tar stops at its end-of-archive marker. Read a member's bytes with
    ``_read_member`` before advancing.
    """
    _require_file(path, "Archive")
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raise DatasetError(f"{path} is not a gzip-compressed tar (.tgz); re-download the archive.")
        raw.seek(0)
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            tf = tarfile.open(fileobj=gz, mode="r|")
        except _READ_ERRORS as err:
            raise _corrupt(path, err) from err
        with tf:
            it = iter(tf)
            while True:
                try:
                    member = next(it)
                except StopIteration:
                    break
                except _READ_ERRORS as err:
                    raise _corrupt(path, err) from err
                yield member, tf
            if drain:
                try:
                    while gz.read(1 << 20):
                        pass
                except _READ_ERRORS as err:
                    raise _corrupt(path, err) from err


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    try:
        fh = tf.extractfile(member)
        if fh is None:
            raise DatasetError(f"{path}: member {member.name} is not a regular file.")
        data = fh.read()
    except _READ_ERRORS as err:
        raise _corrupt(path, err) from err
    if len(data) != member.size:
        raise _corrupt(path, EOFError(f"short read of {member.name}"))
    return data


def _list_members(path: Path) -> set[str]:
    return {_member_name(m.name) for m, _ in _iter_tar(path, drain=True) if m.isfile()}


def extract_images(
    archive_path: str | os.PathLike,
    rows: Sequence[ManifestRow],
    dest_root: str | os.PathLike,
    strip_prefix: str = "",
) -> None:
    """Extract exactly the manifest's images so that ``dest_root / row.path`` exists.

    Member names lose ``strip_prefix`` ('CUB_200_2011/' for CUB, '' for Cars). One streaming
    pass; writes into a temp dir beside ``dest_root`` and renames it on success (replacing an
    old ``dest_root``), so a failure leaves nothing half-extracted.
    """
    from tqdm import tqdm

    archive_path, dest_root = Path(archive_path), Path(dest_root)
    _require_file(archive_path, "Archive")
    prefix = strip_prefix.strip("/")
    prefix = prefix + "/" if prefix else ""
    wanted: set[str] = set()
    for r in rows:
        p = _safe_relpath(r.path, "manifest")
        if p in wanted:
            raise DatasetError(f"manifest lists {p} twice")
        wanted.add(p)

    dest_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_root.name}.", suffix=".tmp", dir=dest_root.parent))
    try:
        found: set[str] = set()
        made: set[Path] = set()
        with tqdm(total=len(wanted), desc=f"extract {archive_path.name}", unit="img", mininterval=2.0) as bar:
            for member, tf in _iter_tar(archive_path, drain=True):
                name = _member_name(member.name)
                if not name.startswith(prefix):
                    continue
                rel = name[len(prefix):]
                if rel not in wanted:
                    continue  # unknown members (attributes/, parts/, ...) and anything unsafe
                if not member.isfile():
                    raise DatasetError(f"{archive_path}: {member.name} is not a regular file; re-download.")
                data = _read_member(tf, member, archive_path)
                target = tmp / rel
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                target.write_bytes(data)
                if rel not in found:
                    found.add(rel)
                    bar.update()
        missing = sorted(wanted - found)
        if missing:
            raise DatasetError(
                f"{archive_path}: {len(missing)} image(s) of the manifest are not in the archive "
                f"(e.g. {missing[:3]}); re-download the archive."
            )
        if dest_root.is_symlink() or dest_root.is_file():
            dest_root.unlink()
        elif dest_root.exists():
            shutil.rmtree(dest_root)
        os.replace(tmp, dest_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
