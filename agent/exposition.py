"""``/metrics`` bytes, written by a formatter fast enough for a thousand ranks.

Why: prometheus_client's ``generate_latest`` spends about 30 µs per sample validating and
escaping every label name and value; with ``publish.ranks: all`` on 1,024 ranks the agent exports
about 12,000 samples, and that alone made a scrape take 0.4-0.8 s on a busy 2-core machine
(benchmarks/ranks.py).  The families the agent builds are plain gauges and counters with
legacy-valid names, so most of that work can be done once per label name and skipped for values
that need no escaping.  The output is byte for byte the library's (tests/unit/test_exposition.py),
for the Prometheus text format and for OpenMetrics 1.x; whatever this formatter does not handle
itself (timestamps, exemplars, histograms, names outside the legacy character set, other
escaping schemes, ``name[]`` filters, methods other than GET) goes to prometheus_client's own
WSGI application, which also chooses the format from ``Accept`` exactly as before.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import exposition, make_wsgi_app
from prometheus_client import openmetrics as om_package  # noqa: F401  (the subpackage below needs it)
from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LABEL = _NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # no ':' in names: OpenMetrics would rewrite it
_SIMPLE = frozenset(("counter", "gauge"))


class Fallback(Exception):
    """Something only prometheus_client formats: let it do the whole output."""


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _samples(metric: Any, out: list[str], order: dict[tuple, tuple]) -> None:
    for s in metric.samples:
        if s.timestamp is not None or s.exemplar is not None or getattr(s, "native_histogram", None) is not None:
            raise Fallback
        labels = s.labels
        if labels:
            keys = tuple(labels)
            ordered = order.get(keys)
            if ordered is None:
                if not all(_LABEL.match(k) for k in keys):
                    raise Fallback
                ordered = order[keys] = tuple(sorted(keys))
            inner = ",".join([f'{k}="{_escape(labels[k])}"' for k in ordered])
            out.append(f"{s.name}{{{inner}}} {floatToGoString(s.value)}\n")
        else:
            out.append(f"{s.name} {floatToGoString(s.value)}\n")


def text(registry: Collector, openmetrics: bool = False) -> bytes:
    """What ``generate_latest`` (or OpenMetrics' with ``openmetrics``) returns for ``registry``."""
    out: list[str] = []
    order: dict[tuple, tuple] = {}
    metrics = list(registry.collect())
    try:
        for metric in metrics:
            name, kind = metric.name, metric.type
            if kind not in _SIMPLE or not _NAME.match(name) or getattr(metric, "unit", ""):
                raise Fallback
            if any(s.name != name + ("_total" if kind == "counter" else "") for s in metric.samples):
                raise Fallback  # _created samples and the like
            if openmetrics:
                doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
                out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
            else:
                shown = name + "_total" if kind == "counter" else name
                doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
                out.append(f"# HELP {shown} {doc}\n# TYPE {shown} {kind}\n")
            _samples(metric, out, order)
    except Fallback:
        once = _Once(metrics)
        return om.generate_latest(once) if openmetrics else exposition.generate_latest(once)
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode("utf-8")


class _Once:
    """A collector that yields families already collected (collecting twice would snapshot twice)."""

    def __init__(self, metrics: list[Any]):
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        return iter(self.metrics)


def _fast_format(accept: str | None) -> tuple[bool, str] | None:
    """(OpenMetrics?, content type) when this module can write what ``Accept`` asks for, else None."""
    encoder, content_type = exposition.choose_encoder(accept)
    if encoder is exposition.generate_latest:
        return False, content_type
    if isinstance(encoder, partial) and encoder.keywords.get("escaping", om.UNDERSCORES) == om.UNDERSCORES:
        if encoder.func is exposition.generate_latest:
            return False, content_type
        if encoder.func is om.generate_latest and str(encoder.keywords.get("version", "1.0.0")).startswith("1."):
            return True, content_type
    return None


def make_metrics_app(registry: Collector) -> Callable[..., Iterable[bytes]]:
    """A WSGI application serving ``registry`` as prometheus_client's ``make_wsgi_app`` does, faster."""
    library = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        fast = _fast_format(environ.get("HTTP_ACCEPT"))
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or fast is None
            or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))
        ):
            return library(environ, start_response)
        openmetrics, content_type = fast
        output = text(registry, openmetrics=openmetrics)
        headers = [("Content-Type", content_type)]
        if exposition.gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING")):
            output = gzip.compress(output, compresslevel=1)  # a 1 MB text: 5x faster than 9, 13 % larger
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app
