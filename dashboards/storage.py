"""Storage: filesystem space and forecast, stuck mounts, NFS client health, Lustre and disks."""

from __future__ import annotations

from grafanalib.core import Dashboard

from dashboards.helpers import (
    CLUSTER,
    GREEN,
    NODE,
    ORANGE,
    RED,
    UID_FLEET,
    UID_NODE,
    UID_STORAGE,
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
MOUNT = "{{node}} {{mountpoint}}"


def nfs_rate(metric: str) -> str:
    return f'sum by (cluster, node, mountpoint) (rate({metric}{{{F}}}[$__rate_interval]))'


def build() -> Dashboard:
    items = [
        Row("Storage now"),
        stat("Stuck mounts", "Mounts whose statfs hangs now. Runbook: FilesystemStuck.",
             [f'count(filesystem_stuck{{{F}}} == 1) or vector(0)'], "none", width=6,
             thresholds=steps((None, GREEN), (1, RED))),
        stat("Mounts failing statfs", "Mounts whose statfs fails with an error (ESTALE, EIO).",
             [f'count(filesystem_device_error{{{F}}} == 1) or vector(0)'], "none", width=6,
             thresholds=steps((None, GREEN), (1, ORANGE))),
        stat("Fullest filesystem", "The highest share of space used of any selected mount.",
             [f'1 - min(node_mountpoint:filesystem_avail:ratio{{{F}}})'], "percentunit", width=6,
             thresholds=steps((None, GREEN), (0.9, ORANGE), (0.95, RED))),
        stat("NFS retransmissions", "RPC retransmissions per second, all NFS mounts of the selected nodes.",
             [f'sum(rate(storage_nfs_retransmissions_total{{{F}}}[5m])) or vector(0)'], "cps", width=6,
             thresholds=steps((None, GREEN), (0.01, ORANGE))),

        Row("Space"),
        table("Filesystem usage",
              "Share used and space available per mount (read-only and empty pseudo filesystems left out). "
              "Runbook: FilesystemAlmostFull.",
              [f'1 - max by (cluster, node, mountpoint, fstype) (node_mountpoint:filesystem_avail:ratio{{{F}}})',
               f'max by (cluster, node, mountpoint, fstype) (filesystem_avail_bytes{{{F}}})',
               f'max by (cluster, node, mountpoint, fstype) (filesystem_size_bytes{{{F}}})'],
              "percentunit", links={"node": node_link()}, units={"Value #B": "bytes", "Value #C": "bytes"},
              rename={"Value #A": "used", "Value #B": "available", "Value #C": "size"}, sort_by="used"),
        timeseries("Available space forecast",
                   "Space available now and predicted at the end of the fill horizon "
                   "(gpufleet:config:filesystem_fill_horizon_seconds) from the last 6 hours' trend; below zero "
                   "means it fills up. Runbook: FilesystemFillingUp.",
                   [Query(f'predict_linear(filesystem_avail_bytes{{{F}}}[6h], '
                          f'scalar(gpufleet:config:filesystem_fill_horizon_seconds))', MOUNT + " predicted")],
                   "bytes"),
        table("Stuck or failing mounts",
              "Mounts whose statfs hangs (stuck) or fails (error): jobs touching them hang or fail.",
              [f'max by (cluster, node, mountpoint, fstype, device) (filesystem_stuck{{{F}}} == 1)',
               f'max by (cluster, node, mountpoint, fstype, device) (filesystem_device_error{{{F}}} == 1)'],
              "none", width=24, links={"node": node_link()},
              rename={"Value #A": "stuck", "Value #B": "error"}),

        Row("NFS"),
        timeseries("NFS round-trip time per operation",
                   "Average RPC round trip (transmission to reply) per mount over all operations.",
                   [Query(f'{nfs_rate("storage_nfs_operation_rtt_seconds_total")} / '
                          f'({nfs_rate("storage_nfs_operations_total")} > 0)', MOUNT)], "s", min_=0),
        timeseries("NFS retransmissions and major timeouts",
                   "RPC retransmissions and major timeouts (server not responding) per second per mount. "
                   "Runbooks: NfsRetransmissionsRising, NfsMajorTimeouts.",
                   [Query(nfs_rate("storage_nfs_retransmissions_total"), MOUNT + " retrans"),
                    Query(nfs_rate("storage_nfs_operation_major_timeouts_total"), MOUNT + " major timeouts")],
                   "cps", min_=0),
        timeseries("NFS throughput", "Bytes per second applications read and wrote per mount.",
                   [Query(nfs_rate("storage_nfs_read_bytes_total"), MOUNT + " read"),
                    Query(nfs_rate("storage_nfs_write_bytes_total"), MOUNT + " write")], "Bps", min_=0,
                   width=24),

        Row("Lustre and disks"),
        timeseries("Lustre client throughput", "Bytes per second read and written through each Lustre client.",
                   [Query(f'sum by (cluster, node, filesystem) (rate(storage_lustre_read_bytes_total{{{F}}}[$__rate_interval]))',
                          "{{node}} {{filesystem}} read"),
                    Query(f'sum by (cluster, node, filesystem) (rate(storage_lustre_write_bytes_total{{{F}}}[$__rate_interval]))',
                          "{{node}} {{filesystem}} write")], "Bps", min_=0),
        timeseries("Disk throughput", "Bytes per second read and written per block device; the 20 busiest.",
                   [Query(f'topk(20, sum by (cluster, node, device) (rate(storage_disk_read_bytes_total{{{F}}}'
                          f'[$__rate_interval])))', "{{node}} {{device}} read"),
                    Query(f'topk(20, sum by (cluster, node, device) (rate(storage_disk_written_bytes_total{{{F}}}'
                          f'[$__rate_interval])))', "{{node}} {{device}} write")], "Bps", min_=0),
    ]
    return dashboard(
        uid=UID_STORAGE, title="gpufleet / Storage", tags=["storage"],
        description="Filesystems, stuck mounts, NFS client health, Lustre and disks.",
        variables=[datasource_var(), cluster_var(),
                   query_var("node", "Node", 'label_values(filesystem_size_bytes{cluster=~"$cluster"}, node)')],
        items=items, links=[(UID_FLEET, "Fleet overview"), (UID_NODE, "Node")],
    )
