"""Small synthetic CUB and Cars archives, written once per session."""
import pytest

from cfga.data import synthetic
from tests.helpers import SYNTHETIC_CLASSES as C
from tests.helpers import SYNTHETIC_IMAGES_PER_CLASS as N


@pytest.fixture(scope="session")
def cub_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("cub_src")
    return synthetic.synthesize({"format": "cub", "synthetic": {"classes": C, "images_per_class": N, "seed": 5}}, d)


@pytest.fixture(scope="session")
def cars_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("cars_src")
    return synthetic.synthesize({"format": "cars", "synthetic": {"classes": C, "images_per_class": N, "seed": 5}}, d)
