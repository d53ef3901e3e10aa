"""The documented read API over a harvest run folder (docs/FORMAT.md, docs/TRAINING.md).

    from harvest.data import open_store
    s = open_store("outputs/demo")

It re-exports `harvest.store`'s read side, and imports neither JAX nor the engine.
"""

from harvest.store.api import Store, open_store
from harvest.store.reader import ActivationView, ChunkRef, SequenceTable

__all__ = ["open_store", "Store", "ActivationView", "SequenceTable", "ChunkRef"]
