"""An entry checksum's cost: unkeyed (xxh3), keyed BLAKE3 (``auth_key``), and the standard
library's keyed blake2b that it was chosen over; best of 7, with ratios to the unkeyed one.

    python scripts/checksum_speed.py
"""

from __future__ import annotations

import hashlib
import os
import timeit
from collections.abc import Callable

import torch

from lmtier import serde

SIZES = (256 << 10, 2 << 20, 16 << 20)
SECRET = os.urandom(32)


def entry_cost(checksums: serde.EntryChecksums) -> Callable[[memoryview], str]:
    """One entry's checksum as a tier computes it: the payload's digest, then the header's."""

    def checksum(payload: memoryview) -> str:
        digest = checksums.payload_digest(payload)
        return checksums.entry_checksum("k", torch.uint8, (payload.nbytes,), payload.nbytes, digest)

    return checksum


def blake2b_cost(payload: memoryview) -> str:
    digest = hashlib.blake2b(payload, key=SECRET, digest_size=32).digest()
    return hashlib.blake2b(b"fields" + digest, key=SECRET, digest_size=16).hexdigest()


def main() -> None:
    ways = {
        "xxh3 (no secret)": entry_cost(serde.UNKEYED),
        "keyed BLAKE3": entry_cost(serde.EntryChecksums(SECRET)),
        "keyed blake2b (stdlib)": blake2b_cost,
    }
    print(f"{'payload':>8}  {'checksum':<24}{'ms':>9}{'GB/s':>8}{'x xxh3':>8}")
    for size in SIZES:
        payload = memoryview(bytearray(os.urandom(size)))
        reps = max(1, (64 << 20) // size)
        base = 0.0
        for name, way in ways.items():
            way(payload)
            runs = timeit.repeat(lambda w=way, p=payload: w(p), number=reps, repeat=7)
            seconds = min(runs) / reps
            base = base or seconds
            print(
                f"{size >> 10:>5} KiB  {name:<24}{seconds * 1e3:>9.3f}"
                f"{size / seconds / 1e9:>8.2f}{seconds / base:>8.1f}"
            )


if __name__ == "__main__":
    main()
