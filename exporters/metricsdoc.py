"""Generate docs/metrics.md from the collectors' own metric descriptors.

    python -m exporters.metricsdoc            # print the catalogue
    python -m exporters.metricsdoc --write    # rewrite docs/metrics.md
    python -m exporters.metricsdoc --check    # exit 1 if docs/metrics.md is stale

The same ``MetricSpec`` tables drive emission, so the catalogue cannot drift
from what the agent publishes (tests/test_metricsdoc.py runs ``--check``).
Later issues add their collectors to ``SECTIONS``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporters import gpu, gpu_dcgm, jobs, progress_collector, rdma, slurm, storage
from exporters.collector import SELF_SPECS, MetricSpec

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "metrics.md"



def _own(specs: tuple[MetricSpec, ...]) -> tuple[MetricSpec, ...]:
    """A collector's domain series (its gpufleet_exporter_* ones go to self-monitoring)."""
    return tuple(s for s in specs if not s.name.startswith("gpufleet_"))


def _self(specs: tuple[MetricSpec, ...]) -> tuple[MetricSpec, ...]:
    return tuple(s for s in specs if s.name.startswith("gpufleet_"))


def _registry_specs(registry) -> tuple[MetricSpec, ...]:
    """MetricSpecs of a prometheus_client registry's families (for services whose
    metrics live in a registry rather than a spec table)."""
    specs = []
    for fam in registry.collect():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = tuple(dict.fromkeys(k for s in fam.samples for k in s.labels if k != "le"))
        specs.append(MetricSpec(name, fam.type, fam.documentation, labels))
    return tuple(specs)


def _remediation_specs() -> tuple[MetricSpec, ...]:
    import tempfile

    from remediation.engine import Engine
    from remediation.memory import MemoryActuator
    from remediation.policy import load_policy
    from remediation.service import create_app
    from remediation.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"{tmp}/doc.db")
        try:
            engine = Engine(load_policy(str(REPO / "alerts" / "remediation-policy.yml")), store, MemoryActuator())
            create_app(engine, webhook_token="doc-webhook", admin_token="doc-admin")  # adds the service's own
            return tuple(s for s in _registry_specs(engine.registry) if s.name.startswith("gpufleet_"))
        finally:
            store.close()


SECTIONS: list[tuple[str, str, tuple[MetricSpec, ...]]] = [
    (
        "GPU collector (`--collector.gpu`, NVML)",
        "Per-GPU series carry `gpu` (NVML index) and `uuid`; join descriptive data from `gpu_info` with "
        "`* on(uuid) group_left(name, pci_bus_id) gpu_info`. A call the GPU does not support leaves its series "
        "out (never a fake zero); a GPU that is lost or needs a reset keeps only `gpu_up 0` and `gpu_info`. "
        "The Xid class comes from the catalogue in [xid-catalogue.md](xid-catalogue.md).",
        _own(gpu.NATIVE_SPECS),
    ),
    (
        "dcgm-exporter compatible series (`--gpu.dcgm-compat`)",
        "dcgm-exporter's names, units (MiB, MHz, mJ, percent for `DCGM_FI_DEV_*_UTIL`, ratios for "
        "`DCGM_FI_PROF_*`) and labels, so its published dashboard and alert rules work unchanged. Built from "
        "the same sample as the native series.",
        gpu_dcgm.SPECS,
    ),
    (
        "RDMA collector (`--collector.rdma`, sysfs `class/infiniband`)",
        "Per HCA (`device`) and port (`device`, `port`). Data counters are converted from the kernel's 4-byte "
        "words to bytes; the 64-bit `counters_ext/` values are used where the kernel has them. `hw_counters/` "
        "files without a named series appear in `rdma_port_hw_events_total{counter}`. A value of "
        "`N/A (no PMA)` leaves the series out. Join RoCE ports with network metrics on `rdma_port_info`'s "
        "`netdev`.",
        _own(rdma.SPECS),
    ),
    (
        "Storage collector (`--collector.storage`)",
        "Filesystems from mountinfo (`device`, `mountpoint`, `fstype`), measured with statvfs in a bounded "
        "worker pool with a per-mount timeout: a hung mount reports `filesystem_stuck 1` and is not probed "
        "again until its earlier probe returns. NFS client statistics from mountstats (`export`, `mountpoint`, "
        "`nfs_version`, `protocol`; v3 and v4 on one path stay separate), Lustre llite stats (`filesystem`), "
        "block devices from diskstats (`device`) and NVMe controllers from sysfs.",
        _own(storage.SPECS),
    ),
    (
        "Jobs collector (`--collector.jobs`): which job holds each GPU",
        "From the compute processes NVML reports, their cgroup (Slurm v1/v2, Kubernetes pods) or "
        "`SLURM_JOB_ID`, and the per-GPU mapping files the Slurm prolog writes (scripts/slurm/), so allocated "
        "GPUs running nothing are attributed too. A join series, not a label on every GPU series: "
        "`gpu_utilization_ratio * on(uuid) group_left(job_id) gpu_job_info`. Pods appear as `job_id=\"pod:<uid>\"`.",
        _own(jobs.SPECS),
    ),
    (
        "Progress collector (`--collector.progress`): training progress",
        "Written by training scripts through `exporters.progress.ProgressReporter` into a spool directory per "
        "job and rank; files of ended or stale jobs are dropped.",
        _own(progress_collector.SPECS),
    ),
    (
        "Slurm cluster exporter (`gpufleet-slurm-exporter`, one per cluster)",
        "From `sinfo --json`/`squeue --json` (formatted output where `--json` is missing) or slurmrestd. Node "
        "states are normalised (idle, allocated, mixed, drained, draining, down, fail, maint, reserved, "
        "unknown) with `not_responding` separate. Only running jobs get per-job series (`slurm_job_info`, "
        "`slurm_job_node_info`), so cardinality follows the running job count, never history.",
        slurm.SNAPSHOT_SPECS,
    ),
    (
        "Slurm exporter self-monitoring",
        "The exporter serves the last good snapshot when a poll fails; these say how old it is and why.",
        slurm.SELF_SPECS,
    ),
    (
        "Remediation service (`gpufleet-remediation`)",
        "Read from its SQLite store at scrape time, so counters and the breaker state survive restarts "
        "(the two duration histograms, the webhook request counter and the Alertmanager reconcile series "
        "restart at zero); the standard "
        "`process_*` and `python_*` series come with them. See [remediation.md](remediation.md).",
        _remediation_specs(),
    ),
    (
        "Exporter self-monitoring",
        "Every collector reports success, duration and last success; a failing collector never breaks the "
        "scrape (DESIGN.md, 'Failure is data').",
        SELF_SPECS
        + _self(gpu.NATIVE_SPECS)
        + _self(rdma.SPECS)
        + _self(storage.SPECS)
        + _self(jobs.SPECS)
        + _self(progress_collector.SPECS),
    ),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [
        "# Metric catalogue",
        "",
        "<!-- Generated by `python -m exporters.metricsdoc --write` from the collectors' MetricSpec tables. "
        "Do not edit by hand. -->",
        "",
        "Names follow Prometheus practice: base units in the name, `_total` for counters, `_ratio` for 0-1. "
        "Series a GPU cannot provide are absent, not zero.",
        "",
    ]
    for title, intro, specs in SECTIONS:
        lines += [f"## {title}", "", intro, "", "| metric | type | labels | description |", "|---|---|---|---|"]
        for s in specs:
            labels = ", ".join(f"`{label}`" for label in s.labels) or "-"
            desc = s.help + (f" *Only with {s.condition}.*" if s.condition and s.condition.startswith("--") else "")
            if s.condition and not s.condition.startswith("--"):
                desc += f" *{s.condition}.*"
            lines.append(f"| `{s.name}` | {s.type} | {labels} | {_cell(desc)} |")
        lines.append("")
    return "\n".join(lines)


def all_metric_names() -> set[str]:
    """Every series name gpufleet's programs emit (for rule and dashboard linting)."""
    names = set()
    for _, _, specs in SECTIONS:
        for s in specs:
            names.add(s.name)
            if s.type == "histogram":
                names |= {s.name + "_bucket", s.name + "_sum", s.name + "_count"}
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help=f"rewrite {DOC}")
    g.add_argument("--check", action="store_true", help=f"fail if {DOC} differs from the generated text")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        DOC.write_text(text)
        return 0
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is stale: run `python -m exporters.metricsdoc --write`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
