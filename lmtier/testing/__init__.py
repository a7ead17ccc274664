"""Contract suites that a third-party evictor, tier or store configuration subclasses.

As ``zarr.testing.store.StoreTests`` does for zarr's stores, each suite is a class of pytest
tests; a subclass in the other package's tests fills in one hook and inherits the tests:

* ``EvictorContract``: override ``make_evictor(capacity)``;
* ``TierContract``: override ``async make_tier(budget)``;
* ``StoreContract``: override the ``store_config`` fixture.

Importing this package needs pytest, pytest-asyncio and hypothesis (``pip install
'lmtier[test]'``); the library itself never imports it.  The tier and store suites are
coroutines: run them with pytest-asyncio in auto mode (``asyncio_mode = "auto"``).
"""

from lmtier.testing.evictor import EvictorContract, lru_victims
from lmtier.testing.store import StoreContract
from lmtier.testing.tier import TierContract, lru, store_in
from lmtier.testing.values import tensor_for

__all__ = [
    "EvictorContract",
    "StoreContract",
    "TierContract",
    "lru",
    "lru_victims",
    "store_in",
    "tensor_for",
]
