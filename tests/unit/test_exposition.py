"""agent/exposition.py writes exactly what prometheus_client writes, in both formats, only faster."""

from __future__ import annotations

import gzip
import math
import time

import numpy as np
import pytest
from agent_proc import make_frames
from prometheus_client import CollectorRegistry, Counter, Histogram, exposition
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics import exposition as om
from test_agent_metrics import ALL_STATS, Fixture

from agent.exposition import make_metrics_app, text

PROMETHEUS_ACCEPT = (  # what Prometheus 2.x/3.x sends by default
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


def _populated() -> Fixture:
    f = Fixture()
    odd = 'we"ird\\run\nname ünï'
    for rank, run in ((0, "job"), (1, "job"), (0, odd)):
        f.send(
            make_frames(
                run=run,
                rank=rank,
                step=7,
                scalars={"loss": math.nan, "grad_norm": math.inf, "lr": -math.inf, "tokens": 1e22, "loss_max": 3.5},
                stats=ALL_STATS,
                tensors=('w"1', "w\\2"),
                matrix=np.arange(2 * len(ALL_STATS)).reshape(2, -1) * 1.5e-9 + 1234567.0,
                dropped=3,
            )
        )
    return f


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_the_agents_families_come_out_byte_for_byte_as_the_librarys(openmetrics: bool) -> None:
    f = _populated()
    library = (om.generate_latest if openmetrics else exposition.generate_latest)(f.registry)
    ours = text(f.registry, openmetrics=openmetrics)
    assert b'we\\"ird\\\\run\\nname' in ours and b"NaN" in ours and b"+Inf" in ours
    assert ours.decode().splitlines() == library.decode().splitlines()
    assert ours == library


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_what_it_does_not_handle_is_the_librarys_own_output(openmetrics: bool) -> None:
    registry = CollectorRegistry()
    Counter("things", "Things (things).", registry=registry).inc(2)  # _created sample
    Histogram("latency_seconds", "Latency (seconds).", registry=registry).observe(0.3)

    class Odd:
        def collect(self):
            g = GaugeMetricFamily("odd", "Odd.", labels=["a"])
            g.add_metric(["x"], 1.0, timestamp=12.5)
            yield g

    registry.register(Odd())
    library = (om.generate_latest if openmetrics else exposition.generate_latest)(registry)
    assert text(registry, openmetrics=openmetrics).split(b"\n")[:-3] == library.split(b"\n")[:-3]  # _created times


def _call(app, accept: str | None = None, query: str = "", encoding: str | None = None, method: str = "GET"):
    got: dict = {}

    def start_response(status, headers):
        got["status"], got["headers"] = status, dict(headers)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": "/metrics", "QUERY_STRING": query}
    if accept is not None:
        environ["HTTP_ACCEPT"] = accept
    if encoding is not None:
        environ["HTTP_ACCEPT_ENCODING"] = encoding
    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def test_the_wsgi_app_negotiates_as_prometheus_client_does() -> None:
    f = _populated()
    ours, library = make_metrics_app(f.registry), exposition.make_wsgi_app(f.registry)
    cases = [
        {},
        {"accept": PROMETHEUS_ACCEPT},
        {"accept": "text/plain;version=0.0.4"},
        {"accept": "application/openmetrics-text;version=1.0.0;escaping=values"},  # the library's path
        {"query": "name[]=sentinel_loss"},
        {"method": "OPTIONS"},
    ]
    for case in cases:
        assert _call(ours, **case) == _call(library, **case), case
    status, headers, body = _call(ours, accept=PROMETHEUS_ACCEPT, encoding="gzip")
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == om.generate_latest(f.registry)
    assert headers["Content-Type"].startswith("application/openmetrics-text")


def test_it_is_several_times_faster_on_a_thousand_ranks() -> None:
    f = Fixture()
    for rank in range(1024):
        f.send(make_frames(run="big", rank=rank, step=1, scalars={"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3}))
    theirs, mine = [], []
    for _ in range(3):  # the fastest of three each: the machine may be busy with something else
        t0 = time.perf_counter()
        library = om.generate_latest(f.registry)
        t1 = time.perf_counter()
        ours = text(f.registry, openmetrics=True)
        theirs.append(t1 - t0)
        mine.append(time.perf_counter() - t1)
        assert ours == library
    assert min(mine) < 0.6 * min(theirs), (mine, theirs)  # each includes the same collect()
