"""Atomic writers: every output appears whole under its final name or not at all."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``suffix`` keeps writers that append an extension (``np.savez``) pointed at the temp name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)


# Fixed zip member metadata: the same arrays always give the same bytes (a sharded extraction is
# compared byte for byte with an unsharded one; a rerun with unchanged results changes no byte).
# These are the values np.savez writes on Python 3.11; pinned here so no numpy or Python version
# can stamp the current time into a member.
_NPZ_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_NPZ_MEMBER_MODE = 0o600 << 16
_COPY_CHUNK = 2**20  # bytes per read when a .npy file is copied into an .npz


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray | Path]) -> None:
    """Write an uncompressed ``.npz`` atomically and byte-deterministically (``np.load`` reads it).

    Members are stored in ``arrays``' order, uncompressed (loads fastest), with a fixed date and
    mode; object arrays are refused (a feature file must load with ``allow_pickle=False``).
    A ``Path`` value is a ``.npy`` file copied in as the member, in chunks (the same bytes
    ``write_array`` gives for its array, without holding it in memory).
    """
    with atomic_path(path, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_NPZ_DATE_TIME)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = _NPZ_MEMBER_MODE
                with zf.open(info, mode="w", force_zip64=True) as fh:
                    if isinstance(value, Path):
                        with open(value, "rb") as src:
                            shutil.copyfileobj(src, fh, _COPY_CHUNK)
                    else:
                        np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npz(path: str | os.PathLike, keys=None) -> dict[str, np.ndarray]:
    """Read the arrays of an uncompressed ``.npz`` (``save_npz``'s) straight into memory.

    ``keys``: the member names to read (default: all), in file order. ``np.load`` streams each
    member through zipfile (CRC32 and small chunked copies), much slower for a feature file of a
    few hundred MB (BENCHMARKS.md); this reads each stored member with one ``readinto``.
    Compressed members (an ``.npz`` from elsewhere) fall back to zipfile. Raises ValueError naming
    the file when it is not a readable ``.npz`` (truncated, not a zip, object arrays).
    """
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if keys is not None and key not in keys:
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as fh:
                        out[key] = np.lib.format.read_array(fh, allow_pickle=False)
                    continue
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    raise ValueError(f"bad local header for {info.filename}")
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                raw.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(raw)
                read_header = _NPY_HEADER_READERS.get(version)
                if read_header is None:  # .npy 3.0 (utf-8 field names): let numpy read it
                    with zf.open(info) as fh:
                        out[key] = np.lib.format.read_array(fh, allow_pickle=False)
                    continue
                shape, fortran, dtype = read_header(raw)
                if dtype.hasobject:
                    raise ValueError(f"{info.filename} holds Python objects")
                arr = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
                view = memoryview(arr.reshape(-1, order="A").view(np.uint8)) if arr.size else b""
                if arr.size and raw.readinto(view) != arr.nbytes:
                    raise ValueError(f"{info.filename} is truncated")
                out[key] = arr
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err}); delete it and rerun the rule that writes it") from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}; delete it and rerun the rule that writes it") from err
    missing = [k for k in (keys or ()) if k not in out]
    if missing:
        raise ValueError(f"{path}: no array(s) {missing}")
    return out


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file's bytes (``hashlib.file_digest``: streamed, never the whole file in memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def md5_file(path: str | os.PathLike) -> str:
    return file_digest(path, "md5")
