"""Exit statuses of the ``lmtier`` command, and the signals that end a run as Ctrl-C does."""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Any

__all__ = ["ENDING_SIGNALS", "INTERRUPTED", "USAGE_ERROR", "Interrupts"]

# A missing command is a usage error, as argparse reports every other one.
USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C
#: What a job scheduler (``timeout``, Slurm, Kubernetes) or a closed terminal sends to end a run.
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Interrupts:
    """While entered, SIGTERM and SIGHUP end a run exactly as Ctrl-C does.

    Each is handed to whatever handles SIGINT at that moment (``asyncio.run`` cancels its main
    task, so the run's files and store are cleaned up; elsewhere KeyboardInterrupt is raised),
    so a second signal stops the clean-up as a second Ctrl-C does.  A signal that was ignored
    when the command started (``nohup``) stays ignored.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the first ending signal, if one came
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        for number in ENDING_SIGNALS:
            if signal.getsignal(number) is signal.SIG_DFL:
                self._previous[number] = signal.signal(number, self._as_ctrl_c)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def exit_status(self, status: int) -> int:
        """``status``, or for a run that was interrupted, 128 + the signal that ended it."""
        if status == INTERRUPTED and self.received is not None:
            return 128 + self.received
        return status

    def _as_ctrl_c(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored (a background job): end all the same
            handler = signal.default_int_handler
        handler(signal.SIGINT, frame)
