"""Prometheus exporter-toolkit web configuration (``--web.config.file``) for stdlib HTTP servers.

node_exporter and the other Go exporters read a YAML "web config" that switches on TLS, mutual
TLS and HTTP basic auth.  Operators already write (and template, and rotate) those files, so our
Python exporters accept the very same format rather than a dialect of their own: one file can be
handed to node_exporter and to gpufleet unchanged.

Wiring it into ``http.server.ThreadingHTTPServer``::

    cfg = load_web_config(args.web_config_file)      # fails fast, at startup, on any mistake
    server = ThreadingHTTPServer((host, port), Handler)
    ctx = cfg.ssl_context()
    if ctx is not None:
        # do_handshake_on_connect=False moves the TLS handshake out of accept(), which runs in
        # the single serve_forever() thread, into the per-connection thread; otherwise one client
        # that connects and then says nothing stalls every other scrape.
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)

    class Handler(BaseHTTPRequestHandler):
        timeout = 30                                  # bounds a stalled handshake or request
        def do_GET(self):
            if not cfg.authorize(self.headers.get("Authorization")):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="gpufleet"')
                ...
            for name, value in cfg.headers.items():   # on every response, 401s included
                self.send_header(name, value)

Where Python's ``ssl`` module cannot do what Go's ``crypto/tls`` does, this module is stricter
than exporter-toolkit, never laxer:

* ``RequestClientCert``: Go asks for a certificate and does not verify it; OpenSSL in Python
  always verifies a certificate it asks for.  With ``client_ca_file`` a presented certificate is
  therefore verified against it (``CERT_OPTIONAL``); without one no certificate is asked for.
  Neither changes who gets in, since this mode never authorizes anyone by certificate.
* ``RequireAnyClientCert`` (and its old alias ``RequireClientCert``): Go accepts any certificate,
  even an unverifiable one; here it must chain to ``client_ca_file``, which is thus required.
* exporter-toolkit keys with no faithful equivalent are rejected with a message rather than
  silently ignored, because ignoring a security setting fails open: ``cert``, ``key`` and
  ``client_ca`` (inline PEM), ``cipher_suites``, ``curve_preferences``, ``client_allowed_sans``
  and ``rate_limit``.  ``prefer_server_cipher_suites`` (ignored by Go since 1.18 as well) and
  ``http_server_config.http2`` (``http.server`` only speaks HTTP/1.1) are accepted and ignored.
* Any TLS setting without ``cert_file`` and ``key_file`` is an error; exporter-toolkit serves
  plain HTTP when, for example, only ``min_version`` is set.
* Duplicate YAML keys are an error, as with Go's strict YAML decoding; PyYAML would otherwise
  keep the last one silently (a second ``alice:`` would replace the first).
* Certificates are read when ``ssl_context()`` is called; exporter-toolkit re-reads them on
  every connection.  Call ``ssl_context()`` again (or reload the config) to pick up a rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt
import yaml

__all__ = ["CLIENT_AUTH_TYPES", "TLS_VERSIONS", "WebConfig", "WebConfigError", "load_web_config"]


class WebConfigError(ValueError):
    """A web config file (or a ``WebConfig`` built in code) is unusable.

    The message names the file and the key at fault, because it ends up in an exporter's startup
    log, and "invalid config" with nothing else sends an operator diffing YAML by hand.
    """


#: Accepted ``client_auth_type`` values, as in exporter-toolkit.
CLIENT_AUTH_TYPES: tuple[str, ...] = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
# exporter-toolkit keeps this spelling "for backwards compatibility"; so do we.
_CLIENT_AUTH_ALIASES = {"RequireClientCert": "RequireAnyClientCert"}
# Modes in which Python must verify client certificates against client_ca_file (see module doc).
_CLIENT_AUTH_NEEDS_CA = frozenset(
    {"RequireAnyClientCert", "VerifyClientCertIfGiven", "RequireAndVerifyClientCert"}
)

#: ``min_version`` / ``max_version`` names and the versions they stand for.
TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# exporter-toolkit's default floor; TLS 1.0/1.1 are only used when asked for explicitly.
_DEFAULT_MIN_VERSION = "TLS12"

# The response headers exporter-toolkit lets a web config set, with the allowed values where the
# header is an enumeration (None: any value).  The list is deliberately short: anything else
# (Content-Type, Set-Cookie, ...) could break or hijack the exporter's own responses.
_ALLOWED_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

# A bcrypt hash in modular crypt format: $2a$ / $2b$ / $2y$, a cost of 04..31, a 22-character salt
# and a 31-character digest.  The salt's last character encodes 2 bits only, so it is one of
# ".Oeu"; bcrypt.checkpw raises "Invalid salt" for anything else, which we want to catch at load.
_BCRYPT_HASH_RE = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{31}")
# bcrypt only ever uses the first 72 bytes of a password.  Go's bcrypt (and so node_exporter)
# ignores the rest silently, the Python binding raises ValueError; we truncate, as Go does, so a
# long password accepted by node_exporter is accepted here too.
_BCRYPT_MAX_PASSWORD_BYTES = 72

# Exactly the keys exporter-toolkit knows.  "Unsupported" ones are known but refused (module doc);
# "ignored" ones are accepted and have no effect; anything else is a typo and refused.
_TOP_LEVEL_KEYS = frozenset({"tls_server_config", "http_server_config", "basic_auth_users"})
_TOP_LEVEL_UNSUPPORTED = frozenset({"rate_limit"})
_TLS_KEYS = frozenset(
    {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
)
_TLS_IGNORED = frozenset({"prefer_server_cipher_suites"})
_TLS_UNSUPPORTED = frozenset(
    {"cert", "key", "client_ca", "cipher_suites", "curve_preferences", "client_allowed_sans"}
)
_HTTP_KEYS = frozenset({"headers"})
_HTTP_IGNORED = frozenset({"http2"})


def _fail(where: str, key: str | None, problem: str) -> WebConfigError:
    """Build the one error format used everywhere: ``<file>: <key>: <problem>``."""
    return WebConfigError(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


# --------------------------------------------------------------------------------------------
# Basic auth helpers
# --------------------------------------------------------------------------------------------


class _VerifiedCache:
    """A small, bounded, thread-safe LRU set of credentials that bcrypt already accepted.

    bcrypt takes ~100 ms per check by design, and Prometheus sends the same credentials on every
    scrape; caching makes the repeat checks cost microseconds, as in exporter-toolkit.  Only
    *successes* are stored: failures are what an attacker controls, and caching them would let a
    flood of wrong passwords evict the legitimate entries (forcing bcrypt on every real scrape).
    Keys are keyed digests, never passwords (see ``WebConfig._cache_digest``).
    """

    def __init__(self, maxsize: int = 128) -> None:
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)  # type: ignore[arg-type]
                return True
            return False

    def add(self, key: bytes) -> None:
        with self._lock:
            self._entries[key] = None
            self._entries.move_to_end(key)
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


# Decoy hashes, one per bcrypt cost, for requests that name a user who does not exist: checking
# the password against one takes as long as checking it against a real user's hash, so response
# time does not reveal which user names exist.  They hold nothing secret and cost a full bcrypt
# round to make, so they are generated lazily and shared by the whole process.
_DECOY_PASSWORD = b"gpufleet-decoy-password"
_decoy_lock = threading.Lock()
_decoy_hashes: dict[int, bytes] = {}


def _decoy_hash(cost: int) -> bytes:
    """Return a process-wide bcrypt hash of the decoy password at ``cost``, making it once."""
    with _decoy_lock:
        decoy = _decoy_hashes.get(cost)
        if decoy is None:
            decoy = bcrypt.hashpw(_DECOY_PASSWORD, bcrypt.gensalt(rounds=cost))
            _decoy_hashes[cost] = decoy
        return decoy


def _bcrypt_cost(hashed: str) -> int:
    """Cost factor of a hash already checked against ``_BCRYPT_HASH_RE`` (``$2b$NN$...``)."""
    return int(hashed[4:6])


def _parse_basic_auth(header: str | None) -> tuple[str, bytes] | None:
    """Split an ``Authorization: Basic base64(user:password)`` value into (user, password).

    Anything malformed yields None rather than an exception: the header comes straight from the
    network, and a request handler should answer 401, not 500, to garbage.  The scheme is
    case-insensitive (RFC 7617); the base64 must be strict, as Go's decoder is.
    """
    if not isinstance(header, str):
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except ValueError:  # binascii.Error is a ValueError, as is non-ASCII input
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:  # cannot match any user name from a YAML (UTF-8) file anyway
        return None


def _checkpw(password: bytes, hashed: bytes) -> bool:
    """bcrypt.checkpw that never raises on request input; see _BCRYPT_MAX_PASSWORD_BYTES."""
    try:
        return bool(bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD_BYTES], hashed))
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Validation shared by load_web_config() and WebConfig()
# --------------------------------------------------------------------------------------------


def _validate(where: str, cfg: WebConfig) -> None:
    """Check everything about a config that does not need the file system.

    Shared by ``load_web_config`` (``where`` is the file) and ``WebConfig.__post_init__`` (for
    configs built in code), so both refuse the same mistakes.
    """
    for key in ("cert_file", "key_file", "client_ca_file", "min_version", "max_version"):
        value = getattr(cfg, key)
        if value is not None and not isinstance(value, str):
            raise _fail(where, f"tls_server_config.{key}", f"must be a string, got {value!r}")

    if cfg.client_auth_type not in CLIENT_AUTH_TYPES:
        raise _fail(
            where,
            "tls_server_config.client_auth_type",
            f"unknown value {cfg.client_auth_type!r}; expected one of {', '.join(CLIENT_AUTH_TYPES)}",
        )
    for key in ("min_version", "max_version"):
        value = getattr(cfg, key)
        if value is not None and value not in TLS_VERSIONS:
            raise _fail(
                where,
                f"tls_server_config.{key}",
                f"unknown TLS version {value!r}; expected one of {', '.join(TLS_VERSIONS)}",
            )
    low = TLS_VERSIONS[cfg.min_version or _DEFAULT_MIN_VERSION]
    if cfg.max_version is not None and TLS_VERSIONS[cfg.max_version] < low:
        raise _fail(
            where,
            "tls_server_config.max_version",
            f"{cfg.max_version} is below min_version {cfg.min_version or _DEFAULT_MIN_VERSION}",
        )

    if (cfg.cert_file is None) != (cfg.key_file is None):
        missing, present = ("key_file", "cert_file") if cfg.key_file is None else ("cert_file", "key_file")
        raise _fail(where, f"tls_server_config.{missing}", f"is required when {present} is set")
    if cfg.cert_file is None:
        others = [
            key
            for key, value in (
                ("client_auth_type", cfg.client_auth_type != "NoClientCert"),
                ("client_ca_file", cfg.client_ca_file is not None),
                ("min_version", cfg.min_version is not None),
                ("max_version", cfg.max_version is not None),
            )
            if value
        ]
        if others:
            # Serving plain HTTP here (as exporter-toolkit would for min_version alone) would
            # quietly drop the protection the operator asked for.
            raise _fail(
                where,
                "tls_server_config.cert_file",
                f"cert_file and key_file are required when {', '.join(others)} is set",
            )
    if cfg.client_auth_type in _CLIENT_AUTH_NEEDS_CA and cfg.client_ca_file is None:
        raise _fail(
            where,
            "tls_server_config.client_ca_file",
            f"is required for client_auth_type {cfg.client_auth_type}",
        )
    if cfg.client_auth_type == "NoClientCert" and cfg.client_ca_file is not None:
        # Same rule as exporter-toolkit: a CA with no policy looks like mTLS but checks nothing.
        raise _fail(
            where,
            "tls_server_config.client_ca_file",
            "is set but client_auth_type is NoClientCert, so client certificates would never be checked",
        )

    if not isinstance(cfg.headers, Mapping):
        raise _fail(where, "http_server_config.headers", f"must be a mapping, got {cfg.headers!r}")
    for name, value in cfg.headers.items():
        key = f"http_server_config.headers.{name}"
        if name not in _ALLOWED_HEADERS:
            raise _fail(where, key, f"header cannot be configured; allowed: {', '.join(_ALLOWED_HEADERS)}")
        if not isinstance(value, str):
            raise _fail(where, key, f"value must be a string, got {value!r}")
        allowed = _ALLOWED_HEADERS[name]
        if allowed is not None and value not in allowed:
            raise _fail(where, key, f"invalid value {value!r}; expected one of {', '.join(allowed)}")
        if any(ch in value for ch in "\r\n\0"):
            raise _fail(where, key, "value must not contain CR, LF or NUL (header injection)")

    if not isinstance(cfg.basic_auth_users, Mapping):
        raise _fail(
            where,
            "basic_auth_users",
            f"must be a mapping of user to bcrypt hash, got {cfg.basic_auth_users!r}",
        )
    for user, hashed in cfg.basic_auth_users.items():
        if not isinstance(user, str):
            raise _fail(where, "basic_auth_users", f"user name {user!r} must be a string (quote it in YAML)")
        key = f"basic_auth_users.{user}"
        if ":" in user:
            raise _fail(where, key, "user name must not contain ':' (basic auth could never send it)")
        if not isinstance(hashed, str) or not _BCRYPT_HASH_RE.fullmatch(hashed):
            # Do not echo the value: it is a password hash, or a plain-text password by mistake.
            raise _fail(
                where,
                key,
                "is not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04-31, 60 characters); plain passwords are not accepted",
            )


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebConfig:
    """A validated web config: TLS settings, extra response headers and basic-auth users.

    Frozen, so one instance can be shared by every request thread without locking; the only
    mutable state (the bcrypt cache and lock) is internal and guarded.  ``WebConfig()`` enables
    nothing: plain HTTP, no auth.  Paths are as given here; ``load_web_config`` makes them
    absolute, resolved against the config file's directory.
    """

    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str | None = None
    max_version: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # repr=False: hashes in a log line are an offline-cracking gift.
    basic_auth_users: dict[str, str] = field(default_factory=dict, repr=False)

    _cache: _VerifiedCache = field(default_factory=_VerifiedCache, init=False, repr=False, compare=False)
    # Serializes bcrypt, as exporter-toolkit does: a burst of wrong passwords then costs one core,
    # not all of them, on a node whose CPUs belong to the GPU jobs.
    _bcrypt_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )
    # Per-instance secret for the cache digests, so the cache never holds anything from which a
    # password could be brute-forced at SHA-256 speed.
    _cache_secret: bytes = field(
        default_factory=lambda: secrets.token_bytes(32), init=False, repr=False, compare=False
    )
    _decoy_cost: int = field(default=10, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Normalize Go-style "empty means unset" values, copy the dicts, and validate."""
        for key in ("cert_file", "key_file", "client_ca_file", "min_version", "max_version"):
            if getattr(self, key) == "":
                object.__setattr__(self, key, None)
        auth_type = self.client_auth_type or "NoClientCert"
        object.__setattr__(self, "client_auth_type", _CLIENT_AUTH_ALIASES.get(auth_type, auth_type))
        # Copies, so a caller mutating its own dict later cannot change a validated config.
        if isinstance(self.headers, Mapping):
            object.__setattr__(self, "headers", dict(self.headers))
        if isinstance(self.basic_auth_users, Mapping):
            object.__setattr__(self, "basic_auth_users", dict(self.basic_auth_users))
        _validate("WebConfig", self)
        if self.basic_auth_users:
            # The decoy uses the highest cost in use, so an unknown user is never answered faster
            # than a known one (exporter-toolkit does the same).
            cost = max(_bcrypt_cost(h) for h in self.basic_auth_users.values())
            object.__setattr__(self, "_decoy_cost", cost)

    @property
    def tls_enabled(self) -> bool:
        """True when the server must speak HTTPS (cert_file and key_file are set)."""
        return self.cert_file is not None and self.key_file is not None

    @property
    def auth_enabled(self) -> bool:
        """True when requests need valid basic-auth credentials."""
        return bool(self.basic_auth_users)

    def ssl_context(self) -> ssl.SSLContext | None:
        """Build a fresh server-side ``SSLContext``, or return None when TLS is not configured.

        The files are read on every call, so calling it again picks up rotated certificates.
        Problems with them (unreadable, bad PEM, key not matching the certificate, an encrypted
        key, a CA file without certificates) raise ``WebConfigError``, naming key and path.
        """
        if not self.tls_enabled:
            return None
        assert self.cert_file is not None and self.key_file is not None  # for type checkers
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version or _DEFAULT_MIN_VERSION]
        if self.max_version is not None:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]

        def refuse_password() -> bytes:
            # Without a callback OpenSSL would prompt on the terminal and hang a daemon.
            raise _EncryptedKeyError

        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=refuse_password)
        except _EncryptedKeyError:
            raise _fail(
                "web config",
                "tls_server_config.key_file",
                f"{self.key_file}: encrypted private keys are not supported",
            ) from None
        except (OSError, ssl.SSLError) as exc:  # SSLError is an OSError; listed for clarity
            raise _fail(
                "web config",
                "tls_server_config.cert_file/key_file",
                f"cannot load certificate {self.cert_file} with key {self.key_file}: {exc}",
            ) from exc

        if self.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise _fail(
                    "web config",
                    "tls_server_config.client_ca_file",
                    f"cannot load {self.client_ca_file}: {exc}",
                ) from exc
            if ctx.cert_store_stats()["x509"] == 0:
                raise _fail(
                    "web config",
                    "tls_server_config.client_ca_file",
                    f"{self.client_ca_file} holds no certificates",
                )

        if self.client_auth_type == "NoClientCert":
            ctx.verify_mode = ssl.CERT_NONE
        elif self.client_auth_type == "RequestClientCert":
            ctx.verify_mode = ssl.CERT_OPTIONAL if self.client_ca_file is not None else ssl.CERT_NONE
        elif self.client_auth_type == "VerifyClientCertIfGiven":
            ctx.verify_mode = ssl.CERT_OPTIONAL
        else:  # RequireAnyClientCert, RequireAndVerifyClientCert
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def authorize(self, authorization_header: str | None) -> bool:
        """Check an ``Authorization`` header value; True if auth is off or the credentials match.

        Unknown users still cost one bcrypt check (against a decoy hash of the same cost), so the
        response time does not reveal which user names exist.  Successful checks are cached, so
        Prometheus scraping every 15 s with the same credentials pays for bcrypt once.  Concurrent
        first checks of the same credentials wait for each other and run bcrypt once.
        """
        if not self.basic_auth_users:
            return True
        credentials = _parse_basic_auth(authorization_header)
        if credentials is None:
            return False
        user, password = credentials
        stored = self.basic_auth_users.get(user)
        if stored is None:
            with self._bcrypt_lock:
                _checkpw(password, _decoy_hash(self._decoy_cost))
            return False

        hashed = stored.encode("ascii")
        digest = self._cache_digest(user, password, hashed)
        if digest in self._cache:
            return True
        with self._bcrypt_lock:
            if digest in self._cache:  # verified by another thread while we waited
                return True
            ok = _checkpw(password, hashed)
        if ok:
            self._cache.add(digest)
        return ok

    def _cache_digest(self, user: str, password: bytes, hashed: bytes) -> bytes:
        """HMAC-SHA-256 of (user, password, hash), each length-prefixed so no two tuples collide.

        The hash is part of the key so that a changed hash never matches a stale entry.
        """
        mac = hmac.new(self._cache_secret, digestmod=hashlib.sha256)
        for part in (user.encode("utf-8"), password, hashed):
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()


class _EncryptedKeyError(Exception):
    """Raised from the password callback to abort loading an encrypted private key."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" merges may override
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key; construct_mapping reports it properly
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates
)


def _section(where: str, doc: Mapping[Any, Any], name: str) -> dict[Any, Any]:
    """Return a top-level section as a dict; absent or empty (``key:`` with nothing) gives {}."""
    value = doc.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, name, f"must be a mapping, got {type(value).__name__}")
    return value


def _check_keys(
    where: str,
    mapping: Mapping[Any, Any],
    prefix: str,
    known: frozenset[str],
    unsupported: frozenset[str] = frozenset(),
    ignored: frozenset[str] = frozenset(),
) -> None:
    """Refuse unknown keys (typos must not pass silently) and known-but-unsupported ones."""
    for key in mapping:
        name = f"{prefix}{key}"
        if key in unsupported:
            raise _fail(where, name, "is an exporter-toolkit option gpufleet does not support; remove it")
        if not isinstance(key, str) or key not in known | ignored:
            allowed = ", ".join(sorted(known | ignored))
            raise _fail(where, name, f"unknown key; expected one of {allowed}")


def _string(where: str, section: Mapping[Any, Any], prefix: str, key: str) -> str | None:
    """Read an optional string; an empty string means unset, as Go's zero value does."""
    value = section.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _fail(where, f"{prefix}{key}", f"must be a string, got {value!r}")
    return value


def _resolve(base_dir: str, path: str | None) -> str | None:
    """Paths in the file are relative to the file's directory, as in exporter-toolkit."""
    if path is None:
        return None
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def load_web_config(path: str | os.PathLike[str] | None) -> WebConfig:
    """Read and fully validate a web config file; None or "" means no file (nothing enabled).

    Everything is checked here, at startup, including that the certificate and key files load,
    so a broken config stops the exporter with one clear ``WebConfigError`` instead of failing
    the first scrape.  File paths in the result are absolute.
    """
    if path is None or path == "":
        return WebConfig()
    where = os.fspath(path)
    try:
        with open(where, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise _fail(where, None, f"cannot read web config file: {exc.strerror or exc}") from exc
    try:
        doc = yaml.load(raw, Loader=_StrictLoader)  # _StrictLoader is a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise _fail(where, None, f"invalid YAML: {exc}") from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise _fail(where, None, f"top level must be a mapping, got {type(doc).__name__}")
    _check_keys(where, doc, "", _TOP_LEVEL_KEYS, _TOP_LEVEL_UNSUPPORTED)

    tls = _section(where, doc, "tls_server_config")
    _check_keys(where, tls, "tls_server_config.", _TLS_KEYS, _TLS_UNSUPPORTED, _TLS_IGNORED)
    if "prefer_server_cipher_suites" in tls and not isinstance(tls["prefer_server_cipher_suites"], bool):
        raise _fail(where, "tls_server_config.prefer_server_cipher_suites", "must be true or false")
    strings = {key: _string(where, tls, "tls_server_config.", key) for key in sorted(_TLS_KEYS)}

    http = _section(where, doc, "http_server_config")
    _check_keys(where, http, "http_server_config.", _HTTP_KEYS, ignored=_HTTP_IGNORED)
    if "http2" in http and not isinstance(http["http2"], bool):
        raise _fail(where, "http_server_config.http2", "must be true or false")
    headers = http.get("headers") or {}
    users = doc.get("basic_auth_users") or {}

    base_dir = os.path.dirname(os.path.abspath(where))
    fields: dict[str, Any] = {
        "cert_file": _resolve(base_dir, strings["cert_file"]),
        "key_file": _resolve(base_dir, strings["key_file"]),
        "client_auth_type": strings["client_auth_type"] or "NoClientCert",
        "client_ca_file": _resolve(base_dir, strings["client_ca_file"]),
        "min_version": strings["min_version"],
        "max_version": strings["max_version"],
        "headers": headers,
        "basic_auth_users": users,
    }
    try:
        config = WebConfig(**fields)
    except WebConfigError as exc:
        # Same checks, same text, but naming the file instead of "WebConfig".
        raise WebConfigError(where + str(exc).removeprefix("WebConfig")) from None

    for key in ("cert_file", "key_file", "client_ca_file"):
        file_path = getattr(config, key)
        if file_path is None:
            continue
        try:
            with open(file_path, "rb"):
                pass
        except OSError as exc:
            raise _fail(
                where, f"tls_server_config.{key}", f"cannot read {file_path}: {exc.strerror or exc}"
            ) from exc
    try:
        config.ssl_context()  # proves the PEM files load, now rather than at the first handshake
    except WebConfigError as exc:
        raise WebConfigError(where + str(exc).removeprefix("web config")) from None
    return config
