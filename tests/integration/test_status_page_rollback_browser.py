"""The status page after a rollback and after the run ended, in a real headless Chromium.

A run is pushed through a real agent as a trainer that rolled back sends it: steps 0..250 with
a loss spike at the end, then steps 150..200 again.  The page, after its script redrew it from
``/api/status``, must draw the abandoned steps apart from the restored ones (no line from the
spike back to step 150), give the loss and risk charts the same steps, say "rank 0" and a step
time a person reads ("0.628 ms"), keep a short run name on one line in the events table, and,
once the run has been silent a while, say it stopped instead of looking live.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from agent_proc import AgentProc, Pusher, fetch, make_frames, require_binary

from agent.status_page import QUIET_SECONDS

RUN = "demo"
STEP_TIME = 6.28e-4


class _Card(HTMLParser):
    """The card of RUN: its facts, its header badges and, per chart, its polylines and x labels."""

    def __init__(self) -> None:
        super().__init__()
        self.facts: dict[str, tuple[str, str]] = {}
        self.badges: list[str] = []
        self.lines: dict[str, list[tuple[str, list[float]]]] = {}
        self.xlabels: dict[str, list[str]] = {}
        self.rendered = ""
        self._in, self._chart, self._dt, self._dd, self._xl, self._badge = False, None, "", None, False, False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.rendered = a.get("data-rendered", "")
        if tag == "article":
            self._in = a.get("data-run") == RUN
        if not self._in:
            return
        if tag == "svg":
            self._chart = a.get("class", "").removeprefix("chart-")
        elif tag == "polyline" and self._chart:
            xs = [float(p.split(",")[0]) for p in a["points"].split()]
            self.lines.setdefault(self._chart, []).append((a.get("class", ""), xs))
        elif tag == "text" and self._chart and a.get("class") == "xlabel":
            self._xl = True
        elif tag == "dt":
            self._dt = "?"
        elif tag == "dd":
            self._dd = a.get("class")
        elif tag == "span" and "state" in a.get("class", "").split():
            self._badge = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        elif tag == "article":
            self._in = False
        elif tag == "text":
            self._xl = False
        elif tag == "dd":
            self._dd = None
        elif tag == "span":
            self._badge = False

    def handle_data(self, data: str) -> None:
        if self._xl and self._chart:
            self.xlabels.setdefault(self._chart, []).append(data)
        elif self._dt == "?" and self._in:
            self._dt = data
        elif self._dd and self._in:
            self.facts[self._dd] = (self._dt, data)
            self._dt = ""
        elif self._badge:
            self.badges.append(data)


def _chromium(target: str, tmp: Path, *mode: str) -> str:
    exe = require_binary("chromium")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    done = subprocess.run(
        [*cmd, "--virtual-time-budget=6000", *mode, target], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _card(page: str) -> _Card:
    card = _Card()
    card.feed(page)
    return card


def _push_rollback(endpoint: str) -> None:
    with Pusher(endpoint) as p:
        for seq, step in enumerate([*range(0, 251), *range(150, 201)], start=1):
            loss = 9.0 if 246 <= step <= 250 and seq <= 251 else 2.0 + 0.001 * (step % 7)
            scalars = {"loss": loss, "grad_norm": 1.0, "step_duration_seconds": STEP_TIME}
            p.send(make_frames(run=RUN, step=step, seq=seq, sent=seq, scalars=scalars))


def test_rollback_finished_run_and_labels_in_the_browser(start_agent: Callable[..., AgentProc], tmp_path: Path) -> None:
    require_binary("chromium")
    agent = start_agent()
    base = agent.metrics_url.removesuffix("metrics")
    _push_rollback(agent.stats_endpoint)
    agent.wait_for(lambda s: s.value("sentinel_agent_received_messages_total") == 302)
    pushed = time.monotonic()
    live = _chromium(base, tmp_path, "--dump-dom")
    card = _card(live)
    assert card.rendered == "api"
    assert "stopped" not in card.badges  # seconds after its last message: live

    loss = card.lines["loss"]
    assert any("abandoned" in cls for cls, _ in loss), loss  # the branch the rollback left is drawn, apart
    for cls, xs in loss:
        assert xs == sorted(xs) and len(set(xs)) == len(xs), f"{cls}: a line that goes back in steps: {xs}"
    current = [xs for cls, xs in loss if "abandoned" not in cls]
    assert current and max(max(xs) for xs in current) < max(max(xs) for _, xs in loss)  # it ends at 200, not 250
    assert card.xlabels["loss"] == card.xlabels["risk"] == card.xlabels["grad_norm"]  # one x range per run
    assert card.facts["ranks"] == ("rank", "0")
    assert card.facts["step_duration_seconds"] == ("step time", "0.628 ms")

    probe = tmp_path / "page.html"  # the page as served, plus a script that measures the run column
    measure = (  # the number of line boxes of the run name's text, not the row's height
        "<script>addEventListener('load',()=>{const td=document.querySelector('#events tbody td:nth-child(2)');"
        "const r=document.createRange();r.selectNodeContents(td);"
        "document.body.dataset.runCell=td.textContent+'|'+r.getClientRects().length;});</script></body>"
    )
    probe.write_text(fetch(base).replace("</body>", measure))
    dom = _chromium(probe.as_uri(), tmp_path, "--dump-dom", "--window-size=700,900")
    text, lines = re.search(r'data-run-cell="([^|"]*)\|(\d+)"', dom).groups()
    assert (text, lines) == (RUN, "1"), f"the run column wraps {text!r} over {lines} lines"

    time.sleep(max(0.0, QUIET_SECONDS + 1 - (time.monotonic() - pushed)))
    card = _card(_chromium(base, tmp_path, "--dump-dom"))
    assert card.badges == ["stopped"]  # silent for many step times: it reads as ended, not "11 s ago" live
    assert card.facts["age"][1].endswith("s ago")
