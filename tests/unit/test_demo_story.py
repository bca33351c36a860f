"""``sentinel demo``'s progress line and summary: consistent under load, and telling why it ended."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sentinel import demo
from sentinel.cli import main
from sentinel.demo import Progress, _ending


def _sn(step: int, skipped: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        step=step,
        counters={"steps": step, "sent": step, "dropped": 0, "errors": 0},
        position=SimpleNamespace(skipped=skipped),
        should_stop=False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--lr", "-1"],
        ["--lr", "nan"],
        ["--lr", "x"],
        ["--metrics-port", "70000"],
        ["--metrics-port", "-1"],
        ["--steps", "-5"],
        ["--steps", "0"],
        ["--seed", "-1"],
    ],
)
def test_every_usage_error_exits_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])  # argparse rejects it before anything starts: no agent, no model
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_a_usage_error_exits_2_from_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "sentinel.cli", "demo", "--lr", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--lr" in done.stderr and "Traceback" not in done.stderr


def test_speed_and_eta_agree_under_a_changing_load(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0] + [1.0 * i for i in range(1, 41)] + [40.0 + 0.1 * i for i in range(1, 11)])
    monkeypatch.setattr(demo.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    progress = Progress(500, stream=out)
    for step in range(1, 51):  # 40 slow steps (1 s), then 10 fast ones (0.1 s)
        progress(_sn(step), 2.0)
    line = out.getvalue().splitlines()[-1]
    m = re.search(r"step 50/500 .* (\d+) ms/step  ETA +(\d+) s", line)
    assert m, line
    per_step, eta = int(m[1]) / 1000, int(m[2])
    assert eta == pytest.approx(per_step * 450, abs=1)  # was: 0.1 s/step shown with a 40-step average ETA


def test_a_rollback_prints_its_own_line_not_a_stale_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    progress = Progress(500, stream=out)
    for step in range(1, 251):
        progress(_sn(step), 2.0)
    progress(_sn(150, skipped=200), 8.91)  # the boundary of step 251 rolled back to step 150
    progress(_sn(151, skipped=200), 2.3)
    lines = out.getvalue().splitlines()
    assert (
        lines[-1] == "step 251: loss 8.9100; the agent rolled the run back to step 150 (200 batch(es) skipped so far)"
    )
    assert not any(re.search(r"step 150/500 .*8\.91", ln) for ln in lines)
    assert progress.rollbacks == [(251, 150)]
    assert _ending(300, 500, progress) == (
        "at step 300 of 500: the data ran out (500 batches were made for 500 steps, "
        "and 200 were skipped by the agent's commands)"
    )
    assert _ending(500, 500, progress) == "after 500 steps, as asked"
