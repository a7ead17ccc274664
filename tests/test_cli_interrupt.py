"""Ctrl-C during a long ``lmtier`` run: partial stats, nothing left behind, exit 130.

Each test starts the command as a child process with its stderr on a pseudo-terminal (so that
its progress bar is drawn, as on a user's terminal), waits for the bar to count work done,
sends SIGINT and reads what the child printed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# A child imports torch, starts a run and cleans it up: up to 38 s on a machine loaded 13.5
# (2 cores).  The waits leave a wide margin; the verdict never times anything.
WAIT_S = 300
#: The signals the tests send, as a user's shell leaves them to a command it starts.
SENT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _as_from_a_terminal() -> None:
    """In the child: the sent signals at their defaults.  A suite started in the background
    (``cmd &`` in a script, ``nohup``) passes SIGINT or SIGHUP on ignored, and a command that
    finds a signal ignored keeps it so, as it should: the test would then wait on a signal the
    child never sees."""
    for number in SENT:
        signal.signal(number, signal.SIG_DFL)


pytestmark = pytest.mark.timeout(4 * WAIT_S)
# A bar that has counted at least one op, request or key: "stress:   3%|...| 170/6000 [...".
PROGRESS = re.compile(r"([1-9]\d*)/\d+ \[")


class Child:
    """``python -m lmtier.cli ARGS`` with stdout on a pipe and stderr on a pseudo-terminal."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.stderr = b""
        master, slave = pty.openpty()
        # A terminal of 0 columns (a new pty's size) gets bars of no width: give it 120.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.master = master
        env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
        env.pop("LMTIER_CONFIG", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmtier.cli", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            preexec_fn=_as_from_a_terminal,
        )
        os.close(slave)  # the child holds it: reads end (EIO) once the child is gone

    def read_stderr(self, seconds: float) -> bool:
        """Read what the child wrote to stderr for up to ``seconds``; False once it is closed."""
        ready, _, _ = select.select([self.master], [], [], seconds)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every holder of the terminal's other end closed it
            return False
        self.stderr += chunk
        return bool(chunk)

    def wait_for_progress(self, timeout: float = WAIT_S) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = [int(n) for n in PROGRESS.findall(self.stderr.decode(errors="replace"))]
            if counts:
                return max(counts)
            if not self.read_stderr(0.2) or self.process.poll() is not None:
                break
        raise AssertionError(f"no progress reported: {self.stderr.decode(errors='replace')}")

    def interrupt(self, timeout: float = WAIT_S) -> tuple[int, str, str]:
        """SIGINT; the exit status, stdout and stderr."""
        self.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while self.read_stderr(0.2) and time.monotonic() < deadline:
            pass
        assert self.process.stdout is not None
        out = self.process.stdout.read().decode(errors="replace")
        code = self.process.wait(max(1.0, deadline - time.monotonic()))
        return code, out, self.stderr.decode(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def _interrupted(args: list[str], tmp: Path, written: Path, glob: str) -> tuple[int, str, str]:
    """Run, interrupt once progress shows; by then ``written`` holds the run's files (matching
    ``glob``), which the test then expects gone."""
    child = Child(args, tmp)
    try:
        child.wait_for_progress()
        assert list(written.glob(glob)), f"the run wrote no {glob} under {written}"
        return child.interrupt()
    finally:
        child.kill()


def test_ctrl_c_during_stress_prints_partial_stats_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code, out, err = _interrupted(
        ["stress", "--ops", "1000000", "--tasks", "8"], tmp, tmp, "lmtier-stress-*"
    )
    assert code == 130, out + err
    done = re.search(r"interrupted after (\d+) ops", out)
    assert done is not None and int(done.group(1)) > 0, out
    assert "cpu" in out and "disk" in out, "the partial per-tier table is printed"
    assert "OK:" not in out and "Traceback" not in err, err
    assert list(tmp.iterdir()) == [], "the temporary disk folder was removed"


def test_ctrl_c_during_a_config_stress_removes_its_namespace(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    (disk / "keep").mkdir(parents=True)  # someone else's: left alone
    config = tmp_path / "c.yaml"
    config.write_text(
        "tiers:\n"
        "  - {name: cpu, kind: memory, max_size_mb: 1}\n"
        f"  - {{name: disk, kind: disk, path: {disk}, max_size_mb: 4}}\n"
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["stress", "--config", str(config), "--ops", "1000000", "--tasks", "4"]
    code, out, err = _interrupted(args, tmp, disk, "ns-*")
    assert code == 130, out + err
    assert "interrupted after" in out and "Traceback" not in err, err
    assert [p.name for p in disk.iterdir()] == ["keep"], "the run's ns-* folder was removed"
    assert list(tmp.iterdir()) == []


def test_ctrl_c_during_a_real_replay_prints_partial_hits_and_cleans_up(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    args = ["replay", "synthetic:zipf", "--real", "--split", "1,4", "--capacities", "0.05"]
    code, out, err = _interrupted(args, tmp, tmp, "lmtier-replay-*")
    assert code == 130, out + err
    done = re.search(r"interrupted after (\d+) ops", out)
    assert done is not None and int(done.group(1)) > 0, out
    assert "block hit" in out, "the partial table is printed"
    assert "Traceback" not in err, err
    assert list(tmp.iterdir()) == [], "the replay's temporary folder was removed"


@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_job_schedulers_signal_ends_a_config_stress_as_ctrl_c_does(
    ending: signal.Signals, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    (disk / "keep").mkdir(parents=True)  # someone else's: left alone
    config = tmp_path / "c.yaml"
    config.write_text(
        "tiers:\n"
        "  - {name: cpu, kind: memory, max_size_mb: 1}\n"
        f"  - {{name: disk, kind: disk, path: {disk}, max_size_mb: 4}}\n"
    )
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    env.pop("LMTIER_CONFIG", None)
    args = ["stress", "--config", str(config), "--ops", "1000000", "--tasks", "4"]
    with (tmp_path / "out").open("w+") as out, (tmp_path / "err").open("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmtier", *args, "--no-progress"],
            cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            preexec_fn=_as_from_a_terminal,
        )  # fmt: skip
        try:
            _wait_for_entry_files(disk / "keep", disk, process)
            process.send_signal(ending)
            code = process.wait(timeout=WAIT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        printed, errors = out.read(), err.read()
    assert code == 128 + ending, printed + errors  # as shells report a run the signal ended
    assert "interrupted after" in printed and "Traceback" not in errors, errors
    assert [p.name for p in disk.iterdir()] == ["keep"], "the run's ns-* folder was removed"
    assert list(disk.rglob("*")) == [disk / "keep"], "no file, temporary or not, is left"
    assert list(tmp.iterdir()) == []


def _wait_for_entry_files(
    keep: Path, disk: Path, process: subprocess.Popen[bytes], timeout: float = WAIT_S
) -> None:
    """Return once the run has committed entries under ``disk`` (files beside its LOCK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        written = [p for p in disk.rglob("*") if p.is_file() and p.name != "LOCK"]
        if any(keep not in p.parents for p in written):
            return
        time.sleep(0.05)
    raise AssertionError(f"no entry file appeared under {disk} (exit status {process.poll()})")
