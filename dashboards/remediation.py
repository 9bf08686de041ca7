"""Remediation: what gpufleet-remediation did, what it holds out of service, and whether it can act.

Its own series (``gpufleet_remediation_*``, docs/metrics.md) are global to the service
(no node label); which nodes it drained comes from Slurm (``slurm_node_drain_info``,
reason prefix ``gpufleet:``). The full audit trail is ``gpufleet remediation history``.
"""

from __future__ import annotations

from grafanalib.core import Dashboard

from dashboards.helpers import (
    BLUE,
    CLUSTER,
    GREEN,
    ORANGE,
    RED,
    UID_FLEET,
    UID_NODE,
    UID_REMEDIATION,
    Query,
    Row,
    cluster_var,
    dashboard,
    datasource_var,
    node_link,
    stat,
    steps,
    table,
    timeseries,
    value_map,
)

R = f'{CLUSTER}, job="gpufleet-remediation"'
DRAIN = f"slurm_node_drain_info{{{CLUSTER}"


def flag(title: str, description: str, metric: str, on: tuple[str, str], off: tuple[str, str]) -> object:
    return stat(title, description, [f'max({metric}{{{R}}})'], "none", width=4,
                mappings=value_map({"1": on, "0": off}), thresholds=steps((None, GREEN), (1, on[1])))


def build() -> Dashboard:
    items = [
        Row("Can it act?"),
        stat("Service up", "Whether Prometheus can scrape the remediation service. Runbook: GpufleetRemediationDown.",
             [f'max(up{{{R}}})'], "none", width=4, mappings=value_map({"1": ("up", GREEN), "0": ("DOWN", RED)}),
             thresholds=steps((None, RED), (1, GREEN))),
        flag("Circuit breaker", "Open: a cap was hit or actions kept failing; new drains are blocked until a "
             "human resets it (gpufleet remediation reset-breaker). Runbook: GpufleetRemediationBreakerOpen.",
             "gpufleet_remediation_breaker_open", ("OPEN", RED), ("closed", GREEN)),
        flag("Paused", "An admin paused all actions (gpufleet remediation pause).",
             "gpufleet_remediation_paused", ("paused", ORANGE), ("acting", GREEN)),
        flag("Dry run", "Dry-run mode: decisions are recorded, nothing is done to the scheduler.",
             "gpufleet_remediation_dry_run", ("dry run", ORANGE), ("live", GREEN)),
        stat("Pending approvals", "Actions waiting for a human (gpufleet remediation approve ID | deny ID).",
             [f'max(gpufleet_remediation_pending_approvals{{{R}}})'], "none", width=4,
             thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Rate-limit tokens", "Actions the rate limit still allows now.",
             [f'max(gpufleet_remediation_rate_limit_tokens{{{R}}})'], "none", width=4,
             thresholds=steps((None, RED), (1, GREEN))),
        stat("Nodes drained by gpufleet", "Nodes the service holds out of service now (its own count).",
             [f'max(gpufleet_remediation_nodes_drained{{{R}}})'], "none", width=4,
             thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Scheduled resumes", "Nodes waiting for their hold-down before an automatic resume.",
             [f'max(gpufleet_remediation_scheduled_resumes{{{R}}})'], "none", width=4,
             thresholds=steps((None, BLUE)), color_mode="value"),
        stat("Flapping nodes", "Nodes flagged as flapping: never resumed automatically.",
             [f'max(gpufleet_remediation_flapping_nodes{{{R}}})'], "none", width=4,
             thresholds=steps((None, GREEN), (1, ORANGE))),

        Row("What it did"),
        timeseries("Actions by result",
                   "Drain, reboot and resume actions per interval by result (done, failed, dry_run, cancelled). "
                   "Runbook for failures: GpufleetRemediationActionsFailing.",
                   [Query(f'sum by (action, result) (increase(gpufleet_remediation_actions_total{{{R}}}'
                          f'[$__rate_interval]))', "{{action}} {{result}}")], "none", bars=True, stack=True, min_=0),
        timeseries("Decisions by kind",
                   "What the service decided per alert per interval: acted, dry_run, declined (guardrails), "
                   "pending_approval, duplicate, unmatched, resolved, failed.",
                   [Query(f'sum by (decision) (increase(gpufleet_remediation_decisions_total{{{R}}}'
                          f'[$__rate_interval]))', "{{decision}}")], "none", bars=True, stack=True, min_=0),
        timeseries("Alert received to drain done",
                   "Time from the webhook delivering an alert to the decision and action completed (p50, p99), "
                   "including the scheduler's read-back. From fault to drain add the rule's `for:` and "
                   "Alertmanager's group_wait (alerts/alertmanager.yml).",
                   [Query(f'histogram_quantile(0.5, sum by (le) (rate('
                          f'gpufleet_remediation_decision_duration_seconds_bucket{{{R}}}[$__rate_interval])))', "p50"),
                    Query(f'histogram_quantile(0.99, sum by (le) (rate('
                          f'gpufleet_remediation_decision_duration_seconds_bucket{{{R}}}[$__rate_interval])))',
                          "p99")], "s", min_=0),
        timeseries("Webhook deliveries", "Alertmanager deliveries to the service per second by HTTP status "
                   "(401: a token mismatch; 5xx: the service failed).",
                   [Query(f'sum by (code) (rate(gpufleet_remediation_webhook_requests_total{{{R}}}'
                          f'[$__rate_interval]))', "{{code}}")], "reqps", min_=0),

        Row("Out of service now"),
        table("Drained nodes, reasons and owners",
              "Every node Slurm holds drained or down with a reason: owner gpufleet (reason prefix 'gpufleet:', "
              "the service resumes it itself when its policy says so) or other (a human or another tool: "
              "gpufleet never resumes it). The node links to the Node dashboard.",
              [f'label_replace(max by (cluster, node, reason, reason_user, reason_time) ({DRAIN}, reason=~"gpufleet:.*"}}), '
               f'"owner", "gpufleet", "", "") or label_replace(max by (cluster, node, reason, reason_user, reason_time) '
               f'({DRAIN}, reason!~"gpufleet:.*"}}), "owner", "other", "", "")'],
              "none", width=24, hide=("Time", "Value"), links={"node": node_link()}),
    ]
    return dashboard(
        uid=UID_REMEDIATION, title="gpufleet / Remediation", tags=["remediation"],
        description="The remediation service: can it act, what it did, which nodes are out of service and why.",
        variables=[datasource_var(), cluster_var()],
        items=items, links=[(UID_FLEET, "Fleet overview"), (UID_NODE, "Node")],
    )
