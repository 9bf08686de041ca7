"""Where the Slurm exporter gets its data: the Slurm commands, or slurmrestd.

``CliSource`` runs ``sinfo --json -N``, ``squeue --json`` and ``sinfo -o '%P %a'`` (the
partitions' availability and default), each bounded by a timeout. Where ``--json`` is
missing (before 21.08, or built without the JSON serializer) it notices once, logs
it once, and uses the formatted ``-O`` output from then on.

``RestSource`` asks slurmrestd (``http(s)://host:port`` or ``unix:///path.socket``)
for ``/slurm/<version>/{nodes,jobs,partitions}``. The version is negotiated: the
highest of ``SUPPORTED_VERSIONS`` the server lists in ``/openapi/v3``, else the
first whose ``/ping`` answers; it is renegotiated when the server stops knowing it
(an upgrade). The token is re-read from its file when the file changes, so
rotation needs no restart.

Both raise ``SourceError(source, message)``; ``source`` (nodes, jobs, partitions,
api_version) becomes the label of ``slurm_exporter_errors_total``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool

from exporters.slurm_data import (
    PARTITION_FORMAT,
    SINFO_FIELDS,
    SQUEUE_FIELDS,
    ParseError,
    Partition,
    Snapshot,
    format_arg,
    jobs_from_json,
    jobs_from_text,
    nodes_from_json,
    nodes_from_text,
    partitions_from_json,
    partitions_from_text,
    slurm_version,
)

log = logging.getLogger("gpufleet.slurm")

#: slurmrestd API versions understood, most preferred first (Slurm 22.05 .. 25.11).
SUPPORTED_VERSIONS = ("v0.0.41", "v0.0.40", "v0.0.39", "v0.0.38")
#: ``-N``: one record per node and partition where sinfo would group nodes (23.02+).
SINFO_JSON_ARGS = ("--json", "-N")
SQUEUE_JSON_ARGS = ("--json",)
SINFO_TEXT_ARGS = ("-h", "-N", "-a", "-O", format_arg(SINFO_FIELDS))
SQUEUE_TEXT_ARGS = ("-h", "-a", "-O", format_arg(SQUEUE_FIELDS))
PARTITION_TEXT_ARGS = ("-h", "-a", "-o", PARTITION_FORMAT)
_UNSUPPORTED_JSON = re.compile(
    r"unrecognized option|invalid option|unknown option|not supported|data_parser|serializer", re.I
)


class SourceError(Exception):
    """Fetching or reading one kind of data failed; ``source`` says which."""

    def __init__(self, source: str, message: str):
        super().__init__(message)
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.args[0]}"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while a big document becomes millions of objects.

    json.loads of 20,000 jobs allocates some 3 million dicts, lists and strings,
    none of them garbage; the collector's passes over that growing heap cost time
    and free nothing. Reference counting still frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loads(source: str, raw: bytes | str) -> Any:
    try:
        with _gc_paused():
            return json.loads(raw)
    except ValueError as exc:
        head = raw[:80] if isinstance(raw, str) else raw[:80].decode(errors="replace")
        raise SourceError(source, f"output is not JSON ({exc}); it starts {head!r}") from None


def run_bounded(argv: Sequence[str], timeout: float, env: Mapping[str, str]) -> tuple[int, bytes, bytes]:
    """Run a command in its own process group; on timeout kill the whole group.

    ``subprocess.run(timeout=)`` kills only the direct child, then waits for the
    pipes to close, which a surviving grandchild (a wrapper script's ``sleep``,
    an ssh hop) can hold open for ever.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out, err


class CliSource:
    """``sinfo``/``squeue`` on this host, against ``--slurm.conf`` or the default config."""

    SOURCES = ("nodes", "jobs", "partitions")

    def __init__(self, *, bin_dir: str = "", conf: str = "", timeout: float = 10.0, fmt: str = "auto"):
        if fmt not in ("auto", "json", "text"):
            raise ValueError("format must be auto, json or text")
        self.bin_dir = bin_dir
        self.timeout = timeout
        self.fmt = fmt
        self._json = fmt != "text"
        self.env = dict(os.environ)
        if conf:
            self.env["SLURM_CONF"] = conf

    @property
    def backend(self) -> str:
        return "cli-json" if self._json else "cli-text"

    def _cmd(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir else name

    def _run(self, source: str, cmd: str, *args: str) -> bytes:
        argv = [self._cmd(cmd), *args]
        try:
            rc, out, err = run_bounded(argv, self.timeout, self.env)
        except subprocess.TimeoutExpired:
            raise SourceError(source, f"{cmd} timed out after {self.timeout:g}s") from None
        except OSError as exc:
            raise SourceError(source, f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        if rc != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise SourceError(source, f"{cmd} exited {rc}: {' | '.join(lines[-3:]) or '(no output)'}")
        return out

    def fetch(self) -> Snapshot:
        if self._json:
            try:
                return self._fetch_json()
            except SourceError as exc:
                if self.fmt == "json" or not _UNSUPPORTED_JSON.search(str(exc)):
                    raise
                log.warning("sinfo/squeue --json unavailable; using formatted output from now on",
                            extra={"reason": str(exc)})
                self._json = False
        return self._fetch_text()

    def _fetch_json(self) -> Snapshot:
        raw = self._run("nodes", "sinfo", *SINFO_JSON_ARGS)
        doc = _loads("nodes", raw)
        del raw
        release, fmt = slurm_version(doc)
        try:
            nodes, _ = nodes_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise SourceError("nodes", f"unexpected sinfo --json shape: {exc}") from None
        del doc
        raw = self._run("jobs", "squeue", *SQUEUE_JSON_ARGS)
        doc = _loads("jobs", raw)
        del raw
        try:
            jobs = jobs_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise SourceError("jobs", f"unexpected squeue --json shape: {exc}") from None
        del doc
        # Partition availability and the default: sinfo --json has neither (22.05) or not the
        # default (23.02+), while '%P %a' has both on every version.
        return Snapshot(nodes, jobs, self._partitions(), backend=self.backend, api_version=fmt,
                        slurm_version=release)

    def _partitions(self) -> list[Partition]:
        out = self._run("partitions", "sinfo", *PARTITION_TEXT_ARGS).decode(errors="replace")
        return partitions_from_text(out)

    def _fetch_text(self) -> Snapshot:
        try:
            out = self._run("nodes", "sinfo", *SINFO_TEXT_ARGS)
            nodes = nodes_from_text(out.decode(errors="replace"))
        except ParseError as exc:
            raise SourceError("nodes", str(exc)) from None
        try:
            out = self._run("jobs", "squeue", *SQUEUE_TEXT_ARGS)
            jobs = jobs_from_text(out.decode(errors="replace"))
        except ParseError as exc:
            raise SourceError("jobs", str(exc)) from None
        return Snapshot(nodes, jobs, self._partitions(), backend=self.backend)


# -- slurmrestd ----------------------------------------------------------------------
class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, *args: Any, socket_path: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, int | float):
            sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock


class _UnixPool(HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class UnixSocketAdapter(HTTPAdapter):
    """requests over a unix socket (slurmrestd's usual listener); the URL's host is ignored."""

    def __init__(self, socket_path: str):
        super().__init__()
        self._pool = _UnixPool("localhost", maxsize=2, socket_path=socket_path)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # noqa: ANN001
        return self._pool

    def get_connection(self, url, proxies=None):  # noqa: ANN001 - older requests
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def read_token(path: str) -> str:
    """A JWT from a file: the bare token, or ``scontrol token``'s ``SLURM_JWT=...`` line."""
    text = Path(path).read_text().strip()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("SLURM_JWT="):
            return line.split("=", 1)[1].strip()
    return text.splitlines()[0].strip() if text else ""


class RestSource:
    """slurmrestd's ``/slurm/<version>/{nodes,jobs,partitions}``."""

    SOURCES = ("api_version", "nodes", "jobs", "partitions")
    backend = "rest"

    def __init__(
        self,
        url: str,
        *,
        token_file: str = "",
        user: str = "",
        timeout: float = 10.0,
        ca_file: str = "",
        versions: Sequence[str] = SUPPORTED_VERSIONS,
    ):
        self.session = requests.Session()
        if url.startswith("unix:"):
            path = url[len("unix:"):]
            path = "/" + path.lstrip("/")
            self.base = "http://slurmrestd"
            self.session.mount("http://slurmrestd", UnixSocketAdapter(path))
            self.session.trust_env = False  # no proxy between us and a local socket
        elif url.startswith(("http://", "https://")):
            self.base = url.rstrip("/")
        else:
            raise ValueError(f"slurmrestd URL {url!r} is not http(s)://HOST:PORT or unix:///PATH")
        if ca_file:
            self.session.verify = ca_file
        self.url = url
        self.token_file = token_file
        self.user = user
        self.timeout = timeout
        self.versions = tuple(versions)
        self.version = ""
        self._token = ""
        self._token_mtime: float | None = None

    def close(self) -> None:
        self.session.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.user:
            headers["X-SLURM-USER-NAME"] = self.user
        if self.token_file:
            try:
                mtime = os.stat(self.token_file).st_mtime
                if mtime != self._token_mtime:
                    self._token = read_token(self.token_file)
                    self._token_mtime = mtime
            except OSError as exc:
                raise SourceError("api_version", f"cannot read token file {self.token_file}: {exc.strerror}") from None
            headers["X-SLURM-USER-TOKEN"] = self._token
        return headers

    def _get(self, source: str, path: str) -> requests.Response:
        try:
            return self.session.get(self.base + path, headers=self._headers(), timeout=self.timeout)
        except requests.Timeout:
            raise SourceError(source, f"GET {path} timed out after {self.timeout:g}s") from None
        except requests.RequestException as exc:
            raise SourceError(source, f"GET {path} failed: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _error_text(resp: requests.Response) -> str:
        try:
            errors = resp.json().get("errors") or []
            msgs = [str(e.get("description") or e.get("error") or e) for e in errors if isinstance(e, dict)]
            if msgs:
                return "; ".join(msgs)
        except (ValueError, AttributeError):
            pass
        return resp.text.strip()[:200]

    def negotiate(self) -> str:
        """Pick the API version: the best one /openapi/v3 lists, else the first /ping that answers."""
        offered: set[str] = set()
        resp = self._get("api_version", "/openapi/v3")
        if resp.status_code in (401, 403):
            raise SourceError("api_version", f"HTTP {resp.status_code} from slurmrestd: {self._error_text(resp)} "
                                             "(check --slurm.token-file and --slurm.user)")
        if resp.status_code == 200:
            try:
                paths = resp.json().get("paths") or {}
                offered = {m.group(1) for p in paths if (m := re.match(r"^/slurm/(v\d+\.\d+\.\d+)/nodes/?$", p))}
            except (ValueError, AttributeError):
                offered = set()
        for v in self.versions:
            if v in offered:
                return v
        if offered:
            newer = sorted(offered, key=lambda v: tuple(int(x) for x in v[1:].split(".")), reverse=True)[0]
            if tuple(int(x) for x in newer[1:].split(".")) > (0, 0, 38):
                log.warning("slurmrestd offers no API version this exporter knows; trying the newest",
                            extra={"offered": ",".join(sorted(offered)), "using": newer})
                return newer
        for v in self.versions:
            if self._get("api_version", f"/slurm/{v}/ping").status_code == 200:
                return v
        raise SourceError("api_version", f"slurmrestd at {self.url} offers none of {', '.join(self.versions)} "
                                         f"(listed: {', '.join(sorted(offered)) or 'nothing'})")

    def _doc(self, source: str, what: str) -> Any:
        resp = self._get(source, f"/slurm/{self.version}/{what}")
        if resp.status_code == 404:
            gone, self.version = self.version, ""  # upgraded server: negotiate again next time
            raise SourceError(source, f"HTTP 404 for /slurm/{gone}/{what}; renegotiating the API version")
        if resp.status_code != 200:
            raise SourceError(source, f"HTTP {resp.status_code} for /{what}: {self._error_text(resp)}")
        return _loads(source, resp.content)

    def fetch(self) -> Snapshot:
        if not self.version:
            self.version = self.negotiate()
            log.info("slurmrestd API version negotiated", extra={"url": self.url, "version": self.version})
        doc = self._doc("nodes", "nodes")
        release, _ = slurm_version(doc)
        try:
            nodes, _parts = nodes_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise SourceError("nodes", f"unexpected /nodes shape: {exc}") from None
        del doc
        doc = self._doc("jobs", "jobs")
        try:
            jobs = jobs_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise SourceError("jobs", f"unexpected /jobs shape: {exc}") from None
        del doc
        doc = self._doc("partitions", "partitions")
        try:
            parts = partitions_from_json(doc)
        except (ParseError, TypeError, AttributeError) as exc:
            raise SourceError("partitions", f"unexpected /partitions shape: {exc}") from None
        return Snapshot(nodes, jobs, parts, backend=self.backend, api_version=self.version, slurm_version=release,
                        timestamp=time.time())
