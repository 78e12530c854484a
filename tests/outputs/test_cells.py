"""The metrics record of a table cell (cfga.outputs.cells)."""
import numpy as np


def test_metrics_record_is_deterministic_and_carries_provenance():
    """Two CPU runs give identical metrics; the cell JSON carries the feature file's provenance."""
    from cfga.outputs.cells import metrics_record

    rng = np.random.default_rng(9)
    X = rng.normal(size=(200, 16)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    meta = {"checkpoint_sha256": "ab" * 32, "manifest_sha256": "cd" * 32, "device": "cpu"}
    a = metrics_record(X, y, dataset="d", model="m", feature="cfga_plus", provenance=meta)
    b = metrics_record(X, y, dataset="d", model="m", feature="cfga_plus", provenance=meta)
    assert a == b
    assert a["provenance"]["checkpoint_sha256"] == "ab" * 32
    assert a["paper_column"] == "CFGA+" and a["n_queries"] == 200
