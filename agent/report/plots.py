"""The report's figures, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Every function returns a ``Figure`` or, when the run holds nothing to draw, ``None`` and the
reason, which the page shows as a note in the panel's place.  Values that span more than
``LOG_SPAN`` (a factor) are drawn on a log scale; heatmaps always use a log colour scale,
since update ratios, ε and logits differ by decades across tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.report.load import RunData, StatSeries
from agent.report.marks import ACTION_LABEL, ACTION_ORDER, ACTION_STYLE, SEVERITY_COLOR, Marks

LOG_SPAN = 30.0
MAX_COLUMNS = 1200  # heatmap columns; longer runs are binned, keeping each bin's largest value
MAX_LINES = 8  # more distinct series than this become a heatmap
UPDATE_RATIO_EXCLUDE = ("bias", "norm", "ln_")  # as the update_ratio predictor (docs/policy.md)
KEPT_COLOR, ABANDONED_COLOR = "#1f4e79", "#9aa5b1"


class MatplotlibMissing(ImportError):
    pass


def _mpl() -> tuple[Any, Any, Any]:
    """matplotlib's Figure, colors and ticker modules, imported on first use."""
    try:
        from matplotlib import colors, ticker
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MatplotlibMissing(
            "the run report draws its figures with matplotlib, which is not installed: "
            "pip install 'llm-sentinel[report]'"
        ) from exc
    return Figure, colors, ticker


def png(fig: Any, dpi: int = 110) -> bytes:
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# -- timelines -------------------------------------------------------------------------------------


def segments(steps: np.ndarray, epochs: np.ndarray, values: np.ndarray) -> tuple[tuple, list[tuple]]:
    """(kept steps, kept values) and the abandoned pieces [(steps, values)] of a series with rollbacks.

    A timeline's steps at or after the first step of the next timeline were rolled back: they
    are abandoned.  The kept pieces, in timeline order, make one increasing trajectory.
    """
    order = list(dict.fromkeys(epochs.tolist()))
    firsts = {e: int(steps[epochs == e][0]) for e in order}
    kept_s, kept_v, abandoned = [], [], []
    for i, e in enumerate(order):
        sel = epochs == e
        s, v = steps[sel], values[sel]
        nxt = firsts[order[i + 1]] if i + 1 < len(order) else None
        if nxt is None:
            kept_s.append(s), kept_v.append(v)
            continue
        keep = s < nxt
        kept_s.append(s[keep]), kept_v.append(v[keep])
        if (~keep).any():
            lo = max(0, int(np.argmax(~keep)) - 1)  # start at the last kept point: the line stays connected
            abandoned.append((s[lo:], v[lo:]))
    return (np.concatenate(kept_s), np.concatenate(kept_v)), abandoned


def kept_columns(series: StatSeries) -> tuple[np.ndarray, np.ndarray]:
    """(steps, rows x steps matrix) of the trajectory the run kept: a later timeline replaces a step."""
    last: dict[int, int] = {}
    for j, s in enumerate(series.steps):
        last[s] = j
    steps = np.asarray(sorted(last))
    return steps, series.matrix([last[s] for s in steps.tolist()]).astype(np.float64)


def _bin(steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(steps) <= MAX_COLUMNS:
        return steps, matrix
    edges = np.linspace(0, len(steps), MAX_COLUMNS + 1).astype(int)
    cols = []
    with np.errstate(all="ignore"):
        for a, b in zip(edges[:-1], edges[1:]):
            block = matrix[:, a:b]
            cols.append(
                np.where(np.isnan(block).all(axis=1), np.nan, np.nanmax(np.nan_to_num(block, nan=-np.inf), axis=1))
            )
    return steps[edges[:-1]], np.stack(cols, axis=1)


def _edges(steps: np.ndarray) -> np.ndarray:
    s = steps.astype(np.float64)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[:-1] + s[1:]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _log_worthy(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    if v.size == 0 or (v <= 0).any():
        return False
    return float(v.max()) / float(v.min()) > LOG_SPAN


def _g(v: float, _pos: object = None) -> str:
    if v == 0:
        return "0"
    return f"{v:g}" if 1e-4 <= abs(v) < 1e5 else f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")


def plain_log_ticks(ax: Any, axis: str = "y") -> None:
    """Log-axis labels as plain numbers (3, 0.003, 1e-8), minor ticks labelled when under ~1.3 decades show."""
    _, _, ticker = _mpl()
    which = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    which.set_major_formatter(ticker.FuncFormatter(_g))
    narrow = lo > 0 and hi / lo < 20
    if narrow:
        which.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    which.set_minor_formatter(ticker.FuncFormatter(_g) if narrow else ticker.NullFormatter())


# -- marks ---------------------------------------------------------------------------------------


def _draw_marks(axes: list, marks: Marks, *, detections_on: Any = None, span_text_on: Any = None) -> None:
    """Action lines and rollback spans on every axis; detection triangles along the top of one."""
    for ax in axes:
        for span in marks.spans:
            ax.axvspan(span.start, span.end, color="#d62728", alpha=0.08, lw=0, label="rolled-back steps")
        for a in sorted(marks.actions, key=lambda a: ACTION_ORDER.index(a.action)):
            color, ls, lw = ACTION_STYLE[a.action]
            ax.axvline(a.step, color=color, ls=ls, lw=lw, label=ACTION_LABEL[a.action], zorder=1.5)
    if span_text_on is not None:
        for span in marks.spans:
            span_text_on.annotate(
                span.label, xy=(span.end, 0.02), xycoords=("data", "axes fraction"), ha="right", va="bottom",
                fontsize=8, color="#a11d1d", xytext=(-3, 0), textcoords="offset points",
            )  # fmt: skip
        for a in marks.actions:
            if a.action in ("lr_scale", "skip_batches", "stop", "skip_update"):
                span_text_on.annotate(
                    a.text, xy=(a.step, 0.98), xycoords=("data", "axes fraction"), rotation=90, ha="right",
                    va="top", fontsize=7, color=ACTION_STYLE[a.action][0],
                )  # fmt: skip
    if detections_on is not None:
        for sev, color in SEVERITY_COLOR.items():
            acted = [d.step for d in marks.detections if d.severity == sev and d.held_back is None]
            held = [d.step for d in marks.detections if d.severity == sev and d.held_back is not None]
            kw = {"transform": detections_on.get_xaxis_transform(), "clip_on": False, "zorder": 5, "s": 42}
            if acted:
                detections_on.scatter(
                    acted, [1.0] * len(acted), marker="v", color=color, label=f"detection ({sev})", **kw
                )
            if held:
                detections_on.scatter(
                    held, [1.0] * len(held), marker="v", facecolors="none", edgecolors=color,
                    label=f"detection ({sev}), action held back", **kw,
                )  # fmt: skip


def _legend(fig: Any, axes: list, ncol: int = 4) -> None:
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_"):
                seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(ncol, len(seen)), fontsize=8)


# -- figures -------------------------------------------------------------------------------------


def overview(rd: RunData, marks: Marks) -> tuple[Any, str | None]:
    """Loss, global gradient norm and learning rate over steps, with every detection and action."""
    Figure, _, _ = _mpl()
    panels = [
        (name, label)
        for name, label in (
            ("loss", "training loss\n(as passed to observe)"),
            ("grad_norm", "global gradient\nL2 norm"),
            ("lr", "learning rate\n(param group 0)"),
        )
        if rd.scalar(name) is not None
    ]
    if not panels:
        return None, "no loss, gradient norm or learning rate in the recordings"
    ratios = [3 if n == "loss" else 2 if n == "grad_norm" else 1.2 for n, _ in panels]
    fig = Figure(figsize=(11, 2.2 + 1.6 * sum(ratios) / 1.5), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": ratios}, squeeze=False)[:, 0]
    for ax, (name, label) in zip(axes, panels):
        steps, epochs, values = rd.scalar(name)
        finite = np.isfinite(values)
        ks, kv, abandoned = np.array([]), np.array([]), []
        if finite.any():
            (ks, kv), abandoned = segments(steps[finite], epochs[finite], values[finite])
        for s, v in abandoned:
            ax.plot(s, v, color=ABANDONED_COLOR, lw=1.0, ls="-", label="abandoned by a rollback")
        if len(ks):
            ax.plot(ks, kv, color=KEPT_COLOR, lw=1.2, label="kept trajectory" if abandoned else "_the panel's own")
        if (~finite).any():
            ax.scatter(steps[~finite], [0.5] * int((~finite).sum()), marker="x", color="#d62728", zorder=6,
                       transform=ax.get_xaxis_transform(), label="NaN / Inf value")  # fmt: skip
        positive = finite.any() and bool((values[finite] > 0).all())
        varies = positive and float(values[finite].max()) > 2 * float(values[finite].min())
        if (name == "grad_norm" and positive) or (name == "lr" and varies) or _log_worthy(values):
            ax.set_yscale("log")
        if name == "grad_norm":
            skips = rd.scalar("update_skips")
            if skips is not None:
                s, _, v = skips
                jumps = s[1:][np.diff(v) > 0]
                if len(jumps):
                    ax.scatter(jumps, [0.06] * len(jumps), marker="|", s=120, color="#9467bd", zorder=6,
                               transform=ax.get_xaxis_transform(), label="update skipped by the in-step guard")  # fmt: skip
        ax.set_ylabel(label, fontsize=9)
        ax.grid(True, alpha=0.3)
    _draw_marks(list(axes), marks, detections_on=axes[0], span_text_on=axes[0])
    for ax in axes:
        if ax.get_yscale() == "log":
            plain_log_ticks(ax)
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"Run {rd.run}: loss, gradient norm and what the agent did", fontsize=12)
    _legend(fig, list(axes))
    return fig, None


def heatmap(
    rd: RunData,
    stat: str,
    *,
    title: str,
    colorbar: str,
    marks: Marks,
    exclude: tuple[str, ...] = (),
    relative: bool = False,
    log: bool = True,
    keep_row: Any = None,
    left_out_what: str = "rows",
) -> tuple[Any, str | None]:
    """Rows (tensors or modules) x steps, log colour.  ``relative``: each row over its early median."""
    Figure, colors, _ = _mpl()
    series = rd.stats.get(stat)
    if series is None or not series.rows:
        return None, f"no `{stat}` statistics in the recordings"
    steps, matrix = kept_columns(series)
    rows = list(series.rows)
    keep = [i for i, r in enumerate(rows) if not any(x in r for x in exclude)]
    keep = [i for i in keep if np.isfinite(matrix[i]).any() and (keep_row is None or keep_row(rows[i], matrix[i]))]
    if not keep:
        return None, f"`{stat}`: every row is excluded or empty"
    rows, matrix = [rows[i] for i in keep], matrix[keep]
    left_out = len(series.rows) - len(rows)
    if relative:
        with np.errstate(all="ignore"):
            base = np.nanmedian(matrix[:, : max(1, min(10, matrix.shape[1] // 10 or 1))], axis=1, keepdims=True)
            matrix = np.where(base > 0, matrix / base, np.nan)
    binned = len(steps) > MAX_COLUMNS
    steps, matrix = _bin(steps, matrix)
    shown = matrix[np.isfinite(matrix) & ((matrix > 0) if log else True)]
    if shown.size == 0:
        return None, f"`{stat}`: no positive values to draw on a log scale"
    lo, hi = np.percentile(shown, [1, 99.5])
    if relative:
        reach = max(2.0, hi, 1 / lo if lo > 0 else 2.0)
        lo, hi, cmap = 1 / reach, reach, "RdBu_r"
    else:
        cmap = "viridis"
        if hi <= lo:
            lo, hi = (lo / 2, hi * 2) if log else (lo - 0.5, hi + 0.5)
    n = len(rows)
    fig = Figure(figsize=(11, min(16.0, max(3.2, 1.7 + 0.17 * n))), layout="constrained")
    ax = fig.subplots()
    masked = np.ma.masked_invalid(np.where(matrix > 0, matrix, np.nan) if log else matrix)
    norm = colors.LogNorm(vmin=lo, vmax=hi) if log else colors.Normalize(vmin=lo, vmax=hi)
    mesh = ax.pcolormesh(_edges(steps), np.arange(n + 1), masked, cmap=cmap, norm=norm, shading="flat")
    ax.invert_yaxis()
    every = max(1, math.ceil(n / 60))
    ticks = list(range(0, n, every))
    ax.set_yticks([t + 0.5 for t in ticks], [rows[t] for t in ticks], fontsize=8 if n <= 30 else 6)
    for span in marks.spans:
        ax.axvline(span.end, color="k", ls="--", lw=1, label=f"rollback ({span.label})")
    for a in marks.actions:
        if a.action in ("stop", "lr_scale"):
            ax.axvline(a.step, color=ACTION_STYLE[a.action][0], ls="--", lw=1, label=ACTION_LABEL[a.action])
    ax.set_xlabel("training step" + (f" ({MAX_COLUMNS} bins, largest value of each)" if binned else ""))
    ax.set_ylabel("tensor" if stat in ("update_ratio", "adam_eps", "wesar_gate") else "module")
    height = fig.get_size_inches()[1]
    cb = fig.colorbar(mesh, ax=ax, pad=0.01, aspect=max(12.0, 6.0 * height), shrink=0.95 if n > 8 else 1.0)
    cb.set_label(colorbar)
    if log:
        plain_log_ticks(cb.ax)
    suffix = f"; {left_out} {left_out_what} left out" if left_out else ""
    ax.set_title(title + suffix, fontsize=11)
    if marks.spans or any(a.action in ("stop", "lr_scale") for a in marks.actions):
        _legend(fig, [ax], ncol=3)
    return fig, None


def transform_lines(
    rd: RunData, stat: str, *, title: str, ylabel: str, drop_constant: float | None = None, marks: Marks
) -> tuple[Any, str | None]:
    """A few distinct series as lines (tensors with identical values share one); many as a heatmap."""
    Figure, _, _ = _mpl()
    series = rd.stats.get(stat)
    if series is None or not series.rows:
        return None, f"no `{stat}` statistics in the recordings (the transform did not run)"
    steps, matrix = kept_columns(series)
    rows = list(series.rows)
    if drop_constant is not None:
        keep = [i for i in range(len(rows)) if not np.all(matrix[i][np.isfinite(matrix[i])] == drop_constant)]
        if not keep:
            return None, f"`{stat}`: every tensor stayed at {drop_constant:g} (no tensor has one)"
        rows, matrix = [rows[i] for i in keep], matrix[keep]
    groups: dict[bytes, list[int]] = {}
    for i in range(len(rows)):
        groups.setdefault(np.round(matrix[i], 12).tobytes(), []).append(i)
    if len(groups) > MAX_LINES:
        keep_row = None
        if drop_constant is not None:

            def keep_row(_name: str, row: np.ndarray) -> bool:
                return not np.all(row[np.isfinite(row)] == drop_constant)

        return heatmap(
            rd, stat, title=title, colorbar=ylabel, marks=marks, log=stat == "adam_eps", keep_row=keep_row,
            left_out_what="tensors without one",
        )  # fmt: skip
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.subplots()
    for members in groups.values():
        name = rows[members[0]] + (f" (+{len(members) - 1} with the same values)" if len(members) > 1 else "")
        ax.plot(steps, matrix[members[0]], lw=1.3, label=name, drawstyle="steps-post")
    if _log_worthy(matrix) or stat == "adam_eps":
        ax.set_yscale("log")
        plain_log_ticks(ax)
    _draw_marks([ax], marks)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=11)
    _legend(fig, [ax], ncol=2)
    return fig, None


def risk(rd: RunData, marks: Marks) -> tuple[Any, str | None]:
    """The agent's risk score and the ETAs of its trend predictors, as it saw them during the run."""
    Figure, _, _ = _mpl()
    if not rd.risk:
        return None, "no risk lines in the recordings (written by agents of this version, with recording enabled)"
    steps = np.asarray([r["step"] for r in rd.risk])
    epochs = np.concatenate([[0], np.cumsum(np.diff(steps) < 0)])
    scores = np.asarray([r["score"] for r in rd.risk], dtype=np.float64)
    last = max(rd.steps) if rd.steps else int(steps[-1])
    if rd.steps and rd.epochs and rd.epochs[-1] == epochs[-1] and rd.steps[-1] > steps[-1]:
        last = rd.steps[-1]  # a risk line holds until the next one: extend the last to the end of the run
    steps_x, epochs_x = np.append(steps, max(last, steps[-1])), np.append(epochs, epochs[-1])
    predictors = sorted({k for r in rd.risk for k in r["eta"]})
    fig = Figure(figsize=(11, 5.8 if predictors else 3.6), layout="constrained")
    axes = fig.subplots(2 if predictors else 1, 1, sharex=True, squeeze=False)[:, 0]
    (ks, kv), abandoned = segments(steps_x, epochs_x, np.append(scores, scores[-1]))
    for s, v in abandoned:
        axes[0].step(s, v, where="post", color=ABANDONED_COLOR, lw=1.0, label="abandoned by a rollback")
    axes[0].step(ks, kv, where="post", color="#d62728", lw=1.4, label="risk score")
    axes[0].set_ylim(-0.02, 1.05)
    axes[0].set_ylabel("spike risk\n(0 = none, 1 = critical now)", fontsize=9)
    axes[0].grid(True, alpha=0.3)
    if predictors:
        ax = axes[1]
        for name in predictors:
            eta = np.asarray([r["eta"].get(name, np.nan) for r in rd.risk], dtype=np.float64)
            (ks, kv), _ = segments(steps, epochs, eta)
            if np.isfinite(kv).any():  # a predictor with no ETA on the kept timeline draws nothing: no legend line
                ax.plot(ks, np.maximum(kv, 1.0), marker=".", ms=3, lw=1.1, label=f"ETA {name}")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1.0)
        plain_log_ticks(ax)
        ax.set_ylabel("predicted steps until\nthe limit is reached\n(1: at it now)", fontsize=9)
        ax.grid(True, alpha=0.3)
    _draw_marks(list(axes), marks, detections_on=axes[0])
    axes[-1].set_xlabel("training step")
    fig.suptitle(f"Run {rd.run}: spike risk (sentinel_spike_risk) and trend ETAs", fontsize=12)
    _legend(fig, list(axes))
    return fig, None


def detections(rd: RunData, marks: Marks) -> tuple[Any, str | None]:
    """Every detection by detector over steps: what fired, how severe, and what was done about it."""
    Figure, _, _ = _mpl()
    if not marks.detections:
        return None, "no detections in the event log"
    names = sorted({d.detector for d in marks.detections})
    fig = Figure(figsize=(11, 1.8 + 0.35 * len(names)), layout="constrained")
    ax = fig.subplots()
    for d in marks.detections:
        y = names.index(d.detector)
        color = "#9aa5b1" if d.held_back or d.action not in ACTION_STYLE else ACTION_STYLE[d.action][0]
        marker = "D" if d.severity == "critical" else "o"
        label = (
            f"held back ({d.held_back})" if d.held_back else f"{ACTION_LABEL.get(d.action, d.action)}"
        ) + f", {d.severity}"
        face = "none" if d.held_back else color
        ax.scatter([d.step], [y], marker=marker, s=46, facecolors=face, edgecolors=color, label=label, zorder=3)
    for span in marks.spans:
        ax.axvspan(span.start, span.end, color="#d62728", alpha=0.08, lw=0, label="rolled-back steps")
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.set_ylim(-0.6, len(names) - 0.4)
    if rd.steps:
        lo, hi = (
            min(min(rd.steps), *(d.step for d in marks.detections)),
            max(max(rd.steps), *(d.step for d in marks.detections)),
        )
        pad = max(1.0, 0.02 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("training step")
    ax.set_ylabel("detector")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"Run {rd.run}: detections (marker: severity; colour: the action taken)", fontsize=11)
    _legend(fig, [ax], ncol=3)
    return fig, None
