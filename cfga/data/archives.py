"""Reading archives safely: tar and zip members and paths that stay inside the dataset root, md5
checks, and the extraction (or copy, from a folder) of a dataset's images.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from cfga.data.manifest import DatasetError, ManifestRow, _require_file
from cfga.files import md5_file

# Everything a damaged gzip/tar stream can raise while being read.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError)
# ... and a damaged zip (NotImplementedError: a compression method zipfile lacks).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError, NotImplementedError)

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
    wanted = _wanted_paths(rows)
    with _staged_dir(dest_root) as tmp:
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
        _check_all_found(archive_path, wanted, found)


def _wanted_paths(rows: Sequence[ManifestRow]) -> set[str]:
    wanted: set[str] = set()
    for r in rows:
        p = _safe_relpath(r.path, "manifest")
        if p in wanted:
            raise DatasetError(f"manifest lists {p} twice")
        wanted.add(p)
    return wanted


def _check_all_found(source: Path, wanted: set[str], found: set[str]) -> None:
    missing = sorted(wanted - found)
    if missing:
        raise DatasetError(
            f"{source}: {len(missing)} image(s) of the manifest are not in the archive "
            f"(e.g. {missing[:3]}); re-download the archive."
        )


@contextlib.contextmanager
def _staged_dir(dest_root: Path) -> Iterator[Path]:
    """A temp dir beside ``dest_root``, renamed onto it (replacing an old one) if the block
    succeeds and removed otherwise: a failure leaves nothing half-extracted."""
    dest_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_root.name}.", suffix=".tmp", dir=dest_root.parent))
    try:
        yield tmp
        if dest_root.is_symlink() or dest_root.is_file():
            dest_root.unlink()
        elif dest_root.exists():
            shutil.rmtree(dest_root)
        os.replace(tmp, dest_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_image_header(data: bytes, source: str, fix: str) -> None:
    """Refuse bytes whose header PIL cannot identify (not an image, or cut before its header).

    Header only: a file whose pixel data is damaged further on fails at extraction, where
    ``cfga.extraction.preprocess.load_rgb`` names it.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 (parsed from the header)
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise DatasetError(f"{source}: not a readable image ({type(err).__name__}: {err}); {fix}") from None


# --------------------------------------------------------------------------------------------
# zip archives (Stanford Online Products, In-Shop)


def _zip_corrupt(path: Path, err: BaseException) -> DatasetError:
    return DatasetError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {err}); re-download the archive."
    )


@contextlib.contextmanager
def open_zip(path: str | os.PathLike) -> Iterator[zipfile.ZipFile]:
    """The zip at ``path``; a missing, truncated or non-zip file raises DatasetError naming it."""
    path = Path(path)
    _require_file(path, "Archive")
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        raise _zip_corrupt(path, err) from None
    with zf:
        yield zf


def zip_is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """The bytes of one zip member, CRC-checked; a damaged member raises DatasetError."""
    if info.is_dir() or zip_is_symlink(info):
        raise DatasetError(f"{path}: member {info.filename} is not a regular file; re-download the archive.")
    if info.flag_bits & 0x1:
        raise DatasetError(f"{path}: member {info.filename} is encrypted; unpack the archive with its password "
                           "and give the unpacked folder instead (see README).")
    try:
        data = zf.read(info)
    except _ZIP_ERRORS as err:
        raise _zip_corrupt(path, err) from None
    if len(data) != info.file_size:
        raise _zip_corrupt(path, EOFError(f"short read of {info.filename}"))
    return data


def extract_zip_images(
    archive_path: str | os.PathLike,
    rows: Sequence[ManifestRow],
    dest_root: str | os.PathLike,
    strip_prefix: str = "",
) -> None:
    """:func:`extract_images` for a zip: exactly the manifest's images, ``dest_root / row.path``.

    Only members named by the (already checked) manifest are written, so a hostile member name
    (``../``, absolute; zip-slip) is never used as a path; a listed member that is a symlink or a
    directory is refused. Each image's header is checked on the way.
    """
    from tqdm import tqdm

    archive_path, dest_root = Path(archive_path), Path(dest_root)
    prefix = strip_prefix.strip("/")
    prefix = prefix + "/" if prefix else ""
    wanted = _wanted_paths(rows)
    with open_zip(archive_path) as zf, _staged_dir(dest_root) as tmp:
        found: set[str] = set()
        members = [i for i in zf.infolist() if i.filename.startswith(prefix)
                   and i.filename[len(prefix):] in wanted]
        with tqdm(total=len(wanted), desc=f"extract {archive_path.name}", unit="img", mininterval=2.0) as bar:
            for info in sorted(members, key=lambda i: i.header_offset):  # archive order: sequential reads
                rel = info.filename[len(prefix):]
                if rel in found:
                    raise DatasetError(f"{archive_path}: {info.filename} is in the archive twice; re-download it.")
                data = read_zip_member(zf, info, archive_path)
                check_image_header(data, f"{archive_path}:{info.filename}", "re-download the archive")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                found.add(rel)
                bar.update()
        _check_all_found(archive_path, wanted, found)


# --------------------------------------------------------------------------------------------
# folders (class folders, a CSV table's root, an extracted archive)


def resolve_inside(root: Path, rel: str, source: str) -> Path:
    """``root / rel`` as an existing regular file whose real path (symlinks resolved) is inside
    ``root``'s; raises DatasetError naming ``source`` otherwise."""
    rel = _safe_relpath(rel, source)
    p = root / rel
    real_root = root.resolve()
    try:
        real = p.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):  # RuntimeError: a symlink loop
        raise DatasetError(f"{source}: image {p} does not exist; fix the path or add the file.") from None
    if real != real_root and real_root not in real.parents:
        raise DatasetError(f"{source}: image {rel} resolves to {real}, outside the dataset root {real_root} "
                           "(a symlink?); copy the file into the root.")
    if not real.is_file():
        raise DatasetError(f"{source}: {p} is not a regular file; fix the path.")
    return real


def copy_images(src_root: str | os.PathLike, rows: Sequence[ManifestRow], dest_root: str | os.PathLike) -> None:
    """Copy exactly the manifest's images from the folder ``src_root`` to ``dest_root / row.path``.

    The workflow then works on its own copy, as with an archive. Every source must be a regular
    file inside ``src_root`` (symlinks resolved); each image's header is checked on the way.
    """
    from tqdm import tqdm

    src_root, dest_root = Path(src_root), Path(dest_root)
    wanted = _wanted_paths(rows)
    with _staged_dir(dest_root) as tmp, \
            tqdm(total=len(wanted), desc=f"copy {src_root.name}", unit="img", mininterval=2.0) as bar:
        for rel in sorted(wanted):
            src = resolve_inside(src_root, rel, str(src_root))
            data = src.read_bytes()
            check_image_header(data, str(src_root / rel), "replace the file or remove it from the dataset")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            bar.update()
