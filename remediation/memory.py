"""An in-memory scheduler that implements the Actuator contract faithfully.

Used by the engine's unit and property tests and by the benchmark, where starting
Slurm for every hypothesis example is impossible. It is not a mock that answers
what a test wants: it keeps node state and enforces the contract's rules the way
the real actuators must (a drain never overwrites a foreign reason; a resume is
refused unless the node is ours at that moment; reads return the state after the
action). Integration tests run the same engine against real Slurm (slurmctld,
slurmd, munged on loopback) through remediation/actuators/slurm.py, which keeps
this model honest.

Test hooks, none of which the engine calls: ``admin_drain``/``admin_resume``/
``set_down`` (someone else changes a node), ``finish_reboot`` (a reboot completes,
``nextstate=RESUME``), ``fail`` (inject ActuatorErrors), ``mutations`` (every
change the engine asked for, for dry-run tests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from remediation.actuators.base import REASON_PREFIX, ActuatorError, NodeStatus


@dataclass
class _Node:
    name: str
    partitions: tuple[str, ...]
    state: str = "IDLE"  # Slurm-like words: IDLE, IDLE+DRAIN, DOWN, IDLE+DRAIN+REBOOT_REQUESTED
    reason: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    _cache: tuple[tuple[str, str], NodeStatus] | None = None

    @property
    def unavailable(self) -> bool:
        return self.state != "IDLE"

    def status(self) -> NodeStatus:
        # NodeStatus is frozen: one object per (state, reason) keeps nodes() cheap on big fleets.
        key = (self.state, self.reason)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._build())
        return self._cache[1]

    def _build(self) -> NodeStatus:
        return NodeStatus(
            name=self.name,
            exists=True,
            unavailable=self.unavailable,
            ours=self.unavailable and self.reason.startswith(REASON_PREFIX),
            reason=self.reason,
            partitions=self.partitions,
            state=self.state,
            extra=dict(self.extra),
        )


class MemoryActuator:
    """A thread-safe in-memory scheduler (Slurm-like node states and reasons)."""

    name = "memory"

    def __init__(self, nodes: dict[str, Iterable[str]] | Iterable[str] = (), *, partition: str = "gpu"):
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        # (operation, node, reason) for every drain/reboot/resume that changed something.
        self.mutations: list[tuple[str, str, str]] = []
        # Every call, including reads and refused ones: (operation, node).
        self.calls: list[tuple[str, str]] = []
        # Injected failures: operation -> list of errors raised by the next calls.
        self._failures: dict[str, list[ActuatorError]] = {}
        self.reachable = True
        if isinstance(nodes, dict):
            for name, parts in nodes.items():
                self.add_node(name, parts)
        else:
            for name in nodes:
                self.add_node(name, (partition,))

    # ---- test hooks ---------------------------------------------------------------------

    def add_node(self, name: str, partitions: Iterable[str] = ("gpu",)) -> None:
        with self._lock:
            self._nodes[name] = _Node(name, tuple(partitions))

    def admin_drain(self, name: str, reason: str = "admin: maintenance") -> None:
        """Someone else (an admin, another tool) drains a node; any reason is replaced."""
        with self._lock:
            node = self._nodes[name]
            node.state, node.reason = "IDLE+DRAIN", reason

    def admin_resume(self, name: str) -> None:
        """Someone else returns a node to service, whoever drained it."""
        with self._lock:
            node = self._nodes[name]
            node.state, node.reason = "IDLE", ""

    def set_down(self, name: str, reason: str = "Not responding") -> None:
        with self._lock:
            node = self._nodes[name]
            node.state, node.reason = "DOWN", reason

    def finish_reboot(self, name: str) -> None:
        """A requested reboot completes: nextstate=RESUME returns the node to service."""
        with self._lock:
            node = self._nodes[name]
            if "REBOOT" in node.state:
                node.state, node.reason = "IDLE", ""

    def fail(self, operation: str, times: int = 1, *, transient: bool = True, message: str = "injected") -> None:
        """Make the next ``times`` calls of ``operation`` (drain, reboot, resume, nodes,
        node, ping) raise ActuatorError without changing anything."""
        with self._lock:
            self._failures.setdefault(operation, []).extend(
                ActuatorError(f"{operation}: {message}", transient=transient) for _ in range(times)
            )

    def status_of(self, name: str) -> NodeStatus:
        """Test-side read that is not recorded as a call."""
        with self._lock:
            return self._nodes[name].status()

    def unavailable_count(self, partition: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for n in self._nodes.values() if n.unavailable and (partition is None or partition in n.partitions)
            )

    # ---- the Actuator contract -----------------------------------------------------------

    def _enter(self, operation: str, node: str = "") -> None:
        """Record the call and raise an injected or reachability failure (lock held)."""
        self.calls.append((operation, node))
        if not self.reachable:
            raise ActuatorError(f"{operation}: scheduler unreachable", transient=True)
        queue = self._failures.get(operation)
        if queue:
            raise queue.pop(0)

    def _get(self, name: str) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            raise ActuatorError(f"node {name!r} is unknown to the scheduler", transient=False)
        return node

    def nodes(self) -> dict[str, NodeStatus]:
        with self._lock:
            self._enter("nodes")
            return {name: n.status() for name, n in self._nodes.items()}

    def node(self, name: str) -> NodeStatus:
        with self._lock:
            self._enter("node", name)
            node = self._nodes.get(name)
            return node.status() if node else NodeStatus(name=name, exists=False)

    def _take_out(self, operation: str, name: str, reason: str, state: str) -> NodeStatus:
        if not reason.startswith(REASON_PREFIX):
            raise ActuatorError(f"{operation}: reason must start with {REASON_PREFIX!r}", transient=False)
        with self._lock:
            self._enter(operation, name)
            node = self._get(name)
            if node.unavailable and not node.reason.startswith(REASON_PREFIX):
                raise ActuatorError(
                    f"{operation}: node {name} is already {node.state} for someone else ({node.reason!r}); not overwritten",
                    transient=False,
                )
            if node.unavailable and node.state == state:
                return node.status()  # already done by us: idempotent, nothing changes
            node.state, node.reason = state, reason
            self.mutations.append((operation, name, reason))
            return node.status()

    def drain(self, node: str, reason: str) -> NodeStatus:
        return self._take_out("drain", node, reason, "IDLE+DRAIN")

    def reboot(self, node: str, reason: str) -> NodeStatus:
        return self._take_out("reboot", node, reason, "IDLE+DRAIN+REBOOT_REQUESTED")

    def resume(self, node: str) -> NodeStatus:
        with self._lock:
            self._enter("resume", node)
            n = self._get(node)
            if not (n.unavailable and n.reason.startswith(REASON_PREFIX)):
                raise ActuatorError(
                    f"resume: node {node} is not drained by gpufleet (state {n.state}, reason {n.reason!r}); refused",
                    transient=False,
                )
            n.state, n.reason = "IDLE", ""
            self.mutations.append(("resume", node, ""))
            return n.status()

    def ping(self) -> None:
        with self._lock:
            self._enter("ping")

