"""A real Slurm cluster on loopback, in a private directory: for tests and the demo.

``LocalSlurm`` starts ``munged``, ``slurmctld`` and one ``slurmd`` per node name from
Debian's packages, with a generated ``slurm.conf`` and ``gres.conf``, its own munge
key and free loopback ports. Nothing on the host is touched: not ``/etc/slurm``, not
``/etc/munge``, not ``/run/munge``; every client call gets ``SLURM_CONF`` pointing at
the private config, which also names the private munge socket
(``AuthInfo=socket=...``). Logs, slurmctld's saved state and the munge key live in
the base directory (kept for post-mortems when it is the caller's); configuration,
sockets, slurmd spool and job output in a short world-searchable run directory under
the system temp directory (removed by ``stop()``), because unix socket paths are
short, munged and jobs of other users need to reach them, and slurmrestd never runs
as root.

Several nodes on one host: each node name gets its own ``slurmd -N NAME`` listening
on its own port (``Port=`` on its node line, ``NodeAddr=127.0.0.1``), with ``%n`` in
the spool, pid and log paths. Debian's 22.05 build (not configured with
``--enable-multiple-slurmd``) runs, registers and schedules jobs on all of them;
that is what the integration tests exercise.

GPUs without GPUs: ``GresTypes=gpu``, ``Gres=gpu:h100:8`` on the node lines, and a
``gres.conf`` whose ``File=`` entries are character devices made with ``mknod``
under the base directory (slurmd rejects regular files). Jobs therefore get real
GPU allocations (``gres_used``, ``gres_detail``, ``CUDA_VISIBLE_DEVICES``).

slurmrestd: ``start_rest()`` runs it on a unix socket with ``rest_auth/local`` (Debian's
22.05 build ships no ``auth/jwt`` for slurmctld, so tokens cannot be checked here).

A quirk worth knowing: ask ``sinfo`` about all nodes. ``sinfo -n NODE`` takes
slurmctld's single-node path, which (22.05) does not refresh the allocation data
behind idle/mixed, and can say ``mixed`` long after the node's last job ended.

Root is required (``SlurmUser=root``, ``mknod``). Typical use::

    with LocalSlurm(tmp_dir, nodes=4) as slurm:
        job = slurm.submit(gres="gpu:2")
        slurm.wait_job_state(job, "RUNNING")
        slurm.drain("gpu-node-2", "NHC: xid 79")
        print(slurm.run("sinfo", "-N").stdout)

``stop()`` (also run from ``__exit__``, on a failed ``start()`` and at interpreter
exit) cancels the jobs, stops every daemon by process group and then kills any
process still carrying this instance's marker in its environment (``slurmstepd``
and job tasks are re-parented away from ``slurmd``, so process groups alone would
miss them).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["LocalSlurm", "LocalSlurmError", "REQUIRED_BINARIES", "missing_binaries"]

#: Programs a LocalSlurm needs (clients and daemons).
REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scontrol", "scancel")
_SEARCH_PATH = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
MARKER_ENV = "GPUFLEET_LOCALSLURM"


class LocalSlurmError(RuntimeError):
    """Starting or driving the local cluster failed; the message carries log tails."""


def _which(name: str, bin_dir: str | os.PathLike[str] | None = None) -> str | None:
    if bin_dir:
        cand = Path(bin_dir) / name
        return str(cand) if os.access(cand, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH_PATH:
        cand = Path(d) / name
        if os.access(cand, os.X_OK):
            return str(cand)
    return None


def missing_binaries(bin_dir: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Names of required programs not found (empty when LocalSlurm can run)."""
    return [n for n in (*REQUIRED_BINARIES, *extra) if _which(n, bin_dir) is None]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (all held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty)"


class LocalSlurm:
    """munged + slurmctld + one slurmd per node, on loopback, under ``base_dir``.

    Parameters mirror what the tests and demo vary: node count and naming, GPUs per
    node and their GRES type (``None`` for untyped ``gpu:8``), CPUs per node and
    partitions (``{"gpu": [...], "debug": [...]}``; the first is the default).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        nodes: int = 4,
        node_prefix: str = "gpu-node-",
        gpus_per_node: int = 8,
        gpu_type: str | None = "h100",
        cpus_per_node: int = 32,
        memory_mb: int = 64000,
        partitions: Mapping[str, Sequence[str]] | None = None,
        cluster_name: str = "gpufleet-local",
        bin_dir: str | None = None,
        start_timeout: float = 30.0,
        prolog: str | os.PathLike[str] | None = None,
        epilog: str | os.PathLike[str] | None = None,
    ):
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self._own_dir = base_dir is None
        # Without a base directory start() makes one (and stop() removes it).
        self.base = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir()) / "gpufleet-slurm-unstarted"
        self.node_names = [f"{node_prefix}{i}" for i in range(1, nodes + 1)]
        self.gpus_per_node = gpus_per_node
        # Site prolog/epilog (e.g. scripts/slurm/*.sh). Every node of a real cluster has its
        # own /run; here each node gets node_dir(name)/{jobs,progress} through a wrapper.
        self.prolog = Path(prolog).resolve() if prolog else None
        self.epilog = Path(epilog).resolve() if epilog else None
        self.gpu_type = gpu_type
        self.cpus_per_node = cpus_per_node
        self.memory_mb = memory_mb
        if partitions is None:
            partitions = {"gpu": self.node_names}
            if nodes > 1:
                partitions["debug"] = self.node_names[: nodes // 2]
        self.partitions = {name: list(members) for name, members in partitions.items()}
        self.cluster_name = cluster_name
        self.bin_dir = bin_dir
        self.start_timeout = start_timeout
        # Configuration, sockets, slurmd spool (job scripts) and job working directories live
        # in a short, world-searchable directory of their own: unix socket paths are limited
        # to 108 bytes, munged refuses a socket whose directory is not searchable by everyone,
        # jobs run as other users (sbatch --uid) must reach their script and working
        # directory, and slurmrestd (never root) must read slurm.conf. A base directory under
        # pytest's 0700 tmp_path satisfies none of that; state, logs and the munge key stay
        # in the base directory.
        # Created by start(), removed by stop().
        self.run_dir = Path(tempfile.gettempdir()) / "gpufleet-slurm-run-unstarted"
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._marker = ""
        self._started = False
        self._atexit_registered = False

    # -- paths and environment ---------------------------------------------
    def binary(self, name: str) -> str:
        path = _which(name, self.bin_dir)
        if path is None:
            raise LocalSlurmError(f"{name} not found (install slurm-wlm and munge: scripts/install-debs.sh)")
        return path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for any Slurm client call against this cluster."""
        env = dict(os.environ)
        for key in list(env):
            # A caller's own job environment must not redirect our clients elsewhere.
            if key.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SINFO_", "SCONTROL_")):
                del env[key]
        env["SLURM_CONF"] = str(self.conf_path)
        env[MARKER_ENV] = self._marker
        if extra:
            env.update(extra)
        return env

    def run(self, cmd: str, *args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (``sinfo``, ``scontrol``...) against this cluster."""
        proc = subprocess.run(
            [self.binary(cmd), *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise LocalSlurmError(
                f"{cmd} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    # -- configuration -----------------------------------------------------
    def _gres(self) -> str:
        return f"gpu:{self.gpu_type}:{self.gpus_per_node}" if self.gpu_type else f"gpu:{self.gpus_per_node}"

    def slurm_conf(self) -> str:
        b = self.base
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={next(iter(self.node_ports.values()))}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            # The node lines, not this host's 2 cores, define CPUs and memory.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "KillWait=2",
            "MinJobAge=2",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={self.run_dir / 'spool'}/%n",
            f"SlurmctldPidFile={b / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={b / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"TmpFS={self.run_dir / 'tmp'}",
            "MailProg=/bin/true",
            f"PlugStackConfig={self.conf_path.parent / 'plugstack.conf'}",
        ]
        if self.prolog:
            lines += [f"Prolog={self.conf_path.parent / 'prolog-wrapper.sh'}", "PrologFlags=Alloc"]
        if self.epilog:
            lines.append(f"Epilog={self.conf_path.parent / 'epilog-wrapper.sh'}")
        for name in self.node_names:
            lines.append(
                f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={name} Port={self.node_ports[name]} "
                f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb} Gres={self._gres()} State=UNKNOWN"
            )
        for i, (pname, members) in enumerate(self.partitions.items()):
            default = "YES" if i == 0 else "NO"
            lines.append(
                f"PartitionName={pname} Nodes={','.join(members)} Default={default} MaxTime=INFINITE State=UP"
            )
        return "\n".join(lines) + "\n"

    def node_dir(self, name: str) -> Path:
        """Per-node state a real node keeps under /run: ``jobs/`` (GPU->job mapping
        files the prolog writes) and ``progress/`` (the training progress spool)."""
        return self.base / "nodes" / name

    def _wrapper(self, script: Path) -> str:
        # slurmd runs the prolog as root with SLURMD_NODENAME set; point the script at
        # that node's directories, as /run/gpufleet would be on a real node.
        nodes = self.base / "nodes"
        return (
            "#!/bin/sh\n"
            f'export GPUFLEET_JOB_MAPPING_DIR="{nodes}/$SLURMD_NODENAME/jobs"\n'
            f'export GPUFLEET_PROGRESS_DIR="{nodes}/$SLURMD_NODENAME/progress"\n'
            f'exec /bin/bash "{script}" "$@"\n'
        )

    def gres_conf(self) -> str:
        last = self.gpus_per_node - 1
        files = f"{self.base / 'dev'}/nvidia[0-{last}]" if last > 0 else f"{self.base / 'dev'}/nvidia0"
        typ = f" Type={self.gpu_type}" if self.gpu_type else ""
        return f"AutoDetect=off\nNodeName={','.join(self.node_names)} Name=gpu{typ} File={files}\n"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def conf_path(self) -> Path:
        return self.run_dir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.run_dir / "munge" / "munge.socket"

    @property
    def job_dir(self) -> Path:
        return self.run_dir / "jobs"

    def _prepare(self) -> None:
        if self._own_dir:
            self.base = Path(tempfile.mkdtemp(prefix="gpufleet-slurm-"))
        b = self.base
        self._marker = f"{os.getpid()}:{b}"
        self.run_dir = Path(tempfile.mkdtemp(prefix="gpufleet-slurm-run-"))
        b.mkdir(parents=True, exist_ok=True)
        b.chmod(0o755)  # munged wants its socket directory searchable by all
        for sub in ("state", "run", "log", "dev"):
            (b / sub).mkdir(exist_ok=True)
        self.run_dir.chmod(0o755)
        for sub in ("etc", "spool", "tmp"):  # spool: slurmd's copies of job scripts, run as the job's user
            (self.run_dir / sub).mkdir()
        self.job_dir.mkdir(exist_ok=True)
        self.job_dir.chmod(0o1777)  # jobs submitted with --uid write their output here
        munge = self.munge_socket.parent
        munge.mkdir(exist_ok=True)
        munge.chmod(0o755)
        key_dir = b / "munge-key"
        key_dir.mkdir(exist_ok=True)
        key_dir.chmod(0o700)
        key = key_dir / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        for i in range(self.gpus_per_node):
            dev = b / "dev" / f"nvidia{i}"
            if not dev.exists():
                try:
                    os.mknod(dev, 0o600 | 0o020000, os.makedev(195, i))  # S_IFCHR, NVIDIA's major
                except PermissionError as exc:
                    raise LocalSlurmError(f"mknod {dev}: {exc} (needs root or CAP_MKNOD)") from exc
        for name in self.node_names:
            (self.run_dir / "spool" / name).mkdir(exist_ok=True)
        ports = _free_ports(1 + len(self.node_names))
        self.ctld_port = ports[0]
        self.node_ports = dict(zip(self.node_names, ports[1:], strict=True))
        etc = self.conf_path.parent
        (etc / "plugstack.conf").write_text("")
        self.conf_path.write_text(self.slurm_conf())
        (etc / "gres.conf").write_text(self.gres_conf())
        for kind, script in (("prolog", self.prolog), ("epilog", self.epilog)):
            if script is not None:
                if not script.is_file():
                    raise LocalSlurmError(f"{kind} script {script} does not exist")
                wrapper = etc / f"{kind}-wrapper.sh"
                wrapper.write_text(self._wrapper(script))
                wrapper.chmod(0o755)
        for name in self.node_names:
            for sub in ("jobs", "progress"):
                (self.node_dir(name) / sub).mkdir(parents=True, exist_ok=True)

    # -- daemons -----------------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.log_dir / f"{key}.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.base,
            )
        finally:
            out.close()
        self._procs[key] = proc
        return proc

    def start(self) -> LocalSlurm:
        """Start munged, slurmctld and the slurmds; return when every node is idle."""
        if self._started:
            return self
        if os.geteuid() != 0:
            raise LocalSlurmError("LocalSlurm needs root (SlurmUser=root, mknod for GPU stand-ins)")
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise LocalSlurmError(f"missing programs: {', '.join(missing)} (run scripts/install-debs.sh)")
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        self._started = True
        try:
            self._prepare()
            self._start_munged()
            self._spawn("slurmctld", [self.binary("slurmctld"), "-D", "-i", "-f", str(self.conf_path)])
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", [self.binary("slurmd"), "-D", "-N", name, "-f", str(self.conf_path)])
            self.wait_nodes_idle(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        b = self.base
        self._spawn("munged", [
            self.binary("munged"), "--foreground",
            f"--socket={self.munge_socket}",
            f"--key-file={b / 'munge-key' / 'munge.key'}",
            f"--pid-file={b / 'run' / 'munged.pid'}",
            f"--log-file={self.log_dir / 'munged.log'}",
            f"--seed-file={b / 'munge-key' / 'munged.seed'}",
        ])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise LocalSlurmError(f"munged did not start:\n{self.diagnostics()}")
            time.sleep(0.02)

    def restart_controller(self) -> None:
        """Stop and start slurmctld, keeping its saved state (drains survive).

        Returns once every slurmd has registered again (no node left ``unknown``).
        """
        self._terminate("slurmctld")
        self._spawn("slurmctld", [self.binary("slurmctld"), "-D", "-f", str(self.conf_path)])
        deadline = time.monotonic() + self.start_timeout
        while True:
            proc = self.run("sinfo", "-h", "-N", "-O", "StateComplete:|", check=False, timeout=10)
            states = [s for s in proc.stdout.replace("\n", "").split("|") if s]
            if proc.returncode == 0 and states and not any(s.startswith("unknown") for s in states):
                return
            if time.monotonic() > deadline:
                raise LocalSlurmError(f"slurmctld did not come back:\n{proc.stderr}\n{self.diagnostics()}")
            time.sleep(0.2)

    def wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            dead = [k for k, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise LocalSlurmError(f"{', '.join(dead)} exited during start-up:\n{self.diagnostics()}")
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
            last = proc.stdout.strip() or proc.stderr.strip()
            states = dict(line.split(None, 1) for line in proc.stdout.splitlines() if " " in line)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            if time.monotonic() > deadline:
                raise LocalSlurmError(
                    f"nodes not idle after {timeout:g}s; sinfo says:\n{last}\n{self.diagnostics()}"
                )
            time.sleep(0.1)

    def diagnostics(self) -> str:
        """Exit codes and log tails of every daemon (for error messages)."""
        parts = []
        for key, proc in self._procs.items():
            rc = proc.poll()
            parts.append(f"--- {key} ({'running' if rc is None else f'exited {rc}'})")
            parts.append(_tail(self.log_dir / f"{key}.out", 8))
        return "\n".join(parts)

    def _terminate(self, key: str, grace: float = 5.0) -> None:
        proc = self._procs.pop(key, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def _marked_pids(self) -> list[int]:
        """Processes whose environment carries this instance's marker (slurmstepd, job tasks)."""
        if not self._marker:
            return []
        needle = f"{MARKER_ENV}={self._marker}".encode()
        me = os.getpid()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Cancel jobs, stop every daemon and sweep up job processes. Idempotent."""
        if not self._started:
            return
        self._started = False
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            with contextlib.suppress(Exception):
                ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=5).stdout.split()
                if ids:
                    self.run("scancel", *ids, check=False, timeout=5)
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and self.run(
                        "squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i", check=False, timeout=5
                    ).stdout.strip():
                        time.sleep(0.1)
        for key in [k for k in self._procs if k.startswith("slurmd-")]:
            self._terminate(key)
        for key in ("slurmrestd", "slurmctld", "munged"):
            self._terminate(key)
        for key in list(self._procs):
            self._terminate(key)
        for pid in self._marked_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- slurmrestd ----------------------------------------------------------
    def start_rest(self, user: str = "nobody", versions: Sequence[str] = ("v0.0.38", "v0.0.37")) -> Path:
        """Start slurmrestd (once) on a unix socket with ``rest_auth/local``; return the socket path.

        slurmrestd refuses to run as root, so it drops to ``user`` after start-up;
        Debian's build has no ``auth/jwt`` for slurmctld, so local (socket peer
        credential) authentication is the one that works here. Only the
        ``openapi/*`` plugins are loaded (the ``dbv*`` ones need slurmdbd).
        """
        rest_dir = self.run_dir / "rest"
        sock = rest_dir / "slurmrestd.socket"
        running = self._procs.get("slurmrestd")
        if running is not None and running.poll() is None:
            return sock
        rest_dir.mkdir(exist_ok=True)
        shutil.chown(rest_dir, user=user)
        plugins = ",".join(f"openapi/{v}" for v in versions)
        self._spawn("slurmrestd", [
            self.binary("slurmrestd"), "-f", str(self.conf_path), "-a", "rest_auth/local",
            "-s", plugins, "-u", user, f"unix:{sock}",
        ])
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self._procs["slurmrestd"].poll() is not None or time.monotonic() > deadline:
                raise LocalSlurmError(f"slurmrestd did not start:\n{self.diagnostics()}")
            time.sleep(0.02)
        return sock

    # -- jobs and nodes --------------------------------------------------------
    def submit(
        self,
        wrap: str = "sleep 300",
        *,
        gres: str | None = "gpu:2",
        partition: str | None = None,
        nodes: int = 1,
        name: str | None = None,
        account: str | None = None,
        uid: str | None = None,
        extra: Sequence[str] = (),
    ) -> int:
        """``sbatch --wrap``; returns the job id."""
        args = ["--parsable", f"--chdir={self.job_dir}", f"--output={self.job_dir}/slurm-%j.out", f"--nodes={nodes}"]
        if gres:
            args.append(f"--gres={gres}")
        if partition:
            args.append(f"--partition={partition}")
        if name:
            args.append(f"--job-name={name}")
        if account:
            args.append(f"--account={account}")
        if uid:
            args.append(f"--uid={uid}")
        out = self.run("sbatch", *args, *extra, f"--wrap={wrap}").stdout.strip()
        return int(out.split(";", 1)[0])

    def job_state(self, job_id: int) -> str:
        """squeue's state (RUNNING, PENDING...), or '' once the job left the queue."""
        return self.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False).stdout.strip()

    def wait_job_state(self, job_id: int, state: str = "RUNNING", timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.job_state(job_id)) != state:
            if time.monotonic() > deadline:
                raise LocalSlurmError(f"job {job_id} is {current or 'gone'}, not {state}, after {timeout:g}s")
            time.sleep(0.1)

    def cancel(self, *job_ids: int) -> None:
        if job_ids:
            self.run("scancel", *map(str, job_ids))

    def drain(self, node: str, reason: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason}")

    def resume(self, node: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=RESUME")

    def wait_node_state(self, node: str, state: str, timeout: float = 20.0) -> None:
        """Wait for ``node_state(node) == state`` (a resumed node is ``idle+not_responding`` until pinged)."""
        deadline = time.monotonic() + timeout
        while (current := self.node_state(node)) != state:
            if time.monotonic() > deadline:
                raise LocalSlurmError(f"{node} is {current}, not {state}, after {timeout:g}s")
            time.sleep(0.1)

    def node_states(self) -> dict[str, str]:
        """sinfo's complete state string of every node, e.g. ``{"gpu-node-1": "mixed+drain"}``.

        Always a full listing: ``sinfo -n NODE`` makes slurmctld answer from its
        single-node path, which (22.05) does not refresh the allocation data that
        sinfo derives idle/mixed from, and so can report ``mixed`` long after the
        last job on the node ended.
        """
        out = self.run("sinfo", "-h", "-N", "-O", "NodeList:|,StateComplete:|").stdout  # no width: untruncated
        return dict(line.split("|")[:2] for line in out.splitlines() if "|" in line)

    def node_state(self, node: str) -> str:
        """sinfo's complete state string, e.g. ``idle``, ``mixed+drain``, ``down+not_responding``."""
        return self.node_states()[node]
