"""Request traces: Mooncake JSONL (512-token blocks) and Qwen-Bailian (16-token blocks)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmtier.errors import TraceError

__all__ = ["FORMATS", "Request", "Trace", "detect_format", "read_trace"]


@dataclass(frozen=True)
class Request:
    """One request: its arrival time and the prefix-chained ids of its input's blocks."""

    timestamp: float
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    requests: tuple[Request, ...]
    block_tokens: int
    format: str

    @property
    def references(self) -> int:
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def distinct_blocks(self) -> int:
        return len({h for r in self.requests for h in r.hash_ids})


# format name -> (tokens per block, fields every line must carry)
FORMATS: dict[str, tuple[int, tuple[str, ...]]] = {
    "mooncake": (512, ("timestamp", "input_length", "output_length", "hash_ids")),
    "qwen-bailian": (
        16,
        ("chat_id", "parent_chat_id", "timestamp", "input_length", "output_length", "type",
         "turn", "hash_ids"),
    ),
}  # fmt: skip


def detect_format(record: dict[str, object]) -> str:
    """The format whose fields a parsed line carries."""
    if "chat_id" in record:
        return "qwen-bailian"
    if "hash_ids" in record:
        return "mooncake"
    raise TraceError(f"neither a Mooncake nor a Qwen-Bailian record: fields {sorted(record)}")


def read_trace(path: str | Path, fmt: str | None = None, limit: int | None = None) -> Trace:
    """Parse a JSONL trace (``fmt`` detected from its first record unless given)."""
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    requests = []
    for number, record in _records(Path(path)):
        if fmt is None:
            fmt = _detect_at(path, number, record)
        requests.append(_request(path, number, record, FORMATS[fmt][1]))
        if limit is not None and len(requests) >= limit:
            break
    if fmt is None:
        raise TraceError(f"{path}: no requests in the trace")
    return Trace(tuple(requests), FORMATS[fmt][0], fmt)


def _records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read the trace: {exc.strerror}") from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{number}: not JSON: {exc.msg}") from exc
            if not isinstance(record, dict):
                raise TraceError(f"{path}:{number}: a record must be a JSON object")
            yield number, record


def _detect_at(path: str | Path, number: int, record: dict[str, object]) -> str:
    try:
        return detect_format(record)
    except TraceError as exc:
        raise TraceError(f"{path}:{number}: {exc}") from None


def _request(
    path: str | Path, number: int, record: dict[str, object], fields: tuple[str, ...]
) -> Request:
    missing = [name for name in fields if name not in record]
    if missing:
        raise TraceError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise TraceError(f"{path}:{number}: hash_ids must be a list of integers")
    timestamp = record["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        raise TraceError(f"{path}:{number}: timestamp must be a number, got {timestamp!r}")
    return Request(float(timestamp), tuple(hash_ids))
