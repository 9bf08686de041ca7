"""Job: one Slurm job's nodes and GPUs, training progress, fabric and alerts.

The GPUs come from the join series ``gpu_job_info`` (DESIGN.md: no job label on GPU
series): ``<gpu series> * on (cluster, node, uuid) group_left () max by (cluster, node, uuid)
(gpu_job_info{job_id="$job"})``.
Opened from the Fleet overview and Node dashboards (``var-job``).
"""

from __future__ import annotations

from grafanalib.core import Dashboard

from dashboards.fleet import ALERT_LABELS, FIRING
from dashboards.helpers import (
    BLUE,
    CLUSTER,
    GREEN,
    RED,
    UID_FLEET,
    UID_JOB,
    UID_NODE,
    UID_USAGE,
    Query,
    Row,
    cluster_var,
    dashboard,
    datasource_var,
    node_link,
    query_var,
    runbook_link,
    stat,
    steps,
    table,
    timeseries,
)

J = f'{CLUSTER}, job_id="$job"'
JOB_GPUS = f'on (cluster, node, uuid) group_left () max by (cluster, node, uuid) (gpu_job_info{{{J}}})'
JOB_NODES = f'on (cluster, node) group_left () max by (cluster, node) (slurm_job_node_info{{{J}}})'
PER_GPU = "{{node}} GPU {{gpu}}"


def on_job_gpus(metric: str) -> str:
    """``metric`` of the GPUs the job holds, one series per (node, gpu)."""
    return f'max by (cluster, node, gpu) ({metric}{{{CLUSTER}}} * {JOB_GPUS})'


def build() -> Dashboard:
    items = [
        Row("The job"),
        table("Job", "Who runs it, where it was submitted, and its name (slurm_job_info: running jobs only).",
              [f'max by (job_id, user, account, partition, name) (slurm_job_info{{{J}}})'], "none", width=12,
              h=4, hide=("Time", "Value")),
        stat("Running for", "Time since Slurm started the job.",
             [f'time() - max(slurm_job_start_timestamp_seconds{{{J}}})'], "s", width=4, h=4,
             thresholds=steps((None, BLUE)), color_mode="value"),
        stat("GPUs allocated / used",
             "GPUs Slurm allocated to the job, and the sum of their utilization (8 GPUs at 50 % = 4 used).",
             [Query(f'sum(slurm_job_gpus{{{J}}})', "allocated"),
              Query(f'sum({on_job_gpus("gpu_utilization_ratio")})', "used")],
             "none", width=4, h=4, thresholds=steps((None, BLUE)), color_mode="value"),
        stat("Alerts on its nodes", "Alerts firing now on the nodes the job holds, or naming the job.",
             [f'count((ALERTS{{{FIRING}}} * {JOB_NODES}) or ALERTS{{{FIRING}, job_id="$job"}}) '
              f'or vector(0)'], "none", width=4, h=4, thresholds=steps((None, GREEN), (1, RED))),

        Row("Nodes and GPUs"),
        table("GPUs of the job",
              "Every GPU the job holds now: node (link to the Node dashboard), GPU, utilization, SM and tensor "
              "activity, memory used.",
              [on_job_gpus("gpu_utilization_ratio"), on_job_gpus("gpu_sm_active_ratio"),
               on_job_gpus("gpu_tensor_active_ratio"), on_job_gpus("gpu_memory_used_bytes")],
              "percentunit", width=24, h=7, links={"node": node_link()}, units={"Value #D": "bytes"},
              rename={"Value #A": "utilization", "Value #B": "SM active", "Value #C": "tensor active",
                      "Value #D": "memory used"}),
        timeseries("GPU utilization", "Utilization of each of the job's GPUs.",
                   [Query(on_job_gpus("gpu_utilization_ratio"), PER_GPU)], "percentunit", min_=0, max_=1),
        timeseries("SM and tensor activity (GPM)", "Averages over the job's GPUs: SM active and tensor active.",
                   [Query(f'avg({on_job_gpus("gpu_sm_active_ratio")})', "SM active"),
                    Query(f'avg({on_job_gpus("gpu_tensor_active_ratio")})', "tensor active")],
                   "percentunit", min_=0, max_=1),
        timeseries("GPU memory used", "Framebuffer memory used on each of the job's GPUs.",
                   [Query(on_job_gpus("gpu_memory_used_bytes"), PER_GPU)], "bytes", min_=0, width=24),

        Row("Training progress"),
        timeseries("Step rate", "Training steps per second of the furthest rank (slope of training_step).",
                   [Query(f'max(deriv(training_step{{{J}}}[$__rate_interval]))', "steps/s")], "suffix: steps/s",
                   width=8, min_=0),
        timeseries("Loss", "Training loss per rank, as the training script reports it.",
                   [Query(f'training_loss{{{J}}}', "rank {{rank}}")], "none", width=8),
        timeseries("Throughput", "Samples and tokens per second, summed over the job's ranks.",
                   [Query(f'sum(training_throughput_samples_per_second{{{J}}})', "samples/s"),
                    Query(f'sum(training_throughput_tokens_per_second{{{J}}})', "tokens/s")], "short",
                   width=8, min_=0),

        Row("Fabric of its nodes, and alerts"),
        timeseries("InfiniBand/RoCE throughput of its nodes",
                   "Bytes per second sent and received by all ports of each node the job holds.",
                   [Query(f'sum by (cluster, node) (rate(rdma_port_transmit_bytes_total{{{CLUSTER}}}[$__rate_interval])) '
                          f'* {JOB_NODES}', "{{node}} tx"),
                    Query(f'sum by (cluster, node) (rate(rdma_port_receive_bytes_total{{{CLUSTER}}}[$__rate_interval])) '
                          f'* {JOB_NODES}', "{{node}} rx")], "Bps", min_=0),
        timeseries("InfiniBand/RoCE errors of its nodes",
                   "PMA error counters per second on the job's nodes (node:rdma_errors:rate5m).",
                   [Query(f'node:rdma_errors:rate5m{{{CLUSTER}}} * {JOB_NODES}', "{{node}}")], "cps", min_=0),
        table("Alerts touching the job",
              "Alerts firing on the job's nodes, or about the job itself (training stalled, idle GPUs); the "
              "alert name links to its runbook. Value: seconds firing.",
              [f'(time() - max by ({ALERT_LABELS}) (ALERTS_FOR_STATE{{{CLUSTER}}})) and on ({ALERT_LABELS}) '
               f'max by ({ALERT_LABELS}) ((ALERTS{{{FIRING}}} * {JOB_NODES}) '
               f'or ALERTS{{{FIRING}, job_id="$job"}})'],
              "s", width=24, h=7, links={"alertname": runbook_link(), "node": node_link()},
              rename={"Value": "firing for"}),
    ]
    return dashboard(
        uid=UID_JOB, title="gpufleet / Job", tags=["job"],
        description="One Slurm job: its nodes and GPUs, training progress, fabric and alerts.",
        variables=[datasource_var(), cluster_var(),
                   query_var("partition", "Partition",
                             'label_values(slurm_job_info{cluster=~"$cluster"}, partition)'),
                   query_var("job", "Job", 'label_values(slurm_job_info{cluster=~"$cluster", '
                             'partition=~"$partition"}, job_id)', multi=False, include_all=False)],
        items=items, time_from="now-3h",
        links=[(UID_FLEET, "Fleet overview"), (UID_NODE, "Node"), (UID_USAGE, "Usage & cost")],
    )
