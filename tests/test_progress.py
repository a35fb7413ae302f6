"""Progress of long work: a line rewritten in place on a terminal; in a log (stderr not a
terminal), whole lines at most every LOG_INTERVAL_S seconds, none for work that ends sooner, and
the step's text (a task id) never cut."""

from __future__ import annotations

import io

from santacpu.progress import LOG_INTERVAL_S, Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_rate_limited_lines_for_long_work_only():
    log, clock = io.StringIO(), Clock()
    quick = Progress(3, "quantizing", stream=log, clock=clock)
    for _ in range(3):
        clock.now += 0.1
        quick.step("layer")
    assert log.getvalue() == ""  # short work writes nothing in a log

    slow = Progress(10, "eval", stream=log, clock=clock)
    for i in range(10):
        clock.now += LOG_INTERVAL_S / 2
        slow.step(f"SingleLineInfilling/HumanEval/{i}/L{i}")
    lines = log.getvalue().splitlines()
    # a line at every other step (one interval apart), and the last step's line
    assert [line.split()[2] for line in lines] == ["2/10", "4/10", "6/10", "8/10", "10/10"]
    assert lines[0] == f"santacpu: eval: 2/10 SingleLineInfilling/HumanEval/1/L1 {LOG_INTERVAL_S:.1f} s"


def test_a_terminal_line_shows_the_whole_step_and_clears_a_longer_one():
    term, clock = Terminal(), Clock()
    progress = Progress(2, "eval", stream=term, clock=clock)
    long_id = "RandomSpanInfillingLight/HumanEval/163/0123456789"
    progress.step(long_id)
    progress.step("x")
    first, second = term.getvalue().split("\r")[1:]
    assert long_id in first
    assert second.endswith("\n") and len(second.rstrip("\n")) >= len(first)


def test_work_cut_short_ends_its_terminal_line_before_the_next_message():
    # "...13.4 ssantacpu: interrupted": the message had followed the open progress line.
    from santacpu.progress import end_open_line

    term, clock = Terminal(), Clock()
    progress = Progress(3, "eval", stream=term, clock=clock)
    progress.step("a")
    end_open_line()
    assert term.getvalue().endswith(" s\n")
    end_open_line()  # (once)
    assert term.getvalue().count("\n") == 1
    done = Progress(1, "eval", stream=term, clock=clock)
    done.step("b")
    end_open_line()  # a finished line is ended already
    assert term.getvalue().count("\n") == 2
