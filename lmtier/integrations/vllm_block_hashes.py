"""Whether vLLM's block hashes can match across processes, told from what can be checked.

vLLM names a block by a hash chained from a first seed (``NONE_HASH``).  With a cryptographic
algorithm (``sha256``, ``sha256_cbor``: the default) the seed is fixed unless
``PYTHONHASHSEED`` names one.  With a non-cryptographic one (``xxhash``, ``xxhash_cbor``) the
seed is random per process unless ``PYTHONHASHSEED`` is set, and with Python's builtin ``hash``
(older vLLM releases' ``builtin``) the hash itself changes per process unless
``PYTHONHASHSEED`` is a fixed number.  Then no restarted engine and no other instance ever
hits what this one stored.  Pure: the integration hands in what it found.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FIXED_SEED", "NON_CRYPTOGRAPHIC", "block_hash_warning"]

#: vLLM's seed of NONE_HASH for cryptographic algorithms when PYTHONHASHSEED is unset.
FIXED_SEED = "vllm-none-hash"
#: Algorithms whose seed vLLM draws at random per process when PYTHONHASHSEED is unset.
NON_CRYPTOGRAPHIC = frozenset({"xxhash", "xxhash_cbor"})


def block_hash_warning(
    environ: Mapping[str, str], algorithm: str | None = None, resolved_seed: str | None = None
) -> str | None:
    """Why block hashes will differ in another process, or None where nothing says so.

    ``algorithm``: the engine's ``prefix_caching_hash_algo``, when known; ``resolved_seed``:
    the seed vLLM derived its NONE_HASH from, when it has (``get_none_hash_seed()``).
    """
    seed = environ.get("PYTHONHASHSEED")
    fix = (
        "set PYTHONHASHSEED to the same number in every engine that shares lmtier's tiers "
        "(or use --prefix-caching-hash-algo sha256)"
    )
    if algorithm == "builtin" and (seed is None or seed == "random"):
        return (
            "vLLM hashes blocks with Python's builtin hash and PYTHONHASHSEED is "
            f"{'unset' if seed is None else 'random'}: every process names the same tokens "
            f"differently, so a restart or another instance never hits lmtier's entries; {fix}"
        )
    if seed is not None:
        return None
    if algorithm in NON_CRYPTOGRAPHIC or (
        resolved_seed is not None and resolved_seed != FIXED_SEED
    ):
        named = f" ({algorithm})" if algorithm else ""
        return (
            f"vLLM hashes blocks with a non-cryptographic algorithm{named} seeded at random per "
            "process (PYTHONHASHSEED is unset): a restart or another instance never hits "
            f"lmtier's entries; {fix}"
        )
    return None
