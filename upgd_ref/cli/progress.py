"""Progress on stderr for the long subcommands: the library reports progress through a
callback or an object it is handed; only the command line writes it out."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, else every 25%).

    Has the ``set_label(text)`` / ``advance(n)`` interface :func:`upgd_ref.demo.run_demo` calls.
    """

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.label = max(1, total), 0, ""
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._next_report = 0.25
        self._start = time.perf_counter()

    def set_label(self, label: str) -> None:
        self.label = label

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        fraction = self.done / self.total
        if self.tty:
            if self.done % 20 == 0 or self.done == self.total:
                filled = int(30 * fraction)
                self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:6.1%} {self.label:<24}")
                self.stream.flush()
        elif fraction >= self._next_report:
            self.stream.write(f"{fraction:.0%} ({self.label}, {time.perf_counter() - self._start:.1f}s)\n")
            self._next_report += 0.25

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class StatusLine:
    """One status line on stderr, rewritten in place on a terminal; a callable taking the text
    (the ``progress`` callback of :func:`upgd_ref.bench.run_benchmark`)."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, text: str) -> None:
        if self.quiet:
            return
        self.stream.write("\r\033[K" + text if self.tty else text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K")
            self.stream.flush()
