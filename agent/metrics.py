"""Prometheus exposition of the agent state (docs/metrics.md lists every family).

A custom Collector builds the families at scrape time from a snapshot of the state, so
series that left the history leave /metrics too, and nothing is kept twice.  Cardinality is
bounded by config: run/rank pairs by ``limits.max_series``, scalar names by
``limits.max_scalar_names``, statistics by ``export.max_stats`` and tensors per statistic
by ``export.max_tensors_per_stat`` (the largest values win; NaN counts as largest), and
per-tensor series come from one rank per run (``export.tensor_ranks``), never tensors x ranks.
Step numbers are values, never labels.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from agent import __version__
from agent.commands import ACK_STATUSES, ACTIONS
from agent.config import AgentConfig
from agent.history import SeriesSnapshot
from agent.predict import DETECTORS, SEVERITIES
from agent.protocol import REJECT_REASONS
from agent.state import AgentState

if TYPE_CHECKING:
    from agent.command_server import CommandServer
    from agent.recording import StatsRecorder
    from agent.supervisor import Supervisor

SERIES_LABELS = ["run", "rank"]
PARAM_LABELS = ["run", "rank", "param"]

SCALAR_FAMILIES: dict[str, tuple[str, str]] = {
    "loss": (
        "sentinel_loss",
        "Training loss of the latest message (trainer scalar 'loss'; unit of the loss, e.g. nats per token).",
    ),
    "grad_norm": (
        "sentinel_grad_norm",
        "Global L2 norm of all gradients at the latest message (trainer scalar 'grad_norm'; gradient units).",
    ),
    "step_duration_seconds": (
        "sentinel_step_duration_seconds",
        "Wall time of the latest training step in seconds (trainer scalar 'step_duration_seconds').",
    ),
    "lr": (
        "sentinel_learning_rate",
        "Learning rate at the latest message (trainer scalar 'lr'; dimensionless).",
    ),
    "roles_unassigned_matrices": (
        "sentinel_roles_unassigned_matrices",
        "Weight matrices the trainer's role map left without a role: WeSaR, the clamp and the role-aware "
        "predictors skip them (trainer scalar 'roles_unassigned_matrices'; matrices; fix with roles.overrides).",
    ),
    "roles_blocks_without_attention": (
        "sentinel_roles_blocks_without_attention",
        "Transformer blocks where no attention was found, so no attention-logit probe runs there "
        "(trainer scalar 'roles_blocks_without_attention'; blocks).",
    ),
    # job-level aggregates over every rank, sent by rank 0 under torch.distributed (sentinel/rank_reduce.py)
    "loss_min": ("sentinel_loss_min", "Smallest training loss over the job's ranks at the latest step (loss units)."),
    "loss_mean": ("sentinel_loss_mean", "Mean training loss over the job's ranks at the latest step (loss units)."),
    "loss_max": (
        "sentinel_loss_max",
        "Largest training loss over the job's ranks at the latest step, NaN if any rank's is (loss units).",
    ),
    "loss_max_rank": (
        "sentinel_loss_max_rank",
        "Rank whose loss is the largest at the latest step, or the first whose loss is not finite (rank number).",
    ),
    "loss_nonfinite_ranks": (
        "sentinel_loss_nonfinite_ranks",
        "Ranks whose loss is NaN or infinite at the latest step (ranks).",
    ),
    "step_seconds_min": (
        "sentinel_step_seconds_min",
        "Shortest time any rank spent in its training loop outside sentinel during the latest step (seconds).",
    ),
    "step_seconds_mean": (
        "sentinel_step_seconds_mean",
        "Mean over ranks of the time spent in the training loop outside sentinel during the latest step (seconds).",
    ),
    "step_seconds_max": (
        "sentinel_step_seconds_max",
        "Longest time any rank spent in its training loop outside sentinel during the latest step: the rank "
        "the others waited for (seconds).",
    ),
    "step_seconds_max_rank": (
        "sentinel_step_seconds_max_rank",
        "Rank that spent the longest time outside sentinel during the latest step, the slowest (rank number).",
    ),
    "errors_max": (
        "sentinel_trainer_errors_max",
        "Largest number of errors sentinel caught and survived on any one rank since it started: failed "
        "hooks, statistics, publishing (errors).",
    ),
    "errors_max_rank": (
        "sentinel_trainer_errors_max_rank",
        "Rank with the most errors caught by sentinel, the lowest on a tie (rank number).",
    ),
}

STAT_FAMILIES: dict[str, tuple[str, str]] = {
    "grad_l2": (
        "sentinel_param_grad_l2_norm",
        "L2 norm of the gradient of one parameter tensor (gradient units).",
    ),
    "grad_rms": (
        "sentinel_param_grad_rms",
        "Root mean square of the gradient elements of one parameter tensor (gradient units).",
    ),
    "param_l2": ("sentinel_param_l2_norm", "L2 norm of one parameter tensor (parameter units)."),
    "update_l2": (
        "sentinel_param_update_l2_norm",
        "L2 norm of the last optimizer update dW of one parameter tensor (parameter units).",
    ),
    "update_ratio": (
        "sentinel_param_update_ratio",
        "Relative update size ||dW|| / ||W|| of one parameter tensor (dimensionless ratio).",
    ),
    "sqrt_v_rms": (
        "sentinel_param_adam_sqrt_v_rms",
        "Root mean square of Adam's bias-corrected sqrt(v_hat) for one parameter tensor (gradient units).",
    ),
    "sqrt_v_below_eps_fraction": (
        "sentinel_param_adam_sqrt_v_below_eps_ratio",
        "Fraction of elements of one parameter tensor whose sqrt(v_hat) is below Adam's eps (ratio 0..1).",
    ),
    "adam_eps": (
        "sentinel_param_adam_epsilon",
        "Adam epsilon in effect for one parameter tensor: its param group's, or the one sentinel's eps "
        "auto-tuning set (gradient units).",
    ),
    "wesar_gate": (
        "sentinel_param_wesar_gate",
        "WeSaR gate alpha of one weight matrix, 1 where the tensor has no gate (dimensionless).",
    ),
    "clamp_factor": (
        "sentinel_param_clamp_factor",
        "Fraction of the last proposed update the update-ratio clamp applied, 1 when untouched (ratio 0..1).",
    ),
}

MODULE_LABELS = ["run", "rank", "module"]

#: probe statistics (sentinel/probes, docs/probes.md): rows are module names, exported with label ``module``
PROBE_FAMILIES: dict[str, tuple[str, str]] = {
    "out_rms": (
        "sentinel_layer_output_rms",
        "Root mean square of the output of one linear module (QKV, Proj, FC1, FC2) on the latest probed step "
        "(activation units).",
    ),
    "out_l2": (
        "sentinel_layer_output_l2_norm",
        "L2 norm of the output of one linear module over the probed micro-batch (activation units).",
    ),
    "attn_logit_max": (
        "sentinel_layer_attention_logit_max",
        "Largest attention logit q.k*scale of one attention module over sampled query positions (logit units).",
    ),
    "resid_std": (
        "sentinel_layer_residual_std",
        "Standard deviation of the residual stream at the input of one transformer block (activation units).",
    ),
    "log_z_max": (
        "sentinel_layer_log_z_max",
        "Largest log Z (log-sum-exp of the output logits) over sampled token positions of one head (nats).",
    ),
    "log_z_mean": (
        "sentinel_layer_log_z_mean",
        "Mean log Z (log-sum-exp of the output logits) over sampled token positions of one head (nats).",
    ),
    "embed_std": (
        "sentinel_layer_embedding_std",
        "Standard deviation of the output of one embedding module (activation units).",
    ),
    "norm_in_std": (
        "sentinel_layer_norm_input_std",
        "Standard deviation of the input of one normalisation module (activation units).",
    ),
    "ffn_grad_bound": (
        "sentinel_layer_ffn_grad_norm_bound",
        "Takase et al.'s eq. 15 upper bound of the FFN sub-layer's gradient norm for one block (dimensionless).",
    ),
    "attn_grad_bound": (
        "sentinel_layer_attention_grad_norm_bound",
        "Takase et al.'s eq. 20 upper bound of the attention sub-layer's gradient norm for one block "
        "(dimensionless; J_Z estimated as in docs/probes.md).",
    ),
}
HEAD_LOGIT_FAMILY = (
    "sentinel_layer_attention_head_logit_max",
    "Largest attention logit of one of the top-k heads of one attention module, by head index (logit units).",
)
_TOP_HEAD = re.compile(r"^attn_logit_top(\d+)(_head)?$")

# promtool's lint rules (client_golang promlint) that a generated name could break.
_UNIT_ABBREVIATIONS = ("s", "ms", "us", "ns", "sec", "b", "kb", "mb", "gb", "tb", "pb", "m", "h", "d")
_TYPE_NAMES = ("counter", "gauge", "histogram", "summary", "gauge_histogram")
_BASE_UNITS = ("amperes", "bytes", "celsius", "grams", "joules", "kelvin", "meters", "metres", "seconds")
_BASE_UNITS += ("volts",)
_NON_BASE_UNITS = ("minutes", "hours", "days", "weeks", "kelvins", "fahrenheit", "rankine", "inches", "yards")
_NON_BASE_UNITS += ("miles", "bits", "calories", "pounds", "ounces")
_UNIT_PREFIXES = ("pico", "nano", "micro", "milli", "centi", "deci", "deca", "hecto", "kilo", "kibi", "mega")
_UNIT_PREFIXES += ("mibi", "mebi", "giga", "gibi", "tera", "tebi", "peta", "pebi")
_NON_BASE_TOKENS = frozenset(
    [p + u for p in _UNIT_PREFIXES for u in _BASE_UNITS + _NON_BASE_UNITS] + list(_NON_BASE_UNITS)
)
_RESERVED_SUFFIXES = ("total", "count", "sum", "bucket")
_BAD_TOKENS = frozenset(_UNIT_ABBREVIATIONS + _TYPE_NAMES + _RESERVED_SUFFIXES) | _NON_BASE_TOKENS
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_STAT_PREFIX = "sentinel_param_"
_MAX_STAT_CHARS = 64


def lint_problems(name: str, kind: str = "gauge") -> list[str]:
    """Problems ``promtool check metrics`` would report for an exposed family name of ``kind``."""
    problems = []
    if not _NAME_RE.match(name):
        problems.append("invalid metric name")
    n = name.lower()
    if kind == "counter" and not name.endswith("_total"):
        problems.append('counter metrics should have "_total" suffix')
    if kind != "counter" and name.endswith("_total"):
        problems.append('non-counter metrics should not have "_total" suffix')
    if kind != "histogram" and name.endswith("_bucket"):
        problems.append('non-histogram metrics should not have "_bucket" suffix')
    if kind not in ("histogram", "summary") and (name.endswith("_count") or name.endswith("_sum")):
        problems.append("non-histogram and non-summary metrics should not have _count/_sum suffix")
    for t in _TYPE_NAMES:
        if f"_{t}_" in n or n.endswith(f"_{t}"):
            problems.append(f"metric name should not include type '{t}'")
    if re.search(r"[a-z][A-Z]", name):
        problems.append("metric names should be written in 'snake_case' not 'camelCase'")
    for a in _UNIT_ABBREVIATIONS:
        if f"_{a}_" in n or n.endswith(f"_{a}"):
            problems.append("metric names should not contain abbreviated units")
    if any(tok in _NON_BASE_TOKENS for tok in name.split("_")):
        problems.append("use base units")
    return problems


def _glue(tokens: list[str]) -> list[str]:
    """Join each token promtool would object to onto a neighbour ('latency_ms' -> 'latencyms')."""
    out: list[str] = []
    pending = ""
    for tok in tokens:
        if tok in _BAD_TOKENS:
            if out:
                out[-1] += tok
            else:
                pending += tok
        else:
            out.append(pending + tok)
            pending = ""
    if pending:
        out.append(pending + "stat")
    return out


def stat_family_name(stat: str) -> str:
    """The metric family of a per-tensor statistic: a dedicated name for known statistics,
    otherwise ``sentinel_param_<sanitised name>``, always a name promtool accepts."""
    if stat in STAT_FAMILIES:
        return STAT_FAMILIES[stat][0]
    tokens = [t for t in re.split(r"[^a-z0-9]+", stat[:_MAX_STAT_CHARS].lower()) if t]
    for _ in range(4):
        glued = _glue(tokens)
        if glued == tokens:
            break
        tokens = glued
    name = _STAT_PREFIX + "_".join(tokens)
    if not tokens or lint_problems(name):
        digest = hashlib.blake2b(stat.encode("utf-8", "replace"), digest_size=4).hexdigest()
        name = _STAT_PREFIX + "stat_" + digest
    return name


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, largest first, NaN counted as largest; ties keep order."""
    if len(values) <= k:
        return np.arange(len(values))
    key = np.where(np.isnan(values), np.inf, values.astype(np.float64))
    return np.argsort(-key, kind="stable")[:k]


def _series_families() -> dict[str, Metric]:
    fams: dict[str, Metric] = {
        "step": GaugeMetricFamily(
            "sentinel_training_step",
            "Latest training step number reported by the run/rank (steps).",
            labels=SERIES_LABELS,
        )
    }
    for scalar, (name, doc) in SCALAR_FAMILIES.items():
        fams[scalar] = GaugeMetricFamily(name, doc, labels=SERIES_LABELS)
    fams["observed"] = GaugeMetricFamily(
        "sentinel_observed_value",
        "Latest value of a trainer scalar without a dedicated metric, by scalar name (unit set by the trainer).",
        labels=[*SERIES_LABELS, "name"],
    )
    fams["received_at"] = GaugeMetricFamily(
        "sentinel_last_message_timestamp_seconds",
        "Unix time in seconds at which the agent received the latest message of the run/rank.",
        labels=SERIES_LABELS,
    )
    fams["sent"] = CounterMetricFamily(
        "sentinel_trainer_sent_messages",
        "Messages the trainer's publisher reports having sent (cumulative count from the header field 'sent').",
        labels=SERIES_LABELS,
    )
    fams["dropped"] = CounterMetricFamily(
        "sentinel_trainer_dropped_messages",
        "Messages the trainer's publisher reports having dropped rather than block training "
        "(cumulative count from the header field 'dropped').",
        labels=SERIES_LABELS,
    )
    fams["nonfinite"] = CounterMetricFamily(
        "sentinel_agent_nonfinite_values",
        "NaN or infinite values received in scalars and per-tensor statistics of the run/rank (values).",
        labels=SERIES_LABELS,
    )
    return fams


def _merged_columns(s: SeriesSnapshot, max_stats: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per statistic, the rows of every layout that carries it (a (tensor, statistic) cell is in
    one layout only, see agent.history); the first ``max_stats`` statistics in layout order."""
    out: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for m in s.matrices:
        for si, stat in enumerate(m.stats):
            if _TOP_HEAD.match(stat):
                continue  # exported by _head_logits
            if stat not in out:
                if len(out) >= max_stats:
                    continue
                out[stat] = ([], [])
            out[stat][0].extend(m.tensors)
            out[stat][1].append(m.matrix[:, si])
    return {stat: (names, np.concatenate(cols)) for stat, (names, cols) in out.items()}


def _head_logits(s: SeriesSnapshot, family: GaugeMetricFamily) -> None:
    """``attn_logit_top<i>`` / ``attn_logit_top<i>_head`` pairs of the probe matrices as one series per head."""
    lv = [s.run, str(s.rank)]
    for m in s.matrices:
        index = {stat: i for i, stat in enumerate(m.stats)}
        seen: set[tuple[str, str]] = set()
        for stat, vi in index.items():
            match = _TOP_HEAD.match(stat)
            hi = index.get(stat + "_head")
            if match is None or match.group(2) or hi is None:
                continue
            for r, module in enumerate(m.tensors):
                head = m.matrix[r, hi]
                if not np.isfinite(head):
                    continue
                key = (module, str(int(head)))
                if key not in seen:
                    seen.add(key)
                    family.add_metric([*lv, *key], float(m.matrix[r, vi]))


def _counter_by(
    name: str, doc: str, label: str, counts: Mapping[str, float], keys: Iterable[str] | None = None
) -> CounterMetricFamily:
    """A counter family with one label; every value of ``keys`` is present (0 until counted)."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in counts if keys is None else keys:
        family.add_metric([key], counts.get(key, 0))
    return family


class AgentCollector(Collector):
    """Reads ``AgentState`` at scrape time and yields every sentinel metric family."""

    def __init__(
        self,
        state: AgentState,
        config: AgentConfig,
        *,
        version: str = __version__,
        supervisor: Supervisor | None = None,
        commands: CommandServer | None = None,
        recorder: StatsRecorder | None = None,
    ):
        self.state = state
        self.supervisor, self.commands, self.recorder = supervisor, commands, recorder
        self.max_tensors = config.export.max_tensors_per_stat
        self.max_stats = config.export.max_stats
        self.all_ranks = config.export.tensor_ranks == "all"
        self.version = version

    def collect(self) -> Iterator[Metric]:
        snap = self.state.snapshot(matrices="all" if self.all_ranks else "lowest")
        fams = _series_families()
        stat_fams: dict[str, GaugeMetricFamily] = {
            name: GaugeMetricFamily(name, doc, labels=PARAM_LABELS) for name, doc in STAT_FAMILIES.values()
        }
        owner = {name: stat for stat, (name, _) in STAT_FAMILIES.items()}
        probe_fams = {
            stat: GaugeMetricFamily(name, doc, labels=MODULE_LABELS) for stat, (name, doc) in PROBE_FAMILIES.items()
        }
        owner.update({name: stat for stat, (name, _) in PROBE_FAMILIES.items()})
        head_fam = GaugeMetricFamily(*HEAD_LOGIT_FAMILY, labels=[*MODULE_LABELS, "head"])
        sample_names = {k: f.name + ("_total" if f.type == "counter" else "") for k, f in fams.items()}
        lowest: dict[str, int] = {}  # per run, the lowest rank with matrices (export.tensor_ranks: lowest)
        for s in snap.series:
            if s.matrices and s.rank < lowest.get(s.run, s.rank + 1):
                lowest[s.run] = s.rank
        for s in snap.series:
            lv = [s.run, str(s.rank)]
            labels = dict(zip(SERIES_LABELS, lv))  # one dict for the series' samples: a scrape of 1,024 ranks
            for key, value in (  # makes 12,000 of them, and add_metric would build one dict each
                ("step", s.step),
                ("received_at", s.received_at),
                ("sent", s.sent),
                ("dropped", s.dropped),
                ("nonfinite", s.nonfinite_values),
            ):
                fams[key].samples.append(Sample(sample_names[key], labels, value))
            for name, value in s.scalars.items():
                if name in SCALAR_FAMILIES:
                    fams[name].samples.append(Sample(sample_names[name], labels, value))
                else:
                    fams["observed"].add_metric([*lv, name], value)
            if not self.all_ranks and lowest.get(s.run) != s.rank:
                continue
            _head_logits(s, head_fam)
            for stat, (names, column) in _merged_columns(s, self.max_stats).items():
                if stat in probe_fams:
                    for ti in top_k(column, self.max_tensors).tolist():
                        probe_fams[stat].add_metric([*lv, names[ti]], float(column[ti]))
                    continue
                fam_name = stat_family_name(stat)
                if owner.setdefault(fam_name, stat) != stat:
                    continue  # another statistic already exports under this sanitised name
                fam = stat_fams.get(fam_name)
                if fam is None:
                    fam = stat_fams[fam_name] = GaugeMetricFamily(
                        fam_name,
                        f"Per-tensor statistic {stat[:_MAX_STAT_CHARS]!r} sent by the trainer, without a "
                        "dedicated metric (unit set by the trainer).",
                        labels=PARAM_LABELS,
                    )
                for ti in top_k(column, self.max_tensors).tolist():
                    fam.add_metric([*lv, names[ti]], float(column[ti]))
        yield from fams.values()
        yield from (stat_fams[name] for name in sorted(stat_fams))
        yield from probe_fams.values()
        yield head_fam
        yield from self._agent_families(snap)
        if self.supervisor is not None:
            yield from self._supervisor_families()
        if self.commands is not None:
            yield from self._command_families()
        if self.recorder is not None:
            yield CounterMetricFamily(
                "sentinel_agent_recorded_messages",
                "Messages written to the statistics recordings (messages).",
                value=self.recorder.recorded,
            )
            yield CounterMetricFamily(
                "sentinel_agent_recording_errors",
                "Messages that could not be written to the recordings, e.g. disk full (messages).",
                value=self.recorder.errors,
            )

    def _supervisor_families(self) -> Iterator[Metric]:
        assert self.supervisor is not None
        snap = self.supervisor.snapshot()
        risk = GaugeMetricFamily(
            "sentinel_spike_risk",
            "Risk of a loss spike or divergence of the run, 0..1 (dimensionless; explanation in the agent log "
            "and event log).",
            labels=["run"],
        )
        eta = GaugeMetricFamily(
            "sentinel_spike_eta_steps",
            "Steps until a trend predictor's statistic reaches its limit, smallest over layers (steps); "
            "absent when the predictor has no ETA.",
            labels=["run", "predictor"],
        )
        info = GaugeMetricFamily(
            "sentinel_risk_explanation_info",
            "Always 1: the layer each trend predictor currently finds riskiest for the run.",
            labels=["run", "predictor", "layer"],
        )
        for r in snap.runs:
            risk.add_metric([r.run], r.risk.score)
            for predictor, value in sorted(r.etas.items()):
                eta.add_metric([r.run, predictor], value)
            for predictor, f in sorted(r.top.items()):
                info.add_metric([r.run, predictor, f.layer], 1.0)
        yield risk
        yield eta
        yield info
        det = CounterMetricFamily(
            "sentinel_detections",
            "Detections by the agent's predictors, by detector and severity (detections).",
            labels=["run", "detector", "severity"],
        )
        counts = {(r.run, d, sev): 0 for r in snap.runs for d in DETECTORS for sev in SEVERITIES}
        counts.update(snap.detections)  # every detector from 0, so increase() sees a run's first detection
        for (run, detector, severity), n in sorted(counts.items()):
            det.add_metric([run, detector, severity], n)
        yield det
        yield _counter_by(
            "sentinel_agent_actions",
            "Decisions taken by the agent's policy, by the action chosen (decisions).",
            "action",
            snap.actions,
            ACTIONS,
        )
        yield _counter_by(
            "sentinel_agent_suppressed_decisions",
            "Detections a policy rule matched but the limits held back, by reason (decisions).",
            "reason",
            snap.suppressed,
        )
        yield CounterMetricFamily(
            "sentinel_agent_event_log_errors",
            "Decisions not taken because the event log could not be written (decisions).",
            value=snap.event_log_errors,
        )

    def _command_families(self) -> Iterator[Metric]:
        assert self.commands is not None
        c = self.commands.snapshot()
        yield _counter_by(
            "sentinel_agent_commands_sent",
            "Commands sent to trainers, first sends only (commands).",
            "action",
            c.sent,
            ACTIONS,
        )
        yield CounterMetricFamily(
            "sentinel_agent_command_resends",
            "Commands sent again because no acknowledgement came in time (sends).",
            value=c.resends,
        )
        yield _counter_by(
            "sentinel_agent_command_acks",
            "Acknowledgements received from trainers, by status (acks).",
            "status",
            c.acks,
            ACK_STATUSES,
        )
        yield _counter_by(
            "sentinel_agent_rejected_commands",
            "Frames received on the command channel and rejected, by reason (frames).",
            "reason",
            c.rejected,
        )
        yield CounterMetricFamily(
            "sentinel_agent_undeliverable_commands",
            "Commands held because no trainer of their run was connected (commands).",
            value=c.undeliverable,
        )
        yield CounterMetricFamily(
            "sentinel_agent_expired_commands",
            "Commands given up unacknowledged after commands.expire_seconds (commands).",
            value=c.expired,
        )
        yield CounterMetricFamily(
            "sentinel_agent_command_handshake_failures",
            "Connections to the command channel that failed the security handshake (connections).",
            value=c.handshake_failures,
        )
        yield CounterMetricFamily(
            "sentinel_agent_refused_client_keys",
            "CURVE client keys refused by the command channel's authenticator (handshakes).",
            value=c.refused_keys,
        )
        yield GaugeMetricFamily(
            "sentinel_agent_pending_commands",
            "Commands sent or held and not yet acknowledged (commands).",
            value=c.pending,
        )
        yield GaugeMetricFamily(
            "sentinel_agent_command_connected_runs",
            "Runs whose trainer has said hello on the command channel (runs).",
            value=c.connected_runs,
        )

    def _agent_families(self, snap) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "sentinel_agent_received_messages",
            "Messages the agent read from the statistics socket, accepted or rejected (messages).",
            value=snap.received_messages,
        )
        yield _counter_by(
            "sentinel_agent_rejected_messages",
            "Messages the agent rejected, by reason (messages).",
            "reason",
            snap.rejected_messages,
            REJECT_REASONS,
        )
        yield CounterMetricFamily(
            "sentinel_agent_decisions",
            "Decisions taken by the agent's policy (decisions).",
            value=snap.decisions,
        )
        yield GaugeMetricFamily(
            "sentinel_agent_tracked_series",
            "Run/rank pairs the agent currently keeps history for (series).",
            value=len(snap.series),
        )
        yield GaugeMetricFamily(
            "sentinel_agent_history_bytes",
            "Bytes held by the agent's history ring buffers (bytes).",
            value=snap.history_bytes,
        )
        info = GaugeMetricFamily(
            "sentinel_agent_build_info", "Agent build information; the value is always 1.", labels=["version"]
        )
        info.add_metric([self.version], 1)
        yield info


def make_registry(
    state: AgentState,
    config: AgentConfig,
    *,
    supervisor: Supervisor | None = None,
    commands: CommandServer | None = None,
    recorder: StatsRecorder | None = None,
) -> CollectorRegistry:
    """A fresh registry holding only the agent collector (not the process-global default)."""
    registry = CollectorRegistry()
    registry.register(AgentCollector(state, config, supervisor=supervisor, commands=commands, recorder=recorder))
    return registry
