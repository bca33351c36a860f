"""Grafana dashboards, alert rules and provisioning files of llm-sentinel, generated in code.

The dashboards are built with grafana-foundation-sdk's builders, so a renamed metric or a
broken panel is a code review diff rather than a hand-edited JSON blob. Everything under
``grafana/dashboards/`` and ``grafana/provisioning/`` is written by this script; CI
(tests/unit/test_grafana_dashboards.py) fails when the checked-in files differ from its output,
and tests/integration/test_grafana_queries.py runs every query against a real Prometheus
that scraped a real agent.

    python grafana/generate.py            # (re)write the files
    python grafana/generate.py --check    # exit 1 and list the files that are out of date

Metric names are those of docs/metrics.md; probe families (``sentinel_layer_*``) are those of
docs/probes.md. Every query is filtered by the ``run`` and ``rank`` template variables where
the family has them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import (
    alerting,
    common,
    dashboard,
    expr,
    heatmap,
    histogram,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as alerting_models
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

ROOT = Path(__file__).resolve().parent
DATASOURCE_UID = "sentinel-prometheus"
DATASOURCE_NAME = "Sentinel Prometheus"
FOLDER_UID = "llm-sentinel"
FOLDER_TITLE = "LLM Sentinel"
RULE_GROUP = "llm-sentinel"
RULE_GROUP_INTERVAL = "1m"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards"
TAG = "llm-sentinel"

RUN = 'run="$run"'
RUN_RANK = 'run="$run", rank="$rank"'
AGENT = 'instance=~"$instance"'


def _datasource() -> dashboard_models.DataSourceRef:
    return dashboard_models.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)


def _query(promql: str, legend: str = "", ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(promql).ref_id(ref).datasource(_datasource())
    if legend:
        q = q.legend_format(legend)
    return q.instant() if instant else q.range()


def _log_scale() -> common.ScaleDistributionConfig:
    return common.ScaleDistributionConfig().type(common_models.ScaleDistribution.LOG).log(10)


def _series(
    title: str,
    description: str,
    queries: list[prometheus.Dataquery],
    unit: str = "short",
    log: bool = False,
    width: int = 12,
    height: int = 8,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(_datasource())
        .targets(queries)
        .unit(unit)
        .span(width)
        .height(height)
        .line_width(1)
        .fill_opacity(5)
        .legend(common.VizLegendOptions().display_mode(common_models.LegendDisplayMode.LIST).show_legend(True))
    )
    return panel.scale_distribution(_log_scale()) if log else panel


def _stat(title: str, description: str, query: prometheus.Dataquery, unit: str = "short", width: int = 6) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(_datasource())
        .with_target(query)
        .unit(unit)
        .span(width)
        .height(4)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(common_models.BigValueGraphMode.AREA)
    )


def _heatmap(title: str, description: str, query: prometheus.Dataquery, log: bool = True) -> heatmap.Panel:
    """One row per series (tensor or module), colour = value: a layer-by-time picture of a statistic."""
    panel = (
        heatmap.Panel()
        .title(title)
        .description(description)
        .datasource(_datasource())
        .with_target(query)
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common_models.HeatmapCellLayout.UNKNOWN))
        .show_tooltip()
        .color(
            heatmap.HeatmapColorOptions()
            .mode(heatmap_models.HeatmapColorMode.SCHEME)
            .scheme("Spectral")
            .scale(heatmap_models.HeatmapColorScale.EXPONENTIAL if log else heatmap_models.HeatmapColorScale.LINEAR)
            .exponent(0.5)
            .steps(64)
            .reverse(True)
        )
        .span(12)
        .height(10)
    )
    return panel


def _variables(agent_scope: bool = False) -> list:
    ds = _datasource()
    refresh = dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED
    out = [
        dashboard.QueryVariable("run")
        .label("Run")
        .description("Training run (`run` label of the trainer's messages).")
        .datasource(ds)
        .query("label_values(sentinel_training_step, run)")
        .refresh(refresh)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC),
        dashboard.QueryVariable("rank")
        .label("Rank")
        .description("Trainer rank (rank 0 unless publish.ranks is 'all').")
        .datasource(ds)
        .query('label_values(sentinel_training_step{run="$run"}, rank)')
        .refresh(refresh)
        .sort(dashboard_models.VariableSort.NUMERICAL_ASC),
    ]
    if agent_scope:
        out.append(
            dashboard.QueryVariable("instance")
            .label("Agent")
            .description("Scrape target of the agent (one agent per training job is usual).")
            .datasource(ds)
            .query("label_values(sentinel_agent_build_info, instance)")
            .refresh(refresh)
            .include_all(True)
            .all_value(".+")
            .multi(True)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
        )
    else:
        out.append(
            dashboard.CustomVariable("topk")
            .label("Top k")
            .description("How many tensors or modules the top-k panels show.")
            .values("5,10,20,50")
            .current(dashboard_models.VariableOption(selected=True, text="10", value="10"))
        )
    return out


def _base(uid: str, title: str, description: str, agent_scope: bool = False) -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("10s")
        .timezone("browser")
        .link(
            dashboard.DashboardLink("LLM Sentinel")
            .type(dashboard_models.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in _variables(agent_scope):
        board = board.with_variable(variable)
    return board


def _annotations(board: dashboard.Dashboard, agent_scope: bool = False) -> dashboard.Dashboard:
    """Agent decisions as markers on every time-series panel.

    The actions counter is per agent (no run label): every run an agent watches shows all its
    actions.  Where the dashboard has the Agent variable, the markers follow it.  The window is
    ``$__rate_interval`` (at least four scrape intervals): ``$__interval`` shrinks below two
    scrapes when zoomed in, and ``increase`` over fewer than two samples returns nothing.
    """
    actions = f"sentinel_agent_actions_total{{{AGENT}}}" if agent_scope else "sentinel_agent_actions_total"
    return board.annotation(
        dashboard.AnnotationQuery()
        .name("Agent actions")
        .datasource(_datasource())
        .enable(True)
        .icon_color("red")
        .expr(f"sum by (action) (increase({actions}[$__rate_interval])) > 0")
    ).annotation(
        dashboard.AnnotationQuery()
        .name("Detections")
        .datasource(_datasource())
        .enable(False)
        .icon_color("orange")
        .expr(f"sum by (detector, severity) (increase(sentinel_detections_total{{{RUN}}}[$__rate_interval])) > 0")
    )


def run_overview() -> dashboard.Dashboard:
    board = _base(
        "sentinel-run-overview",
        "LLM Sentinel / Run overview",
        "Loss, gradient norm, the agent's spike risk and ETAs, with its actions as annotations.",
    )
    board = _annotations(board)
    board = (
        board.with_row(dashboard.Row("Now"))
        .with_panel(
            _stat("Step", "Latest training step reported.", _query(f"sentinel_training_step{{{RUN_RANK}}}"), width=4)
        )
        .with_panel(_stat("Loss", "Latest training loss.", _query(f"sentinel_loss{{{RUN_RANK}}}"), width=4).decimals(4))
        .with_panel(
            _stat(
                "Spike risk",
                "Risk of a spike or divergence, 0..1 (docs/policy.md, 'Risk score').",
                _query(f"sentinel_spike_risk{{{RUN}}}"),
                unit="percentunit",
                width=4,
            )
            .min(0)
            .max(1)
            .thresholds(
                dashboard.ThresholdsConfig()
                .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
                .steps(
                    [
                        dashboard_models.Threshold(value=None, color="green"),
                        dashboard_models.Threshold(value=0.5, color="orange"),
                        dashboard_models.Threshold(value=0.8, color="red"),
                    ]
                )
            )
        )
        .with_panel(
            _stat(
                "Seconds since last message",
                "Agent clock minus the receive time of the run's latest message: a stalled trainer shows here first.",
                _query(f"time() - sentinel_last_message_timestamp_seconds{{{RUN_RANK}}}"),
                unit="s",
                width=4,
            )
        )
        .with_panel(
            _stat(
                "Step time",
                "Wall time of the latest training step.",
                _query(f"sentinel_step_duration_seconds{{{RUN_RANK}}}"),
                unit="s",
                width=4,
            )
        )
        .with_panel(
            _stat(
                "Dropped messages",
                "Statistics messages the trainer dropped rather than block training.",
                _query(f"sentinel_trainer_dropped_messages_total{{{RUN_RANK}}}"),
                width=4,
            )
        )
        .with_row(dashboard.Row("Training"))
        .with_panel(_series("Loss", "Training loss.", [_query(f"sentinel_loss{{{RUN_RANK}}}", "loss")]))
        .with_panel(
            _series(
                "Gradient norm",
                "Global L2 norm of the gradients (log scale: spikes are multiplicative).",
                [_query(f"sentinel_grad_norm{{{RUN_RANK}}}", "grad norm")],
                log=True,
            )
        )
        .with_panel(
            _series(
                "Learning rate",
                "Learning rate of param group 0.",
                [_query(f"sentinel_learning_rate{{{RUN_RANK}}}", "lr")],
            )
        )
        .with_panel(
            _series(
                "Step time",
                "Wall time of each training step.",
                [_query(f"sentinel_step_duration_seconds{{{RUN_RANK}}}", "step time")],
                unit="s",
            )
        )
        .with_row(dashboard.Row("Prediction"))
        .with_panel(
            _series(
                "Spike risk",
                "Largest of the recent detections and forecasts, 0..1; the explanation is in the agent log.",
                [_query(f"sentinel_spike_risk{{{RUN}}}", "risk")],
                unit="percentunit",
            )
            .min(0)
            .max(1)
        )
        .with_panel(
            _series(
                "ETA to limit",
                "Steps until a trend predictor's statistic reaches its limit (smallest over layers); "
                "present only while the predictor has an ETA.",
                [_query(f"sentinel_spike_eta_steps{{{RUN}}}", "{{predictor}}")],
                log=True,
            )
        )
        .with_panel(
            _series(
                "Detections",
                "Detections by detector and severity (one per episode).",
                [
                    _query(
                        f"sum by (detector, severity) (increase(sentinel_detections_total{{{RUN}}}[$__rate_interval]))",
                        "{{detector}} {{severity}}",
                    )
                ],
            )
        )
        .with_panel(
            table.Panel()
            .title("Riskiest layer per predictor")
            .description("The layer each trend predictor currently finds riskiest.")
            .datasource(_datasource())
            .with_target(
                _query(f"sentinel_risk_explanation_info{{{RUN}}}", "{{predictor}}: {{layer}}", instant=True).format(
                    prometheus_models.PromQueryFormat.TABLE
                )
            )
            .show_header(True)
            .span(12)
            .height(8)
        )
    )
    return board


def per_layer() -> dashboard.Dashboard:
    board = _base(
        "sentinel-per-layer",
        "LLM Sentinel / Per layer",
        "Per-tensor and per-module statistics: update ratios, linear-output RMS, attention logits, "
        "√v̂ against ε. Heatmaps show every exported row; top-k panels the largest ones.",
    )
    board = _annotations(board)
    return (
        board.with_row(dashboard.Row("Updates (WeSaR: the update ratio is the spike precursor)"))
        .with_panel(
            _heatmap(
                "Update ratio ‖ΔW‖/‖W‖ by tensor",
                "One row per tensor; colour = update ratio.",
                _query(f"sentinel_param_update_ratio{{{RUN_RANK}}}", "{{param}}"),
            )
        )
        .with_panel(
            _series(
                "Update ratio, top k",
                "The $topk tensors with the largest ‖ΔW‖/‖W‖.",
                [_query(f"topk($topk, sentinel_param_update_ratio{{{RUN_RANK}}})", "{{param}}")],
                log=True,
            )
        )
        .with_row(dashboard.Row("Activations (probes)"))
        .with_panel(
            _heatmap(
                "Linear-output RMS by module",
                "RMS of each linear module's output (Rybakov et al.: QKV, Proj, FC2 outputs grow > 2× before "
                "divergence). Needs probes.enabled in the trainer.",
                _query(f"sentinel_layer_output_rms{{{RUN_RANK}}}", "{{module}}"),
            )
        )
        .with_panel(
            _series(
                "Linear-output RMS, top k",
                "The $topk modules with the largest output RMS.",
                [_query(f"topk($topk, sentinel_layer_output_rms{{{RUN_RANK}}})", "{{module}}")],
                log=True,
            )
        )
        .with_panel(
            _series(
                "Attention-logit max",
                "Largest attention logit per attention module (Wortsman et al. §3.1.1: runs past 1e4 diverged).",
                [_query(f"topk($topk, sentinel_layer_attention_logit_max{{{RUN_RANK}}})", "{{module}}")],
                log=True,
            )
        )
        .with_panel(
            _series(
                "Residual stream std",
                "Standard deviation of each block's input.",
                [_query(f"sentinel_layer_residual_std{{{RUN_RANK}}}", "{{module}}")],
            )
        )
        .with_panel(
            _series(
                "Output log Z",
                "Log of the softmax normaliser of the head: max and mean over tokens (Wortsman et al. §3.1.2).",
                [
                    _query(f"sentinel_layer_log_z_max{{{RUN_RANK}}}", "max {{module}}", ref="A"),
                    _query(f"sentinel_layer_log_z_mean{{{RUN_RANK}}}", "mean {{module}}", ref="B"),
                ],
            )
        )
        .with_row(dashboard.Row("Adam second moment against ε (Wortsman et al. §3.4)"))
        .with_panel(
            _series(
                "√v̂ / ε, bottom k",
                "RMS of Adam's √v̂ divided by the tensor's ε in effect: near 1, ε dominates the denominator "
                "and updates shrink. The $topk smallest.",
                [
                    _query(
                        f"bottomk($topk, sentinel_param_adam_sqrt_v_rms{{{RUN_RANK}}} "
                        f"/ sentinel_param_adam_epsilon{{{RUN_RANK}}})",
                        "{{param}}",
                    )
                ],
                log=True,
            )
        )
        .with_panel(
            _series(
                "Fraction of √v̂ below ε, top k",
                "Fraction of each tensor's elements whose √v̂ is below ε.",
                [_query(f"topk($topk, sentinel_param_adam_sqrt_v_below_eps_ratio{{{RUN_RANK}}})", "{{param}}")],
                unit="percentunit",
            )
        )
        .with_panel(
            _series(
                "Gradient RMS, top k",
                "RMS of each tensor's gradient.",
                [_query(f"topk($topk, sentinel_param_grad_rms{{{RUN_RANK}}})", "{{param}}")],
                log=True,
            )
        )
    )


def optimizer() -> dashboard.Dashboard:
    board = _base(
        "sentinel-optimizer",
        "LLM Sentinel / Optimizer transforms",
        "What the optimizer transforms of docs/optim.md did: WeSaR gates, Adam ε per tensor, the "
        "update-ratio clamp and the gradient guard.",
    )
    board = _annotations(board)
    return (
        board.with_row(dashboard.Row("WeSaR"))
        .with_panel(
            _series(
                "WeSaR gates α",
                "Gate of each gated matrix (W̄ = α·W, papers/001); matrices without a gate (value 1) are hidden.",
                [_query(f"sentinel_param_wesar_gate{{{RUN_RANK}}} != 1", "{{param}}")],
                width=24,
            )
        )
        .with_row(dashboard.Row("Adam ε"))
        .with_panel(
            _series(
                "ε per tensor",
                "Adam ε in effect for each tensor: its param group's, or the one auto-tuning set (never above "
                "the optimizer's ε).",
                [_query(f"sentinel_param_adam_epsilon{{{RUN_RANK}}}", "{{param}}")],
                log=True,
            )
        )
        .with_panel(
            _series(
                "ε range",
                "Smallest and largest ε in effect across tensors.",
                [_query(f'sentinel_observed_value{{{RUN_RANK}, name=~"adam_eps_min|adam_eps_max"}}', "{{name}}")],
                log=True,
            )
        )
        .with_panel(
            histogram.Panel()
            .title("Tensors per ε bucket (log10 ε)")
            .description("How many tensors use each ε, by decade (eps.per_decade buckets per decade).")
            .datasource(_datasource())
            .with_target(_query(f"log10(sentinel_param_adam_epsilon{{{RUN_RANK}}})", "{{param}}", instant=True))
            .bucket_size(0.25)
            .combine(True)
            .span(12)
            .height(8)
        )
        .with_row(dashboard.Row("Update-ratio clamp"))
        .with_panel(
            _series(
                "Clamp factor, bottom k",
                "Fraction of the proposed update the clamp applied (1: untouched). The $topk most clamped tensors.",
                [_query(f"bottomk($topk, sentinel_param_clamp_factor{{{RUN_RANK}}})", "{{param}}")],
                unit="percentunit",
            )
        )
        .with_panel(
            _series(
                "Clamp events",
                "Matrix-steps pulled back by the clamp, cumulative since the trainer started.",
                [_query(f'sentinel_observed_value{{{RUN_RANK}, name="clamp_events"}}', "clamp events")],
            )
        )
        .with_row(dashboard.Row("Gradient guard"))
        .with_panel(
            _series(
                "Skipped and clipped updates",
                "Updates skipped by the guard or on the agent's request, and updates the guard clipped (cumulative).",
                [_query(f'sentinel_observed_value{{{RUN_RANK}, name=~"update_skips|guard_clips"}}', "{{name}}")],
            )
        )
        .with_panel(
            _series(
                "Gradient-norm z-score",
                "z-score of each step's gradient norm against the guard's EMA (outlier at optim.guard.z, default 6).",
                [_query(f'sentinel_observed_value{{{RUN_RANK}, name="guard_grad_norm_z"}}', "z")],
            )
        )
    )


def agent_health() -> dashboard.Dashboard:
    board = _base(
        "sentinel-agent-health",
        "LLM Sentinel / Agent health",
        "The sidecar agent itself: messages received, rejected and dropped, memory held, commands and "
        "their acknowledgements.",
        agent_scope=True,
    )
    board = _annotations(board, agent_scope=True)
    rate = "[$__rate_interval]"
    return (
        board.with_row(dashboard.Row("Agent"))
        .with_panel(
            _stat(
                "Agents up",
                "Scrape targets that are sentinel agents and answered the last scrape.",
                _query(f"sum(up * on (instance, job) group_left (version) sentinel_agent_build_info{{{AGENT}}})"),
            )
        )
        .with_panel(
            _stat(
                "Tracked run/ranks",
                "Run/rank pairs the agent keeps history for.",
                _query(f"sentinel_agent_tracked_series{{{AGENT}}}", "{{instance}}"),
            )
        )
        .with_panel(
            _stat(
                "Pending commands",
                "Commands sent and not yet acknowledged.",
                _query(f"sentinel_agent_pending_commands{{{AGENT}}}", "{{instance}}"),
            )
        )
        .with_panel(
            _stat(
                "Connected runs",
                "Runs whose trainer said hello on the command channel.",
                _query(f"sentinel_agent_command_connected_runs{{{AGENT}}}", "{{instance}}"),
            )
        )
        .with_row(dashboard.Row("Statistics channel"))
        .with_panel(
            _series(
                "Messages received",
                "Messages read from the statistics socket (accepted or rejected), per second.",
                [_query(f"rate(sentinel_agent_received_messages_total{{{AGENT}}}{rate})", "{{instance}}")],
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Messages rejected by reason",
                "Rejected messages per second by reason (docs/metrics.md lists the reasons).",
                [
                    _query(
                        f"sum by (reason) (rate(sentinel_agent_rejected_messages_total{{{AGENT}}}{rate}))", "{{reason}}"
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Trainer messages sent and dropped",
                "The run's publisher: messages sent and messages dropped rather than block training, per second.",
                [
                    _query(f"rate(sentinel_trainer_sent_messages_total{{{RUN_RANK}}}{rate})", "sent", ref="A"),
                    _query(f"rate(sentinel_trainer_dropped_messages_total{{{RUN_RANK}}}{rate})", "dropped", ref="B"),
                ],
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Non-finite values",
                "NaN or ±Inf values received from the run, per second.",
                [_query(f"rate(sentinel_agent_nonfinite_values_total{{{RUN_RANK}}}{rate})", "non-finite")],
            )
        )
        .with_panel(
            _series(
                "History memory",
                "Bytes held by the history ring buffers (bounded; docs/configuration.md, 'Memory bound').",
                [_query(f"sentinel_agent_history_bytes{{{AGENT}}}", "{{instance}}")],
                unit="bytes",
            )
        )
        .with_panel(
            _series(
                "Recordings",
                "Messages written to stats-<run>.jsonl, and messages the recordings could not take.",
                [
                    _query(f"rate(sentinel_agent_recorded_messages_total{{{AGENT}}}{rate})", "recorded", ref="A"),
                    _query(f"rate(sentinel_agent_recording_errors_total{{{AGENT}}}{rate})", "errors", ref="B"),
                ],
                unit="reqps",
            )
        )
        .with_row(dashboard.Row("Decisions and commands"))
        .with_panel(
            _series(
                "Decisions by action",
                "Decisions taken by the policy per action, and decisions its limits suppressed.",
                [
                    _query(f"sum by (action) (increase(sentinel_agent_actions_total{{{AGENT}}}{rate}))", "{{action}}"),
                    _query(
                        f"sum by (reason) (increase(sentinel_agent_suppressed_decisions_total{{{AGENT}}}{rate}))",
                        "suppressed: {{reason}}",
                        ref="B",
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Commands sent and acknowledged",
                "Commands sent by action, acknowledgements by status, resends.",
                [
                    _query(
                        f"sum by (action) (increase(sentinel_agent_commands_sent_total{{{AGENT}}}{rate}))",
                        "sent: {{action}}",
                    ),
                    _query(
                        f"sum by (status) (increase(sentinel_agent_command_acks_total{{{AGENT}}}{rate}))",
                        "ack: {{status}}",
                        ref="B",
                    ),
                    _query(f"sum(increase(sentinel_agent_command_resends_total{{{AGENT}}}{rate}))", "resends", ref="C"),
                ],
            )
        )
        .with_panel(
            _series(
                "Commands not delivered",
                "Commands held for want of a connected trainer, and commands given up unacknowledged.",
                [
                    _query(
                        f"sum(increase(sentinel_agent_undeliverable_commands_total{{{AGENT}}}{rate}))", "undeliverable"
                    ),
                    _query(
                        f"sum(increase(sentinel_agent_expired_commands_total{{{AGENT}}}{rate}))", "expired", ref="B"
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Command channel security and errors",
                "Rejected command frames by reason, failed handshakes, refused CURVE keys, event-log write errors.",
                [
                    _query(
                        f"sum by (reason) (increase(sentinel_agent_rejected_commands_total{{{AGENT}}}{rate}))",
                        "rejected: {{reason}}",
                    ),
                    _query(
                        f"sum(increase(sentinel_agent_command_handshake_failures_total{{{AGENT}}}{rate}))",
                        "handshake failures",
                        ref="B",
                    ),
                    _query(
                        f"sum(increase(sentinel_agent_refused_client_keys_total{{{AGENT}}}{rate}))",
                        "refused keys",
                        ref="C",
                    ),
                    _query(
                        f"sum(increase(sentinel_agent_event_log_errors_total{{{AGENT}}}{rate}))",
                        "event-log errors",
                        ref="D",
                    ),
                ],
            )
        )
    )


DASHBOARDS: dict[str, Callable[[], dashboard.Dashboard]] = {
    "run-overview.json": run_overview,
    "per-layer.json": per_layer,
    "optimizer.json": optimizer,
    "agent-health.json": agent_health,
}


# -- alert rules -------------------------------------------------------------------------------------


def _new_above_zero(counter: str, window: str) -> str:
    """Series of ``counter`` that appeared within ``window`` already above 0.

    ``increase`` needs two samples, so it never sees what a counter had counted before its first
    scrape (a trainer that dropped messages before the agent first heard from it).
    """
    return f"({counter} unless {counter} offset {window})"


_DROPPED = "sentinel_trainer_dropped_messages_total"
_SENT = "sentinel_trainer_sent_messages_total"
_NONFINITE = "sentinel_agent_nonfinite_values_total"
_NEW_DROPPED = _new_above_zero(_DROPPED, "10m")

#: (uid, title, PromQL giving one value per alerting series, comparison, threshold, for, severity, summary)
ALERTS: list[tuple[str, str, str, str, float, str, str, str]] = [
    (
        "sentinel-spike-risk",
        "Spike risk high",
        "max by (run) (sentinel_spike_risk)",
        "gt",
        0.8,
        "1m",
        "warning",
        "Run {{ $labels.run }}: spike risk {{ humanize $values.A.Value }} (> 0.8); the agent log has the explanation.",
    ),
    (
        "sentinel-run-stopped",
        "Run stopped by the agent",
        'sum by (instance) (increase(sentinel_agent_actions_total{action="stop"}[10m]))',
        "gt",
        0,
        "0s",
        "critical",
        "The agent stopped a run past the rollback cap (policy.max_rollbacks); a person must resume it.",
    ),
    (
        "sentinel-rollback",
        "Agent rolled a run back",
        'sum by (instance) (increase(sentinel_agent_actions_total{action="rollback"}[10m]))',
        "gt",
        0,
        "0s",
        "warning",
        "The agent rolled a run back in the last 10 minutes; events.jsonl has the evidence.",
    ),
    (
        "sentinel-event-log-errors",
        "Agent cannot write its event log",
        "sum by (instance) (increase(sentinel_agent_event_log_errors_total[10m]))",
        "gt",
        0,
        "0s",
        "critical",
        "Decisions are not taken because events.jsonl cannot be written (disk full?).",
    ),
    (
        "sentinel-trainer-silent",
        "Trainer silent",
        "max by (run, rank) (time() - sentinel_last_message_timestamp_seconds) < 3600",
        "gt",
        300,
        "2m",
        "warning",
        "Run {{ $labels.run }} rank {{ $labels.rank }}: no statistics for {{ humanize $values.A.Value }} s "
        "(the trainer hung, crashed or finished, or cannot reach the agent); quiet again after an hour.",
    ),
    (
        "sentinel-nonfinite",
        "Non-finite training values",
        f"sum by (run) (increase({_NONFINITE}[5m])) > 0 or sum by (run) ({_new_above_zero(_NONFINITE, '5m')})",
        "gt",
        0,
        "0s",
        "critical",
        "Run {{ $labels.run }} sent NaN or ±Inf values in the last 5 minutes.",
    ),
    (
        "sentinel-messages-dropped",
        "Trainer dropping statistics",
        f"sum by (run) (increase({_DROPPED}[10m])) "
        f"/ clamp_min(sum by (run) (increase({_SENT}[10m])) + sum by (run) (increase({_DROPPED}[10m])), 1) > 0 "
        f"or sum by (run) ({_NEW_DROPPED}) / clamp_min(sum by (run) ({_SENT} and on (job, instance, run, rank) "
        f"{_NEW_DROPPED}) + sum by (run) ({_NEW_DROPPED}), 1)",
        "gt",
        0.01,
        "5m",
        "warning",
        "Run {{ $labels.run }} dropped more than 1% of its statistics messages (agent absent or slow).",
    ),
    (
        "sentinel-messages-rejected",
        "Agent rejecting messages",
        "sum by (instance, reason) (increase(sentinel_agent_rejected_messages_total[10m]))",
        "gt",
        0,
        "5m",
        "warning",
        "The agent rejected messages ({{ $labels.reason }}); its log names the cause.",
    ),
    (
        "sentinel-commands-expired",
        "Recovery commands expired",
        "sum by (instance) (increase(sentinel_agent_expired_commands_total[30m]))",
        "gt",
        0,
        "0s",
        "critical",
        "A command the agent decided was never acknowledged (commands.expire_seconds): that recovery did not happen.",
    ),
    (
        "sentinel-agent-down",
        "Agent down",
        'min by (instance) (up{job="sentinel-agent"})',
        "lt",
        1,
        "1m",
        "critical",
        "Prometheus cannot scrape the agent at {{ $labels.instance }} (scrape job sentinel-agent): no "
        "predictions and no recovery.",
    ),
]


def alert_rules() -> list[alerting.Rule]:
    rules = []
    for uid, title, promql, op, threshold, for_, severity, summary in ALERTS:
        source = (
            alerting.Query("A")
            .datasource_uid(DATASOURCE_UID)
            .relative_time_range(alerting_models.RelativeTimeRange(from_val=600, to=0))
        )
        source = source.model(_query(promql, instant=True))
        condition = (
            alerting.Query("C")
            .datasource_uid("__expr__")
            .model(
                expr.TypeThreshold()
                .ref_id("C")
                .expression("A")
                .conditions(
                    [
                        expr.ExprTypeThresholdConditions().evaluator(
                            expr.ExprTypeThresholdConditionsEvaluator().type(op).params([threshold])
                        )
                    ]
                )
            )
        )
        rules.append(
            alerting.Rule(title)
            .uid(uid)
            .condition("C")
            .queries([source, condition])
            .for_val(for_)
            .no_data_state("OK")
            .exec_err_state("Error")
            .labels({"severity": severity, "service": "llm-sentinel"})
            .annotations({"summary": summary, "description": "llm-sentinel alert; docs/grafana.md lists the rules."})
            .rule_group(RULE_GROUP)
            .folder_uid(FOLDER_UID)
            .org_id(1)
        )
    return rules


def _plain(obj: object) -> object:
    return json.loads(json.dumps(obj, cls=JSONEncoder))


def alert_rules_api() -> list[dict]:
    """The rules as Grafana's provisioning HTTP API takes them (POST /api/v1/provisioning/alert-rules)."""
    return [_plain(rule.build()) for rule in alert_rules()]  # type: ignore[misc]


def alert_rules_file() -> dict:
    """The rules in Grafana's file-provisioning format (provisioning/alerting/*.yml)."""
    rules = []
    for api in alert_rules_api():
        rules.append(
            {
                "uid": api["uid"],
                "title": api["title"],
                "condition": api["condition"],
                "data": api["data"],
                "noDataState": api["noDataState"],
                "execErrState": api["execErrState"],
                "for": api["for"],
                "labels": api["labels"],
                "annotations": api["annotations"],
                "isPaused": False,
            }
        )
    group = {"orgId": 1, "name": RULE_GROUP, "folder": FOLDER_TITLE, "interval": RULE_GROUP_INTERVAL, "rules": rules}
    return {"apiVersion": 1, "groups": [group]}


def datasource_file() -> dict:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": DATASOURCE_NAME,
                "type": "prometheus",
                "uid": DATASOURCE_UID,
                "access": "proxy",
                "url": "http://prometheus:9090",
                "isDefault": False,  # the panels name it by uid; a Grafana may already have a default
                "editable": False,
                "jsonData": {"timeInterval": "15s", "httpMethod": "POST"},
            }
        ],
    }


def dashboard_provider_file() -> dict:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "llm-sentinel",
                "orgId": 1,
                "folder": FOLDER_TITLE,  # by title, as the alerting provisioning does: no folderUid
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False},
            }
        ],
    }


def _yaml(data: dict, what: str) -> str:
    header = f"# {what}\n# Generated by grafana/generate.py; edit that file, not this one.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)


#: Keys of Grafana's Prometheus annotation queries that the SDK's AnnotationQuery model does not carry.
ANNOTATION_EXTRAS = {
    "Agent actions": {"titleFormat": "agent: {{action}}", "tagKeys": "action", "useValueForTime": False},
    "Detections": {"titleFormat": "{{detector}} ({{severity}})", "tagKeys": "detector,severity"},
}


def dashboard_json(board: dashboard.Dashboard) -> dict:
    """The dashboard as Grafana stores it, with stable panel ids (Grafana would otherwise number them on load)."""
    model = board.build()
    for number, panel in enumerate(model.panels or [], start=1):
        panel.id_val = number
    data = _plain(model)
    for annotation in data.get("annotations", {}).get("list", []):  # type: ignore[union-attr]
        annotation.update(ANNOTATION_EXTRAS.get(annotation["name"], {}))
    return data  # type: ignore[return-value]


def render() -> dict[str, str]:
    """Every generated file: path relative to grafana/ -> its text."""
    files = {}
    for name, build in DASHBOARDS.items():
        files[f"dashboards/{name}"] = json.dumps(dashboard_json(build()), indent=2, ensure_ascii=False) + "\n"
    files["provisioning/alerting/sentinel.yml"] = _yaml(alert_rules_file(), "Grafana-managed alert rules.")
    files["provisioning/datasources/sentinel.yml"] = _yaml(datasource_file(), "The Prometheus that scrapes the agent.")
    files["provisioning/dashboards/sentinel.yml"] = _yaml(
        dashboard_provider_file(), f"Loads the dashboards of grafana/dashboards, mounted at {DASHBOARDS_PATH}."
    )
    return files


def stale(root: Path = ROOT) -> list[str]:
    """Generated files whose checked-in text differs from the generator's output (or is missing)."""
    out = []
    for rel, text in render().items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a file is out of date")
    parser.add_argument("--out", type=Path, default=ROOT, help="folder to write into (default: grafana/)")
    args = parser.parse_args(argv)
    if args.check:
        outdated = stale(args.out)
        for rel in outdated:
            print(f"out of date: {args.out / rel} (run python grafana/generate.py)", file=sys.stderr)
        return 1 if outdated else 0
    for rel, text in render().items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
