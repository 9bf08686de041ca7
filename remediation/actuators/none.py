"""No scheduler at all: for notify-only deployments (``--actuator none``).

It records nothing and acts on nothing. Its view is empty (so no cap is ever
near), ``node()`` knows nothing about any node (``state="unknown"``; it exists as
far as the alert says), ``ping()`` always succeeds, and every action raises a
non-transient ActuatorError, so a policy that asks for a drain in a notify-only
deployment shows up in the audit log as the configuration error it is instead of
pretending to have acted.
"""

from __future__ import annotations

from remediation.actuators.base import ActuatorError, NodeStatus

__all__ = ["NoneActuator"]


class NoneActuator:
    name = "none"

    def nodes(self) -> dict[str, NodeStatus]:
        return {}

    def node(self, name: str) -> NodeStatus:
        return NodeStatus(name=name, state="unknown", extra={"actuator": "none"})

    def ping(self) -> None:
        return None

    def _refuse(self, action: str, node: str) -> ActuatorError:
        return ActuatorError(f"{action} {node}: the 'none' actuator acts on nothing (notify-only deployment); "
                             "choose --actuator slurm|slurmrestd|kubernetes|exec to act", transient=False)

    def drain(self, node: str, reason: str) -> NodeStatus:
        raise self._refuse("drain", node)

    def reboot(self, node: str, reason: str) -> NodeStatus:
        raise self._refuse("reboot", node)

    def resume(self, node: str) -> NodeStatus:
        raise self._refuse("resume", node)
