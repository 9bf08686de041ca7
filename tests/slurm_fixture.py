"""pytest fixtures for a real Slurm on loopback (exporters.localslurm.LocalSlurm).

tests/conftest.py imports them, so every test module can ask for the fixtures
``slurm_cluster`` and ``slurm`` and the whole run shares one cluster (the functions'
own names differ so that test arguments do not shadow imports).

``slurm_cluster`` (session) starts one four-node cluster (``gpu-node-[1-4]``, 8 GPUs
each, partitions ``gpu`` = all (default) and ``debug`` = nodes 1-2) for the whole run
and stops every process it started at the end. ``slurm`` (per test) hands out the
same cluster and puts it back afterwards: jobs cancelled, nodes resumed and idle.

Without the Slurm and munge programs, or without root, the tests are skipped with
the reason; under ``CI=true`` they fail instead (the CI image must have them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporters.localslurm import LocalSlurm, LocalSlurmError, missing_binaries

NODES = [f"gpu-node-{i}" for i in range(1, 5)]
# The shipped Slurm prolog/epilog run on the test cluster, as on a site's.
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "slurm"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI: run make setup as root)")
    pytest.skip(reason)


def slurm_available() -> None:
    """Skip (or fail under CI) unless a LocalSlurm can start here."""
    missing = missing_binaries()
    if missing:
        _unavailable(f"Slurm/munge programs missing: {', '.join(missing)} (scripts/install-debs.sh)")
    if os.geteuid() != 0:
        _unavailable("a local Slurm needs root (SlurmUser=root, mknod)")


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    slurm_available()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=4,
                         partitions={"gpu": NODES, "debug": NODES[:2]}, cluster_name="gpufleet-test",
                         prolog=SCRIPTS / "prolog.sh", epilog=SCRIPTS / "epilog.sh")
    try:
        cluster.start()
    except LocalSlurmError as exc:
        pytest.fail(f"LocalSlurm did not start: {exc}")
    yield cluster
    cluster.stop()


def reset(cluster: LocalSlurm, timeout: float = 15.0) -> None:
    """Cancel every job and resume every node, then wait until all nodes are idle again."""
    ids = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    if ids:
        cluster.run("scancel", *ids, check=False)
    for node, state in cluster.node_states().items():
        if "drain" in state or state.startswith(("down", "fail")):
            cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
    deadline = time.monotonic() + timeout
    while True:
        busy = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        states = cluster.node_states()
        if not busy and all(s == "idle" for s in states.values()):
            return
        if time.monotonic() > deadline:
            queue = cluster.run("squeue", "-h", "-t", "all", "-o", "%i %T %N").stdout
            node = cluster.run("sinfo", "-h", "-N", "-O", "NodeList:|,StateComplete:|,CPUsState:|,GresUsed:|").stdout
            log = (cluster.log_dir / "slurmctld.log").read_text().splitlines()[-25:]
            raise AssertionError(f"cluster did not settle: jobs {busy}, nodes {states}, queue:\n{queue}\n{node}\n"
                                 + "\n".join(log))
        time.sleep(0.1)


@pytest.fixture(name="slurm")
def slurm_fixture(slurm_cluster: LocalSlurm) -> Iterator[LocalSlurm]:
    reset(slurm_cluster)
    yield slurm_cluster
    reset(slurm_cluster)
