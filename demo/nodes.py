"""Simulated GPU nodes for the demo: what one node agent reads, and the faults to inject.

Each node gets a directory of its own under the demo's work directory with:

- ``gpu-state.yaml``: the GPU simulator's fault file (docs/simulator.md), written
  atomically (temp file + rename), as an operator or the scenario would;
- ``sys/class/infiniband/mlx5_{0,1}``: a sysfs tree laid out as the kernel does
  (``drivers/infiniband/core/sysfs.c``), two NDR ports, ACTIVE/LinkUp; a link flap
  rewrites ``state``/``phys_state`` and bumps the PMA ``link_downed`` counter, which
  is what a real HCA shows;
- ``proc/1/mountinfo``: the node's mounts view, one local scratch filesystem (a real
  directory, so ``statfs`` answers);
- ``jobs/`` and ``progress/`` come from LocalSlurm's ``node_dir`` when Slurm runs
  (the prolog writes there), else from this directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

ACTIVE, DOWN = "4: ACTIVE", "1: DOWN"
LINK_UP, POLLING = "5: LinkUp", "2: Polling"
HCAS = ("mlx5_0", "mlx5_1")

_PMA_START = {
    "port_xmit_data": 0, "port_rcv_data": 0, "port_xmit_packets": 0, "port_rcv_packets": 0,
    "unicast_xmit_packets": 0, "unicast_rcv_packets": 0, "multicast_xmit_packets": 0,
    "multicast_rcv_packets": 0, "symbol_error": 0, "link_error_recovery": 0, "link_downed": 0,
    "port_rcv_errors": 0, "port_rcv_remote_physical_errors": 0, "port_xmit_discards": 0,
    "local_link_integrity_errors": 0, "excessive_buffer_overrun_errors": 0, "port_xmit_wait": 0,
}


def _write(path: Path, text: str) -> None:
    """Atomic replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SimNode:
    """One simulated node: its directories, its agent's flags, and fault injection."""

    def __init__(self, name: str, index: int, root: Path, *, gpus: int = 8,
                 jobs_dir: Path | None = None, progress_dir: Path | None = None):
        self.name = name
        self.index = index
        self.gpus = gpus
        self.root = Path(root)
        self.state_file = self.root / "gpu-state.yaml"
        self.sysfs = self.root / "sys"
        self.procfs = self.root / "proc"
        self.scratch = self.root / "scratch"
        self.jobs_dir = Path(jobs_dir) if jobs_dir else self.root / "jobs"
        self.progress_dir = Path(progress_dir) if progress_dir else self.root / "progress"
        self.state: dict[str, Any] = {"gpus": {}}

    # -- set-up ---------------------------------------------------------------------------
    def prepare(self) -> SimNode:
        """Create (or reset) every file the agent reads. Idempotent."""
        for d in (self.root, self.scratch, self.jobs_dir, self.progress_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.state = {"gpus": {}}
        self._write_state()
        for dev_i, dev in enumerate(HCAS):
            base = self.sysfs / "class" / "infiniband" / dev
            _write(base / "fw_ver", "28.39.1002\n")
            _write(base / "board_id", "MT_0000000838\n")
            _write(base / "hca_type", "MT4129\n")
            _write(base / "node_guid", f"b83f:d203:00{self.index:02x}:{dev_i:04x}\n")
            port = base / "ports" / "1"
            _write(port / "state", ACTIVE + "\n")
            _write(port / "phys_state", LINK_UP + "\n")
            _write(port / "rate", "400 Gb/sec (4X NDR)\n")
            _write(port / "link_layer", "InfiniBand\n")
            for counter, start in _PMA_START.items():
                _write(port / "counters" / counter, f"{start}\n")
        mount = (f"22 1 259:2 / {self.scratch} rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n")
        _write(self.procfs / "1" / "mountinfo", mount)
        _write(self.procfs / "self" / "mountinfo", mount)
        _write(self.procfs / "diskstats", "")
        return self

    def agent_argv(self, python: str, port: int, *, interval: str = "1s") -> list[str]:
        """The node agent's command line: simulated GPUs, this node's sysfs/procfs."""
        return [python, "-m", "exporters.agent", f"--web.listen-address=127.0.0.1:{port}",
                "--gpu.backend=sim", f"--sim.gpus={self.gpus}", f"--sim.seed={self.index}",
                f"--sim.state-file={self.state_file}", f"--gpu.expected-count={self.gpus}",
                f"--collector.interval={interval}", f"--path.sysfs={self.sysfs}", f"--path.procfs={self.procfs}",
                f"--collector.storage.mountpoint-include=^{self.scratch}$",
                f"--collector.jobs.mapping-dir={self.jobs_dir}", "--no-collector.jobs.read-environ",
                f"--collector.progress.dir={self.progress_dir}", "--no-collector.progress.slurm-check"]

    # -- GPU faults -----------------------------------------------------------------------
    def _write_state(self) -> None:
        _write(self.state_file, yaml.safe_dump(self.state, sort_keys=True))

    def gpu(self, index: int, **settings: Any) -> None:
        """Merge ``settings`` into GPU ``index``'s simulator state (docs/simulator.md)."""
        self.state.setdefault("gpus", {}).setdefault(str(index), {}).update(settings)
        self._write_state()

    def xid(self, gpu: int, code: int, lost: bool = False) -> None:
        """Raise one more Xid ``code`` on ``gpu`` (79 with ``lost``: fallen off the bus)."""
        entry = self.state.setdefault("gpus", {}).setdefault(str(gpu), {})
        counts = entry.setdefault("xid", {})
        counts[str(code)] = int(counts.get(str(code), 0)) + 1
        if lost:
            entry["lost"] = True
        self._write_state()

    def clear_gpus(self) -> None:
        """Every GPU healthy again (a reset or reboot); Xid counts stay, as NVML's events did happen."""
        for entry in self.state.get("gpus", {}).values():
            for key in ("lost", "reset_required", "remap_failed", "remap_pending"):
                entry.pop(key, None)
        self._write_state()

    # -- fabric faults --------------------------------------------------------------------
    def _port(self, hca: str) -> Path:
        return self.sysfs / "class" / "infiniband" / hca / "ports" / "1"

    def link_down(self, hca: str = "mlx5_0") -> None:
        """The link drops: state DOWN, physical state Polling, PMA link_downed + 1."""
        port = self._port(hca)
        downed = port / "counters" / "link_downed"
        _write(downed, f"{min(255, int(downed.read_text().strip() or 0) + 1)}\n")  # 8-bit, saturating
        _write(port / "phys_state", POLLING + "\n")
        _write(port / "state", DOWN + "\n")

    def link_up(self, hca: str = "mlx5_0") -> None:
        port = self._port(hca)
        _write(port / "phys_state", LINK_UP + "\n")
        _write(port / "state", ACTIVE + "\n")
