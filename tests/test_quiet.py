"""A quiet terminal: no warnings from our runs, progress as bars or whole log lines, silence on request.

reprpo.progress in-process (line mode, quiet, thread-safe updates, the narrow warning filter),
then tiny-random `reprpo train` / `reprpo eval` in subprocesses (stderr a pipe: not a terminal).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import warnings

import pytest

from reprpo import progress

TINY = ["--model.name", "tiny-random", "--data.n_train", "8", "--data.n_eval", "4", "--train.max_steps", "2",
        "--train.batch_size", "2"]
PROGRESS_TEXT = re.compile(r"\d+/\d+|/s\b|it/s|%\|")  # counts, rates, a tqdm bar


def _reprpo(*args, cache) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"REPRPO_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "reprpo.cli", *args], capture_output=True, env=env, timeout=300)
    # decoded by hand: text=True would turn every "\r" into "\n" (universal newlines)
    p.stdout, p.stderr = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `reprpo train` with progress on and the evaluation after it: (process, run dir)."""
    tmp = tmp_path_factory.mktemp("quiet")
    return _reprpo("train", *TINY, "--out", str(tmp / "run"), cache=tmp / "cache"), tmp / "run"


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch):
    """Each test starts with bars on; set_quiet in a test is undone after it."""
    monkeypatch.setattr(progress, "_quiet", False)


# -- reprpo.progress -------------------------------------------------------------------------
def test_line_mode_logs_start_tenths_and_end_with_count_rate_eta(capsys, monkeypatch):
    """20 updates of 1 with no minimum interval: a start line, one line per further 10% (at
    2, 4, ..., 18), the end line; each names the count and has a rate and an ETA."""
    monkeypatch.setattr(progress, "LINE_MIN_SECONDS", 0.0)
    with progress.bar(total=20, desc="score test (adapter)", unit="pair") as b:
        for _ in range(20):
            b.update(1)
    err = capsys.readouterr().err  # capsys's stderr is no terminal
    lines = err.splitlines()
    assert b.mode == "lines" and "\r" not in err
    assert len(lines) == 1 + 9 + 1, lines
    assert lines[0].startswith("score test (adapter): 0/20 (0%)") and lines[0].endswith("start")
    assert lines[1].startswith("score test (adapter): 2/20 (10%)")
    assert lines[-1].startswith("score test (adapter): 20/20 (100%)") and "done in" in lines[-1]
    assert all("pair/s" in x or "s/pair" in x for x in lines[1:]) and all("ETA" in x for x in lines)


@pytest.mark.parametrize("mode", ["lines", "tty"])
def test_skipped_counts_are_not_in_the_rate(monkeypatch, mode):
    """A resumed grid of 10 runs, 6 done before: skip(6) at t=0, then one run done at t=100 s.
    The rate is 1 run / 100 s, so the 3 left take 300 s: "100.00 s/run, ETA 05:00". Counting the
    6 as updates would say 7 runs / 100 s = 14.29 s/run, ETA 00:42."""
    class Stream(io.StringIO):
        def isatty(self):
            return mode == "tty"

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "LINE_MIN_SECONDS", 0.0)
    monkeypatch.setattr(sys, "stderr", Stream())
    b = progress.bar(total=10, desc="compare", unit="run")
    if mode == "tty":
        monkeypatch.setattr(b._tqdm, "_time", lambda: clock[0])
        b._tqdm.start_t = b._tqdm.last_print_t = 0.0
    b.skip(6)
    clock[0] = 100.0
    b.update(1)
    if mode == "lines":
        last = sys.stderr.getvalue().splitlines()[-1]
        assert last.startswith("compare: 7/10 (70%), 100.00 s/run, ETA 05:00"), last
    else:
        d = b._tqdm.format_dict
        assert (d["n"], d["initial"], d["elapsed"]) == (7, 6, 100.0)
        assert "7/10" in sys.stderr.getvalue() and "05:00" in b._tqdm.__str__()
    b.close()


def test_line_mode_at_most_one_tenth_line_a_second(capsys):
    """A bar done within a second logs its start and end only (LINE_MIN_SECONDS)."""
    for _ in progress.bar(range(50), desc="fast", unit="pair"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[-1].startswith("fast: 50/50 (100%)"), lines


def test_a_bar_closed_early_says_stopped(capsys):
    with pytest.raises(RuntimeError), progress.bar(total=10, desc="x") as b:
        b.update(3)
        raise RuntimeError("boom")
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("x: 3/10 (30%)") and "stopped" in last


@pytest.mark.parametrize("how", ["quiet", "disabled"])
def test_quiet_or_disabled_bars_write_nothing_but_count(capsys, how):
    if how == "quiet":
        progress.set_quiet(True)  # undone by _not_quiet
    assert progress.quiet() == (how == "quiet")
    with progress.bar(total=5, desc="x", enabled=how == "quiet") as b:
        b.update(5)
        b.set_postfix(loss="0.69")
    assert b.n == 5 and b.mode == "off"
    assert list(progress.bar([1, 2, 3], enabled=how == "quiet")) == [1, 2, 3]
    assert capsys.readouterr().err == ""


def test_terminal_mode_is_a_tqdm_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    monkeypatch.setattr(sys, "stderr", s)
    with progress.bar(total=4, desc="score test (base)", unit="pair") as b:
        b.update(4)
    assert b.mode == "tty" and "\r" in s.getvalue() and "4/4" in s.getvalue() and "pair/s" in s.getvalue()


@pytest.mark.parametrize("mode", ["lines", "tty"])
def test_updates_from_threads_are_all_counted(monkeypatch, mode):
    """Scoring workers share one bar per split: 8 threads x 500 updates all count."""
    class Stream(io.StringIO):
        def isatty(self):
            return mode == "tty"

    monkeypatch.setattr(sys, "stderr", Stream())
    with progress.bar(total=4000, desc="t", unit="pair") as b:
        threads = [threading.Thread(target=lambda: [b.update(1) for _ in range(500)]) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert b.mode == mode and b.n == 4000
    if mode == "tty":
        assert b._tqdm.n == 4000


def test_third_party_filter_is_narrow(tiny):
    """peft's read of transformers' deprecated `is_gradient_checkpointing` is ignored; any other
    FutureWarning, even one reported at transformers.modeling_utils, still shows."""
    model, _ = tiny
    with warnings.catch_warnings(record=True) as seen:  # restores the filters after
        warnings.simplefilter("always")
        _ = model.is_gradient_checkpointing  # what peft's PeftModel.__init__ reads
        assert any("`is_gradient_checkpointing` is deprecated" in str(w.message) for w in seen)
        seen.clear()
        progress.quiet_third_party_warnings()
        progress.quiet_third_party_warnings()  # idempotent: one filter
        text = [(getattr(f[1], "pattern", f[1]), getattr(f[3], "pattern", f[3])) for f in warnings.filters]
        assert text.count((r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils")) == 1
        _ = model.is_gradient_checkpointing
        warnings.warn_explicit("`other` is deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == ["`other` is deprecated", "something else is deprecated"]


# -- the command line ------------------------------------------------------------------------
def test_tiny_train_and_eval_print_no_warning(trained):
    """A tiny `reprpo train` (evaluation after it) prints no warning: ours are fixed at the
    source (model/forward.py: `cache`, not the deprecated `past_key_values`), third parties'
    filtered by message (progress.quiet_third_party_warnings)."""
    p, _ = trained
    bad = [line for line in p.stderr.splitlines() if "Warning" in line or "deprecated" in line]
    assert not bad, bad
    assert "| test |" in p.stdout


def test_eval_progress_is_whole_lines_without_a_terminal(trained, tmp_path):
    """`reprpo eval` with stderr a pipe: one bar per split and model, as whole lines (no `\\r`).
    A fresh cache: the base scores are computed (into the reference cache), not read."""
    _, run = trained
    p = _reprpo("eval", str(run), "--data.n_eval", "4", "--out", str(tmp_path / "e"), cache=tmp_path / "cache")
    assert "\r" not in p.stderr
    for name in ("score test (base)", "score test (adapter)", "score oos (adapter)"):
        lines = [x for x in p.stderr.splitlines() if x.startswith(name + ":")]
        assert lines and lines[0].endswith("start") and "done in" in lines[-1], (name, p.stderr)
    assert not [x for x in p.stderr.splitlines() if "Warning" in x]


def test_train_progress_is_whole_lines_without_a_terminal(trained):
    """The whole `reprpo train` (step bar included) logs whole lines when stderr is a pipe."""
    p, _ = trained
    assert "\r" not in p.stderr


def test_quiet_and_progress_false_print_no_progress(tmp_path):
    """`--train.progress false` with `--quiet`: no bar and no progress line on stderr."""
    p = _reprpo("--quiet", "train", *TINY, "--train.progress", "false", "--out", str(tmp_path / "run"), cache=tmp_path / "cache")
    shown = [x for x in p.stderr.splitlines() if PROGRESS_TEXT.search(x)]
    assert not shown and "\r" not in p.stderr, p.stderr
    assert "| test |" in p.stdout  # the evaluation ran
