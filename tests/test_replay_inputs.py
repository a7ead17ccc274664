"""Bad trace input: files that are not UTF-8 text traces and records with bad fields are
errors naming the file (and the line, field and value), from the library and from the CLI."""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from lmtier.cli import main
from lmtier.cli.replay import trace_file
from lmtier.cli.replay.traces import read_trace
from lmtier.errors import TraceError

GOOD = {"timestamp": 0, "input_length": 1024, "output_length": 7, "hash_ids": [1, 2]}
QWEN = {"chat_id": 7, "parent_chat_id": -1, "timestamp": 1.5, "input_length": 40,
        "output_length": 9, "type": "text", "turn": 1, "hash_ids": [3, 4, 5]}  # fmt: skip


def lines(path: Path, *records: object) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


def cli_error(capsys: pytest.CaptureFixture[str], path: Path | str) -> str:
    """The CLI's one-line error for replaying ``path``; it must exit with status 2."""
    assert main(["replay", str(path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the header line
    assert captured.err.count("\n") == 1 and captured.err.startswith("lmtier: error: ")
    return captured.err


# ---------------------------------------------------------------------- files
def gzipped(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(GOOD).encode() + b"\n"))
    return path


def random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(bytes([0x80, 0x04, 0x95]) + bytes(range(256)) * 4)
    return path


def nul_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "nul.jsonl"
    path.write_bytes(b'{"timestamp": 0}\x00\x00\x00\n')
    return path


def latin1_on_line_3(tmp_path: Path) -> Path:
    path = lines(tmp_path / "latin1.jsonl", GOOD, GOOD)
    with path.open("ab") as handle:
        handle.write(b'{"note": "caf\xe9"}\n')
    return path


def utf16(tmp_path: Path) -> Path:
    path = tmp_path / "utf16.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16"))
    return path


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (gzipped, "it starts like a gzip file; decompress it first"),
        (random_bytes, "line 1: byte 0x80 at offset 0 is not UTF-8"),
        (nul_bytes, "line 1: a NUL byte at offset 16"),
        (latin1_on_line_3, "line 3: byte 0xe9 at offset 13 is not UTF-8"),
        (utf16, "it is UTF-16 text; convert it to UTF-8"),
    ],
)
def test_a_binary_or_non_utf8_file_is_named_as_not_a_text_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], Path], why: str
) -> None:
    path = make(tmp_path)
    expected = f"{path} is not a UTF-8 text trace: {why}"
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(caught.value) == expected
    assert cli_error(capsys, path) == f"lmtier: error: {expected}\n"


def test_a_byte_order_mark_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    assert read_trace(path).references == 4


def test_a_line_beyond_the_limit_is_refused_before_it_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace_file, "MAX_LINE_BYTES", 2**20)
    path = tmp_path / "one-line.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "[" + "0," * 2**20 + "0]\n")
    with pytest.raises(TraceError, match=rf"^{re.escape(str(path))}:2: a line longer than 1 MiB"):
        read_trace(path)


def make_fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)  # no writer: opening it blocking would wait forever
    return path


def make_socket(tmp_path: Path) -> Path:
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()  # the socket file stays
    return path


def make_dir(tmp_path: Path) -> Path:
    return tmp_path


def make_empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    return path


def make_blank(tmp_path: Path) -> Path:
    return lines(tmp_path / "blank.jsonl", "", "  ", "")


def make_missing(tmp_path: Path) -> Path:
    return tmp_path / "missing.jsonl"


def dev_null(tmp_path: Path) -> Path:
    return Path(os.devnull)


@pytest.mark.timeout(10)  # a FIFO must be refused, not waited on
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (make_fifo, "{path} is a FIFO (named pipe), not a trace file: give a JSONL file"),
        (make_socket, "{path} is a socket, not a trace file"),
        (make_dir, "{path} is a directory, not a trace file: give a JSONL file"),
        (dev_null, "{path} is a character device, not a trace file: give a JSONL file"),
        (make_empty, "{path} is empty: a trace has one JSON request per line"),
        (make_blank, "{path} has no requests, only blank lines"),
        (make_missing, "{path}: no such trace file"),
    ],
)
def test_what_is_not_a_trace_file_gets_a_clear_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], Path],
    message: str,
) -> None:
    path = make(tmp_path)
    expected = message.format(path=path)
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(caught.value) == expected
    assert cli_error(capsys, path) == f"lmtier: error: {expected}\n"


def test_an_unreadable_file_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = lines(tmp_path / "locked.jsonl", GOOD)

    def refuse(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(trace_file.os, "open", refuse)  # root ignores chmod
    expected = f"{path}: cannot read the trace: {os.strerror(errno.EACCES)}"
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(caught.value) == expected
    assert cli_error(capsys, path) == f"lmtier: error: {expected}\n"


# ---------------------------------------------------------------------- fields
@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({**GOOD, "input_length": -5}, "input_length must be a whole number >= 0, not -5"),
        ({**GOOD, "input_length": 12.5}, "input_length must be a whole number >= 0, not 12.5"),
        ({**GOOD, "input_length": "512"}, 'input_length must be a whole number >= 0, not "512"'),
        ({**GOOD, "output_length": -1}, "output_length must be a whole number >= 0, not -1"),
        ({**GOOD, "output_length": True}, "output_length must be a whole number >= 0, not true"),
        ({**GOOD, "output_length": None}, "output_length must be a whole number >= 0, not null"),
        ({**GOOD, "timestamp": -0.5}, "timestamp must be a number >= 0, not -0.5"),
        ({**GOOD, "timestamp": "noon"}, 'timestamp must be a number >= 0, not "noon"'),
        ({**GOOD, "timestamp": [1]}, "timestamp must be a number >= 0, not [1]"),
        ({**GOOD, "hash_ids": "1,2"}, 'hash_ids must be a list of integers, not "1,2"'),
        ({**GOOD, "hash_ids": [1, 2.5]}, "hash_ids[1] must be an integer, not 2.5"),
        ({**GOOD, "hash_ids": [1, "2"]}, 'hash_ids[1] must be an integer, not "2"'),
        ({**GOOD, "hash_ids": [False]}, "hash_ids[0] must be an integer, not false"),
        ({**QWEN, "input_length": -40}, "input_length must be a whole number >= 0, not -40"),
        ({**QWEN, "timestamp": -1}, "timestamp must be a number >= 0, not -1"),
        ({"timestamp": 0, "input_length": 1, "hash_ids": [1]}, "missing field(s) output_length"),
    ],
)
def test_a_bad_field_names_file_line_field_and_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record: dict[str, object], message: str
) -> None:
    good = QWEN if "chat_id" in record else GOOD
    path = lines(tmp_path / "t.jsonl", good, "", record, good)
    expected = f"{path}:3: {message}"
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(caught.value) == expected
    assert cli_error(capsys, path) == f"lmtier: error: {expected}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"timestamp": NaN, "input_length": 1, "output_length": 1, "hash_ids": [1]}',
         "not JSON: NaN is not a number JSON allows"),
        ('{"timestamp": 0, "input_length": Infinity, "output_length": 1, "hash_ids": [1]}',
         "not JSON: Infinity is not a number JSON allows"),
        ('{"timestamp": 1e400, "input_length": 1, "output_length": 1, "hash_ids": [1]}',
         "timestamp must be a number >= 0, not Infinity"),
        ('{"timestamp": 0, "input_length": 1' + "0" * 400 + ', "output_length": 1, '
         '"hash_ids": [1]}', "input_length must be a whole number >= 0, not 1000000"),
        ("[" * 100_000 + "]" * 100_000, "not JSON: nested too deeply"),
    ],
)  # fmt: skip
def test_numbers_json_does_not_allow_or_float_cannot_hold_are_refused(
    tmp_path: Path, text: str, message: str
) -> None:
    path = lines(tmp_path / "t.jsonl", GOOD, text)
    with pytest.raises(TraceError) as caught:
        read_trace(path)
    assert str(caught.value).startswith(f"{path}:2: {message}")


def test_valid_edge_values_are_accepted(tmp_path: Path) -> None:
    zero = {"timestamp": 0.0, "input_length": 0, "output_length": 0.0, "hash_ids": [-3, 0]}
    trace = read_trace(lines(tmp_path / "t.jsonl", zero, {**GOOD, "timestamp": 2.5}))
    assert [r.timestamp for r in trace.requests] == [0.0, 2.5]
    assert trace.requests[0].hash_ids == (-3, 0)
    qwen = read_trace(lines(tmp_path / "q.jsonl", QWEN, {**QWEN, "input_length": 0}))
    assert (qwen.format, qwen.references) == ("qwen-bailian", 6)
