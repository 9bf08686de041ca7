"""Slurm's data, parsed: nodes, jobs and partitions from every shape Slurm prints.

Sources and the shapes each one produces:

* ``sinfo --json`` / ``squeue --json`` on 21.08-22.05 (OpenAPI v0.0.37/v0.0.38) and
  slurmrestd ``/slurm/v0.0.38/{nodes,jobs,partitions}``: flat records; a node's
  ``state`` is a lower-case string with flags in ``state_flags``; times are integers.
* 23.02 and newer (data_parser v0.0.39 ... v0.0.41+), CLI and slurmrestd: ``state``
  and ``job_state`` are lists of upper-case flags; times and counts are
  ``{"set": true, "infinite": false, "number": N}``; ``sinfo --json`` prints a
  ``sinfo`` array of per-partition records (``nodes.nodes``, ``node.state``,
  ``cpus``, ``gres.total``/``gres.used``, ``partition``, ``reason``) instead of
  ``nodes``.
* Formatted ``sinfo -N -O ...`` / ``squeue -O ...`` where ``--json`` is missing
  (fields separated by ``\\x1f``, which no Slurm name or reason contains).

Everything ends in the same small records (``Node``, ``Job``, ``Partition``), so
metric building never looks at a version. Parsing is linear in the input: host
lists are expanded with a cache, and nothing is looked up in a list.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = [
    "FIELD_SEP",
    "NODE_STATES",
    "PARTITION_FORMAT",
    "SINFO_FIELDS",
    "SQUEUE_FIELDS",
    "TERMINAL_JOB_STATES",
    "Job",
    "Node",
    "ParseError",
    "Partition",
    "Snapshot",
    "expand_hostlist",
    "format_arg",
    "gpu_count",
    "job_gpus",
    "jobs_from_json",
    "jobs_from_text",
    "nodes_from_json",
    "nodes_from_text",
    "normalise_node_state",
    "partitions_from_json",
    "partitions_from_text",
    "pending_reason",
    "rfc3339",
    "slurm_version",
    "tres_gpus",
    "utc_epoch",
]

#: Normalised node states, in the order they are exported (one-hot).
NODE_STATES = ("idle", "allocated", "mixed", "drained", "draining", "down", "fail", "maint", "reserved", "unknown")

#: Finished jobs that squeue/slurmrestd still list for MinJobAge; never exported.
TERMINAL_JOB_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
    "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT",
})

#: Separator of the formatted fallback (``-O Field:\x1f``): no node, job or reason contains it.
FIELD_SEP = "\x1f"


class ParseError(ValueError):
    """Slurm's output is not what any supported version prints."""


@dataclass(slots=True)
class Node:
    name: str
    state: str  # one of NODE_STATES
    not_responding: bool = False
    raw_state: str = ""
    cpus: int = 0
    cpus_allocated: int = 0
    gpus: int = 0
    gpus_allocated: int = 0
    partitions: list[str] = field(default_factory=list)
    reason: str = ""
    reason_user: str = ""
    reason_time: float = 0.0


@dataclass(slots=True)
class Job:
    job_id: str
    state: str  # upper case: RUNNING, PENDING, ...
    partition: str = ""
    user: str = ""
    account: str = ""
    name: str = ""
    reason: str = ""
    nodes: list[str] = field(default_factory=list)
    gpus: int = 0
    start_time: float = 0.0


@dataclass(slots=True)
class Partition:
    name: str
    state: str = "unknown"  # up, down, drain, inactive
    default: bool = False


@dataclass
class Snapshot:
    nodes: list[Node]
    jobs: list[Job]
    partitions: list[Partition]
    timestamp: float = 0.0
    backend: str = ""
    api_version: str = ""
    slurm_version: str = ""


# -- small value helpers ---------------------------------------------------------
def _number(v: Any) -> float | None:
    """A plain number, or the v0.0.39+ ``{"set", "infinite", "number"}`` wrapper."""
    if isinstance(v, dict):
        if not v.get("set", True) or v.get("infinite"):
            return None
        v = v.get("number")
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return v
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _int(v: Any) -> int:
    n = _number(v)
    return int(n) if n is not None and n >= 0 else 0


def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return str(v)


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts > 0 else ""


def _parse_local_time(text: str) -> float:
    """``2026-11-26T11:16:26`` as Slurm prints it (local time) -> epoch; 0 if unknown."""
    text = text.strip()
    if not text or text in ("Unknown", "N/A", "None", "(null)"):
        return 0.0
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return 0.0


def utc_epoch(text: str) -> float:
    """RFC 3339 UTC back to epoch (tests and tools)."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


# -- host lists -------------------------------------------------------------------
def _split_top(text: str, sep: str = ",", open_: str = "[", close: str = "]") -> Iterator[str]:
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
        elif ch == sep and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def _expand_one(expr: str) -> list[str]:
    lb = expr.find("[")
    if lb < 0:
        return [expr]
    rb = expr.find("]", lb)
    if rb < 0:
        raise ParseError(f"unbalanced host list {expr!r}")
    prefix, body, rest = expr[:lb], expr[lb + 1 : rb], expr[rb + 1 :]
    tails = _expand_one(rest)
    out: list[str] = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not dash:
            out.extend(prefix + lo + t for t in tails)
            continue
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise ParseError(f"bad range {part!r} in host list {expr!r}")
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            num = str(n).zfill(width)
            out.extend(prefix + num + t for t in tails)
    return out


@lru_cache(maxsize=65536)
def _expand_cached(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for expr in _split_top(text):
        expr = expr.strip()
        if expr:
            out.extend(_expand_one(expr))
    return tuple(out)


def expand_hostlist(text: str | None) -> list[str]:
    """``gpu-node-[1-3,7]``, ``rack[1-2]-n[01-02]``, ``a,b`` -> node names, in order."""
    if not text or text in ("(null)", "None", "N/A"):
        return []
    return list(_expand_cached(text))


# -- GRES and TRES ---------------------------------------------------------------
def _gres_items(text: str) -> Iterator[str]:
    """Comma-separated GRES items; commas inside ``(IDX:0-1,4-5)`` do not split."""
    return _split_top(text, ",", "(", ")")


@lru_cache(maxsize=4096)
def gpu_count(text: str | None) -> int:
    """GPUs in a GRES string: ``gpu:h100:8(IDX:0-7)``, ``gpu:(null):3``, ``gpu:8``, ``gpu:a:2,gpu:b:1``.

    Other GRES (``tmpsize:7T``, ``mps:100``) are ignored; a type without a count
    (``gpu:h100``) counts 1, as Slurm reads it.
    """
    if not text or text in ("N/A", "(null)"):
        return 0
    total = 0
    for item in _gres_items(text):
        item = item.strip()
        if item.startswith(("gres:", "gres/")):
            item = item[5:]
        if not (item == "gpu" or item.startswith("gpu:")):
            continue
        if item.endswith(")") and not item.endswith(":(null)"):
            item = item[: item.rfind("(")]
        parts = item.split(":")
        last = parts[-1]
        if len(parts) == 1:
            total += 1
        elif last.isdigit():
            total += int(last)
        elif len(parts) == 2:
            total += 1  # gpu:TYPE
        else:
            raise ParseError(f"cannot read GPU count in GRES {item!r}")
    return total


@lru_cache(maxsize=4096)
def tres_gpus(text: str | None) -> int | None:
    """``gres/gpu=N`` of a TRES string (``cpu=2,mem=4G,gres/gpu=2,gres/gpu:h100=2``), None if absent."""
    if not text:
        return None
    for item in text.split(","):
        key, _, val = item.partition("=")
        if key == "gres/gpu":
            try:
                return int(val)
            except ValueError:
                return None
    return None


def job_gpus(gres_detail: Any, tres_alloc: Any, tres_per_node: Any, node_count: int) -> int:
    """GPUs allocated to a job: per-node ``gres_detail``, else ``gres/gpu`` TRES, else request x nodes."""
    if isinstance(gres_detail, list) and gres_detail:
        return sum(gpu_count(d) for d in gres_detail if isinstance(d, str))
    n = tres_gpus(tres_alloc) if isinstance(tres_alloc, str) else None
    if n is not None:
        return n
    if isinstance(tres_per_node, str) and tres_per_node not in ("", "N/A", "(null)"):
        return gpu_count(tres_per_node) * max(node_count, 1)
    return 0


# -- states --------------------------------------------------------------------------
_BASE_STATES = {"IDLE", "ALLOCATED", "MIXED", "DOWN", "UNKNOWN", "ERROR", "FUTURE"}
# sinfo's short and long spellings that fold a flag into the name.
_STATE_ALIASES: dict[str, tuple[str, ...]] = {
    "ALLOC": ("ALLOCATED",),
    "MIX": ("MIXED",),
    "DRAINED": ("IDLE", "DRAIN"),
    "DRAIN": ("IDLE", "DRAIN"),  # as the first word, sinfo's short 'drain' means drained
    "DRAINING": ("ALLOCATED", "DRAIN"),
    "DRNG": ("ALLOCATED", "DRAIN"),
    "FAILING": ("ALLOCATED", "FAIL"),
    "FAIL": ("IDLE", "FAIL"),
    "RESV": ("IDLE", "RESERVED"),
    "RESERVED": ("IDLE", "RESERVED"),
    "MAINT": ("IDLE", "MAINT"),
    "COMP": ("ALLOCATED", "COMPLETING"),
    "COMPLETING": ("ALLOCATED", "COMPLETING"),
    "PLND": ("IDLE", "PLANNED"),
    "PLANNED": ("IDLE", "PLANNED"),
    "NPC": ("IDLE",),
    "INVAL": ("UNKNOWN",),
    "UNK": ("UNKNOWN",),
}
_SUFFIX_FLAGS = {"*": "NOT_RESPONDING", "$": "MAINT", "~": "POWERED_DOWN", "#": "POWERING_UP",
                 "%": "POWERING_DOWN", "!": "POWER_DOWN", "@": "REBOOT_REQUESTED", "^": "REBOOT_ISSUED",
                 "-": "PLANNED"}


def _state_tokens(state: Any, flags: Any = None) -> list[str]:
    """Upper-case tokens: the base state first (sinfo's spellings expanded), then flags."""
    out: list[str] = []
    if isinstance(state, list):  # 23.02+ JSON: canonical names, base and flags together
        out = [str(s).upper() for s in state]
    else:
        for i, tok in enumerate(t.upper() for t in re.split(r"[+\s]+", str(state or "").strip()) if t):
            while tok and tok[-1] in _SUFFIX_FLAGS:
                out.append(_SUFFIX_FLAGS[tok[-1]])
                tok = tok[:-1]
            if tok:
                out.extend(_STATE_ALIASES.get(tok, (tok,)) if i == 0 else (tok,))
    if isinstance(flags, list):
        out.extend(str(f).upper() for f in flags)
    return out


@lru_cache(maxsize=1024)
def _normalise(tokens: tuple[str, ...]) -> tuple[str, bool]:
    flags = set(tokens)
    base = next((t for t in tokens if t in _BASE_STATES), "UNKNOWN")
    not_responding = "NOT_RESPONDING" in flags
    if base == "DOWN":
        state = "down"
    elif "FAIL" in flags:
        state = "fail"
    elif "DRAIN" in flags:
        busy = base in ("ALLOCATED", "MIXED") or "COMPLETING" in flags
        state = "draining" if busy else "drained"
    elif "MAINT" in flags:
        state = "maint"
    elif base == "IDLE" and "RESERVED" in flags:
        state = "reserved"
    elif base in ("IDLE", "ALLOCATED", "MIXED"):
        state = base.lower()
    else:
        state = "unknown"
    return state, not_responding


def normalise_node_state(state: Any, flags: Any = None) -> tuple[str, bool]:
    """Slurm's node state (any spelling) -> (one of NODE_STATES, not_responding).

    ``IDLE+DRAIN`` -> drained, ``MIXED+DRAIN`` -> draining, ``DOWN+NOT_RESPONDING`` ->
    (down, True), ``["IDLE", "DRAIN"]``, ``"mixed"`` + ``state_flags=["DRAIN"]``,
    ``down*``, ``drng``, ``idle+drain+not_responding``.
    """
    return _normalise(tuple(_state_tokens(state, flags)))


def _raw_state(state: Any, flags: Any = None) -> str:
    tokens = list(state) if isinstance(state, list) else [str(state or "")]
    if isinstance(flags, list):
        tokens += flags
    return "+".join(str(t).upper() for t in tokens if t)


def pending_reason(reason: str) -> str:
    """A bounded reason code: ``ReqNodeNotAvail, UnavailableNodes:n[1-3]`` -> ``ReqNodeNotAvail``."""
    reason = (reason or "").strip().strip("()")
    for sep in (",", ":"):
        reason = reason.split(sep, 1)[0]
    return reason.strip() or "None"


# -- JSON: nodes -------------------------------------------------------------------
def _node_from_record(n: Mapping[str, Any]) -> Node:
    """A flat node record: sinfo --json (v0.0.37/38) or slurmrestd /nodes (any version)."""
    state, nr = normalise_node_state(n.get("state"), n.get("state_flags"))
    gres_used = n.get("gres_used")
    gpus_alloc = gpu_count(gres_used) if isinstance(gres_used, str) and gres_used else None
    if gpus_alloc is None:
        gpus_alloc = tres_gpus(n.get("tres_used")) or 0
    return Node(
        name=_str(n.get("name")),
        state=state,
        not_responding=nr,
        raw_state=_raw_state(n.get("state"), n.get("state_flags")),
        cpus=_int(n.get("cpus")),
        cpus_allocated=_int(n.get("alloc_cpus")),
        gpus=gpu_count(_str(n.get("gres"))),
        gpus_allocated=gpus_alloc,
        partitions=[str(p) for p in (n.get("partitions") or [])],
        reason=_str(n.get("reason")),
        reason_user=_str(n.get("reason_set_by_user")),
        reason_time=float(_number(n.get("reason_changed_at")) or 0),
    )


def _nodes_from_sinfo_records(records: Iterable[Mapping[str, Any]]) -> tuple[list[Node], list[Partition]]:
    """sinfo --json on 23.02+: one record per (node group, partition)."""
    nodes: dict[str, Node] = {}
    parts: dict[str, Partition] = {}
    for rec in records:
        names = (rec.get("nodes") or {}).get("nodes") or []
        if isinstance(names, str):
            names = expand_hostlist(names)
        if not names:
            continue
        part = rec.get("partition") or {}
        pname = _str(part.get("name")) if isinstance(part, dict) else _str(part)
        if pname and pname not in parts and isinstance(part, dict):
            parts[pname] = _partition_from_record(part)
        known = [nm for nm in names if nm in nodes]
        for nm in known:
            if pname and pname not in nodes[nm].partitions:
                nodes[nm].partitions.append(pname)
        fresh = [nm for nm in names if nm not in nodes]
        if not fresh:
            continue
        count = len(names)
        state_v = (rec.get("node") or {}).get("state")
        state, nr = normalise_node_state(state_v)
        cpus = rec.get("cpus") or {}
        gres = rec.get("gres") or {}
        reason = rec.get("reason")
        if isinstance(reason, dict):
            rdesc, ruser, rtime = _str(reason.get("description")), _str(reason.get("user")), reason.get("time")
        else:
            rdesc, ruser, rtime = _str(reason), "", None
        # A record may group several identical nodes (sinfo without -N); totals are per record.
        per = count
        for nm in fresh:
            nodes[nm] = Node(
                name=nm,
                state=state,
                not_responding=nr,
                raw_state=_raw_state(state_v),
                cpus=_int(cpus.get("total")) // per,
                cpus_allocated=_int(cpus.get("allocated")) // per,
                gpus=gpu_count(_str(gres.get("total"))),
                gpus_allocated=gpu_count(_str(gres.get("used"))),
                partitions=[pname] if pname else [],
                reason=rdesc,
                reason_user=ruser,
                reason_time=float(_number(rtime) or 0),
            )
    return list(nodes.values()), list(parts.values())


def _check_errors(doc: Mapping[str, Any], what: str) -> None:
    """Slurm reports failures inside the document: 22.05's ``sinfo --json`` exits 0
    with ``{"errors": [{"error": "Unspecified error", "errno": -1}], "nodes": []}``
    when slurmctld is unreachable. An empty cluster must never be believed then."""
    errors = doc.get("errors")
    if isinstance(errors, list) and errors:
        msgs = [str(e.get("description") or e.get("error") or e) if isinstance(e, dict) else str(e) for e in errors]
        raise ParseError(f"Slurm reported errors in the {what} document: {'; '.join(msgs)[:300]}")


def nodes_from_json(doc: Mapping[str, Any]) -> tuple[list[Node], list[Partition]]:
    """Nodes (and, from 23.02+ sinfo, partitions) of a ``sinfo --json`` or ``/nodes`` document."""
    if not isinstance(doc, Mapping):
        raise ParseError("node document is not a JSON object")
    _check_errors(doc, "node")
    if isinstance(doc.get("sinfo"), list):
        return _nodes_from_sinfo_records(doc["sinfo"])
    records = doc.get("nodes")
    if not isinstance(records, list):
        raise ParseError(f"no 'nodes' or 'sinfo' list in node document (keys: {sorted(doc)[:8]})")
    return [_node_from_record(n) for n in records if isinstance(n, dict) and n.get("name")], []


# -- JSON: jobs ----------------------------------------------------------------------
def _job_state(v: Any) -> str:
    if isinstance(v, list):
        return str(v[0]).upper() if v else "UNKNOWN"
    return str(v or "UNKNOWN").upper()


def jobs_from_json(doc: Mapping[str, Any]) -> list[Job]:
    """Jobs of a ``squeue --json`` or ``/jobs`` document (finished jobs dropped)."""
    if not isinstance(doc, Mapping):
        raise ParseError("job document is not a JSON object")
    _check_errors(doc, "job")
    records = doc.get("jobs")
    if not isinstance(records, list):
        raise ParseError(f"no 'jobs' list in job document (keys: {sorted(doc)[:8]})")
    out: list[Job] = []
    append = out.append
    for j in records:
        if not isinstance(j, dict):
            continue
        state = _job_state(j.get("job_state"))
        if state in TERMINAL_JOB_STATES:
            continue
        job = Job(
            job_id=_str(j.get("job_id")),
            state=state,
            partition=_str(j.get("partition")),
            user=_str(j.get("user_name")) or _str(j.get("user_id")),
            account=_str(j.get("account")),
            name=_str(j.get("name")),
            reason=_str(j.get("state_reason")),
        )
        if state == "RUNNING":
            nodes = expand_hostlist(j.get("nodes") if isinstance(j.get("nodes"), str) else None)
            job.nodes = nodes
            job.gpus = job_gpus(j.get("gres_detail"), j.get("tres_alloc_str"), j.get("tres_per_node"), len(nodes))
            job.start_time = float(_number(j.get("start_time")) or 0)
        append(job)
    return out


# -- JSON: partitions -----------------------------------------------------------------
def _partition_state(v: Any) -> str:
    if isinstance(v, list):
        v = v[0] if v else ""
    s = str(v or "").lower()
    return s or "unknown"


def _partition_from_record(p: Mapping[str, Any]) -> Partition:
    inner = p.get("partition") if isinstance(p.get("partition"), dict) else {}
    state = p.get("state") if "state" in p else inner.get("state")
    flags = [str(f).upper() for f in (p.get("flags") or []) + (inner.get("flags") or [])
             if isinstance(f, str)]
    return Partition(name=_str(p.get("name")), state=_partition_state(state), default="DEFAULT" in flags)


def partitions_from_json(doc: Mapping[str, Any]) -> list[Partition]:
    """Partitions of a slurmrestd ``/partitions`` document (v0.0.38 .. v0.0.41 shapes)."""
    records = doc.get("partitions") if isinstance(doc, Mapping) else None
    if not isinstance(records, list):
        raise ParseError("no 'partitions' list in partition document")
    return [_partition_from_record(p) for p in records if isinstance(p, dict) and p.get("name")]


# -- formatted fallback ------------------------------------------------------------------
#: ``sinfo -h -N -a -O <SINFO_FIELDS>``: one line per node and partition.
SINFO_FIELDS = ("NodeList", "StateComplete", "CPUsState", "Gres", "GresUsed", "Partition", "User",
                "Timestamp", "Reason")
#: ``squeue -h -a -O <SQUEUE_FIELDS>``; the free-text name comes last.
SQUEUE_FIELDS = ("JobID", "State", "Partition", "UserName", "Account", "ReasonList", "NodeList",
                 "StartTime", "tres-alloc", "tres-per-node", "NumNodes", "Name")
#: ``sinfo -h -a -o <PARTITION_FORMAT>``: partition (``*`` marks the default) and availability.
PARTITION_FORMAT = f"%P{FIELD_SEP}%a{FIELD_SEP}"


def format_arg(fields: Iterable[str]) -> str:
    """The ``-O`` argument: ``Field:<sep>`` (no width: untruncated) for each field."""
    return ",".join(f"{f}:{FIELD_SEP}" for f in fields)


def _none(text: str) -> str:
    return "" if text in ("(null)", "N/A", "none", "None") else text


def nodes_from_text(text: str) -> list[Node]:
    nodes: dict[str, Node] = {}
    n_fields = len(SINFO_FIELDS)
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split(FIELD_SEP)
        if len(f) < n_fields:
            raise ParseError(f"sinfo line has {len(f)} fields, expected {n_fields}: {line!r}")
        name, state_s, cpus_s, gres, gres_used, part, user, ts, reason = (x.strip() for x in f[:n_fields])
        part = part.rstrip("*")
        node = nodes.get(name)
        if node is not None:
            if part and part not in node.partitions:
                node.partitions.append(part)
            continue
        state, nr = normalise_node_state(state_s)
        a, _, rest = cpus_s.partition("/")
        total = rest.rsplit("/", 1)[-1] if rest else "0"
        nodes[name] = Node(
            name=name, state=state, not_responding=nr, raw_state=state_s.upper(),
            cpus=int(total) if total.isdigit() else 0,
            cpus_allocated=int(a) if a.isdigit() else 0,
            gpus=gpu_count(_none(gres)), gpus_allocated=gpu_count(_none(gres_used)),
            partitions=[part] if part else [],
            reason=_none(reason), reason_user=_none(user) if user != "Unknown" else "",
            reason_time=_parse_local_time(ts),
        )
    return list(nodes.values())


def jobs_from_text(text: str) -> list[Job]:
    out: list[Job] = []
    n_fields = len(SQUEUE_FIELDS)
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split(FIELD_SEP)
        if len(f) < n_fields:
            raise ParseError(f"squeue line has {len(f)} fields, expected {n_fields}: {line!r}")
        job_id, state, part, user, account, reason, nodelist, start, tres_alloc, tres_pn, num_nodes = (
            x.strip() for x in f[:11])
        name = f[11]
        state = state.upper()
        if state in TERMINAL_JOB_STATES:
            continue
        job = Job(job_id=job_id, state=state, partition=part, user=user, account=_none(account),
                  name=name.strip(), reason=reason)
        if state == "RUNNING":
            job.nodes = expand_hostlist(nodelist)
            count = int(num_nodes) if num_nodes.isdigit() else len(job.nodes)
            job.gpus = job_gpus(None, tres_alloc, tres_pn, count)
            job.start_time = _parse_local_time(start)
        out.append(job)
    return out


def partitions_from_text(text: str) -> list[Partition]:
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        f = line.split(FIELD_SEP)
        if len(f) < 2 or not f[0].strip():
            continue
        raw = f[0].strip()
        name = raw.rstrip("*")
        if name not in parts:
            parts[name] = Partition(name=name, state=_partition_state(f[1].strip()), default=raw.endswith("*"))
    return list(parts.values())


def slurm_version(doc: Mapping[str, Any]) -> tuple[str, str]:
    """(Slurm release, data format) from a JSON document's ``meta``."""
    meta = doc.get("meta") if isinstance(doc, Mapping) else None
    if not isinstance(meta, dict):
        return "", ""
    slurm = meta.get("Slurm") or meta.get("slurm") or {}
    release = _str(slurm.get("release")) if isinstance(slurm, dict) else ""
    plugin = meta.get("plugin") or {}
    fmt = ""
    if isinstance(plugin, dict):
        fmt = (_str(plugin.get("data_parser")) or _str(plugin.get("type"))).rpartition("/")[2]
    return release, fmt


