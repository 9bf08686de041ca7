"""Node: one node's GPUs, fabric ports, filesystems, jobs and remediation history.

Opened from the Fleet overview's tables (``var-node``). The top row says whether the
node is usable and why not; the rest is per GPU (filtered by ``$gpu``), per port and
per mount.
"""

from __future__ import annotations

from grafanalib.core import Dashboard

from dashboards.fleet import ALERT_LABELS, FIRING, xid_in_range
from dashboards.helpers import (
    BLUE,
    CLUSTER,
    GREEN,
    ORANGE,
    RED,
    UID_FABRIC,
    UID_FLEET,
    UID_JOB,
    UID_NODE,
    UID_REMEDIATION,
    UID_STORAGE,
    Query,
    Row,
    cluster_var,
    dashboard,
    datasource_var,
    job_link,
    query_var,
    runbook_link,
    stat,
    state_timeline,
    steps,
    table,
    timeseries,
    value_map,
)

N = f'{CLUSTER}, node="$node"'
NG = f'{N}, gpu=~"$gpu"'
PER_GPU = "GPU {{gpu}}"


def build() -> Dashboard:
    items = [
        Row("Is this node usable?"),
        stat("GPUs expected / reporting / healthy",
             "This node's expected GPUs (--gpu.expected-count or Slurm GRES), those answering NVML, and those "
             "healthy (no pending/failed remap, no pending retirement, no uncorrectable ECC error).",
             [Query(f'sum(node:gpus_expected:sum{{{N}}})', "expected"),
              Query(f'sum(node:gpus_reporting:count{{{N}}})', "reporting"),
              Query(f'sum(node:gpus_healthy:count{{{N}}})', "healthy")],
             "none", width=6, thresholds=steps((None, BLUE)), color_mode="value"),
        stat("Slurm state",
             "The node's normalised Slurm state (and NOT_RESPONDING, separately, in the alerts).",
             [Query(f'max by (state) (slurm_node_state{{{N}}}) == 1', "{{state}}")],
             "none", width=4, text_mode="name",
             thresholds=steps((None, GREEN))),
        stat("Alerts firing on this node", "Alerts firing now whose node label is this node.",
             [f'count(ALERTS{{{FIRING}, node="$node"}}) or vector(0)'], "none", width=3,
             thresholds=steps((None, GREEN), (1, RED))),
        stat("Jobs running here", "Running Slurm jobs holding this node.",
             [f'count(slurm_job_node_info{{{N}}}) or vector(0)'], "none", width=3,
             thresholds=steps((None, BLUE)), color_mode="value"),
        stat("GPUs allocated", "GPUs of this node Slurm has allocated to jobs, of its GRES count.",
             [Query(f'sum(slurm_node_gpus_allocated{{{N}}})', "allocated"),
              Query(f'sum(slurm_node_gpus{{{N}}})', "of")],
             "none", width=4, thresholds=steps((None, BLUE)), color_mode="value"),
        stat("GPU power", "Power drawn by this node's selected GPUs now.",
             [f'sum(gpu_power_usage_watts{{{NG}}})'], "watt", width=4,
             thresholds=steps((None, BLUE)), color_mode="value"),
        table("Alerts on this node",
              "Alerts firing now on this node; the alert name links to its runbook. Value: seconds firing.",
              [f'(time() - max by ({ALERT_LABELS}) (ALERTS_FOR_STATE{{{N}}})) and on ({ALERT_LABELS}) '
               f'max by ({ALERT_LABELS}) (ALERTS{{{FIRING}, node="$node"}})'],
              "s", width=24, h=7, links={"alertname": runbook_link(), "job_id": job_link()},
              rename={"Value": "firing for"}),

        Row("GPUs"),
        state_timeline("GPU answers NVML",
                       "gpu_up per GPU over time: red while NVML reports it lost or needing a reset.",
                       [Query(f'max by (gpu) (gpu_up{{{NG}}})', PER_GPU)], "none", width=24, h=5,
                       mappings=value_map({"1": ("up", GREEN), "0": ("LOST", RED)}),
                       thresholds=steps((None, RED), (1, GREEN))),
        timeseries("GPU utilization", "Fraction of time a kernel was running, per GPU.",
                   [Query(f'max by (gpu) (gpu_utilization_ratio{{{NG}}})', PER_GPU)], "percentunit",
                   min_=0, max_=1),
        timeseries("SM and tensor activity (GPM)",
                   "SM active and tensor pipe active per GPU (Hopper and newer): how much of the GPU the work uses.",
                   [Query(f'max by (gpu) (gpu_sm_active_ratio{{{NG}}})', "SM " + PER_GPU),
                    Query(f'max by (gpu) (gpu_tensor_active_ratio{{{NG}}})', "tensor " + PER_GPU)],
                   "percentunit", min_=0, max_=1),
        timeseries("GPU memory used", "Framebuffer memory in use per GPU, and installed.",
                   [Query(f'max by (gpu) (gpu_memory_used_bytes{{{NG}}})', PER_GPU),
                    Query(f'max(gpu_memory_total_bytes{{{NG}}})', "installed")], "bytes", min_=0),
        timeseries("Temperatures", "GPU die and HBM temperature per GPU, and the lowest slowdown threshold.",
                   [Query(f'max by (gpu) (gpu_temperature_celsius{{{NG}}})', "die " + PER_GPU),
                    Query(f'max by (gpu) (gpu_memory_temperature_celsius{{{NG}}})', "HBM " + PER_GPU),
                    Query(f'min(gpu_temperature_threshold_celsius{{{NG}, threshold="slowdown"}})', "slowdown")],
                   "celsius"),
        timeseries("Power", "Board power per GPU and the enforced limit.",
                   [Query(f'max by (gpu) (gpu_power_usage_watts{{{NG}}})', PER_GPU),
                    Query(f'max(gpu_power_limit_watts{{{NG}}})', "limit")], "watt", min_=0),
        timeseries("SM clock", "Current SM clock per GPU and the maximum; a clock below maximum under load "
                   "is explained by the clock-event reasons.",
                   [Query(f'max by (gpu) (gpu_sm_clock_hertz{{{NG}}})', PER_GPU),
                    Query(f'max(gpu_sm_clock_max_hertz{{{NG}}})', "max")], "hertz"),
        timeseries("Clock-event reasons", "How many of the selected GPUs each reason holds down now "
                   "(hw_slowdown, hw_thermal_slowdown and hw_power_brake are hardware trouble).",
                   [Query(f'sum by (reason) (gpu_clock_event_active{{{NG}}})', "{{reason}}")], "none",
                   stack=True, min_=0),
        table("ECC and row remapping",
              "Per GPU: volatile uncorrected and corrected ECC errors, remapped rows, remap pending (needs a "
              "reset) or failed (needs a replacement).",
              [f'sum by (gpu) (gpu_ecc_errors_total{{{NG}, error_type="uncorrected", counter="volatile"}})',
               f'sum by (gpu) (gpu_ecc_errors_total{{{NG}, error_type="corrected", counter="volatile"}})',
               f'sum by (gpu) (gpu_remapped_rows_total{{{NG}}})',
               f'max by (gpu) (gpu_row_remap_pending{{{NG}}})',
               f'max by (gpu) (gpu_row_remap_failed{{{NG}}})'],
              "none", width=12, thresholds=steps((None, GREEN), (1, RED)),
              rename={"Value #A": "uncorrected", "Value #B": "corrected", "Value #C": "remapped rows",
                      "Value #D": "remap pending", "Value #E": "remap failed"}),
        table("Xid history",
              "Xid errors per GPU, code and class in the selected range (docs/xid-catalogue.md).",
              [xid_in_range("gpu, xid, class", NG)], "none", width=12, rename={"Value": "events"}),
        timeseries("NVLink errors", "NVLink data-link errors per second per GPU and counter "
                   "(crc_flit, crc_data, replay, recovery), all links.",
                   [Query(f'sum by (gpu, counter) (rate(gpu_nvlink_errors_total{{{NG}}}[$__rate_interval]))',
                          "GPU {{gpu}} {{counter}}")], "cps", min_=0),
        timeseries("NVLink links down and PCIe replays",
                   "Inactive NVLink links per GPU, and PCIe replays (link-level retransmissions) per second.",
                   [Query(f'count by (gpu) (gpu_nvlink_up{{{NG}}} == 0) or on (gpu) '
                          f'(0 * max by (gpu) (gpu_up{{{NG}}}))', "links down " + PER_GPU),
                    Query(f'sum by (gpu) (rate(gpu_pcie_replay_errors_total{{{NG}}}[$__rate_interval]))',
                          "PCIe replays/s " + PER_GPU)], "short", min_=0),

        Row("InfiniBand / RoCE ports"),
        table("Ports", "Every port: logical and physical state and the negotiated rate.",
              [f'max by (device, port, state, physical_state) (rdma_port_state_info{{{N}}})',
               f'max by (device, port) (rdma_port_rate_bytes_per_second{{{N}}})'],
              "none", width=12, hide=("Time", "Value #A"), units={"Value #B": "Bps"},
              rename={"Value #B": "rate"}),
        timeseries("Port throughput", "Bytes per second sent (positive) and received per port.",
                   [Query(f'sum by (device, port) (rate(rdma_port_transmit_bytes_total{{{N}}}[$__rate_interval]))',
                          "{{device}}/{{port}} tx"),
                    Query(f'sum by (device, port) (rate(rdma_port_receive_bytes_total{{{N}}}[$__rate_interval]))',
                          "{{device}}/{{port}} rx")], "Bps", min_=0),
        timeseries("Port errors", "All PMA error counters of each port, per second (recording rule "
                   "node:rdma_port_errors:rate5m), and link state changes (flaps) per second.",
                   [Query(f'sum by (device, port) (node:rdma_port_errors:rate5m{{{N}}})',
                          "{{device}}/{{port}} errors"),
                    Query(f'sum by (device, port) (rate(rdma_port_state_changes_total{{{N}}}[$__rate_interval]))',
                          "{{device}}/{{port}} flaps")], "cps", min_=0, width=24),

        Row("Filesystems and disks"),
        table("Filesystems", "Each mount: share of space used, space available, stuck (statfs hangs) and "
              "device error (statfs fails).",
              [f'1 - max by (mountpoint, fstype) (node_mountpoint:filesystem_avail:ratio{{{N}}})',
               f'max by (mountpoint, fstype) (filesystem_avail_bytes{{{N}}})',
               f'max by (mountpoint, fstype) (filesystem_stuck{{{N}}})',
               f'max by (mountpoint, fstype) (filesystem_device_error{{{N}}})'],
              "none", width=12, units={"Value #A": "percentunit", "Value #B": "bytes"},
              rename={"Value #A": "used", "Value #B": "available", "Value #C": "stuck", "Value #D": "error"}),
        timeseries("Disk throughput", "Bytes per second read and written per block device.",
                   [Query(f'sum by (device) (rate(storage_disk_read_bytes_total{{{N}}}[$__rate_interval]))',
                          "{{device}} read"),
                    Query(f'sum by (device) (rate(storage_disk_written_bytes_total{{{N}}}[$__rate_interval]))',
                          "{{device}} write")], "Bps", min_=0),

        Row("Jobs and remediation"),
        table("Jobs on this node now",
              "Running Slurm jobs holding this node (link to the Job dashboard), and the GPUs of this node "
              "each one holds (from the prolog's mapping files or the GPU's processes).",
              [f'max by (job_id, user, account, partition, name) (slurm_job_info{{{CLUSTER}}} '
               f'and on (cluster, job_id) slurm_job_node_info{{{N}}})',
               f'count by (job_id) (gpu_job_info{{{N}}})'],
              "none", width=12, hide=("Time", "Value #A"), links={"job_id": job_link()},
              rename={"Value #B": "GPUs here"}),
        table("Drain reason", "Why Slurm holds the node out of service, who set it and when. A reason "
              "starting with 'gpufleet:' is the remediation service's; `gpufleet remediation history --node` "
              "has its audit trail.",
              [f'max by (reason, reason_user, reason_time) (slurm_node_drain_info{{{N}}})'],
              "none", width=12, hide=("Time", "Value")),
        state_timeline("Slurm state over time", "The node's Slurm state over the range: when it was drained "
                       "and returned.",
                       [Query(f'max by (state) (slurm_node_state{{{N}}}) == 1', "{{state}}")], "none",
                       width=12, thresholds=steps((None, ORANGE))),
        timeseries("Remediable alerts on this node",
                   "Alerts carrying a remediation label (drain, reboot) that fired on this node over the range: "
                   "what the remediation service was asked to act on.",
                   [Query(f'count by (alertname, remediation) (ALERTS{{{FIRING}, node="$node", '
                          f'remediation=~".+"}}) or vector(0)', "{{alertname}} {{remediation}}")],
                   "none", width=12, min_=0),
    ]
    return dashboard(
        uid=UID_NODE, title="gpufleet / Node", tags=["node"],
        description="One node: GPUs, fabric ports, filesystems, jobs and remediation history.",
        variables=[datasource_var(), cluster_var(),
                   query_var("node", "Node", 'label_values(up{job="gpufleet-exporter", cluster=~"$cluster"}, node)',
                             multi=False, include_all=False),
                   query_var("gpu", "GPU", 'label_values(gpu_info{cluster=~"$cluster", node="$node"}, gpu)')],
        items=items,
        links=[(UID_FLEET, "Fleet overview"), (UID_JOB, "Job"), (UID_FABRIC, "Fabric"), (UID_STORAGE, "Storage"),
               (UID_REMEDIATION, "Remediation")],
    )
