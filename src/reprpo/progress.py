"""Progress of the slow steps: a tqdm bar on a terminal, whole log lines elsewhere, nothing when quiet.

`bar(...)` is the one constructor every slow loop uses (conversion, reference cache, scoring,
generation, compare, tune; train.py's step bar). Where stderr is not a terminal (a log file, a
pipe, a job scheduler) a bar writes whole lines instead of carriage-return redraws: one when it
starts, then one each time another 10% is done (at most one a second) or 30 s have passed, and
one when it ends, each with the count, the rate and the ETA. `set_quiet(True)` (`reprpo --quiet`) silences every bar;
a caller whose config says `train.progress false` passes `enabled=False`.

`update` is thread-safe (scoring workers share one bar per split): each bar holds a lock.
`skip(n)` counts work done before or elsewhere (compare's runs already in the store) without
putting it in the rate, so a resumed grid's ETA is of the runs it actually runs.

`quiet_third_party_warnings()` silences, by exact message, the deprecation warnings that
libraries raise about their own calls on our runs; warnings our calls cause are fixed where we
make the call.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator

from tqdm import tqdm

LINE_FRACTION = 0.1  # without a terminal: a line each time another tenth of the total is done
LINE_SECONDS = 30.0  # ... or when this long has passed since the last line
LINE_MIN_SECONDS = 1.0  # but a 10% line at most this often (a bar done in a second logs its start and end only)

_quiet = False


def set_quiet(flag: bool) -> None:
    """Silence (True) or allow (False) every progress bar of this process."""
    global _quiet
    _quiet = bool(flag)


def quiet() -> bool:
    return _quiet


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _count(x: float) -> str:
    """A count as an integer when it is one (1200128, not 1.20013e+06), else up to 6 digits."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _clock(seconds: float) -> str:
    return tqdm.format_interval(max(0.0, seconds))


class Bar:
    """A tqdm-like progress counter: iterate it, or `update(n)` it (from any thread); a context
    manager that closes itself. Mode, chosen once at creation: `tty` (a tqdm bar on stderr),
    `lines` (whole log lines on stderr) or `off`."""

    def __init__(self, iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self._lock = threading.Lock()
        self._postfix = ""
        self._closed = False
        self._stream = sys.stderr
        self.mode = "off" if (not enabled or _quiet) else ("tty" if _isatty(self._stream) else "lines")
        self._tqdm = None
        if self.mode == "tty":
            # leave=None: a top-level bar stays on screen when done, a nested one (inside compare's) goes
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self._stream, dynamic_ncols=True, leave=None)
        elif self.mode == "lines":
            self._t0 = self._t_line = time.monotonic()
            self._next_n = self._step_n(initial)
            self._line("start")

    # -- counting ------------------------------------------------------------------------------
    def update(self, n: float = 1) -> None:
        with self._lock:
            self.n += n
            if self._tqdm is not None:
                self._tqdm.update(n)
            elif self.mode == "lines" and not self._closed:
                now = time.monotonic()
                since = now - self._t_line
                tenth = self.total and self._next_n <= self.n < self.total and since >= LINE_MIN_SECONDS
                if tenth or since >= LINE_SECONDS:
                    self._line("")
                    self._next_n = self._step_n(self.n)

    def skip(self, n: float = 1) -> None:
        """Count `n` as done but not as work this bar timed (a run finished by an earlier or
        another process): the rate and ETA are of the updates only, as if the bar had started
        at the higher count (tqdm's `initial`)."""
        with self._lock:
            self.n += n
            self.initial += n
            if self._tqdm is not None:  # past tqdm.update: its smoothed rate never sees the jump
                self._tqdm.n += n
                self._tqdm.initial += n
                self._tqdm.last_print_n += n
                self._tqdm.refresh()

    def __iter__(self) -> Iterator:
        try:
            for x in self.iterable or ():
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def set_postfix(self, ordered_dict: dict | None = None, **kw) -> None:
        """`key=value` pairs shown after the counts (tqdm's set_postfix)."""
        items = dict(ordered_dict or {}) | kw
        with self._lock:
            if self._tqdm is not None:
                self._tqdm.set_postfix(items)
            self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str) -> None:
        with self._lock:
            self.desc = desc
            if self._tqdm is not None:
                self._tqdm.set_description(desc)

    def close(self, *, failed: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._tqdm is not None:
                self._tqdm.close()
            elif self.mode == "lines":
                short = self.total is not None and self.n < self.total  # closed before the end (an error, a break)
                self._line("stopped" if failed or short else "done")

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    # -- log lines -----------------------------------------------------------------------------
    def _step_n(self, n: float) -> float:
        """The count at which the next 10% line is due."""
        if not self.total:
            return float("inf")
        step = self.total * LINE_FRACTION
        return (int(n / step) + 1) * step

    def _line(self, event: str) -> None:
        """One whole line: `desc: n/total (p%), rate unit/s, ETA` (+ the event, + postfix)."""
        now = time.monotonic()
        elapsed = now - self._t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        u = self.unit
        parts = [f"{_count(self.n)}/{_count(self.total)} ({100 * self.n / self.total:.0f}%)" if self.total else _count(self.n)]
        parts.append("? " + f"{u}/s" if rate is None else (f"{rate:.2f} {u}/s" if rate >= 1 else f"{1 / rate:.2f} s/{u}"))
        left = (self.total - self.n) / rate if (rate and self.total) else None
        parts.append("ETA ?" if left is None else f"ETA {_clock(left)}")
        if event == "done":
            parts.append(f"done in {_clock(elapsed)}")
        elif event:
            parts.append(event if event == "start" else f"{event} after {_clock(elapsed)}")
        if self._postfix:
            parts.append(self._postfix)
        print(f"{self.desc or 'progress'}: " + ", ".join(parts), file=self._stream, flush=True)
        self._t_line = now


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True, initial: int = 0) -> Bar:
    """A progress bar over `iterable` (or `total` counts): see `Bar`. `enabled=False` (a config's
    `train.progress false`) or `set_quiet(True)` makes it silent; it still counts (`.n`)."""
    return Bar(iterable, total=total, desc=desc, unit=unit, enabled=enabled, initial=initial)


def write(message: str, *, file=None) -> None:
    """Print a line (stdout by default) without breaking a live terminal bar (tqdm.write)."""
    tqdm.write(message, file=file or sys.stdout)


# Deprecation warnings that third-party code raises about its own calls, during our runs
# (found in tiny-random `reprpo train / eval / compare / tune` runs): (message regex, category,
# module regex: the module whose code calls warnings.warn, the frame the warning is reported at).
THIRD_PARTY_WARNINGS = (
    # peft 0.21 (PeftModel.__init__, mixed_model) reads `model.is_gradient_checkpointing`, which
    # transformers 5.x deprecates in favour of `is_activation_checkpointing`; the property calls
    # warnings.warn itself (stacklevel 1), so the warning is reported at transformers.modeling_utils.
    # It fires in get_peft_model (train) and PeftModel.from_pretrained (eval, compare, tune).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)


def quiet_third_party_warnings() -> None:
    """Ignore exactly the warnings in THIRD_PARTY_WARNINGS (by message, category and module);
    every other warning still shows. Idempotent (warnings drops a filter added twice)."""
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
