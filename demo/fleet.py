"""The whole gpufleet loop on one machine: every process the demo starts, and stops.

Start order (each waits for the one before to answer):

1. a real Slurm (``exporters.localslurm.LocalSlurm``: munged, slurmctld, one slurmd per
   node, ``Gres=gpu:8``) with the shipped prolog/epilog;
2. one node agent per node (``python -m exporters.agent --gpu.backend=sim``) with its own
   fault file, sysfs tree and mounts view (``demo.nodes.SimNode``);
3. the Slurm exporter, polling every 2 s;
4. the demo's "pager" (``WebhookSink``: where the page/ticket receivers deliver);
5. the remediation service with the demo policy and the Slurm actuator;
6. Alertmanager with the demo copy of alerts/alertmanager.yml;
7. Prometheus scraping all of it every second and evaluating the demo copy of the rules;
8. a demo training job per node, reporting progress.

``stop()`` ends all of it in reverse order (Slurm cancels its jobs first). Whatever a
missing prerequisite rules out is skipped and named in ``missing`` (with how to get
it); the rest runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from demo import config
from demo.nodes import SimNode
from demo.stack import Alertmanager, Program, Prometheus, WebhookSink, free_port
from exporters.localslurm import LocalSlurm, missing_binaries

REPO = config.REPO
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
WEBHOOK_TOKEN = "demo-webhook-token-0123456789abcdef"
ADMIN_TOKEN = "demo-admin-token-fedcba9876543210"
# Debian package of each program the demo needs.
PACKAGES = {
    "prometheus": "prometheus", "prometheus-alertmanager": "prometheus-alertmanager", "munged": "munge",
    "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sinfo": "slurm-wlm", "squeue": "slurm-wlm",
    "sbatch": "slurm-wlm", "scontrol": "slurm-wlm", "scancel": "slurm-wlm",
}


@dataclass
class Missing:
    what: str
    fix: str
    disables: str


def prerequisites() -> list[Missing]:
    """What this machine lacks for the full demo, how to get it, and what it disables."""
    out: list[Missing] = []
    for prog, disables in (("prometheus", "alerts (Prometheus)"), ("prometheus-alertmanager", "alert routing")):
        if shutil.which(prog) is None:
            out.append(Missing(prog, f"make setup (as root), or: apt-get install -y {PACKAGES[prog]}", disables))
    slurm = missing_binaries()
    if slurm:
        pkgs = " ".join(sorted({PACKAGES.get(p, p) for p in slurm}))
        out.append(Missing(", ".join(slurm), f"make setup (as root), or: apt-get install -y {pkgs}",
                           "Slurm, drains and jobs"))
    if os.geteuid() != 0:
        out.append(Missing("root", "run `make demo` / `gpufleet demo` as root (a local Slurm runs as SlurmUser=root "
                           "and makes GPU device nodes with mknod)", "Slurm, drains and jobs"))
    return out


class Fleet:
    """Everything the demo runs. ``say`` receives one-line progress messages."""

    def __init__(self, workdir: Path, *, nodes: int = 4, gpus: int = 8, python: str = sys.executable,
                 say: Callable[[str], None] = print, policy_overrides: dict[str, Any] | None = None,
                 jobs: bool = True):  # fmt: skip
        if nodes < 2:
            raise ValueError("the demo needs at least 2 nodes (one to fault, one to flap)")
        self.workdir = Path(workdir).resolve()
        self.n = nodes
        self.gpus = gpus
        self.python = python
        self.say = say
        self.policy_overrides = policy_overrides or {}
        self.want_jobs = jobs
        self.node_names = [f"gpu-node-{i}" for i in range(1, nodes + 1)]
        self.missing = prerequisites()
        self.slurm: LocalSlurm | None = None
        self.nodes: dict[str, SimNode] = {}
        self.agents: dict[str, Program] = {}
        self.slurm_exporter: Program | None = None
        self.pager: WebhookSink | None = None
        self.service: Program | None = None
        self.am: Alertmanager | None = None
        self.prom: Prometheus | None = None
        self.jobs: dict[str, int] = {}
        self.session = requests.Session()

    # -- what can run -------------------------------------------------------------------
    @property
    def has_slurm(self) -> bool:
        return not any("Slurm" in m.disables for m in self.missing)

    @property
    def has_prometheus(self) -> bool:
        return shutil.which("prometheus") is not None and shutil.which("prometheus-alertmanager") is not None

    # -- start / stop -------------------------------------------------------------------
    def _fresh_workdir(self) -> None:
        """Idempotent set-up: the previous run's state (Slurm's saved drains, the
        service's database, Prometheus' TSDB) is removed, so every run starts alike."""
        marker = self.workdir / ".gpufleet-demo"
        if self.workdir.exists() and any(self.workdir.iterdir()):
            if not marker.exists():
                raise RuntimeError(f"{self.workdir} is not empty and is not a demo work directory "
                                   f"(no {marker.name}); refusing to empty it: pick another --workdir")
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        marker.write_text("gpufleet demo work directory: emptied by every `gpufleet demo` run\n")  # munged and slurmd need to traverse to the base directory

    def start(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._fresh_workdir()
        w = self.workdir
        if self.has_slurm:
            self.say(f"starting Slurm: munged, slurmctld, {self.n} slurmd ({self.gpus} GPUs each, gres gpu:h100)")
            self.slurm = LocalSlurm(w / "slurm", nodes=self.n, gpus_per_node=self.gpus, cluster_name="gpufleet-demo",
                                    prolog=SLURM_SCRIPTS / "prolog.sh", epilog=SLURM_SCRIPTS / "epilog.sh",
                                    start_timeout=90)  # fmt: skip
            self.slurm.start()
        for i, name in enumerate(self.node_names, 1):
            node_dir = self.slurm.node_dir(name) if self.slurm else None
            self.nodes[name] = SimNode(name, i, w / "nodes" / name, gpus=self.gpus,
                                       jobs_dir=node_dir / "jobs" if node_dir else None,
                                       progress_dir=node_dir / "progress" if node_dir else None).prepare()
        self.say(f"starting {self.n} node agents (simulated GPUs, their own sysfs and mounts)")
        for name, node in self.nodes.items():
            prog = Program(f"agent-{name}", lambda port, n=node: n.agent_argv(self.python, port),
                           w / "logs", cwd=REPO)  # fmt: skip
            self.agents[name] = prog
        for prog in self.agents.values():
            prog.start(timeout=60)
        if self.slurm:
            self.say("starting the Slurm exporter")
            conf = str(self.slurm.conf_path)
            self.slurm_exporter = Program("slurm-exporter", lambda port: [
                self.python, "-m", "exporters.slurm", f"--web.listen-address=127.0.0.1:{port}",
                "--slurm.poll-interval=2s", "--slurm.allow-fast-poll", f"--slurm.conf={conf}"],
                w / "logs", cwd=REPO).start(timeout=60)  # fmt: skip
        self.pager = WebhookSink()
        # Alertmanager and the service name each other: Alertmanager's port is chosen first, so
        # the service starts with --alertmanager.url (resolutions Alertmanager never sends,
        # docs/remediation.md) and Alertmanager's config with the service's address.
        am_port = free_port() if self.has_prometheus else None
        self._start_service(am_url=f"http://127.0.0.1:{am_port}" if am_port else None)
        if not self.has_prometheus:
            return
        self.say("starting Alertmanager and Prometheus (demo copies of alerts/)")
        am_cfg = w / "alertmanager.yml"
        assert self.service is not None
        config.write_alertmanager(am_cfg, service_url=self.service.url, token_file=self.webhook_token_file,
                                  pager_url=self.pager.url)
        self.am = Alertmanager(am_cfg, w / "alertmanager")
        self.am.start(timeout=60, port=am_port)
        rules = config.write_rules(w / "rules")
        sd = w / "targets-agents.yml"
        config.write_agents_sd(sd, {n: f"127.0.0.1:{p.port}" for n, p in self.agents.items()})
        prom_cfg = config.prometheus_config(
            rule_files=rules, alertmanager=self.am.url, agents_sd=sd,
            slurm_exporter=f"127.0.0.1:{self.slurm_exporter.port}" if self.slurm_exporter else None,
            remediation=f"127.0.0.1:{self.service.port}")
        self.prom = Prometheus(w / "prometheus", config=prom_cfg)
        self.prom.start(timeout=60)
        self.say("waiting for Prometheus to scrape every target")
        self.wait_targets_up(timeout=90)
        if self.slurm and self.want_jobs:
            self.submit_jobs()

    @property
    def webhook_token_file(self) -> Path:
        return self.workdir / "secrets" / "remediation-webhook-token"

    @property
    def admin_token_file(self) -> Path:
        return self.workdir / "secrets" / "remediation-admin-token"

    def _start_service(self, am_url: str | None) -> None:
        w = self.workdir
        secrets = w / "secrets"
        secrets.mkdir(mode=0o700, exist_ok=True)
        self.webhook_token_file.write_text(WEBHOOK_TOKEN + "\n")
        self.admin_token_file.write_text(ADMIN_TOKEN + "\n")
        policy = config.write_policy(w / "remediation-policy.yml", self.n, **self.policy_overrides)
        extra = ["--actuator", "slurm", "--slurm.conf", str(self.slurm.conf_path)] if self.slurm else \
            ["--actuator", "none", "--dry-run"]
        self.say("starting the remediation service (demo policy: " + str(policy.relative_to(w.parent)) + ")"
                 if policy.is_relative_to(w.parent) else "starting the remediation service")
        self.service = Program("remediation", lambda port: [
            self.python, "-m", "remediation.service", "--web.listen-address", f"127.0.0.1:{port}",
            "--policy", str(policy), "--db", str(w / "remediation.db"),
            "--webhook-token-file", str(self.webhook_token_file), "--admin-token-file", str(self.admin_token_file),
            "--tick-interval", "500ms", *extra,
            *(["--alertmanager.url", am_url, "--alertmanager.reconcile-interval", "5s"] if am_url else [])],
            w / "logs", cwd=REPO).start(timeout=60)  # fmt: skip

    def wait_targets_up(self, timeout: float) -> None:
        assert self.prom is not None
        want = 1 + len(self.agents) + (1 if self.slurm_exporter else 0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                up = [t for t in self.prom.targets() if t.get("health") == "up"]
            except (requests.RequestException, RuntimeError):
                up = []
            if len(up) >= want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(up)} of {want} targets up after {timeout:g}s: "
                                   f"{[(t['labels'].get('job'), t.get('lastError')) for t in self.prom.targets()]}")
            time.sleep(0.5)

    def submit_jobs(self) -> None:
        """A pretend training job per node (half its GPUs), reporting progress."""
        assert self.slurm is not None
        spool = self.slurm.base / "nodes"
        for name in self.node_names:
            wrap = (f'GPUFLEET_PROGRESS_DIR="{spool}/$SLURMD_NODENAME/progress" '
                    f"exec {self.python} -m demo.train --step-seconds 0.5")
            self.jobs[name] = self.slurm.submit(wrap, gres=f"gpu:{max(1, self.gpus // 2)}", name=f"train-{name}",
                                                extra=[f"--nodelist={name}", f"--chdir={REPO}"])  # fmt: skip
        self.say(f"submitted {len(self.jobs)} training jobs: " + ", ".join(
            f"{j} on {n}" for n, j in self.jobs.items()))

    def restart_agent(self, node: str) -> None:
        """Restart one node's agent on the same address (a reboot of that node, as Prometheus sees it)."""
        prog = self.agents[node]
        port = prog.port
        prog.stop()
        prog.start(timeout=60, port=port)

    def stop(self) -> None:
        """Stop everything this fleet started, newest first. Idempotent."""
        for server in (self.prom, self.am):
            if server is not None:
                server.stop()
        if self.service is not None:
            self.service.stop()
        if self.pager is not None:
            self.pager.close()
            self.pager = None
        if self.slurm_exporter is not None:
            self.slurm_exporter.stop()
        for prog in self.agents.values():
            prog.stop()
        if self.slurm is not None:
            self.slurm.stop()

    # -- reading the loop's state ---------------------------------------------------------
    def admin(self, method: str, path: str, **params: Any) -> Any:
        assert self.service is not None
        r = self.session.request(method, f"{self.service.url}/api/v1/{path}", params=params or None,
                                 json={"who": "demo"} if method == "POST" else None,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)  # fmt: skip
        r.raise_for_status()
        return r.json()

    def history(self, node: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": 1000}
        if node:
            params["node"] = node
        return self.admin("GET", "history", **params)["history"]

    def sinfo(self) -> dict[str, tuple[str, str]]:
        """{node: (state, reason)} from sinfo (the whole listing; see LocalSlurm.node_states)."""
        if self.slurm is None:
            return {}
        out = self.slurm.run("sinfo", "-h", "-N", "-O", "NodeList:|,StateComplete:|,Reason:|").stdout
        rows = {}
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 3:
                rows[parts[0].strip()] = (parts[1].strip(), "" if parts[2].strip() == "none" else parts[2].strip())
        return rows

    def urls(self) -> dict[str, str]:
        out = {}
        if self.prom:
            out["Prometheus"] = self.prom.url
        if self.am:
            out["Alertmanager"] = self.am.url
        if self.service:
            out["remediation admin API"] = f"{self.service.url}/api/v1/status (token: {self.admin_token_file})"
        for name, prog in self.agents.items():
            out[f"agent {name}"] = f"{prog.url}/metrics"
        if self.slurm_exporter:
            out["Slurm exporter"] = f"{self.slurm_exporter.url}/metrics"
        if self.slurm:
            out["Slurm"] = f"SLURM_CONF={self.slurm.conf_path} sinfo"
        return out
