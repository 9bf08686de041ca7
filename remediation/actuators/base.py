"""The contract between the remediation engine and a scheduler.

An actuator reports the scheduler's live view of every node (the engine counts
*all* unavailable nodes against its caps, not only its own) and performs the
three actions. It never decides anything: policy, guardrails, ownership and
idempotency live in the engine. Every action reads the node back and returns
the state the scheduler reports afterwards, so the audit log records what
really happened, not what was asked.

Ownership: a node gpufleet takes out of service carries a reason that starts
with ``REASON_PREFIX`` (Slurm) or our taint (Kubernetes); ``NodeStatus.ours``
says so, and the engine only ever resumes nodes where it is true.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

REASON_PREFIX = "gpufleet:"


@dataclass(frozen=True)
class NodeStatus:
    name: str
    exists: bool = True
    # Out of service for any reason: drained, draining, down, failed, maintenance,
    # reboot pending, cordoned, NotReady. The caps count every one of these.
    unavailable: bool = False
    # Taken out of service by gpufleet (reason prefix or taint): the only nodes it may resume.
    ours: bool = False
    reason: str = ""
    # The groups caps apply to: Slurm partitions; on Kubernetes a node-pool label.
    partitions: tuple[str, ...] = ()
    # The scheduler's own words, for the audit log (e.g. "IDLE+DRAIN").
    state: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class ActuatorError(Exception):
    """An action or a read failed. ``transient`` errors (timeouts, connection
    refused, HTTP 5xx/429) are worth retrying; others (unknown node, permission
    denied) are not."""

    def __init__(self, message: str, *, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class Actuator(Protocol):
    name: str

    def nodes(self) -> dict[str, NodeStatus]:
        """The live view of every node the scheduler knows."""

    def node(self, name: str) -> NodeStatus:
        """One node (``exists=False`` if the scheduler does not know it)."""

    def drain(self, node: str, reason: str) -> NodeStatus:
        """Stop new work on the node (running work finishes or is evicted, per
        scheduler). ``reason`` already starts with REASON_PREFIX. Must not
        overwrite another owner's reason: if the node is already unavailable
        for someone else, raise ActuatorError(transient=False) without acting."""

    def reboot(self, node: str, reason: str) -> NodeStatus:
        """Drain, then reboot when idle, and return to service after (Slurm:
        ``scontrol reboot ASAP nextstate=RESUME reason=...``)."""

    def resume(self, node: str) -> NodeStatus:
        """Return a node gpufleet took out of service. Must refuse (ActuatorError,
        transient=False) when the node is not ``ours`` at the moment of acting."""

    def ping(self) -> None:
        """Raise ActuatorError when the scheduler cannot be reached (readiness)."""


def wait_for_node(read: Callable[[str], NodeStatus], node: str, done: Callable[[NodeStatus], bool], what: str, *,
                  timeout: float, poll_interval: float,
                  settled: Callable[[NodeStatus], bool] | None = None) -> NodeStatus:
    """Read a node back until ``done`` (else a transient ActuatorError), then, within
    the same bound, until ``settled`` (else return what the scheduler says): schedulers
    apply an update asynchronously, and the audit must record what really happened."""
    deadline = time.monotonic() + timeout
    while True:
        st = read(node)
        if done(st) and (settled is None or settled(st) or time.monotonic() >= deadline):
            return st
        if time.monotonic() >= deadline:
            raise ActuatorError(f"{node}: {what} not visible after {timeout:g}s "
                                f"(state {st.state}, reason {st.reason!r})", transient=True)
        time.sleep(poll_interval)
