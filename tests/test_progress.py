"""The project's progress lines: what a terminal and a job log see, ETA from this attempt's rate,
a failed stage, a poll that fails, and the ledger's counts of retried batches."""

from __future__ import annotations

import io

from cousins.run.ledger import Ledger
from cousins.run.progress import Bar, duration, watch


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_job_log_gets_a_line_every_interval_and_a_last_one():
    out, clock = io.StringIO(), Clock()
    bar = Bar("generate teacher", 1000, every_s=10, stream=out, tty=False, clock=clock)
    for t, done in ((4, 100), (11, 250), (15, 300), (22, 600)):
        clock.t = t
        bar.update(done, tokens=done * 50, errors=done // 100)
    clock.t = 40
    bar.update(1000, tokens=50_000, errors=10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "generate teacher ·   0% [                    ] 0/1,000 rows · 0 errors · 0 s",
        "generate teacher ·  25% [#####               ] 250/1,000 rows · 1,136 tok/s · 2 errors · ETA 33 s",
        "generate teacher ·  60% [############        ] 600/1,000 rows · 1,364 tok/s · 6 errors · ETA 15 s",
        "generate teacher · 100% [####################] 1,000/1,000 rows · 1,250 tok/s · 10 errors · done in 40 s",
    ]


def test_a_terminal_gets_one_line_redrawn_in_place():
    out, clock = io.StringIO(), Clock()
    bar = Bar("diff", 200, unit="drift rows", stream=out, tty=True, clock=clock)
    for t in range(1, 5):
        clock.t = t
        bar.add(50, errors=1)
    bar.close()
    text = out.getvalue()
    assert "\n" not in text[:-1] and text.endswith("done in 4 s\n") and text.count("\r") == 5
    assert "200/200 drift rows" in text and "4 errors" in text


def test_eta_counts_only_what_this_attempt_did():
    out, clock = io.StringIO(), Clock()
    bar = Bar("generate q", 1000, start=900, every_s=1, stream=out, tty=False, clock=clock)
    clock.t = 10
    bar.update(950)  # 50 rows in 10 s, 50 to go
    assert out.getvalue().splitlines()[-1].endswith("950/1,000 rows · 0 errors · ETA 10 s")


def test_a_failed_stage_says_stopped_and_a_failing_poll_is_skipped():
    out, clock = io.StringIO(), Clock()
    bar = Bar("score q", 10, stream=out, tty=False, clock=clock)
    try:
        with watch(bar, lambda: (7, None, 0)):
            clock.t = 3
            raise RuntimeError("engine died")
    except RuntimeError:
        pass
    assert out.getvalue().splitlines()[-1].endswith("0/10 rows · 0 errors · stopped after 3 s")

    def poll():
        raise TimeoutError("the counter did not answer")

    out = io.StringIO()
    with watch(Bar("score r", 10, stream=out, tty=False, clock=clock), poll):
        pass  # the stage itself went well: its poll failing is not its failure
    assert out.getvalue().splitlines()[-1].endswith("0/10 rows · 0 errors · done in 0 s")
    out = io.StringIO()
    with watch(Bar("score s", 10, stream=out, tty=False, clock=clock), lambda: (7, None, 1)):
        pass
    assert out.getvalue().splitlines()[-1].endswith("7/10 rows · 1 error · done in 0 s")


def test_the_ledger_counts_a_retried_batch_once():
    ledger = Ledger()
    ledger.rows_done("m", "k1", 16, 1, 400)
    ledger.rows_done("m", "k2", 16, 0, 380)
    ledger.rows_done("m", "k1", 16, 0, 410)  # k1 again: its task was retried
    ledger.rows_done("score:m", "k1", 16, 0, 0)
    assert ledger.progress("m") == (32, 0, 790)
    assert ledger.progress("score:m") == (16, 0, 0) and ledger.progress("other") == (0, 0, 0)


def test_durations():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7620)] == ["0 s", "59 s", "1m01s", "59m59s", "1h00m", "2h07m"]


def test_without_a_poll_the_block_sets_the_counts_and_the_thread_only_keeps_time():
    out, clock = io.StringIO(), Clock()
    bar = Bar("prompts", None, unit="prompts", every_s=0.01, stream=out, tty=False, clock=clock)
    with watch(bar):
        for t in range(1, 50):
            clock.t = t
            bar.update(t * 10, errors=1)  # races with the thread's redraws: they must not undo it
    assert out.getvalue().splitlines()[-1] == "prompts · 490 prompts · 1 error · done in 49 s"
