"""The loss table (cfga.registry.losses) is the one read by training, tables and the rules."""
import pytest

from cfga.registry.losses import LOSSES, get_loss
from cfga.registry.protocols import HEADS, PROTOCOLS


def test_each_loss_is_consistent_with_the_other_registries():
    from cfga.checkpoints.formats import FORMATS as CHECKPOINT_FORMATS
    from cfga.outputs.tables import FAMILIES

    for name, loss in LOSSES.items():
        assert loss.name == name
        assert loss.head in HEADS
        assert PROTOCOLS[loss.protocol].embedding == loss.head  # evaluated with the head it trained
        assert loss.format in CHECKPOINT_FORMATS
        assert loss.family in FAMILIES


def test_training_and_tables_read_the_table():
    from cfga.outputs.tables import model_family
    from cfga.training import dml

    assert dml.LOSSES == tuple(LOSSES)
    assert dml.HEAD_FOR_LOSS == {n: loss.head for n, loss in LOSSES.items()}
    assert dml.FORMAT_FOR_LOSS == {n: loss.format for n, loss in LOSSES.items()}
    for name, loss in LOSSES.items():
        assert model_family({"protocol": loss.protocol, "train": {"loss": name}}) == loss.family


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(ValueError, match="proxy_anchor"):
        get_loss("triplet")
