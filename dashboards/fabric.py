"""Fabric: InfiniBand and RoCE ports across the fleet.

Throughput per port, errors and flaps, ports below the expected rate
(``gpufleet:config:rdma_expected_rate_bytes_per_second``) and RoCE congestion.
"""

from __future__ import annotations

from grafanalib.core import Dashboard

from dashboards.helpers import (
    BLUE,
    CLUSTER,
    GREEN,
    NODE,
    ORANGE,
    RED,
    UID_FABRIC,
    UID_FLEET,
    UID_NODE,
    Query,
    Row,
    cluster_var,
    dashboard,
    datasource_var,
    node_link,
    query_var,
    stat,
    steps,
    table,
    timeseries,
)

F = f"{CLUSTER}, {NODE}"
PORT = "{{node}} {{device}}/{{port}}"


def per_port_rate(metric: str) -> str:
    return f'sum by (cluster, node, device, port) (rate({metric}{{{F}}}[$__rate_interval]))'


def build() -> Dashboard:
    items = [
        Row("Fabric now"),
        stat("Ports active / total",
             "Ports whose logical state is ACTIVE and physical state LinkUp, of all ports (recording rules "
             "node:rdma_ports_active:count, node:rdma_ports:count).",
             [Query(f'sum(node:rdma_ports_active:count{{{F}}})', "active"),
              Query(f'sum(node:rdma_ports:count{{{F}}})', "total")],
             "none", width=6, thresholds=steps((None, BLUE)), color_mode="value"),
        stat("Ports not active", "Ports that are not ACTIVE/LinkUp now. Runbook: RdmaPortDown.",
             [f'sum(node:rdma_ports:count{{{F}}}) - sum(node:rdma_ports_active:count{{{F}}})'],
             "none", width=6, thresholds=steps((None, GREEN), (1, RED))),
        stat("Fabric throughput", "Bytes per second sent by all selected ports.",
             [f'sum(rate(rdma_port_transmit_bytes_total{{{F}}}[5m]))'], "Bps", width=6,
             thresholds=steps((None, BLUE)), color_mode="value"),
        stat("Port errors", "PMA errors per second, all selected ports (node:rdma_errors:rate5m).",
             [f'sum(node:rdma_errors:rate5m{{{F}}})'], "cps", width=6,
             thresholds=steps((None, GREEN), (0.001, ORANGE))),

        Row("Throughput"),
        timeseries("Transmit per port", "Bytes per second sent per port; the 20 busiest.",
                   [Query(f'topk(20, {per_port_rate("rdma_port_transmit_bytes_total")})', PORT)], "Bps", min_=0),
        timeseries("Receive per port", "Bytes per second received per port; the 20 busiest.",
                   [Query(f'topk(20, {per_port_rate("rdma_port_receive_bytes_total")})', PORT)], "Bps", min_=0),

        Row("Errors and flaps"),
        timeseries("Error rate per port",
                   "All PMA error counters per second per port (node:rdma_port_errors:rate5m); the 20 worst.",
                   [Query(f'topk(20, sum by (cluster, node, device, port) (node:rdma_port_errors:rate5m{{{F}}}))', PORT)],
                   "cps", min_=0),
        table("Link flaps in the range",
              "Logical state changes (rdma_port_state_changes_total) and failed link recoveries "
              "(link_downed) per port in the selected range. Runbooks: RdmaPortFlapping, RdmaPortLinkDowned.",
              [f'sum by (cluster, node, device, port) (increase(rdma_port_state_changes_total{{{F}}}[$__range])) > 0',
               f'sum by (cluster, node, device, port) (increase(rdma_port_link_downed_total{{{F}}}[$__range])) > 0'],
              "none", links={"node": node_link()},
              rename={"Value #A": "state changes", "Value #B": "link downed"}),
        table("Ports below the expected rate",
              "Ports that trained to a lower rate than gpufleet:config:rdma_expected_rate_bytes_per_second "
              "(a bad cable or transceiver). Runbook: RdmaPortRateBelowExpected.",
              [f'max by (cluster, node, device, port) (rdma_port_rate_bytes_per_second{{{F}}}) '
               f'< scalar(gpufleet:config:rdma_expected_rate_bytes_per_second)'],
              "Bps", width=24, links={"node": node_link()}, rename={"Value": "rate"}),

        Row("RoCE congestion"),
        timeseries("Congestion notifications (CNP)",
                   "CNPs sent (this port saw ECN-marked traffic) and handled (this port slowed down), per second.",
                   [Query(f'topk(20, {per_port_rate("rdma_port_cnp_sent_total")})', PORT + " sent"),
                    Query(f'topk(20, {per_port_rate("rdma_port_cnp_handled_total")})', PORT + " handled")],
                   "pps", min_=0),
        timeseries("ECN-marked packets and retransmissions",
                   "RoCE packets received with an ECN mark, and adaptive retransmissions, per second.",
                   [Query(f'topk(20, {per_port_rate("rdma_port_ecn_marked_packets_total")})', PORT + " ECN"),
                    Query(f'topk(20, {per_port_rate("rdma_port_retransmissions_total")})', PORT + " retrans")],
                   "pps", min_=0),
        table("Ports", "Every port: state, physical state and negotiated rate.",
              [f'max by (cluster, node, device, port, state, physical_state) (rdma_port_state_info{{{F}}})',
               f'max by (cluster, node, device, port) (rdma_port_rate_bytes_per_second{{{F}}})'],
              "none", width=24, hide=("Time", "Value #A"), units={"Value #B": "Bps"}, rename={"Value #B": "rate"},
              links={"node": node_link()}),
    ]
    return dashboard(
        uid=UID_FABRIC, title="gpufleet / Fabric", tags=["fabric"],
        description="InfiniBand and RoCE: throughput, errors, flaps, rate and congestion.",
        variables=[datasource_var(), cluster_var(),
                   query_var("node", "Node", 'label_values(rdma_port_info{cluster=~"$cluster"}, node)')],
        items=items, links=[(UID_FLEET, "Fleet overview"), (UID_NODE, "Node")],
    )
