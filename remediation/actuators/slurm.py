"""Slurm through its command-line clients: ``sinfo`` to read, ``scontrol`` to act.

Reading is the Slurm exporter's own: ``sinfo --json -N`` (falling back, once and for
good, to the formatted ``sinfo -O`` output where ``--json`` is missing) parsed by
``exporters.slurm_data``, so the remediation service and the dashboards agree about
every node. Two things the exporter does not need and we do:

* ``sinfo --json`` exits 0 with ``"errors": [...]`` and no nodes when slurmctld cannot
  be reached (22.05); an empty view would make every cap look unused, so errors in
  the document are a (transient) failure, never "no nodes".
* the flags that make a node unavailable without changing its base state
  (``REBOOT_REQUESTED``, ``POWERED_DOWN``, ``NOT_RESPONDING``...) count.

Acting: ``scontrol update NodeName=N State=DRAIN Reason=...``, ``scontrol reboot ASAP
nextstate=RESUME reason=... N`` and ``scontrol update NodeName=N State=RESUME``, each
read back until the scheduler shows the change. Every command is an argv (never a
shell), bounded by ``timeout`` and run in its own process group that is killed on
timeout (``exporters.slurm_source.run_bounded``).

Reasons are single-line in Slurm (``sinfo``/``squeue`` print them on one line and a
newline breaks every line-based tool), so control characters become spaces. scontrol
strips one leading and one trailing double quote from ``Reason=`` values (not from
``reboot ... reason=``), so the update wraps the text in quotes to keep it exact.

Node names are checked before anything runs: a hostlist expression
(``gpu-node-[1-4]``, ``a,b``) or ``ALL`` would make scontrol act on many nodes.

Ownership is checked just before acting, but Slurm offers no compare-and-set: an
admin who drains the node in the milliseconds between our read and our update loses
their reason to ours (the audit log keeps both reads).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from exporters.slurm_data import (
    Node,
    ParseError,
    _state_tokens,  # the exporter's state tokenizer: one spelling table for both
    nodes_from_json,
    nodes_from_text,
)
from exporters.slurm_source import _UNSUPPORTED_JSON, SINFO_JSON_ARGS, SINFO_TEXT_ARGS, run_bounded
from remediation.actuators.base import REASON_PREFIX, ActuatorError, NodeStatus, wait_for_node

__all__ = [
    "UNAVAILABLE_FLAGS",
    "UNAVAILABLE_STATES",
    "SlurmActuator",
    "check_node_name",
    "node_status",
    "sanitize_reason",
]

#: Normalised states (exporters.slurm_data.NODE_STATES) that take a node out of service.
UNAVAILABLE_STATES = frozenset({"drained", "draining", "down", "fail", "maint", "unknown"})
#: State tokens (base or flag, any Slurm version) that take a node out of service.
UNAVAILABLE_FLAGS = frozenset({
    "DRAIN", "DRAINED", "DRAINING", "DOWN", "FAIL", "FAILING", "MAINT", "ERROR", "UNKNOWN", "FUTURE",
    "REBOOT_REQUESTED", "REBOOT_ISSUED", "NOT_RESPONDING", "POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN",
    "POWERING_UP", "INVALID_REG", "INVALID", "BLOCKED",
})
#: The longest reason we hand to Slurm (it has no documented limit; audit logs and
#: sinfo columns do).
MAX_REASON = 512

# A Slurm node name: no hostlist syntax ([], commas), no spaces, no leading dash.
_NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# scontrol/sinfo wording for "slurmctld is not there right now" (retry later) as opposed
# to "this request is wrong" (Invalid node name, Access/permission denied...).
_TRANSIENT = re.compile(
    r"unable to contact slurm controller|socket timed out|connection refused|connect failure|"
    r"zero bytes were transmitted|resource temporarily unavailable|in standby mode|"
    r"communication connection failure|slurmctld.*(down|not responding)|try again|"
    r"slurm controller is busy|transport endpoint",
    re.I,
)


def sanitize_reason(reason: str) -> str:
    """One line, no control characters, bounded, starting with ``REASON_PREFIX``.

    The engine always passes a prefixed reason; one that lost it would drain a node
    that gpufleet could then never resume, so the prefix is restored rather than
    trusted.
    """
    text = " ".join(_CONTROL.sub(" ", reason or "").split())
    if not text.startswith(REASON_PREFIX):
        text = f"{REASON_PREFIX} {text}".rstrip()
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3].rstrip() + "..."
    return text


def check_node_name(node: str) -> str:
    """The name, or ActuatorError(transient=False) for anything that is not one node."""
    if not isinstance(node, str) or not _NODE_NAME.fullmatch(node) or node.upper() == "ALL":
        raise ActuatorError(f"refusing node name {node!r}: not a single Slurm node name", transient=False)
    return node


def node_status(node: Node) -> NodeStatus:
    """An exporter ``Node`` (any Slurm version, CLI or REST) as the engine's NodeStatus."""
    tokens = set(_state_tokens(node.raw_state)) if node.raw_state else set()
    unavailable = node.state in UNAVAILABLE_STATES or node.not_responding or bool(tokens & UNAVAILABLE_FLAGS)
    extra = {"slurm_state": node.state}
    if node.reason_user:
        extra["reason_user"] = node.reason_user
    return NodeStatus(
        name=node.name,
        exists=True,
        unavailable=unavailable,
        # A reason on an available node is a leftover, not ownership of anything.
        ours=unavailable and node.reason.startswith(REASON_PREFIX),
        reason=node.reason,
        partitions=tuple(sorted(node.partitions)),  # sinfo JSON and text list them in different orders
        state=node.raw_state or node.state.upper(),
        extra=extra,
    )


def state_flags(status: NodeStatus) -> set[str]:
    """The upper-case state tokens of a NodeStatus (``IDLE+DRAIN`` -> {IDLE, DRAIN})."""
    return set(_state_tokens(status.state)) if status.state else set()


def classify(message: str) -> bool:
    """Is a Slurm client's error message worth retrying (slurmctld away, timeouts)?"""
    return bool(_TRANSIENT.search(message))


class SlurmActing:
    """What both Slurm actuators (scontrol and slurmrestd) do around an action:
    refuse a node someone else took out, and read the node back until the change shows."""

    settle_timeout: float
    poll_interval: float

    def node(self, name: str) -> NodeStatus:  # provided by the actuator
        raise NotImplementedError

    def _check_free_or_ours(self, node: str, action: str) -> NodeStatus:
        st = self.node(check_node_name(node))
        if not st.exists:
            raise ActuatorError(f"{action} {node}: Slurm does not know this node", transient=False)
        if st.unavailable and not st.ours:
            raise ActuatorError(
                f"{action} {node}: already unavailable for someone else ({st.state}, reason {st.reason!r}); "
                "not overwriting their reason", transient=False)
        return st

    def _wait(self, node: str, done: Callable[[NodeStatus], bool], what: str,
              settled: Callable[[NodeStatus], bool] | None = None) -> NodeStatus:
        return wait_for_node(self.node, node, done, what, timeout=self.settle_timeout,
                             poll_interval=self.poll_interval, settled=settled)


class SlurmActuator(SlurmActing):
    """``sinfo``/``scontrol`` on this host against ``conf`` (or the default slurm.conf).

    ``bin_dir``: where the Slurm clients live (default: ``PATH``). ``timeout``: the
    limit for each command. ``settle_timeout``: how long an action waits for the
    scheduler to show its effect. ``env``: the base environment (default: this
    process's, without the caller's own ``SLURM_*`` job variables).
    """

    name = "slurm"

    def __init__(
        self,
        bin_dir: str | os.PathLike[str] | None = None,
        conf: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        *,
        settle_timeout: float = 10.0,
        poll_interval: float = 0.2,
        env: Mapping[str, str] | None = None,
    ):
        self.bin_dir = str(bin_dir) if bin_dir else ""
        self.conf = str(conf) if conf else ""
        self.timeout = timeout
        self.settle_timeout = settle_timeout
        self.poll_interval = poll_interval
        base = dict(os.environ if env is None else env)
        # A job environment (the service run under srun, a test inside a job) must not
        # redirect or reformat our clients.
        self.env = {k: v for k, v in base.items()
                    if not k.startswith(("SLURM_", "SINFO_", "SCONTROL_", "SQUEUE_", "SBATCH_"))}
        if self.conf:
            self.env["SLURM_CONF"] = self.conf
        elif "SLURM_CONF" in base:
            self.env["SLURM_CONF"] = base["SLURM_CONF"]
        self._json = True

    # -- commands ----------------------------------------------------------------
    def _cmd(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir else name

    def _run(self, cmd: str, *args: str) -> tuple[int, str, str]:
        argv = [self._cmd(cmd), *args]
        try:
            rc, out, err = run_bounded(argv, self.timeout, self.env)
        except subprocess.TimeoutExpired:
            raise ActuatorError(f"{cmd} timed out after {self.timeout:g}s (killed)", transient=True) from None
        except OSError as exc:
            raise ActuatorError(f"cannot run {argv[0]}: {exc.strerror or exc}", transient=False) from None
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def scontrol(self, *args: str) -> str:
        """Run ``scontrol ARGS``; its stdout, or ActuatorError (transient if slurmctld is away)."""
        rc, out, err = self._run("scontrol", *args)
        if rc != 0:
            lines = (err.strip() or out.strip()).splitlines()
            msg = " | ".join(lines[-3:]) or "(no output)"
            raise ActuatorError(f"scontrol {args[0] if args else ''} exited {rc}: {msg}", transient=classify(msg))
        return out

    # -- reading -----------------------------------------------------------------
    def _nodes_json(self) -> list[Node]:
        rc, out, err = self._run("sinfo", *SINFO_JSON_ARGS)
        if rc != 0:
            msg = " | ".join(err.strip().splitlines()[-3:]) or "(no output)"
            if _UNSUPPORTED_JSON.search(msg):
                raise _NoJson(msg)
            # Reading changes nothing: any failure is worth another try.
            raise ActuatorError(f"sinfo exited {rc}: {msg}", transient=True)
        try:
            doc: Any = json.loads(out)
        except ValueError as exc:
            raise ActuatorError(f"sinfo --json printed no JSON ({exc}): {out[:80]!r}", transient=True) from None
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if errors:
            # 22.05 says {"error": "Unspecified error", "errno": -1} when slurmctld is away.
            text = "; ".join(str(e.get("description") or e.get("error") or e) if isinstance(e, dict) else str(e)
                             for e in errors)
            raise ActuatorError(f"sinfo --json reported errors (slurmctld unreachable?): {text}", transient=True)
        try:
            nodes, _ = nodes_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise ActuatorError(f"unexpected sinfo --json shape: {exc}", transient=False) from None
        return nodes

    def _nodes_text(self) -> list[Node]:
        rc, out, err = self._run("sinfo", *SINFO_TEXT_ARGS)
        if rc != 0:
            msg = " | ".join(err.strip().splitlines()[-3:]) or "(no output)"
            raise ActuatorError(f"sinfo exited {rc}: {msg}", transient=True)
        try:
            return nodes_from_text(out)
        except ParseError as exc:
            raise ActuatorError(f"unexpected sinfo output: {exc}", transient=False) from None

    def _read(self) -> list[Node]:
        if self._json:
            try:
                return self._nodes_json()
            except _NoJson:
                self._json = False  # this sinfo has no --json: formatted output from now on
        return self._nodes_text()

    def nodes(self) -> dict[str, NodeStatus]:
        # Always the full listing: sinfo -n NODE takes slurmctld's single-node path,
        # whose allocation data (idle vs mixed) can be stale (22.05).
        return {n.name: node_status(n) for n in self._read()}

    def node(self, name: str) -> NodeStatus:
        return self.nodes().get(name) or NodeStatus(name=name, exists=False)

    def ping(self) -> None:
        rc, out, err = self._run("scontrol", "ping")
        if rc != 0:
            text = " ".join((out.strip() or err.strip()).split("\n")[:1]) or f"exit {rc}"
            raise ActuatorError(f"slurmctld unreachable: {text}", transient=True)

    # -- acting ------------------------------------------------------------------
    def drain(self, node: str, reason: str) -> NodeStatus:
        self._check_free_or_ours(node, "drain")
        text = sanitize_reason(reason)
        # Quoted: scontrol strips one leading and one trailing '"' from Reason= values.
        self.scontrol("update", f"NodeName={node}", "State=DRAIN", f'Reason="{text}"')
        return self._wait(node, lambda s: "DRAIN" in state_flags(s) and s.ours, "DRAIN",
                          settled=lambda s: s.reason == text)

    def reboot(self, node: str, reason: str) -> NodeStatus:
        self._check_free_or_ours(node, "reboot")
        text = sanitize_reason(reason)
        # reboot's reason= is taken verbatim (no quote stripping). The node name is the
        # last argument: scontrol reads everything after the options as the node list.
        self.scontrol("reboot", "ASAP", "nextstate=RESUME", f"reason={text}", node)
        requested = {"REBOOT_REQUESTED", "REBOOT_ISSUED"}
        return self._wait(node, lambda s: bool(state_flags(s) & (requested | {"DRAIN", "DOWN"})), "reboot request",
                          settled=lambda s: bool(state_flags(s) & requested))

    def resume(self, node: str) -> NodeStatus:
        st = self.node(check_node_name(node))
        if not st.exists:
            raise ActuatorError(f"resume {node}: Slurm does not know this node", transient=False)
        if not st.ours:
            raise ActuatorError(
                f"resume {node}: not taken out of service by gpufleet (state {st.state}, reason {st.reason!r})",
                transient=False)
        self.scontrol("update", f"NodeName={node}", "State=RESUME")
        # A resumed node reads NOT_RESPONDING until slurmctld's next ping of it (about a
        # second); wait for that too, but a node that stays away is Slurm's answer.
        return self._wait(node, lambda s: "DRAIN" not in state_flags(s) and "REBOOT_REQUESTED" not in state_flags(s),
                          "RESUME", settled=lambda s: not s.unavailable)


class _NoJson(Exception):
    """sinfo has no ``--json`` (before 21.08, or built without the JSON plugin)."""
