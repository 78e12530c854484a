"""The config schema is the one home of defaults: the Python API's settings read it."""
import dataclasses

from cfga.registry.config import SCHEMA_PATH, schema_defaults
from cfga.training.dml import TrainSettings
from cfga.training.pretrain import PretrainSettings


def test_settings_defaults_are_the_schemas():
    for cls, key in ((PretrainSettings, "pretrain"), (TrainSettings, "train")):
        defaults = schema_defaults("models", "*", key)
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        assert defaults, key
        for name, value in defaults.items():
            assert fields[name] == value, (key, name)


def test_schema_ships_inside_the_package_and_the_workflow_reads_that_file():
    assert SCHEMA_PATH.is_file()
    repo_link = SCHEMA_PATH.parents[2] / "schemas" / "config.schema.yaml"
    assert repo_link.resolve() == SCHEMA_PATH.resolve()
