"""``gpufleet``: the umbrella command line. ``gpufleet remediation ...`` wraps the
remediation service's admin API (remediation/service.py); the other areas (``AREAS``)
live in their own packages.

    gpufleet remediation status
    gpufleet remediation history [--limit N] [--node NODE]
    gpufleet remediation audit [--limit N]
    gpufleet remediation approve ID | deny ID
    gpufleet remediation resume NODE
    gpufleet remediation pause | unpause | reset-breaker

Common options (before or after the subcommand): ``--url`` (default
http://127.0.0.1:9847, env GPUFLEET_REMEDIATION_URL), ``--token-file`` (the admin
token; env GPUFLEET_ADMIN_TOKEN_FILE), ``--who`` (recorded in the audit; default
$USER@host), ``--json`` (the API's answer as JSON instead of tables), ``--timeout``,
``--ca-file`` (an https service with a private CA).
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:9847"

# Exit statuses (also in --help).
OK, FAILED, USAGE, UNREACHABLE, UNAUTHORIZED, NOT_FOUND, CONFLICT = 0, 1, 2, 3, 4, 5, 6

EPILOG = """\
exit status: 0 done; 1 the service failed (5xx) or answered something unexpected;
2 usage error or a request the service rejected (400/413/415/422); 3 the service
cannot be reached; 4 unauthorized (401/403: check --token-file); 5 not found (404:
no such action or node); 6 conflict (409: e.g. the action is not pending, the node
is not drained by gpufleet).
"""


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def default_who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in a container
        user = os.environ.get("USER") or f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# ---- HTTP -----------------------------------------------------------------------------------


class Client:
    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0, ca_file: str | None = None):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.verify: bool | str = ca_file or True
        self.session = requests.Session()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                body: dict[str, Any] | None = None) -> Any:  # fmt: skip
        target = f"{self.url}/api/v1/{path}"
        try:
            resp = self.session.request(method, target, params=params, json=body, headers=self._headers(),
                                        timeout=self.timeout, verify=self.verify, allow_redirects=False)  # fmt: skip
        except requests.exceptions.SSLError as exc:
            raise CliError(f"TLS error talking to {self.url}: {exc} (use --ca-file for a private CA)", UNREACHABLE) from None
        except requests.ConnectionError:
            raise CliError(f"cannot connect to the remediation service at {self.url} (is gpufleet-remediation "
                           "running there? see --url)", UNREACHABLE) from None  # fmt: skip
        except requests.Timeout:
            raise CliError(f"the remediation service at {self.url} did not answer within {self.timeout:g}s",
                           UNREACHABLE) from None  # fmt: skip
        except requests.RequestException as exc:
            raise CliError(f"request to {target} failed: {exc}", UNREACHABLE) from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.ok and data is not None:
            return data
        message = data.get("error") if isinstance(data, dict) else None
        message = message or (resp.text.strip()[:300] or resp.reason)
        if isinstance(data, dict) and data.get("details"):
            message += ": " + "; ".join(f"{d.get('loc')}: {d.get('msg')}" for d in data["details"])
        code = resp.status_code
        if code in (401, 403):
            hint = "" if self.token else " (no token given: pass --token-file or set GPUFLEET_ADMIN_TOKEN_FILE)"
            raise CliError(f"unauthorized (HTTP {code}): {message}{hint}", UNAUTHORIZED)
        if code == 404:
            raise CliError(f"not found (HTTP 404): {message}", NOT_FOUND)
        if code == 409:
            raise CliError(f"conflict (HTTP 409): {message}", CONFLICT)
        if code in (400, 413, 415, 422):
            raise CliError(f"rejected (HTTP {code}): {message}", USAGE)
        if resp.ok:
            raise CliError(f"unexpected answer from {target}: not JSON", FAILED)
        raise CliError(f"the remediation service failed (HTTP {code}): {message}", FAILED)


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise CliError(f"--token-file {path}: {exc.strerror or exc}", USAGE) from None
    if not token:
        raise CliError(f"--token-file {path} is empty", USAGE)
    return token


# ---- tables ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns; the last column is never padded or cut."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        return "  (none)"
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) for i, v in enumerate(values[:-1])]
        return "  " + "  ".join([*parts, values[-1]]).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return " ".join(str(value).split())


def _time(iso: str | None) -> str:
    return (iso or "-").replace("T", " ").replace("Z", "")


def show_status(s: dict[str, Any]) -> str:
    b = s["breaker"]
    if b["open"]:
        breaker = f"OPEN since {_time(b['opened_at'])}: {b['reason']} (reset: gpufleet remediation reset-breaker)"
    else:
        breaker = (f"closed ({b['failures_in_window']}/{b['failures_to_trip']} failures, "
                   f"{b['cap_hits_in_window']}/{b['cap_hits_to_trip']} cap hits in {b['window_seconds']:g}s)")  # fmt: skip
    paused = f"yes, by {s['paused_by']} since {_time(s['paused_at'])}" if s["paused"] else "no"
    rl = s["rate_limit"]
    out = [
        f"dry-run:     {'yes (nothing changes in the scheduler)' if s['dry_run'] else 'no'}",
        f"paused:      {paused}",
        f"breaker:     {breaker}",
        f"rate limit:  {rl['tokens']:g} of {rl['burst']} tokens ({rl['actions_per_hour']:g} actions/hour)",
    ]
    un = s.get("unavailable") or {}
    if "error" in un:
        out.append(f"unavailable: the scheduler could not be read: {un['error']}")
    else:
        out.append(f"unavailable: {un.get('total', 0)} nodes (gpufleet's: {un.get('ours', 0)}),"
                   f" cluster limit {un.get('limit')}")  # fmt: skip
        parts = un.get("partitions") or {}
        if parts:
            out.append(table(["PARTITION", "NODES", "UNAVAILABLE", "LIMIT", "RATIO"],
                             [[p, v["nodes"], v["unavailable"], v["limit"], f"{v['ratio']:.0%}"]
                              for p, v in sorted(parts.items())]))  # fmt: skip
    out.append("\npending approvals:")
    out.append(table(["ID", "NODE", "ACTION", "RULE", "CREATED", "REASON"],
                     [[a["id"], a["node"], a["action"], a["rule"], _time(a["created_at"]), a["reason"]]
                      for a in s["pending_approvals"]]))  # fmt: skip
    out.append("\nscheduled resumes:")
    out.append(table(["ID", "NODE", "DUE", "RULE", "REASON"],
                     [[a["id"], a["node"], _time(a["due_at"]), a["rule"], a["reason"]]
                      for a in s["scheduled_resumes"]]))  # fmt: skip
    out.append("\nnodes held by gpufleet:")
    out.append(table(["NODE", "SINCE", "RULE", "AUTO-RESUME", "ACTION", "REASON"],
                     [[o["node"], _time(o["since"]), o["rule"], o["auto_resume"], o["action_id"], o["reason"]]
                      for o in s["owned_nodes"]]))  # fmt: skip
    out.append("\nflapping nodes (a human resumes them):")
    out.append(table(["NODE", "SINCE", "REASON"], [[f["node"], _time(f["since"]), f["reason"]] for f in s["flapping"]]))
    return "\n".join(out)


def show_history(data: dict[str, Any]) -> str:
    rows = []
    for h in data["history"]:
        action = h.get("action") or "-"
        if h.get("action_id"):
            action = f"{action} #{h['action_id']} ({h.get('action_state') or '?'})"
        rows.append([h["id"], _time(h.get("at_iso")), h.get("node") or "-", h.get("alertname") or "-",
                     h["decision"], action, h.get("who"), h.get("reason")])  # fmt: skip
    return table(["ID", "TIME", "NODE", "ALERT", "DECISION", "ACTION", "WHO", "REASON"], rows)


def show_audit(data: dict[str, Any]) -> str:
    return table(["ID", "TIME", "WHO", "WHAT", "TARGET", "DETAIL"],
                 [[a["id"], _time(a.get("at_iso")), a["who"], a["what"], a.get("target") or "-", a.get("detail")]
                  for a in data["audit"]])  # fmt: skip


def show_decision(d: dict[str, Any]) -> str:
    action = f"action {d['action_id']}" if d.get("action_id") else (d.get("action") or "")
    state = f" (now {d['state']})" if d.get("state") else ""
    return f"{d['decision']}: {d['reason']}" + (f" [{action}{state}]" if action else "")


# ---- commands -------------------------------------------------------------------------------


def _post(client: Client, path: str, who: str) -> Any:
    return client.request("POST", path, body={"who": who})


COMMANDS: dict[str, tuple[str, Callable[[Client, argparse.Namespace], Any], Callable[[Any], str]]] = {
    "status": ("dry-run, pause, breaker, caps, pending approvals, nodes held",
               lambda c, a: c.request("GET", "status"), show_status),
    "history": ("decisions and their actions, newest first",
                lambda c, a: c.request("GET", "history", params={"limit": a.limit, **({"node": a.node} if a.node else {})}),
                show_history),
    "audit": ("admin calls and engine events, newest first",
              lambda c, a: c.request("GET", "audit", params={"limit": a.limit}), show_audit),
    "approve": ("approve a pending action (it runs through the guardrails again)",
                lambda c, a: _post(c, f"actions/{a.id}/approve", a.who), show_decision),
    "deny": ("deny a pending action", lambda c, a: _post(c, f"actions/{a.id}/deny", a.who), show_decision),
    "resume": ("resume a node gpufleet drained (refused for anyone else's drain)",
               lambda c, a: _post(c, f"nodes/{a.node}/resume", a.who), show_decision),
    "pause": ("stop all new actions (alerts are still recorded)",
              lambda c, a: _post(c, "pause", a.who), lambda d: f"paused by {d['by']}: no new actions until unpause"),
    "unpause": ("allow new actions again", lambda c, a: _post(c, "unpause", a.who),
                lambda d: f"unpaused by {d['by']}"),
    "reset-breaker": ("close the circuit breaker (earlier failures stop counting)",
                      lambda c, a: _post(c, "breaker/reset", a.who),
                      lambda d: f"breaker closed by {d['by']} (it was {'open' if d['was_open'] else 'already closed'})"),
}  # fmt: skip


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The shared options, accepted before and after the subcommand (the later wins)."""
    d = (lambda v: v) if top else (lambda _v: argparse.SUPPRESS)
    parser.add_argument("--url", default=d(os.environ.get("GPUFLEET_REMEDIATION_URL", DEFAULT_URL)),
                        help=f"the service's address (default {DEFAULT_URL}; env GPUFLEET_REMEDIATION_URL)")
    parser.add_argument("--token-file", default=d(os.environ.get("GPUFLEET_ADMIN_TOKEN_FILE")), metavar="FILE",
                        help="file with the admin bearer token (env GPUFLEET_ADMIN_TOKEN_FILE)")
    parser.add_argument("--who", default=d(None), help="who you are, for the audit (default $USER@host)")
    parser.add_argument("--json", action="store_true", default=d(False), help="print the API's JSON answer")
    parser.add_argument("--timeout", type=float, default=d(30.0), help="seconds to wait for the service (default 30)")
    parser.add_argument("--ca-file", default=d(None), metavar="FILE", help="CA bundle for an https service")


# Other areas of the umbrella command, by module. Each module has ``HELP`` (one line),
# ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status); it imports its
# heavy dependencies inside ``run`` so that ``gpufleet --help`` stays fast.
AREAS: dict[str, str] = {
    "dashboards": "dashboards.cli",
    "demo": "demo.cli",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpufleet", description="gpufleet command line.")
    sub = p.add_subparsers(dest="area", metavar="AREA", required=True)
    for area, module_name in AREAS.items():
        module = importlib.import_module(module_name)
        ap = sub.add_parser(area, help=module.HELP, description=module.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(ap)
    rem = sub.add_parser("remediation", help="the remediation service's admin API", epilog=EPILOG,
                         description="Talk to gpufleet-remediation's admin API (/api/v1/).",
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _common(rem, top=True)
    cmds = rem.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _call, _show) in COMMANDS.items():
        c = cmds.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        _common(c, top=False)
        if name in ("approve", "deny"):
            c.add_argument("id", type=int, help="the action's id (gpufleet remediation status)")
        if name == "resume":
            c.add_argument("node", help="the node to return to service")
        if name in ("history", "audit"):
            c.add_argument("--limit", type=int, default=50, help="how many rows (default 50)")
        if name == "history":
            c.add_argument("--node", help="only this node")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.area in AREAS:
        return importlib.import_module(AREAS[args.area]).run(args)
    args.who = args.who or default_who()
    _help, call, show = COMMANDS[args.command]
    try:
        token = read_token_file(args.token_file) if args.token_file else None
        client = Client(args.url, token, timeout=args.timeout, ca_file=args.ca_file)
        data = call(client, args)
    except CliError as exc:
        print(f"gpufleet remediation {args.command}: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(show(data))
    return OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
