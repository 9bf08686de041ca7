"""Slurm through slurmrestd: ``POST /slurm/<version>/node/<name>``.

The client is the Slurm exporter's ``RestSource`` (http(s) or ``unix:///path``
sockets, ``X-SLURM-USER-NAME``/``X-SLURM-USER-TOKEN`` headers, the token re-read when
its file changes, API version negotiated from ``/openapi/v3``), so the two speak to
slurmrestd identically. Nodes are parsed by ``exporters.slurm_data`` and judged by the
same rules as the scontrol actuator (``slurm.node_status``).

Versions. Reading works with every version the exporter knows (v0.0.38 .. v0.0.41).
Changing a node needs ``POST /slurm/<v>/node/{node_name}``, which slurmrestd offers
from v0.0.39 (Slurm 23.02) on, with the body ``update_node_msg``: ``{"state":
["DRAIN"], "reason": "..."}`` (the same field names in v0.0.39, v0.0.40 and v0.0.41;
``state`` is a list of flags, ``RESUME`` to resume). Debian 12's slurmrestd 22.05
speaks v0.0.38 (and v0.0.37), whose ``/node/{node_name}`` is GET only (POST answers
405): against it every action fails with a clear, non-transient error naming the
scontrol actuator instead. The write version is the best one whose OpenAPI document
lists that POST, negotiated once and again after a 404 (an upgraded slurmrestd).

Reboot: slurmrestd has no counterpart of ``scontrol reboot`` (no endpoint, and
``update_node_msg`` cannot request one), so ``reboot`` raises a non-transient
ActuatorError; sites that want reboots use the scontrol actuator (or exec).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import requests

from exporters.slurm_data import ParseError, nodes_from_json
from exporters.slurm_source import SUPPORTED_VERSIONS, RestSource, SourceError
from remediation.actuators.base import ActuatorError, NodeStatus
from remediation.actuators.slurm import (
    SlurmActing,
    check_node_name,
    classify,
    node_status,
    sanitize_reason,
    state_flags,
)

__all__ = ["SlurmRestActuator"]

_VERSION = re.compile(r"^/slurm/(v\d+\.\d+\.\d+)/node/\{node_name\}/?$")
# Slurm's ESLURM_INVALID_NODE_NAME.
_INVALID_NODE_NAME = 2018


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v[1:].split("."))


class SlurmRestActuator(SlurmActing):
    """slurmrestd at ``url`` (``http(s)://host:port`` or ``unix:///path/to.socket``).

    ``token_file``: a JWT (bare, or ``scontrol token``'s ``SLURM_JWT=`` line), sent as
    ``X-SLURM-USER-TOKEN``; ``user``: ``X-SLURM-USER-NAME``. Neither is needed over a
    unix socket with ``rest_auth/local``.
    """

    name = "slurmrestd"

    def __init__(
        self,
        url: str,
        token_file: str | None = None,
        user: str | None = None,
        timeout: float = 10.0,
        *,
        ca_file: str | None = None,
        versions: Sequence[str] = SUPPORTED_VERSIONS,
        settle_timeout: float = 10.0,
        poll_interval: float = 0.2,
    ):
        self._src = RestSource(url, token_file=token_file or "", user=user or "", timeout=timeout,
                               ca_file=ca_file or "", versions=versions)
        self.url = url
        self.timeout = timeout
        self.settle_timeout = settle_timeout
        self.poll_interval = poll_interval
        self._write_version: str | None = None  # None: not negotiated; "": none offered
        self._offered: list[str] = []

    def close(self) -> None:
        self._src.close()

    # -- plumbing (RestSource's session, headers and error text) -------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        try:
            headers = self._src._headers()
        except SourceError as exc:
            raise ActuatorError(str(exc), transient=False) from None
        try:
            return self._src.session.request(method, self._src.base + path, headers=headers, json=body,
                                             timeout=self.timeout)
        except requests.Timeout:
            raise ActuatorError(f"{method} {path} timed out after {self.timeout:g}s", transient=True) from None
        except requests.RequestException as exc:
            raise ActuatorError(f"{method} {path} failed: {type(exc).__name__}: {exc}", transient=True) from None

    @staticmethod
    def _errors(resp: requests.Response) -> list[dict[str, Any]]:
        try:
            errors = resp.json().get("errors") or []
        except (ValueError, AttributeError):
            return []
        return [e for e in errors if isinstance(e, dict)]

    def _fail(self, what: str, resp: requests.Response) -> ActuatorError:
        # Both words of each error: "description" says what failed, "error" why
        # (e.g. "Unable to contact slurm controller", which is what makes it transient).
        errs = self._errors(resp)
        parts = [" ".join(dict.fromkeys(str(e[k]) for k in ("description", "error") if e.get(k))) for e in errs]
        text = "; ".join(p for p in parts if p) or RestSource._error_text(resp)
        if resp.status_code in (401, 403):
            return ActuatorError(f"{what}: HTTP {resp.status_code} from slurmrestd: {text} "
                                 "(check the token file and user)", transient=False)
        transient = resp.status_code in (429, 502, 503, 504) or classify(text)
        return ActuatorError(f"{what}: HTTP {resp.status_code}: {text}", transient=transient)

    def _read_version(self) -> str:
        if not self._src.version:
            try:
                self._src.version = self._src.negotiate()
            except SourceError as exc:
                text = str(exc.args[0])
                denied = bool(re.search(r"HTTP 40[13]|token file", text))
                raise ActuatorError(f"slurmrestd at {self.url}: {text}", transient=not denied) from None
        return self._src.version

    def _negotiate_write(self) -> str:
        """The best API version whose OpenAPI document offers POST /node/{node_name}."""
        resp = self._request("GET", "/openapi/v3")
        if resp.status_code != 200:
            raise self._fail("GET /openapi/v3", resp)
        try:
            paths = resp.json().get("paths") or {}
        except (ValueError, AttributeError):
            raise ActuatorError("slurmrestd's /openapi/v3 is not a JSON object", transient=True) from None
        writable: set[str] = set()
        offered: set[str] = set()
        for path, ops in paths.items():
            m = _VERSION.match(path)
            if m:
                offered.add(m.group(1))
                if isinstance(ops, dict) and "post" in ops:
                    writable.add(m.group(1))
        self._offered = sorted(offered, key=_vkey)
        for v in self._src.versions:
            if v in writable:
                return v
        newer = sorted((v for v in writable if _vkey(v) > (0, 0, 38)), key=_vkey, reverse=True)
        return newer[0] if newer else ""

    def _write(self) -> str:
        if self._write_version is None:
            self._write_version = self._negotiate_write()
        if not self._write_version:
            raise ActuatorError(
                f"slurmrestd at {self.url} cannot change nodes: no offered API version "
                f"({', '.join(self._offered) or 'none'}) has POST /node/{{node_name}} (v0.0.39+, Slurm 23.02+); "
                "use the scontrol actuator (--actuator slurm)", transient=False)
        return self._write_version

    # -- reading -------------------------------------------------------------------
    def _nodes_doc(self, path: str) -> tuple[int, Any, requests.Response]:
        resp = self._request("GET", path)
        if resp.status_code == 404 and not self._errors(resp):
            self._src.version = ""  # an upgraded slurmrestd dropped our version: negotiate again
            self._write_version = None
            raise ActuatorError(f"HTTP 404 for {path}; renegotiating the API version", transient=True)
        try:
            return resp.status_code, resp.json(), resp
        except ValueError:
            raise self._fail(f"GET {path}", resp) from None

    @staticmethod
    def _parse(doc: Any) -> list[NodeStatus]:
        try:
            nodes, _ = nodes_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise ActuatorError(f"unexpected slurmrestd node document: {exc}", transient=False) from None
        return [node_status(n) for n in nodes]

    def nodes(self) -> dict[str, NodeStatus]:
        path = f"/slurm/{self._read_version()}/nodes"
        status, doc, resp = self._nodes_doc(path)
        if status != 200 or self._errors(resp):
            raise self._fail(f"GET {path}", resp)
        return {s.name: s for s in self._parse(doc)}

    def node(self, name: str) -> NodeStatus:
        check_node_name(name)
        path = f"/slurm/{self._read_version()}/node/{quote(name, safe='')}"
        status, doc, resp = self._nodes_doc(path)
        errors = self._errors(resp)
        if any(e.get("error_number", e.get("errno")) == _INVALID_NODE_NAME
               or "invalid node name" in str(e.get("error", "")).lower() for e in errors):
            return NodeStatus(name=name, exists=False)
        if status != 200 or errors:
            raise self._fail(f"GET {path}", resp)
        found = [s for s in self._parse(doc) if s.name == name]
        return found[0] if found else NodeStatus(name=name, exists=False)

    def ping(self) -> None:
        path = f"/slurm/{self._read_version()}/ping"
        resp = self._request("GET", path)
        if resp.status_code != 200:
            raise self._fail(f"GET {path}", resp)
        try:
            pings = resp.json().get("pings") or []
        except (ValueError, AttributeError):
            pings = []
        # 22.05: {"ping": "UP"}; 23.02+: {"pinged": "UP", "responding": true}.
        up = any(isinstance(p, dict) and (p.get("ping") == "UP" or p.get("pinged") == "UP" or p.get("responding") is True)
                 for p in pings)
        if not up:
            raise ActuatorError(f"slurmrestd answers but no slurmctld is UP: {pings}", transient=True)

    # -- acting ----------------------------------------------------------------------
    def _update(self, node: str, body: dict[str, Any]) -> None:
        path = f"/slurm/{self._write()}/node/{quote(node, safe='')}"
        resp = self._request("POST", path, body)
        if resp.status_code == 404 and not self._errors(resp):
            self._write_version = None
            self._src.version = ""
            raise ActuatorError(f"HTTP 404 for POST {path}; renegotiating the API version", transient=True)
        if resp.status_code == 405:
            self._write_version = None
            raise ActuatorError(f"slurmrestd refuses POST {path} (405): no node update in this version",
                                transient=False)
        if resp.status_code != 200 or self._errors(resp):
            raise self._fail(f"POST {path}", resp)

    def drain(self, node: str, reason: str) -> NodeStatus:
        check_node_name(node)
        self._write()  # fail before reading when this slurmrestd cannot write at all
        self._check_free_or_ours(node, "drain")
        text = sanitize_reason(reason)
        self._update(node, {"state": ["DRAIN"], "reason": text})
        return self._wait(node, lambda s: "DRAIN" in state_flags(s) and s.ours, "DRAIN",
                          settled=lambda s: s.reason == text)

    def reboot(self, node: str, reason: str) -> NodeStatus:
        raise ActuatorError(
            "slurmrestd has no reboot operation (nothing like 'scontrol reboot ASAP nextstate=RESUME'); "
            "use the scontrol actuator (--actuator slurm) for reboot rules", transient=False)

    def resume(self, node: str) -> NodeStatus:
        check_node_name(node)
        self._write()
        st = self.node(node)
        if not st.exists:
            raise ActuatorError(f"resume {node}: Slurm does not know this node", transient=False)
        if not st.ours:
            raise ActuatorError(
                f"resume {node}: not taken out of service by gpufleet (state {st.state}, reason {st.reason!r})",
                transient=False)
        self._update(node, {"state": ["RESUME"]})
        return self._wait(node, lambda s: "DRAIN" not in state_flags(s), "RESUME",
                          settled=lambda s: not s.unavailable)
