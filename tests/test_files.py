"""cfga.files: npz files written byte-deterministically; the fast reader gives exactly what np.load
gives."""
import os
import time

import numpy as np
import pytest

from cfga import files as io


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((37, 9), dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((5, 3))),
        "paths": np.asarray(["images/a.jpg", "images/bb.jpg", "ü.jpg"]),
        "meta_json": np.asarray('{"device": "cpu"}'),
        "empty": np.zeros((0, 4), np.float32),
        "labels": np.arange(7, dtype=np.int64),
    }


def test_load_npz_equals_np_load(tmp_path):
    arrays = _arrays()
    path = tmp_path / "f.npz"
    io.save_npz(path, arrays)
    got = io.load_npz(path)
    assert list(got) == list(arrays)
    with np.load(path, allow_pickle=False) as ref:
        for key in arrays:
            assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape
            assert np.array_equal(got[key], ref[key]), key
    assert got["fortran"].flags["F_CONTIGUOUS"]
    assert list(io.load_npz(path, keys={"labels", "f32"})) == ["f32", "labels"]


def test_load_npz_reads_compressed_files_too(tmp_path):
    arrays = _arrays()
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    got = io.load_npz(tmp_path / "c.npz")
    assert all(np.array_equal(got[k], arrays[k]) for k in arrays)


@pytest.mark.parametrize("cut", [0.5, 0.98])
def test_load_npz_names_a_broken_file(tmp_path, cut):
    path = tmp_path / "f.npz"
    io.save_npz(path, _arrays())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="f.npz.*rerun"):
        io.load_npz(path)
    with pytest.raises(ValueError, match=r"no array\(s\) \['nope'\]"):
        io.save_npz(path, _arrays()) or io.load_npz(path, keys={"nope"})


def test_save_npz_is_byte_deterministic(tmp_path, monkeypatch):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "paths": np.asarray(["a", "bb"]),
              "meta_json": np.asarray('{"k": 1}')}
    io.save_npz(tmp_path / "a.npz", arrays)
    os.utime(tmp_path / "a.npz", (0, 0))
    real_time = time.time
    # a day later: a zip member stamped with the current time would now differ
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400)
    io.save_npz(tmp_path / "b.npz", arrays)
    monkeypatch.undo()
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert z.files == list(arrays) and z["paths"].tolist() == ["a", "bb"]
    with pytest.raises(ValueError):
        io.save_npz(tmp_path / "c.npz", {"o": np.asarray([{"a": 1}], dtype=object)})
    assert not (tmp_path / "c.npz").exists()

