"""The start-up check that vLLM's block hashes can match those of another process."""

from __future__ import annotations

import pytest

from lmtier.integrations.vllm_block_hashes import FIXED_SEED, block_hash_warning


@pytest.mark.parametrize("environ", [{}, {"PYTHONHASHSEED": "random"}])
def test_builtin_hash_without_a_fixed_seed_is_named(environ: dict[str, str]) -> None:
    problem = block_hash_warning(environ, "builtin")
    assert problem is not None and "PYTHONHASHSEED" in problem and "builtin" in problem


def test_a_random_seed_of_a_non_cryptographic_algorithm_is_named() -> None:
    problem = block_hash_warning({}, "xxhash")
    assert problem is not None and "xxhash" in problem and "PYTHONHASHSEED" in problem
    # What vLLM resolved says the same when the algorithm is not known.
    assert block_hash_warning({}, None, "9f" * 32) is not None


@pytest.mark.parametrize(
    ("environ", "algorithm", "seed"),
    [
        ({}, "sha256", None),
        ({}, None, FIXED_SEED),
        ({}, None, None),
        ({"PYTHONHASHSEED": "0"}, "xxhash", "0"),
        ({"PYTHONHASHSEED": "1234"}, "builtin", None),
        ({"PYTHONHASHSEED": "random"}, "xxhash_cbor", "random"),  # vLLM seeds with the text
    ],
)
def test_shareable_hashes_are_not_warned_about(
    environ: dict[str, str], algorithm: str | None, seed: str | None
) -> None:
    assert block_hash_warning(environ, algorithm, seed) is None
