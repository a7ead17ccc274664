"""Request traces: Mooncake JSONL (512-token blocks) and Qwen-Bailian (16-token blocks)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmtier.cli.replay.trace_file import trace_lines
from lmtier.errors import TraceError

__all__ = [
    "FORMATS",
    "WINDOWS",
    "Request",
    "Trace",
    "TraceStats",
    "detect_format",
    "parse_part",
    "read_trace",
    "trace_part",
    "trace_stats",
]


@dataclass(frozen=True)
class Request:
    """One request: its arrival time and the prefix-chained ids of its input's blocks."""

    timestamp: float
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order; ``block_tokens`` tokens per hash id; ``format`` its origin."""

    requests: tuple[Request, ...]
    block_tokens: int
    format: str

    @property
    def references(self) -> int:
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def distinct_blocks(self) -> int:
        return len({h for r in self.requests for h in r.hash_ids})


@dataclass(frozen=True)
class TraceStats:
    """What a trace asks of a cache: its size, its reuse and the infinite cache's hit ratio."""

    requests: int
    references: int
    distinct_blocks: int
    blocks_used_once: int

    @property
    def once_fraction(self) -> float:
        """The fraction of distinct blocks referenced exactly once (no cache can reuse them)."""
        return self.blocks_used_once / max(self.distinct_blocks, 1)

    @property
    def ceiling(self) -> float:
        """The infinite cache's block hit ratio: every reference but each block's first."""
        return (self.references - self.distinct_blocks) / max(self.references, 1)

    def describe(self) -> str:
        return (
            f"{self.requests:,} requests, {self.references:,} block references, "
            f"{self.distinct_blocks:,} distinct blocks ({self.once_fraction:.1%} used once), "
            f"infinite-cache block hit ratio {self.ceiling:.4f}"
        )


def trace_stats(trace: Trace) -> TraceStats:
    """Counts of ``trace``'s requests, references and blocks."""
    uses: dict[int, int] = {}
    for request in trace.requests:
        for block in request.hash_ids:
            uses[block] = uses.get(block, 0) + 1
    once = sum(1 for count in uses.values() if count == 1)
    return TraceStats(len(trace.requests), sum(uses.values()), len(uses), once)


#: Named time windows for ``trace_part``: (part, parts).
WINDOWS: dict[str, tuple[int, int]] = {"first-half": (1, 2), "second-half": (2, 2)}


def trace_part(trace: Trace, part: int, parts: int) -> Trace:
    """The ``part``-th (1-based) of ``parts`` consecutive slices of ``trace``, by request order.

    Slice boundaries fall at ``len * (part - 1) // parts`` and ``len * part // parts``, so the
    parts cover every request once.  A part replays cold: nothing before it is cached, so tuning
    on part 1 and reporting part 2 tests a policy on requests it never saw.
    """
    if parts < 1 or not 1 <= part <= parts:
        raise TraceError(f"part {part}/{parts}: need 1 <= part <= parts")
    count = len(trace.requests)
    requests = trace.requests[count * (part - 1) // parts : count * part // parts]
    if not requests:
        raise TraceError(f"part {part}/{parts} of {count} requests is empty")
    return Trace(requests, trace.block_tokens, trace.format)


def parse_part(text: str) -> tuple[int, int]:
    """``K/N`` or a name in ``WINDOWS`` as (part, parts)."""
    if text in WINDOWS:
        return WINDOWS[text]
    part, slash, parts = text.partition("/")
    try:
        if slash:
            return int(part), int(parts)
    except ValueError:
        pass
    raise TraceError(f"not a part K/N nor one of {', '.join(WINDOWS)}: {text!r}")


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
    """Parse a JSONL trace (``fmt`` detected from its first record unless given).

    A record's lengths (``input_length``, ``output_length``: whole numbers) and ``timestamp``
    must be numbers >= 0 and ``hash_ids`` a list of integers; anything else is a TraceError
    naming the file, the line, the field and the bad value.
    """
    if fmt is not None and fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    requests = []
    for number, record in _records(Path(path)):
        where = f"{path}:{number}"
        if fmt is None:
            fmt = _detect_at(where, record)
        requests.append(_request(where, record, FORMATS[fmt][1]))
        if limit is not None and len(requests) >= limit:
            break
    if fmt is None:
        raise TraceError(f"{path} has no requests, only blank lines")
    return Trace(tuple(requests), FORMATS[fmt][0], fmt)


def _records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    for number, line in trace_lines(path):
        try:
            record = json.loads(line, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{number}: not JSON: {exc.msg}") from None
        except ValueError as exc:  # NaN or Infinity, which JSON does not allow
            raise TraceError(f"{path}:{number}: not JSON: {exc}") from None
        except RecursionError:
            raise TraceError(f"{path}:{number}: not JSON: nested too deeply") from None
        if not isinstance(record, dict):
            raise TraceError(
                f"{path}:{number}: a record must be a JSON object, not {_shown(record)}"
            )
        yield number, record


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number JSON allows")


def _detect_at(where: str, record: dict[str, object]) -> str:
    try:
        return detect_format(record)
    except TraceError as exc:
        raise TraceError(f"{where}: {exc}") from None


def _request(where: str, record: dict[str, object], fields: tuple[str, ...]) -> Request:
    missing = [name for name in fields if name not in record]
    if missing:
        raise TraceError(f"{where}: missing field(s) {', '.join(missing)}")
    for name in ("input_length", "output_length"):  # token counts
        count = _finite(record[name])
        if count is None or count < 0 or not count.is_integer():
            raise TraceError(
                f"{where}: {name} must be a whole number >= 0, not {_shown(record[name])}"
            )
    timestamp = _finite(record["timestamp"])
    if timestamp is None or timestamp < 0:
        raise TraceError(
            f"{where}: timestamp must be a number >= 0, not {_shown(record['timestamp'])}"
        )
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list):
        raise TraceError(f"{where}: hash_ids must be a list of integers, not {_shown(hash_ids)}")
    for index, block in enumerate(hash_ids):
        if isinstance(block, bool) or not isinstance(block, int):
            raise TraceError(f"{where}: hash_ids[{index}] must be an integer, not {_shown(block)}")
    return Request(timestamp, tuple(hash_ids))


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite JSON number, else None (true/false are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) else None  # 1e400 parses as inf


def _shown(value: object, width: int = 60) -> str:
    """A bad value for a message: its JSON text, cut short."""
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."
