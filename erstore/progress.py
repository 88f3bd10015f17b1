"""Progress of long phases (read, compute, commit, verify, copy, export, gc, choose) on stderr.

A `Reporter` belongs to one command (`build`, `verify`, ...) and opens `Phase`s; the code doing
the work calls `phase.update(n)` as it goes. What the user sees depends on the mode:

- "bar": a tqdm bar per phase (a terminal, or a notebook);
- "lines": plain lines, one when a phase starts, one every `ERSTORE_PROGRESS_SECONDS` (10 s)
  while it runs, and a summary when it ends, e.g.
  `build: compute 12,345/40,000 sequences (31%), 2,100 sequences/s, eta 13 s, 5.9 s elapsed; 790,080 tokens, ...`
  (stderr redirected to a file or a pipe: a build logged to a file shows that it is alive);
- "off": nothing (`--quiet`, `progress=False`).

"auto" (the default) is "bar" when stderr is a terminal or a notebook runs us, else "lines". The
environment variable `ERSTORE_PROGRESS=bar|lines|off` overrides "auto" (it does not override an
explicit mode or `--quiet`). Progress never goes to stdout: stdout carries `--json` output, and
`--json` commands print no plain lines unless `ERSTORE_PROGRESS` asks for them (`cli_mode`).

Cheap by construction: `update` adds to a counter and compares `time.monotonic()` (~50 ns) with
the time the next line is due; nothing is formatted until a line is due, and the optional
`detail` callable (extra counts for the line) is called only then.

Not here: logging integration, multi-process aggregation (each rank of a distributed build
reports on its own, named `build rank R/W`), byte-level progress of corpus files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from erstore.errors import InvalidInputError

MODES = ("auto", "bar", "lines", "off")
ENV_MODE = "ERSTORE_PROGRESS"
ENV_SECONDS = "ERSTORE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 10.0
BAR_DETAIL_SECONDS = 0.5  # how often a bar's detail text (postfix) is refreshed


def _env_mode() -> str | None:
    value = os.environ.get(ENV_MODE, "").strip().lower()
    if not value:
        return None
    if value not in MODES:
        raise InvalidInputError(f"{ENV_MODE}={value!r} is not a progress mode; use one of {', '.join(MODES)} "
                                f"(or unset it)")
    return value


def interval_seconds() -> float:
    """Seconds between plain progress lines: `ERSTORE_PROGRESS_SECONDS`, default 10."""
    raw = os.environ.get(ENV_SECONDS, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise InvalidInputError(f"{ENV_SECONDS}={raw!r} must be a number of seconds >= 0 (e.g. 10)")
    return value


def _interactive(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return True
    # A Jupyter kernel's stderr is no terminal, but tqdm.auto draws a widget there.
    return "ipykernel" in sys.modules and stream is sys.stderr


def resolve(progress: bool | str | None, stream: TextIO | None = None) -> str:
    """The concrete mode ("bar", "lines" or "off") for a `progress` argument.

    True / None / "auto": `ERSTORE_PROGRESS` if set, else "bar" on a terminal, "lines" otherwise;
    False / "off": off; "bar" / "lines": that mode.
    """
    if progress is None or progress is True:
        progress = "auto"
    elif progress is False:
        progress = "off"
    if progress not in MODES:
        raise InvalidInputError(f"progress must be True, False or one of {', '.join(MODES)}, got {progress!r}")
    if progress != "auto":
        return progress
    forced = _env_mode()
    if forced is not None and forced != "auto":
        return forced
    return "bar" if _interactive(stream or sys.stderr) else "lines"


def cli_mode(*, quiet: bool, as_json: bool = False) -> str:
    """The mode a command runs with: `--quiet` is off; `--json` keeps a terminal's bar but writes
    no plain lines unless `ERSTORE_PROGRESS` asks for them (scripts often merge stderr into the
    JSON they parse); otherwise "auto"."""
    if quiet:
        return "off"
    if as_json:
        forced = _env_mode()
        if forced is not None and forced != "auto":
            return forced
        return "bar" if _interactive(sys.stderr) else "off"
    return "auto"


def _count(n: int, unit: str) -> str:
    """`1 sequence`, `2 sequences`: units are given in the plural."""
    return f"{n:,} {unit[:-1] if n == 1 and unit.endswith('s') else unit}"


def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def duration(seconds: float) -> str:
    """`13 s`, `2 min 05 s`, `1 h 03 min`: short, for progress lines."""
    s = int(round(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Reporter:
    """Progress of one command: `with reporter.phase("compute", total=n, unit="sequences") as p: p.update()`.

    `progress` is a mode (see `resolve`); `stream` defaults to sys.stderr at the time a phase
    starts; `interval` (seconds between plain lines) defaults to `ERSTORE_PROGRESS_SECONDS`.
    """

    def __init__(self, name: str, progress: bool | str | None = True, *, stream: TextIO | None = None,
                 interval: float | None = None) -> None:
        self.name = name
        self.stream = stream
        self.mode = resolve(progress, stream)
        if interval is None:  # read only when lines are printed: --quiet never fails on the variable
            interval = interval_seconds() if self.mode == "lines" else DEFAULT_SECONDS
        self.interval = float(interval)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _out(self) -> TextIO:
        return self.stream or sys.stderr

    def phase(self, name: str, *, total: int | None = None, unit: str | None = "items",
              detail: Callable[[], str] | None = None) -> Phase:
        """Start a phase (prints its start line now in "lines" mode); close it, or use it as a context.

        `unit` None: a step without a count (loading a model), reported by its time only.
        """
        return Phase(self, name, total=total, unit=unit, detail=detail)

    def say(self, message: str) -> None:
        """One line of status (not throttled), drawn above any bars; nothing when off."""
        if self.mode == "off":
            return
        if self.mode == "bar":
            from tqdm.auto import tqdm

            tqdm.write(message, file=self._out())
        else:
            self._line(message)

    def _line(self, text: str) -> None:
        if self.mode == "off":
            return
        try:
            out = self._out()
            out.write(text + "\n")
            out.flush()
        except (OSError, ValueError):  # stderr closed (a pipe whose reader left): never end the work for it
            self.mode = "off"


class Phase:
    """One phase's counter; `update(n)` is cheap (see the module docstring)."""

    def __init__(self, reporter: Reporter, name: str, *, total: int | None, unit: str | None,
                 detail: Callable[[], str] | None) -> None:
        self.reporter, self.name, self.total, self.unit, self.detail = reporter, name, total, unit, detail
        self.n = 0
        self.closed = False
        self.started = time.monotonic()
        self._bar: Any = None
        mode = reporter.mode
        # Off: the next line is never due, so update() is an add and a compare.
        self._due = math.inf
        if mode == "lines":
            self._due = self.started + reporter.interval
            counted = total is not None and unit is not None
            reporter._line(f"{self.label} started" + (f": {_count(total, unit)}" if counted else ""))
        elif mode == "bar":
            from tqdm.auto import tqdm

            step = {"bar_format": "{desc}: {elapsed}"} if unit is None else {}
            self._bar = tqdm(total=total, unit=f" {unit}", desc=f"{reporter.name} {name}", file=reporter._out(),
                             dynamic_ncols=True, leave=True, disable=False, unit_scale=False, **step)
            self._due = self.started + BAR_DETAIL_SECONDS

    @property
    def label(self) -> str:
        return f"{self.reporter.name}: {self.name}"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def set_total(self, total: int | None) -> None:
        """The total, once it becomes known (e.g. compute's once the corpus is read)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """Count `n` more done; draws or prints only when due."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if now >= self._due:
            self._tick(now)

    def _tick(self, now: float) -> None:
        if self._bar is not None:
            if self.detail is not None:
                self._bar.set_postfix_str(self.detail(), refresh=False)
            self._due = now + BAR_DETAIL_SECONDS
            return
        self.reporter._line(self._status(now - self.started))
        self._due = now + self.reporter.interval

    def _status(self, elapsed: float) -> str:
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"{self.label} {self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)"
            text += f", {_rate(rate)} {self.unit}/s"
            if 0 < rate and self.n < self.total:
                text += f", eta {duration((self.total - self.n) / rate)}"
        else:
            text = f"{self.label} {_count(self.n, self.unit)}, {_rate(rate)} {self.unit}/s"
        text += f", {duration(elapsed)} elapsed"
        return text + (f"; {self.detail()}" if self.detail is not None else "")

    def close(self, *, failed: bool = False) -> None:
        """End the phase: the bar is finished, or a summary line is printed. Idempotent."""
        if self.closed:
            return
        self.closed = True
        elapsed = self.elapsed
        if self._bar is not None:
            if not failed and self.total is not None and self.n < self.total:
                self._bar.total = self.n  # fewer than announced (e.g. a --limit above the corpus size)
            if self.detail is not None:
                self._bar.set_postfix_str(self.detail(), refresh=False)
            self._bar.close()
        elif self.reporter.mode == "lines":
            rate = f" ({_rate(self.n / elapsed)} {self.unit}/s)" if elapsed > 0 and self.n else ""
            if self.unit is not None:
                head = f"{self.label} {'stopped after' if failed else 'done:'} {_count(self.n, self.unit)} in "
            else:  # a step without a count (loading a model)
                head = f"{self.label} {'stopped after' if failed else 'done in'} "
            self.reporter._line(f"{head}{duration(elapsed)}{rate}"
                                + (f"; {self.detail()}" if self.detail is not None else ""))

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(failed=exc_type is not None)


def reporter(name: str, progress: bool | str | Reporter | None = True) -> Reporter:
    """A Reporter for `name`: `progress` is a mode (see `resolve`) or an existing Reporter, whose
    mode, stream and interval are kept under the new name."""
    if isinstance(progress, Reporter):
        return Reporter(name, progress.mode, stream=progress.stream, interval=progress.interval)
    return Reporter(name, progress)


__all__ = ["MODES", "Phase", "Reporter", "cli_mode", "duration", "interval_seconds", "reporter", "resolve"]
