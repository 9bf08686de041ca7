"""A site command as the actuator: for schedulers and procedures gpufleet does not know.

The command is an argv (never a shell). The node name is substituted for ``{node}``
in any argument, or appended as the last argument when no argument names it (the
policy's ``exec.command`` convention). The command gets:

* on stdin, one JSON object: ``{"action": "drain"|"reboot"|"resume"|..., "node": ...,
  "reason": ..., "alert": {...} | null}``;
* in its environment: ``GPUFLEET_ACTION``, ``GPUFLEET_NODE`` and ``GPUFLEET_REASON``
  (single-line);
* ``timeout`` seconds, in its own process group, which is killed (SIGKILL) when the
  time is up: a transient ActuatorError.

Exit status 0 is success; 75 (``EX_TEMPFAIL`` of sysexits.h) is a transient failure
(retry later); anything else is a permanent one. Both carry the tail of stderr.

The live view. A command can act but cannot report what the scheduler thinks, and the
engine's caps and ownership rules need exactly that. So ``nodes()``/``node()``/``ping()``
delegate to another actuator passed as ``view`` (``ExecActuator(cmd,
view=SlurmActuator())``), drains and reboots are refused when the view shows the node
unavailable for someone else, resumes unless the view says it is ours, and every
action returns the view's state afterwards. A site command that drains must
therefore leave a mark the view recognises (on Slurm: the reason it was given, which
starts with ``gpufleet:``). Without a view, the Actuator methods raise a non-transient
ActuatorError; ``run()`` (the policy's ``exec`` action: a command per rule, alert on
stdin, no ownership involved) works with or without one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from remediation.actuators.base import Actuator, ActuatorError, NodeStatus

__all__ = ["EX_TEMPFAIL", "ExecActuator", "ExecResult"]

EX_TEMPFAIL = 75
_TAIL = 2000


@dataclass(frozen=True)
class ExecResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _tail(text: str, limit: int = _TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


class ExecActuator:
    """Runs ``command`` for each action; ``view`` supplies the scheduler's live view."""

    name = "exec"

    def __init__(
        self,
        command: Sequence[str],
        timeout: float = 30.0,
        *,
        view: Actuator | None = None,
        env: Mapping[str, str] | None = None,
    ):
        if isinstance(command, str) or not command or not all(isinstance(a, str) and a for a in command):
            raise ValueError("command must be a non-empty list of non-empty strings (argv, no shell)")
        self.command = tuple(command)
        self.timeout = timeout
        self.view = view
        self.env = dict(os.environ if env is None else env)

    # -- running the command ---------------------------------------------------------
    def argv(self, node: str) -> list[str]:
        if any("{node}" in a for a in self.command):
            return [a.replace("{node}", node) for a in self.command]
        return [*self.command, node]

    def run(self, node: str, action: str, *, reason: str = "", alert: Mapping[str, Any] | None = None) -> ExecResult:
        """Run the command for ``action`` on ``node``; ActuatorError unless it exits 0."""
        if not node or node.startswith("-") or any(c in node for c in "\x00\n\r/"):
            raise ActuatorError(f"refusing node name {node!r}", transient=False)
        argv = self.argv(node)
        one_line = " ".join(reason.replace("\x00", " ").split())
        env = {**self.env, "GPUFLEET_ACTION": action, "GPUFLEET_NODE": node, "GPUFLEET_REASON": one_line}
        payload = json.dumps({"action": action, "node": node, "reason": reason,
                              "alert": dict(alert) if alert is not None else None}).encode()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True)
        except OSError as exc:
            raise ActuatorError(f"cannot run {argv[0]}: {exc.strerror or exc}", transient=False) from None
        try:
            out, err = proc.communicate(payload, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            # The whole group: a wrapper's children would otherwise keep the pipes open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise ActuatorError(f"{argv[0]} ({action} {node}) timed out after {self.timeout:g}s; "
                                f"killed its process group. stderr: {_tail(err.decode(errors='replace')) or '(none)'}",
                                transient=True) from None
        result = ExecResult(tuple(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if proc.returncode != 0:
            raise ActuatorError(
                f"{argv[0]} ({action} {node}) exited {proc.returncode}: {_tail(result.stderr) or '(no stderr)'}",
                transient=proc.returncode == EX_TEMPFAIL)
        return result

    # -- the Actuator protocol ------------------------------------------------------------
    def _view(self) -> Actuator:
        if self.view is None:
            raise ActuatorError("the exec actuator cannot see the scheduler: construct it with view=<actuator> "
                                "(e.g. SlurmActuator()) for nodes(), ownership checks and read-back",
                                transient=False)
        return self.view

    def nodes(self) -> dict[str, NodeStatus]:
        return self._view().nodes()

    def node(self, name: str) -> NodeStatus:
        return self._view().node(name)

    def ping(self) -> None:
        """The command is executable, and the view (if any) reaches the scheduler."""
        cmd = self.command[0]
        found = cmd if "/" in cmd else shutil.which(cmd, path=self.env.get("PATH"))
        if not found or not os.access(found, os.X_OK):
            raise ActuatorError(f"{cmd} is not an executable program", transient=False)
        if self.view is not None:
            self.view.ping()

    def _free_or_ours(self, node: str, action: str) -> None:
        st = self._view().node(node)
        if not st.exists:
            raise ActuatorError(f"{action} {node}: the scheduler does not know this node", transient=False)
        if st.unavailable and not st.ours:
            raise ActuatorError(f"{action} {node}: already unavailable for someone else ({st.state}, "
                                f"reason {st.reason!r}); not running {self.command[0]}", transient=False)

    def drain(self, node: str, reason: str, *, alert: Mapping[str, Any] | None = None) -> NodeStatus:
        self._free_or_ours(node, "drain")
        self.run(node, "drain", reason=reason, alert=alert)
        return self._view().node(node)

    def reboot(self, node: str, reason: str, *, alert: Mapping[str, Any] | None = None) -> NodeStatus:
        self._free_or_ours(node, "reboot")
        self.run(node, "reboot", reason=reason, alert=alert)
        return self._view().node(node)

    def resume(self, node: str, *, alert: Mapping[str, Any] | None = None) -> NodeStatus:
        st = self._view().node(node)
        if not st.ours:
            raise ActuatorError(f"resume {node}: not taken out of service by gpufleet "
                                f"({st.state or 'unknown'}, reason {st.reason!r})", transient=False)
        self.run(node, "resume", alert=alert)
        return self._view().node(node)
