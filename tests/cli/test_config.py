"""The config tree's translation into the engine's GenerateConfig."""

import pytest

from harvest.cli.config import from_dict
from harvest.errors import HarvestError


def engine_config(runtime: dict, sequences=None, data=1):
    return from_dict({"runtime": runtime}).generate_config((), (), 100, sequences, data)


@pytest.mark.parametrize(
    "runtime, sequences, data, slots, tail",
    [
        ({}, None, 1, 32, 8),  # no bound: the configured pool
        ({}, 100, 1, 32, 8),  # more sequences than slots
        ({}, 17, 1, 17, 4),  # a slot no sequence fills would decode at full cost every step
        ({}, 17, 2, 18, 4),  # rounded up to split over the mesh's rows
        ({}, 3, 1, 8, 2),  # never below the prefill lanes
        ({"tail_slots": 8}, 8, 1, 8, 0),  # a tail pool as large as the pool is none
        ({"tail_slots": 4}, 17, 1, 17, 4),
        ({"batch_size": 4, "decode_slots": 16}, 5, 1, 5, 1),
    ],
)
def test_the_pool_holds_at_most_the_runs_sequences(runtime, sequences, data, slots, tail):
    g = engine_config(runtime, sequences, data)
    assert (g.decode_slots, g.tail_pool) == (slots, tail)


def test_a_pool_below_the_lanes_is_still_refused_whatever_the_sequences():
    with pytest.raises(HarvestError, match="runtime.decode_slots: 4 is below batch_size=8"):
        engine_config({"decode_slots": 4}, sequences=100)
    with pytest.raises(HarvestError, match="runtime.decode_slots: 4 is below batch_size=8"):
        from_dict({"runtime": {"decode_slots": 4}})
