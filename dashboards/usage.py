"""Usage & cost: allocated vs used GPU-hours by account, user and partition; idle allocated GPUs.

GPU-hours follow alerts/rules/jobs.yml: its ``*:gpus_*`` recordings are GPU counts
sampled every minute (the group's interval), so their integral over the range is
``sum_over_time(<rule>[$__range]) / 60`` GPU-hours. "Used" is the sum of the
utilization of the GPUs a job holds (8 GPUs at 50 % = 4 GPUs used).
"""

from __future__ import annotations

from grafanalib.core import Dashboard

from dashboards.helpers import (
    BLUE,
    CLUSTER,
    GREEN,
    ORANGE,
    UID_FLEET,
    UID_JOB,
    UID_USAGE,
    Query,
    Row,
    cluster_var,
    dashboard,
    datasource_var,
    job_link,
    query_var,
    stat,
    steps,
    table,
    timeseries,
)

P = f'{CLUSTER}, partition=~"$partition"'
IDLE = "scalar(gpufleet:config:gpu_idle_utilization_ratio)"


def gpu_hours(rule: str, by: str, matchers: str = CLUSTER) -> str:
    return f'sum by ({by}) (sum_over_time({rule}{{{matchers}}}[$__range])) / 60'


def build() -> Dashboard:
    items = [
        Row("The range in GPU-hours"),
        stat("GPU-hours allocated", "GPU-hours Slurm allocated to running jobs in the selected partitions over "
             "the range.", [f'sum(sum_over_time(partition:gpus_allocated:sum{{{P}}}[$__range])) / 60'],
             "none", width=6, thresholds=steps((None, BLUE)), color_mode="value"),
        stat("GPU-hours used", "GPU-hours of utilization of the allocated GPUs over the range.",
             [f'sum(sum_over_time(partition:gpus_used:sum{{{P}}}[$__range])) / 60'], "none", width=6,
             thresholds=steps((None, BLUE)), color_mode="value"),
        stat("Used share of allocated", "Used GPU-hours as a share of allocated GPU-hours over the range.",
             [f'sum(sum_over_time(partition:gpus_used:sum{{{P}}}[$__range])) / '
              f'sum(sum_over_time(partition:gpus_allocated:sum{{{P}}}[$__range]))'], "percentunit", width=6,
             thresholds=steps((None, ORANGE), (0.5, GREEN))),
        stat("Idle allocated GPU-hours",
             "GPU-hours allocated GPUs spent below the idle knob (gpufleet:config:gpu_idle_utilization_ratio) "
             "over the range, all partitions.",
             [f'sum(sum_over_time(cluster:gpus_allocated_idle:count{{{CLUSTER}}}[$__range])) / 60'], "none",
             width=6,
             thresholds=steps((None, GREEN), (1, ORANGE))),

        Row("By account, user and partition"),
        table("By account", "Allocated and used GPU-hours per Slurm account over the range.",
              [gpu_hours("account:gpus_allocated:sum", "account"), gpu_hours("account:gpus_used:sum", "account")],
              "none", width=8, rename={"Value #A": "allocated GPU-h", "Value #B": "used GPU-h"},
              sort_by="allocated GPU-h"),
        table("By user", "Allocated and used GPU-hours per user over the range.",
              [gpu_hours("user:gpus_allocated:sum", "user"), gpu_hours("user:gpus_used:sum", "user")],
              "none", width=8, rename={"Value #A": "allocated GPU-h", "Value #B": "used GPU-h"},
              sort_by="allocated GPU-h"),
        table("By partition", "Allocated, used and idle GPU-hours per partition over the range.",
              [gpu_hours("partition:gpus_allocated:sum", "partition", P),
               gpu_hours("partition:gpus_used:sum", "partition", P),
               gpu_hours("partition:gpus_allocated_idle:count", "partition", P)],
              "none", width=8, rename={"Value #A": "allocated GPU-h", "Value #B": "used GPU-h",
                                       "Value #C": "idle GPU-h"}),
        timeseries("Allocated vs used GPUs", "GPUs allocated to running jobs and GPUs' worth of utilization, "
                   "selected partitions.",
                   [Query(f'sum(partition:gpus_allocated:sum{{{P}}})', "allocated"),
                    Query(f'sum(partition:gpus_used:sum{{{P}}})', "used"),
                    Query(f'sum(partition:gpus_allocated_idle:count{{{P}}})', "allocated and idle")],
                   "none", min_=0, width=24),

        Row("Idle jobs"),
        table("Top idle jobs now",
              "Running jobs with the most allocated GPUs below the idle knob now, with user, account and "
              "partition; the job id links to the Job dashboard. Runbook: JobGpusAllocatedIdle.",
              [f'topk(10, count by (cluster, job_id) (node_gpu_job:gpu_utilization_ratio:max{{{CLUSTER}}} < {IDLE}) '
               f'* on (cluster, job_id) group_left (user, account, partition) '
               f'max by (cluster, job_id, user, account, partition) (slurm_job_info{{{P}}}))'],
              "none", width=24, links={"job_id": job_link()}, rename={"Value": "idle GPUs"}, sort_by="idle GPUs"),
    ]
    return dashboard(
        uid=UID_USAGE, title="gpufleet / Usage & cost", tags=["usage"],
        description="Allocated vs used GPU-hours by account, user and partition; idle allocated GPUs.",
        variables=[datasource_var(), cluster_var(),
                   query_var("partition", "Partition",
                             'label_values(slurm_partition_info{cluster=~"$cluster"}, partition)')],
        items=items, time_from="now-7d", links=[(UID_FLEET, "Fleet overview"), (UID_JOB, "Job")],
    )
