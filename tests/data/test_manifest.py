"""The manifest CSV (cfga.data.manifest)."""
import pytest

from cfga.data.archives import DatasetError
from cfga.data.manifest import ManifestRow, read_manifest, write_manifest


def test_manifest_csv_format(tmp_path):
    rows = [ManifestRow("train", 0, "001.A_b", "images/001.A_b/x.jpg"),
            ManifestRow("test", 195, "Ram C/V Cargo Van, Minivan 2012", "car_ims/016185.jpg")]
    write_manifest(rows, tmp_path / "m.csv")
    text = (tmp_path / "m.csv").read_text()
    assert text.splitlines()[0] == "split,label,class_name,path,is_query,is_gallery"
    assert text.splitlines()[2].endswith(",1,1")  # a test row: query and gallery (leave-one-out)
    assert read_manifest(tmp_path / "m.csv") == rows
    (tmp_path / "bad.csv").write_text("split,label,path\ntrain,0,x\n")
    with pytest.raises(DatasetError, match="bad.csv"):
        read_manifest(tmp_path / "bad.csv")
