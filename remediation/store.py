"""State and audit for the remediation engine: one SQLite file in WAL mode.

Everything the guardrails depend on lives here, not in memory, so a restart (or a
crash) forgets nothing: deliveries as received, alerts seen (the idempotency keys),
decisions, actions with their intent and outcome, approvals, the breaker and its
window counts, the rate-limit bucket, flap flags, the pause flag, the nodes gpufleet
owns, admin audit, and the counters behind the metrics.

Concurrency. One writer connection, guarded by a re-entrant lock; every write runs in
a ``BEGIN IMMEDIATE`` transaction, so two engines on the same file (two processes, or
two objects in one) serialize their decisions instead of both passing a cap.
Reads from a thread that holds the write transaction go through the writer (they see
its uncommitted rows); reads from any other thread (status, history, metrics) use a
per-thread read-only connection, which WAL never blocks, so a slow drain never
stalls a scrape.

Durability. ``synchronous=FULL`` by default: a committed intent is on disk before the
actuator is called, even across a power loss.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    receiver TEXT NOT NULL DEFAULT '',
    group_key TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,            -- received | processed | failed | interrupted
    alert_count INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL,
    finished_at REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS alerts (
    key TEXT PRIMARY KEY,            -- fingerprint@startsAt: one firing of one alert
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    alertname TEXT NOT NULL DEFAULT '',
    node TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,            -- firing | resolved
    rule TEXT,
    action TEXT,
    final INTEGER NOT NULL DEFAULT 0,-- 1: the firing was handled; resends are duplicates
    first_delivery INTEGER,
    last_delivery INTEGER,
    first_seen REAL NOT NULL,
    updated_at REAL NOT NULL,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS alerts_node ON alerts (node, status);
CREATE INDEX IF NOT EXISTS alerts_status ON alerts (status);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    delivery_id INTEGER,
    alert_key TEXT,
    alertname TEXT NOT NULL DEFAULT '',
    node TEXT NOT NULL DEFAULT '',
    alert_status TEXT NOT NULL DEFAULT '',
    rule TEXT,
    action TEXT,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    action_id INTEGER,
    who TEXT NOT NULL DEFAULT 'engine',
    duration_seconds REAL
);
CREATE INDEX IF NOT EXISTS decisions_node ON decisions (node, id);
CREATE INDEX IF NOT EXISTS decisions_alert ON decisions (alert_key, id);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    action TEXT NOT NULL,            -- drain | reboot | resume | exec
    reason TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,             -- pending | scheduled | intent | done | failed | cancelled
    alert_key TEXT,
    rule TEXT,
    auto_resume INTEGER NOT NULL DEFAULT 0,
    hold_down REAL NOT NULL DEFAULT 0,
    requested_by TEXT NOT NULL DEFAULT 'engine',
    created_at REAL NOT NULL,
    due_at REAL,
    started_at REAL,
    finished_at REAL,
    outcome TEXT,
    readback TEXT,
    payload TEXT
);
CREATE INDEX IF NOT EXISTS actions_state ON actions (state);
CREATE INDEX IF NOT EXISTS actions_node ON actions (node, created_at);
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY,
    action_id INTEGER NOT NULL,
    verdict TEXT NOT NULL,           -- approved | denied
    who TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    who TEXT NOT NULL,
    what TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS breaker (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    open INTEGER NOT NULL DEFAULT 0,
    opened_at REAL,
    reason TEXT NOT NULL DEFAULT '',
    reset_at REAL NOT NULL DEFAULT 0,
    reset_by TEXT NOT NULL DEFAULT '',
    reset_after_event INTEGER NOT NULL DEFAULT 0  -- events up to this id predate the last reset
);
CREATE TABLE IF NOT EXISTS breaker_events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,              -- failure | cap
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS breaker_events_at ON breaker_events (kind, at);
CREATE TABLE IF NOT EXISTS rate_limit (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    tokens REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flap (
    node TEXT PRIMARY KEY,
    flagged_at REAL NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS flags (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    who TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS ownership (
    node TEXT PRIMARY KEY,
    action_id INTEGER,
    since REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    alert_key TEXT,
    rule TEXT,
    auto_resume INTEGER NOT NULL DEFAULT 0,
    hold_down REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (name, labels)
);
"""


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (``executescript`` would commit the transaction)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf!r}")


def _dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


class Store:
    """The remediation state in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL", busy_timeout: float = 30.0):
        if str(path) == ":memory:":
            raise ValueError("Store needs a file: readers use their own connections (WAL)")
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        with self.transaction():
            for statement in _statements(SCHEMA):
                self._conn.execute(statement)
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path}: schema version {version} is newer than this gpufleet ({SCHEMA_VERSION})")
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("INSERT OR IGNORE INTO breaker (id) VALUES (1)")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._conn.close()

    # ---- transactions -------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: the database write lock is taken at
        the start, so decide-then-write cannot interleave with another writer).
        Nested use joins the outer transaction."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._owner = threading.get_ident()
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._owner = None
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            else:
                self._depth = 0
                self._owner = None
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")

    def commit_now(self) -> None:
        """Inside a transaction: make everything so far durable, and go on in a new
        one (still holding the write lock). Used to commit an intent before acting."""
        with self._lock:
            if not self._depth or self._owner != threading.get_ident():
                raise RuntimeError("commit_now outside a transaction")
            self._conn.execute("COMMIT")
            self._conn.execute("BEGIN IMMEDIATE")

    @contextmanager
    def outside_transaction(self) -> Iterator[None]:
        """Inside a transaction: commit everything so far (durable), run the body with
        the database write lock released (the store's own lock stays held, so this
        thread's writes are not interleaved with another thread's), then begin again."""
        with self._lock:
            if not self._depth or self._owner != threading.get_ident():
                raise RuntimeError("outside_transaction outside a transaction")
            self._conn.execute("COMMIT")
            try:
                yield
            finally:
                self._conn.execute("BEGIN IMMEDIATE")

    def _reader(self) -> sqlite3.Connection:
        if self._owner == threading.get_ident():
            return self._conn
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def execute(self, sql: str, params: tuple | Mapping = ()) -> int:
        """Run one write statement (in the current transaction, or its own); returns lastrowid."""
        with self.transaction() as conn:
            cur = conn.execute(sql, params)
            return int(cur.lastrowid or 0)

    def query(self, sql: str, params: tuple | Mapping = ()) -> list[dict[str, Any]]:
        if self._owner == threading.get_ident():
            cur = self._conn.execute(sql, params)
            return [_dict(cur, r) for r in cur.fetchall()]
        conn = self._reader()
        cur = conn.execute(sql, params)
        return [_dict(cur, r) for r in cur.fetchall()]

    def query_one(self, sql: str, params: tuple | Mapping = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: tuple | Mapping = ()) -> Any:
        row = self.query_one(sql, params)
        return None if row is None else next(iter(row.values()))

    # ---- deliveries and alerts -----------------------------------------------------------

    def record_delivery(self, payload: Mapping[str, Any], *, received_at: float) -> int:
        """Durably record a delivery as received (its own committed transaction)."""
        alerts = payload.get("alerts") or []
        with self.transaction():
            return self.execute(
                "INSERT INTO deliveries (received_at, receiver, group_key, status, alert_count, payload)"
                " VALUES (?, ?, ?, 'received', ?, ?)",
                (
                    received_at,
                    str(payload.get("receiver", "")),
                    str(payload.get("groupKey", "")),
                    len(alerts) if isinstance(alerts, list) else 0,
                    json.dumps(payload, sort_keys=True, default=str),
                ),
            )

    def finish_delivery(self, delivery_id: int, status: str, *, at: float, error: str | None = None) -> None:
        self.execute(
            "UPDATE deliveries SET status = ?, finished_at = ?, error = ? WHERE id = ?",
            (status, at, error, delivery_id),
        )

    def delivery(self, delivery_id: int) -> dict[str, Any] | None:
        row = self.query_one("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        if row:
            row["payload"] = json.loads(row["payload"])
        return row

    def alert(self, key: str) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM alerts WHERE key = ?", (key,))

    def upsert_alert(self, key: str, **fields: Any) -> None:
        existing = self.alert(key)
        if existing is None:
            cols = ["key", *fields]
            self.execute(
                f"INSERT INTO alerts ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                (key, *fields.values()),
            )
        elif fields:
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.execute(f"UPDATE alerts SET {sets} WHERE key = ?", (*fields.values(), key))

    def resolved_by(self, key: str) -> str | None:
        """Who recorded the latest resolution of a firing (``engine``: a webhook,
        ``reconcile``: Alertmanager no longer had it), or None."""
        return self.scalar(
            "SELECT who FROM decisions WHERE alert_key = ? AND decision = 'resolved' ORDER BY id DESC LIMIT 1", (key,)
        )

    def active_alerts(self, node: str, *, actions: tuple[str, ...], exclude_key: str | None = None) -> list[dict]:
        """Firing (unresolved) alerts on a node whose rule takes the node out of service."""
        marks = ", ".join("?" for _ in actions)
        return self.query(
            f"SELECT * FROM alerts WHERE node = ? AND status = 'firing' AND action IN ({marks})"
            " AND key != ? ORDER BY first_seen",
            (node, *actions, exclude_key or ""),
        )

    # ---- decisions, actions, approvals, audit ---------------------------------------------

    def add_decision(self, **fields: Any) -> int:
        cols = list(fields)
        with self.transaction():
            decision_id = self.execute(
                f"INSERT INTO decisions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                tuple(fields.values()),
            )
            self.bump("decisions", {"decision": fields["decision"]})
            return decision_id

    def add_action(self, **fields: Any) -> int:
        cols = list(fields)
        return self.execute(
            f"INSERT INTO actions ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            tuple(fields.values()),
        )

    def update_action(self, action_id: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.execute(f"UPDATE actions SET {sets} WHERE id = ?", (*fields.values(), action_id))

    def action(self, action_id: int) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM actions WHERE id = ?", (action_id,))

    def actions(self, *, state: str | None = None, node: str | None = None, action: str | None = None) -> list[dict]:
        where, params = [], []
        for col, val in (("state", state), ("node", node), ("action", action)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return self.query(f"SELECT * FROM actions{clause} ORDER BY id", tuple(params))

    def add_approval(self, action_id: int, verdict: str, who: str, at: float) -> None:
        self.execute(
            "INSERT INTO approvals (action_id, verdict, who, at) VALUES (?, ?, ?, ?)", (action_id, verdict, who, at)
        )

    def add_audit(self, who: str, what: str, target: str = "", detail: str = "", *, at: float) -> None:
        self.execute(
            "INSERT INTO audit (at, who, what, target, detail) VALUES (?, ?, ?, ?, ?)", (at, who, what, target, detail)
        )

    def audit(self, limit: int = 100) -> list[dict]:
        return self.query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))

    def history(self, limit: int = 100, node: str | None = None) -> list[dict]:
        """Decisions joined with their actions, newest first."""
        where = "WHERE d.node = ?" if node is not None else ""
        params: tuple = (node, limit) if node is not None else (limit,)
        return self.query(
            "SELECT d.id, d.at, d.delivery_id, d.alert_key, d.alertname, d.node, d.alert_status, d.rule,"
            " d.action, d.decision, d.reason, d.who, d.action_id, d.duration_seconds,"
            " a.state AS action_state, a.reason AS action_reason, a.created_at AS action_created_at,"
            " a.due_at AS action_due_at, a.finished_at AS action_finished_at, a.outcome AS action_outcome,"
            " a.readback AS action_readback, a.requested_by AS action_requested_by"
            f" FROM decisions d LEFT JOIN actions a ON a.id = d.action_id {where}"
            " ORDER BY d.id DESC LIMIT ?",
            params,
        )

    # ---- counters (metrics that survive restarts) ----------------------------------------

    def bump(self, name: str, labels: Mapping[str, str], by: float = 1.0) -> None:
        self.execute(
            "INSERT INTO counters (name, labels, value) VALUES (?, ?, ?)"
            " ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
            (name, json.dumps(dict(labels), sort_keys=True), by),
        )

    def counters(self, name: str) -> list[tuple[dict[str, str], float]]:
        rows = self.query("SELECT labels, value FROM counters WHERE name = ? ORDER BY labels", (name,))
        return [(json.loads(r["labels"]), r["value"]) for r in rows]

    # ---- breaker ------------------------------------------------------------------------

    def breaker(self) -> dict[str, Any]:
        return self.query_one("SELECT * FROM breaker WHERE id = 1") or {
            "open": 0, "opened_at": None, "reason": "", "reset_at": 0.0, "reset_by": "", "reset_after_event": 0,
        }  # fmt: skip

    def set_breaker(self, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.execute(f"UPDATE breaker SET {sets} WHERE id = 1", tuple(fields.values()))

    def add_breaker_event(self, kind: str, detail: str, *, at: float) -> None:
        self.execute("INSERT INTO breaker_events (at, kind, detail) VALUES (?, ?, ?)", (at, kind, detail))

    def breaker_events(self, kind: str, *, since: float, after_event: int = 0) -> int:
        """Events of a kind newer than ``since`` (the window) and than event ``after_event`` (the last reset)."""
        return int(
            self.scalar(
                "SELECT COUNT(*) FROM breaker_events WHERE kind = ? AND at > ? AND id > ?", (kind, since, after_event)
            )
            or 0
        )

    def last_breaker_event(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(id), 0) FROM breaker_events") or 0)

    # ---- rate limit, flags, flap, ownership ----------------------------------------------

    def bucket(self) -> tuple[float, float] | None:
        row = self.query_one("SELECT tokens, updated_at FROM rate_limit WHERE id = 1")
        return (row["tokens"], row["updated_at"]) if row else None

    def set_bucket(self, tokens: float, updated_at: float) -> None:
        self.execute(
            "INSERT INTO rate_limit (id, tokens, updated_at) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
            (tokens, updated_at),
        )

    def flag(self, name: str) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM flags WHERE name = ?", (name,))

    def set_flag(self, name: str, value: int, who: str, at: float) -> None:
        self.execute(
            "INSERT INTO flags (name, value, who, at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value, who = excluded.who, at = excluded.at",
            (name, value, who, at),
        )

    def flapping(self, node: str) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM flap WHERE node = ?", (node,))

    def flapping_nodes(self) -> list[dict]:
        return self.query("SELECT * FROM flap ORDER BY node")

    def set_flapping(self, node: str, count: int, reason: str, at: float) -> None:
        self.execute(
            "INSERT INTO flap (node, flagged_at, count, reason) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (node) DO UPDATE SET count = excluded.count, reason = excluded.reason",
            (node, at, count, reason),
        )

    def clear_flapping(self, node: str) -> None:
        self.execute("DELETE FROM flap WHERE node = ?", (node,))

    def ownership(self, node: str) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM ownership WHERE node = ?", (node,))

    def owned_nodes(self) -> list[dict]:
        return self.query("SELECT * FROM ownership ORDER BY node")

    def set_ownership(self, node: str, **fields: Any) -> None:
        cols = ["node", *fields]
        updates = ", ".join(f"{k} = excluded.{k}" for k in fields)
        self.execute(
            f"INSERT INTO ownership ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
            f" ON CONFLICT (node) DO UPDATE SET {updates}",
            (node, *fields.values()),
        )

    def update_ownership(self, node: str, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.execute(f"UPDATE ownership SET {sets} WHERE node = ?", (*fields.values(), node))

    def release_ownership(self, node: str) -> None:
        self.execute("DELETE FROM ownership WHERE node = ?", (node,))
