"""Fleet overview: the first dashboard on-call opens.

The first row answers "what is broken and what is it costing" in big numbers; the
second lists the problems, each row linking to its runbook and to the Node dashboard;
then utilization, power and heat for the whole fleet.
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
    UID_JOB,
    UID_NODE,
    UID_REMEDIATION,
    UID_STORAGE,
    UID_USAGE,
    Query,
    Row,
    cluster_var,
    dashboard,
    datasource_var,
    heatmap,
    job_link,
    node_link,
    query_var,
    runbook_link,
    stat,
    steps,
    table,
    timeseries,
)

F = f"{CLUSTER}, {NODE}"
BROKEN = 'state=~"drained|draining|down|fail"'
ALERT_LABELS = "alertname, severity, domain, cluster, node, gpu, device, port, mountpoint, job_id, remediation"
FIRING = f'{CLUSTER}, alertstate="firing"'


def xid_in_range(by: str, filters: str) -> str:
    """Xid events per (by) in the dashboard's range; a code's series appears already at 1,
    so series new within the range count with their value (alerts/README.md)."""
    x = f"gpu_xid_errors_total{{{filters}}}"
    return (f"sum by ({by}) ((increase({x}[$__range]) > 0) or ({x} unless {x} offset $__range))")


def build() -> Dashboard:
    items = [
        Row("Now: what is broken, and what it costs"),
        stat("GPUs expected / reporting / healthy",
             "Expected: the agents' --gpu.expected-count, else Slurm's GRES count. Reporting: answering NVML. "
             "Healthy: reporting, with no row remap pending or failed, no page retirement pending and no "
             "uncorrectable ECC error since the driver loaded (recording rules node:gpus_*).",
             [Query(f'sum(node:gpus_expected:sum{{{F}}})', "expected"),
              Query(f'sum(node:gpus_reporting:count{{{F}}})', "reporting"),
              Query(f'sum(node:gpus_healthy:count{{{F}}})', "healthy")],
             "none", width=6, thresholds=steps((None, BLUE)), color_mode="value"),
        stat("GPUs not healthy or missing",
             "Expected GPUs that are missing, lost or unhealthy (expected minus healthy). Each one is a GPU a "
             "job cannot use; see the tables below for which and why.",
             [f'sum(node:gpus_expected:sum{{{F}}}) - sum(node:gpus_healthy:count{{{F}}})'],
             "none", thresholds=steps((None, GREEN), (1, RED))),
        stat("Critical alerts firing",
             "Alerts with severity=critical firing now (they page). The table below lists them with runbooks.",
             [f'count(ALERTS{{{FIRING}, severity="critical"}}) or vector(0)'],
             "none", thresholds=steps((None, GREEN), (1, RED))),
        stat("Warning alerts firing",
             "Alerts with severity=warning firing now (they open tickets).",
             [f'count(ALERTS{{{FIRING}, severity="warning"}}) or vector(0)'],
             "none", thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Nodes out of service",
             "Distinct Slurm nodes drained, draining, down or failed now.",
             [f'count(max by (cluster, node) (slurm_node_state{{{F}, {BROKEN}}}) == 1) or vector(0)'],
             "none", thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Drained by gpufleet / by others",
             "Nodes Slurm holds drained/down with a reason: set by gpufleet's remediation (reason prefix "
             "'gpufleet:'), or by a human or another tool. Only gpufleet resumes its own.",
             [Query(f'count(slurm_node_drain_info{{{F}, reason=~"gpufleet:.*"}}) or vector(0)', "gpufleet"),
              Query(f'count(slurm_node_drain_info{{{F}, reason!~"gpufleet:.*"}}) or vector(0)', "others")],
             "none", thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("GPUs out of service",
             "GPUs on nodes Slurm holds drained, draining, down or failed: capacity the fleet pays for and "
             "cannot schedule.",
             [f'sum(slurm_node_gpus{{{F}}} * on (cluster, node) group_left () '
              f'(max by (cluster, node) (slurm_node_state{{{F}, {BROKEN}}}) == 1)) or vector(0)'],
             "none", thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Jobs on nodes with a critical alert",
             "Running Slurm jobs holding a node that has a critical alert firing: the jobs at risk now.",
             [f'count(count by (cluster, job_id) (slurm_job_node_info{{{F}}} * on (cluster, node) group_left () '
              f'max by (cluster, node) (ALERTS{{{FIRING}, severity="critical"}}))) or vector(0)'],
             "none", thresholds=steps((None, GREEN), (1, RED))),
        stat("Allocated GPUs idle now",
             "GPUs a job holds whose utilization is below the idle knob "
             "(gpufleet:config:gpu_idle_utilization_ratio): paid for, unused.",
             [f'count(count by (cluster, node, uuid) (node_gpu_job:gpu_utilization_ratio:max{{{F}}} '
              f'< scalar(gpufleet:config:gpu_idle_utilization_ratio))) or vector(0)'],
             "none", thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Fleet GPU power",
             "Total power drawn by the selected nodes' GPUs now.",
             [f'sum(gpu_power_usage_watts{{{F}}})'], "watt", width=3,
             thresholds=steps((None, BLUE)), color_mode="value"),

        Row("Problems: each links to its runbook and its node"),
        table("Firing alerts",
              "Every alert firing now, most severe first. Click the alert name for its runbook, the node for "
              "the Node dashboard, the job for the Job dashboard. Value: seconds since it started.",
              [f'(time() - max by ({ALERT_LABELS}) (ALERTS_FOR_STATE{{{CLUSTER}}})) and on ({ALERT_LABELS}) '
               f'max by ({ALERT_LABELS}) (ALERTS{{{FIRING}}})'],
              "s", width=24, h=9, links={"alertname": runbook_link(), "node": node_link(), "job_id": job_link()},
              rename={"Value": "firing for"}, sort_by="severity"),
        table("Xid errors in the range",
              "Xid errors per node, GPU, code and class (reboot, hw_inspection, app, ignore, unknown) in the "
              "selected time range. Classes come from docs/xid-catalogue.md.",
              [xid_in_range("cluster, node, gpu, xid, class", F)], "none", width=12, links={"node": node_link()},
              rename={"Value": "events"}),
        table("GPUs not answering NVML",
              "GPUs that report gpu_up 0: lost (fell off the bus) or waiting for a reset. Runbook: GpuLost.",
              [f'max by (cluster, node, gpu, uuid) (gpu_up{{{F}}} == 0)'], "none", width=12,
              links={"node": node_link()}, hide=("Time", "Value")),
        table("ECC errors and row remapping",
              "GPUs with uncorrectable or correctable (volatile) ECC errors, remapped rows, or a row remap "
              "pending (needs a GPU reset) or failed (needs a replacement).",
              [f'sum by (cluster, node, gpu) (gpu_ecc_errors_total{{{F}, error_type="uncorrected", counter="volatile"}}) > 0',
               f'sum by (cluster, node, gpu) (gpu_ecc_errors_total{{{F}, error_type="corrected", counter="volatile"}}) > 0',
               f'sum by (cluster, node, gpu) (gpu_remapped_rows_total{{{F}}}) > 0',
               f'max by (cluster, node, gpu) (gpu_row_remap_pending{{{F}}}) == 1',
               f'max by (cluster, node, gpu) (gpu_row_remap_failed{{{F}}}) == 1'],
              "none", width=12, links={"node": node_link()},
              rename={"Value #A": "uncorrected", "Value #B": "corrected", "Value #C": "remapped rows",
                      "Value #D": "remap pending", "Value #E": "remap failed"}),
        table("InfiniBand/RoCE ports not active",
              "Ports whose logical state is not ACTIVE or whose physical state is not LinkUp. Runbook: "
              "RdmaPortDown.",
              [f'max by (cluster, node, device, port, state, physical_state) (rdma_port_state_info{{{F}}}) '
               f'unless on (cluster, node, device, port) (rdma_port_state{{{F}}} >= 4 '
               f'and on (cluster, node, device, port) rdma_port_physical_state{{{F}}} == 5)'],
              "none", width=12, links={"node": node_link()}, hide=("Time", "Value")),
        table("Stuck filesystems",
              "Mounts whose statfs has not answered within the agent's timeout (hung NFS/Lustre server, dead "
              "FUSE daemon): jobs touching them hang. Runbook: FilesystemStuck.",
              [f'max by (cluster, node, mountpoint, fstype, device) (filesystem_stuck{{{F}}} == 1)'],
              "none", width=12, links={"node": node_link()}, hide=("Time", "Value")),
        table("Idle allocated GPUs and their jobs",
              "GPUs held by a job with utilization below the idle knob, with the job (link to the Job "
              "dashboard). Runbook for long idling: JobGpusAllocatedIdle.",
              [f'node_gpu_job:gpu_utilization_ratio:max{{{F}}} '
               f'< scalar(gpufleet:config:gpu_idle_utilization_ratio)'],
              "percentunit", width=12, links={"node": node_link(), "job_id": job_link()},
              rename={"Value": "utilization"}),

        Row("Utilization, power and heat"),
        timeseries("Fleet GPU utilization and activity",
                   "Average over the selected GPUs: utilization (a kernel running), SM active and tensor active "
                   "(GPM, Hopper and newer). Utilization high with low SM/tensor activity means GPUs wait on "
                   "something else.",
                   [Query(f'avg(gpu_utilization_ratio{{{F}}})', "utilization"),
                    Query(f'avg(gpu_sm_active_ratio{{{F}}})', "SM active"),
                    Query(f'avg(gpu_tensor_active_ratio{{{F}}})', "tensor active")],
                   "percentunit", min_=0, max_=1),
        heatmap("GPU utilization per node",
                "Average GPU utilization of each node over time; a dark row is a node that stopped working.",
                Query(f'avg by (cluster, node) (gpu_utilization_ratio{{{F}}})', "{{node}}"), "percentunit"),
        timeseries("Total GPU power", "Power drawn by all selected GPUs, and their enforced limits.",
                   [Query(f'sum(gpu_power_usage_watts{{{F}}})', "drawn"),
                    Query(f'sum(gpu_power_limit_watts{{{F}}})', "limit")], "watt", min_=0),
        table("Hottest GPUs",
              "The ten hottest GPUs now, with the margin to their slowdown threshold (GpuTemperatureHigh fires "
              "within gpufleet:config:gpu_temperature_margin_celsius).",
              [f'topk(10, max by (cluster, node, gpu) (gpu_temperature_celsius{{{F}}}))',
               f'max by (cluster, node, gpu) (gpu_temperature_threshold_celsius{{{F}, threshold="slowdown"}}) '
               f'- on (cluster, node, gpu) max by (cluster, node, gpu) (gpu_temperature_celsius{{{F}}}) '
               f'and on (cluster, node, gpu) topk(10, max by (cluster, node, gpu) (gpu_temperature_celsius{{{F}}}))'],
              "celsius", links={"node": node_link()},
              rename={"Value #A": "temperature", "Value #B": "margin to slowdown"}, sort_by="temperature"),
    ]
    return dashboard(
        uid=UID_FLEET, title="gpufleet / Fleet overview", tags=["fleet"],
        description="What is broken and what it costs, across the fleet. Start here.",
        variables=[datasource_var(), cluster_var(),
                   query_var("partition", "Partition", 'label_values(slurm_partition_info{cluster=~"$cluster"}, '
                             'partition)'),
                   query_var("node", "Node", 'label_values(slurm_node_partition_info{cluster=~"$cluster", '
                             'partition=~"$partition"}, node)')],
        items=items,
        links=[(UID_NODE, "Node"), (UID_JOB, "Job"), (UID_FABRIC, "Fabric"), (UID_STORAGE, "Storage"),
               (UID_REMEDIATION, "Remediation"), (UID_USAGE, "Usage & cost")],
    )
