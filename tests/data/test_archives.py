"""Reading archives safely (cfga.data.archives): one streamed pass, hostile members ignored,
truncation refused with nothing left behind."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cfga.data.archives import DatasetError, extract_images
from cfga.data.formats import CUB_PREFIX, read_cub_manifest
from cfga.data.manifest import ManifestRow
from tests.helpers import assert_nothing_left as _assert_nothing_left


def test_truncated_during_extraction(cub_cfg, tmp_path):
    rows = read_cub_manifest(cub_cfg["archive"])
    data = Path(cub_cfg["archive"]).read_bytes()
    bad = tmp_path / "CUB_200_2011.tgz"
    bad.write_bytes(data[: int(len(data) * 0.7)])
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="re-download"):
        extract_images(bad, rows, out / "root", CUB_PREFIX)
    _assert_nothing_left(out)


def test_extract_ignores_hostile_members(tmp_path):
    arc = tmp_path / "x.tgz"
    with tarfile.open(arc, "w:gz") as tf:
        for name in ("../evil.jpg", "/tmp/evil_abs.jpg", "car_ims/000001.jpg"):
            ti = tarfile.TarInfo(name)
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"abc"))
    rows = [ManifestRow("test", 0, "a", "car_ims/000001.jpg")]
    extract_images(arc, rows, tmp_path / "d" / "root", "")
    assert (tmp_path / "d" / "root" / "car_ims" / "000001.jpg").read_bytes() == b"abc"
    assert not (tmp_path / "d" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    with pytest.raises(DatasetError, match="unsafe"):
        extract_images(arc, [ManifestRow("test", 0, "a", "../evil.jpg")], tmp_path / "e", "")
    assert not (tmp_path / "e").exists()
