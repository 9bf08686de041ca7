"""Tests for exporters.webconfig: parsing, validation, basic auth (and its cache) and real TLS/mTLS."""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The repository root is not on sys.path when pytest is run as .venv/bin/pytest without an
# installed package; make `import exporters` work either way.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from exporters import webconfig  # noqa: E402
from exporters.webconfig import WebConfig, WebConfigError, load_web_config  # noqa: E402

# Cost 4 (the minimum) keeps every bcrypt check around a millisecond.
ALICE_PW = "s3cret"
BOB_PW = "hunter2:with:colons"
ALICE_HASH = bcrypt.hashpw(ALICE_PW.encode(), bcrypt.gensalt(rounds=4)).decode()
BOB_HASH = bcrypt.hashpw(BOB_PW.encode(), bcrypt.gensalt(rounds=5)).decode()


def basic(user: str | bytes, password: str | bytes) -> str:
    """An Authorization header value for user/password."""
    user_b = user.encode() if isinstance(user, str) else user
    pw_b = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(user_b + b":" + pw_b).decode()


def write(tmp_path: Path, text: str, name: str = "web.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class CountingCheckpw:
    """Stands in for bcrypt.checkpw, counting calls (thread-safe) and recording the hashes used."""

    def __init__(self) -> None:
        self.real = bcrypt.checkpw
        self.lock = threading.Lock()
        self.hashes: list[bytes] = []

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self.lock:
            self.hashes.append(hashed)
        return self.real(password, hashed)

    @property
    def calls(self) -> int:
        with self.lock:
            return len(self.hashes)


@pytest.fixture
def checkpw(monkeypatch: pytest.MonkeyPatch) -> CountingCheckpw:
    counter = CountingCheckpw()
    monkeypatch.setattr(webconfig.bcrypt, "checkpw", counter)
    return counter


@pytest.fixture
def auth_config() -> WebConfig:
    return WebConfig(basic_auth_users={"alice": ALICE_HASH, "bob": BOB_HASH})


# --------------------------------------------------------------------------------------------
# Certificates (generated with the openssl command line)
# --------------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _self_signed(directory: Path, name: str, subject: str, san: str | None = None) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    args = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    args += ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", subject]
    if san:
        args += ["-addext", f"subjectAltName={san}"]
    _openssl(*args)
    return cert, key


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Self-signed server cert for 127.0.0.1, a trusted client cert and an untrusted one."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed")
    d = tmp_path_factory.mktemp("certs")
    server_crt, server_key = _self_signed(d, "server", "/CN=localhost", "IP:127.0.0.1,DNS:localhost")
    client_crt, client_key = _self_signed(d, "client", "/CN=prometheus")
    rogue_crt, rogue_key = _self_signed(d, "rogue", "/CN=prometheus")
    encrypted_key = d / "encrypted.key"
    _openssl("ec", "-in", str(server_key), "-aes128", "-passout", "pass:x", "-out", str(encrypted_key))
    garbage = d / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    empty = d / "empty.pem"
    empty.write_text("")
    return {
        "dir": d,
        "server_crt": server_crt,
        "server_key": server_key,
        "client_crt": client_crt,
        "client_key": client_key,
        "rogue_crt": rogue_crt,
        "rogue_key": rogue_key,
        "encrypted_key": encrypted_key,
        "garbage": garbage,
        "empty": empty,
    }


# --------------------------------------------------------------------------------------------
# Valid configurations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, ""])
def test_no_file_enables_nothing(path: str | None) -> None:
    cfg = load_web_config(path)
    assert cfg == WebConfig()
    assert not cfg.tls_enabled
    assert not cfg.auth_enabled
    assert cfg.ssl_context() is None
    assert cfg.authorize(None) is True
    assert cfg.authorize("garbage") is True
    assert cfg.headers == {}


@pytest.mark.parametrize(
    "text", ["", "# only a comment\n", "tls_server_config:\nhttp_server_config:\nbasic_auth_users:\n"]
)
def test_empty_file_or_sections_enable_nothing(tmp_path: Path, text: str) -> None:
    cfg = load_web_config(str(write(tmp_path, text)))
    assert not cfg.tls_enabled and not cfg.auth_enabled
    assert cfg.client_auth_type == "NoClientCert"


def test_full_config_resolves_paths_relative_to_the_file(
    tmp_path: Path, certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    for name in ("server_crt", "server_key", "client_crt"):
        shutil.copy(certs[name], conf_dir / certs[name].name)
    path = write(
        conf_dir,
        f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: client.crt
  min_version: TLS12
  max_version: TLS13
  prefer_server_cipher_suites: true
http_server_config:
  http2: false
  headers:
    X-Frame-Options: deny
    X-Content-Type-Options: nosniff
    Strict-Transport-Security: max-age=31536000
basic_auth_users:
  alice: {ALICE_HASH}
  "bob": '{BOB_HASH}'
""",
    )
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    cfg = load_web_config(str(path))
    assert cfg.cert_file == str(conf_dir / "server.crt")
    assert cfg.key_file == str(conf_dir / "server.key")
    assert cfg.client_ca_file == str(conf_dir / "client.crt")
    assert cfg.client_auth_type == "RequireAndVerifyClientCert"
    assert (cfg.min_version, cfg.max_version) == ("TLS12", "TLS13")
    assert cfg.headers == {
        "X-Frame-Options": "deny",
        "X-Content-Type-Options": "nosniff",
        "Strict-Transport-Security": "max-age=31536000",
    }
    assert cfg.basic_auth_users == {"alice": ALICE_HASH, "bob": BOB_HASH}
    assert cfg.tls_enabled and cfg.auth_enabled
    ctx = cfg.ssl_context()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ALICE_HASH not in repr(cfg)  # hashes stay out of logs


def test_absolute_paths_are_kept(tmp_path: Path, certs: dict[str, Path]) -> None:
    path = write(
        tmp_path,
        f"tls_server_config:\n  cert_file: {certs['server_crt']}\n  key_file: {certs['server_key']}\n",
    )
    cfg = load_web_config(path)  # os.PathLike works too
    assert cfg.cert_file == str(certs["server_crt"])
    ctx = cfg.ssl_context()
    assert ctx is not None
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default floor
    assert ctx.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("auth_type", "with_ca", "verify_mode", "normalized"),
    [
        ("NoClientCert", False, ssl.CERT_NONE, "NoClientCert"),
        ("RequestClientCert", False, ssl.CERT_NONE, "RequestClientCert"),
        ("RequestClientCert", True, ssl.CERT_OPTIONAL, "RequestClientCert"),
        ("RequireAnyClientCert", True, ssl.CERT_REQUIRED, "RequireAnyClientCert"),
        ("RequireClientCert", True, ssl.CERT_REQUIRED, "RequireAnyClientCert"),  # old alias
        ("VerifyClientCertIfGiven", True, ssl.CERT_OPTIONAL, "VerifyClientCertIfGiven"),
        ("RequireAndVerifyClientCert", True, ssl.CERT_REQUIRED, "RequireAndVerifyClientCert"),
    ],
)
def test_client_auth_types(
    tmp_path: Path,
    certs: dict[str, Path],
    auth_type: str,
    with_ca: bool,
    verify_mode: ssl.VerifyMode,
    normalized: str,
) -> None:
    text = f"tls_server_config:\n  cert_file: {certs['server_crt']}\n  key_file: {certs['server_key']}\n"
    text += f"  client_auth_type: {auth_type}\n"
    if with_ca:
        text += f"  client_ca_file: {certs['client_crt']}\n"
    cfg = load_web_config(str(write(tmp_path, text)))
    assert cfg.client_auth_type == normalized
    ctx = cfg.ssl_context()
    assert ctx is not None and ctx.verify_mode == verify_mode


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_prefixes_accepted_and_verified(tmp_path: Path, prefix: str) -> None:
    hashed = prefix + ALICE_HASH[4:]
    cfg = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n")))
    assert cfg.authorize(basic("alice", ALICE_PW)) is True
    assert cfg.authorize(basic("alice", "wrong")) is False


def test_webconfig_copies_its_dicts() -> None:
    users = {"alice": ALICE_HASH}
    cfg = WebConfig(basic_auth_users=users)
    users["mallory"] = ALICE_HASH
    users["alice"] = "not a hash"
    assert cfg.basic_auth_users == {"alice": ALICE_HASH}


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------

_TLS = "tls_server_config:\n  cert_file: s.crt\n  key_file: s.key\n"

INVALID = {
    "unknown top-level key": ("tls_config:\n  cert_file: x\n", ["tls_config", "unknown key"]),
    "unknown tls key": (
        "tls_server_config:\n  cert_flie: x\n",
        ["tls_server_config.cert_flie", "unknown key"],
    ),
    "unknown http key": ("http_server_config:\n  header: {}\n", ["http_server_config.header", "unknown key"]),
    "unsupported cipher_suites": (
        _TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        ["cipher_suites", "not support"],
    ),
    "unsupported client_allowed_sans": (
        _TLS + "  client_allowed_sans: [a]\n",
        ["client_allowed_sans", "not support"],
    ),
    "unsupported inline key": (
        "tls_server_config:\n  cert: x\n  key: y\n",
        ["tls_server_config.cert", "not support"],
    ),
    "unsupported rate_limit": ("rate_limit:\n  burst: 1\n", ["rate_limit", "not support"]),
    "cert without key": (
        "tls_server_config:\n  cert_file: s.crt\n",
        ["tls_server_config.key_file", "required"],
    ),
    "key without cert": (
        "tls_server_config:\n  key_file: s.key\n",
        ["tls_server_config.cert_file", "required"],
    ),
    "tls setting without cert": ("tls_server_config:\n  min_version: TLS13\n", ["cert_file", "min_version"]),
    "unknown client_auth_type": (_TLS + "  client_auth_type: Bogus\n", ["client_auth_type", "Bogus"]),
    "verify needs a CA": (
        _TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        ["client_ca_file", "required"],
    ),
    "verify-if-given needs a CA": (
        _TLS + "  client_auth_type: VerifyClientCertIfGiven\n",
        ["client_ca_file", "required"],
    ),
    "require-any needs a CA": (
        _TLS + "  client_auth_type: RequireAnyClientCert\n",
        ["client_ca_file", "required"],
    ),
    "CA without policy": (_TLS + "  client_ca_file: ca.crt\n", ["client_ca_file", "NoClientCert"]),
    "unknown min_version": (_TLS + "  min_version: TLS14\n", ["tls_server_config.min_version", "TLS14"]),
    "unknown max_version": (_TLS + "  max_version: SSL3\n", ["tls_server_config.max_version", "SSL3"]),
    "max below min": (_TLS + "  min_version: TLS13\n  max_version: TLS12\n", ["max_version", "below"]),
    "non-string path": (
        "tls_server_config:\n  cert_file: 5\n  key_file: s.key\n",
        ["tls_server_config.cert_file", "string"],
    ),
    "section not a mapping": ("tls_server_config: [a]\n", ["tls_server_config", "mapping"]),
    "users not a mapping": ("basic_auth_users: [alice]\n", ["basic_auth_users", "mapping"]),
    "plain password": ("basic_auth_users:\n  alice: s3cret\n", ["basic_auth_users.alice", "bcrypt"]),
    "unsupported $2x$": (
        f"basic_auth_users:\n  alice: '$2x${ALICE_HASH[4:]}'\n",
        ["basic_auth_users.alice", "bcrypt"],
    ),
    "truncated hash": (
        f"basic_auth_users:\n  alice: '{ALICE_HASH[:-1]}'\n",
        ["basic_auth_users.alice", "bcrypt"],
    ),
    "cost out of range": (
        f"basic_auth_users:\n  alice: '$2b$03{ALICE_HASH[6:]}'\n",
        ["basic_auth_users.alice", "bcrypt"],
    ),
    "invalid salt": (
        f"basic_auth_users:\n  alice: '{ALICE_HASH[:28]}A{ALICE_HASH[29:]}'\n",
        ["basic_auth_users.alice"],
    ),
    "hash not a string": ("basic_auth_users:\n  alice: 12\n", ["basic_auth_users.alice", "bcrypt"]),
    "user not a string": (
        f"basic_auth_users:\n  123: '{ALICE_HASH}'\n",
        ["basic_auth_users", "123", "string"],
    ),
    "user with colon": (f"basic_auth_users:\n  'a:b': '{ALICE_HASH}'\n", ["basic_auth_users.a:b", "':'"]),
    "header not allowed": (
        "http_server_config:\n  headers:\n    Content-Type: foo\n",
        ["headers.Content-Type"],
    ),
    "header bad value": (
        "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
        ["X-Frame-Options", "allow"],
    ),
    "header injection": (
        'http_server_config:\n  headers:\n    Content-Security-Policy: "a\\r\\nSet-Cookie: x"\n',
        ["Content-Security-Policy", "CR"],
    ),
    "http2 not a bool": ("http_server_config:\n  http2: maybe\n", ["http_server_config.http2"]),
    "invalid YAML": ("tls_server_config: [\n", ["invalid YAML"]),
    "top level not a mapping": ("- a\n- b\n", ["top level", "mapping"]),
    "duplicate key": (
        f"basic_auth_users:\n  alice: '{ALICE_HASH}'\n  alice: '{BOB_HASH}'\n",
        ["invalid YAML", "duplicate key 'alice'"],
    ),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_invalid_configs(tmp_path: Path, case: str) -> None:
    text, expected = INVALID[case]
    path = write(tmp_path, text)
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(str(path))
    message = str(excinfo.value)
    assert message.startswith(f"{path}: "), message
    for fragment in expected:
        assert fragment in message, message
    assert isinstance(excinfo.value, ValueError)


def test_hash_not_echoed_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "basic_auth_users:\n  alice: my-plaintext-password\n")
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(str(path))
    assert "my-plaintext-password" not in str(excinfo.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    with pytest.raises(WebConfigError, match="cannot read web config file") as excinfo:
        load_web_config(str(path))
    assert str(path) in str(excinfo.value)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match="cannot read web config file"):
        load_web_config(str(tmp_path))  # a directory: reading it fails even as root


@pytest.mark.parametrize(
    ("key", "overrides"),
    [
        ("cert_file", {"cert_file": "missing.crt"}),
        ("key_file", {"key_file": "missing.key"}),
        (
            "client_ca_file",
            {"client_auth_type": "VerifyClientCertIfGiven", "client_ca_file": "missing-ca.crt"},
        ),
    ],
)
def test_missing_tls_files(
    tmp_path: Path, certs: dict[str, Path], key: str, overrides: dict[str, str]
) -> None:
    fields = {"cert_file": str(certs["server_crt"]), "key_file": str(certs["server_key"]), **overrides}
    path = write(tmp_path, "tls_server_config:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()))
    with pytest.raises(WebConfigError) as excinfo:
        load_web_config(str(path))
    message = str(excinfo.value)
    assert message.startswith(f"{path}: tls_server_config.{key}: cannot read "), message
    # The resolved path, so the operator sees where we looked.
    assert str(tmp_path / overrides[key]) in message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"cert_file": "garbage", "key_file": "server_key"}, "cannot load certificate"),
        ({"cert_file": "server_crt", "key_file": "garbage"}, "cannot load certificate"),
        ({"cert_file": "server_crt", "key_file": "client_key"}, "cannot load certificate"),  # mismatched pair
        (
            {"cert_file": "server_crt", "key_file": "encrypted_key"},
            "encrypted private keys are not supported",
        ),
        (
            {
                "cert_file": "server_crt",
                "key_file": "server_key",
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": "empty",
            },
            "client_ca_file",
        ),
        (
            {
                "cert_file": "server_crt",
                "key_file": "server_key",
                "client_auth_type": "RequireAndVerifyClientCert",
                "client_ca_file": "garbage",
            },
            "client_ca_file",
        ),
    ],
)
def test_bad_pem_fails_at_load_and_in_ssl_context(
    tmp_path: Path, certs: dict[str, Path], fields: dict[str, str], expected: str
) -> None:
    resolved = {k: (str(certs[v]) if v in certs else v) for k, v in fields.items()}
    path = write(tmp_path, "tls_server_config:\n" + "".join(f"  {k}: {v}\n" for k, v in resolved.items()))
    with pytest.raises(WebConfigError, match=expected) as excinfo:
        load_web_config(str(path))
    assert str(excinfo.value).startswith(f"{path}: tls_server_config.")

    cfg = WebConfig(**resolved)  # built in code: the PEM is only read by ssl_context()
    with pytest.raises(WebConfigError, match=expected):
        cfg.ssl_context()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"client_auth_type": "Bogus"},
        {"cert_file": "a.crt"},
        {"min_version": "TLS9"},
        {"headers": {"Set-Cookie": "a=b"}},
        {"basic_auth_users": {"alice": "plain"}},
    ],
)
def test_webconfig_constructor_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(WebConfigError, match=r"^WebConfig: "):
        WebConfig(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# authorize()
# --------------------------------------------------------------------------------------------


def test_authorize_accepts_valid_credentials(auth_config: WebConfig) -> None:
    assert auth_config.authorize(basic("alice", ALICE_PW)) is True
    assert auth_config.authorize(basic("bob", BOB_PW)) is True  # password split at the first colon only
    # The scheme is case-insensitive (RFC 7617).
    assert auth_config.authorize("basic " + basic("alice", ALICE_PW)[6:]) is True


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("alice", "wrong"),
        ("alice", ""),
        ("alice", ALICE_PW + "x"),
        ("alice", BOB_PW),
        ("bob", ALICE_PW),
        ("mallory", ALICE_PW),
        ("", ALICE_PW),
        ("Alice", ALICE_PW),
    ],
)
def test_authorize_rejects_bad_credentials(auth_config: WebConfig, user: str, password: str) -> None:
    assert auth_config.authorize(basic(user, password)) is False


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        "Basic !!!notbase64",
        # Right credentials with the padding dropped: Go's strict decoder refuses it too.
        basic("bob", BOB_PW).rstrip("="),
        "Bearer " + base64.b64encode(f"alice:{ALICE_PW}".encode()).decode(),
        "Basic " + base64.b64encode(b"alice").decode(),  # no colon
        "Basic " + base64.b64encode(b"\xff\xfe:" + ALICE_PW.encode()).decode(),  # user not UTF-8
        "Basic \u00e9\u00e9\u00e9\u00e9",  # non-ASCII "base64"
        "Basic " + "A" * 10000,
        12345,
    ],
)
def test_authorize_rejects_garbage_headers(auth_config: WebConfig, header: object) -> None:
    assert auth_config.authorize(header) is False  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.text(), raw=st.binary(max_size=100))
def test_authorize_never_raises(auth_config: WebConfig, header: str, raw: bytes) -> None:
    assert auth_config.authorize(header) is False
    assert auth_config.authorize("Basic " + base64.b64encode(raw).decode()) is False


def test_authorize_truncates_long_passwords_like_go() -> None:
    long_password = b"p" * 72
    cfg = WebConfig(
        basic_auth_users={"alice": bcrypt.hashpw(long_password, bcrypt.gensalt(rounds=4)).decode()}
    )
    assert cfg.authorize(basic("alice", long_password)) is True
    assert cfg.authorize(basic("alice", long_password + b"ignored by bcrypt")) is True  # as node_exporter
    assert cfg.authorize(basic("alice", long_password[:71])) is False


def test_unknown_user_still_costs_a_bcrypt_check(auth_config: WebConfig, checkpw: CountingCheckpw) -> None:
    assert auth_config.authorize(basic("mallory", "whatever")) is False
    assert checkpw.calls == 1
    decoy = checkpw.hashes[0].decode()
    assert decoy not in (ALICE_HASH, BOB_HASH)
    assert decoy[4:6] == "05"  # the highest cost configured (bob's), so it is never faster
    assert auth_config.authorize(basic("mallory", "whatever")) is False
    assert checkpw.calls == 2  # failures are never cached


def test_cache_skips_bcrypt_for_repeated_success(auth_config: WebConfig, checkpw: CountingCheckpw) -> None:
    header = basic("alice", ALICE_PW)
    assert auth_config.authorize(header) is True
    assert checkpw.calls == 1
    for _ in range(5):
        assert auth_config.authorize(header) is True
    assert checkpw.calls == 1  # served from the cache

    assert auth_config.authorize(basic("alice", "wrong")) is False  # a different password misses
    assert checkpw.calls == 2
    assert auth_config.authorize(basic("alice", "wrong")) is False
    assert checkpw.calls == 3
    assert auth_config.authorize(basic("bob", BOB_PW)) is True  # another user misses, then hits
    assert auth_config.authorize(basic("bob", BOB_PW)) is True
    assert checkpw.calls == 4


def test_cache_is_per_config_and_keyed_by_hash(checkpw: CountingCheckpw) -> None:
    header = basic("alice", ALICE_PW)
    first = WebConfig(basic_auth_users={"alice": ALICE_HASH})
    assert first.authorize(header) and first.authorize(header)
    assert checkpw.calls == 1
    # A reloaded config (say, with a rotated hash) never trusts another instance's cache.
    other_hash = bcrypt.hashpw(ALICE_PW.encode(), bcrypt.gensalt(rounds=4)).decode()
    second = WebConfig(basic_auth_users={"alice": other_hash})
    assert second.authorize(header) is True
    assert checkpw.calls == 2


def test_concurrent_first_checks_run_bcrypt_once(auth_config: WebConfig, checkpw: CountingCheckpw) -> None:
    header = basic("alice", ALICE_PW)
    barrier = threading.Barrier(8)
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        ok = auth_config.authorize(header)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 8
    assert checkpw.calls == 1


def test_verified_cache_is_bounded_lru() -> None:
    cache = webconfig._VerifiedCache(maxsize=3)
    for key in (b"a", b"b", b"c"):
        cache.add(key)
    assert b"a" in cache  # touch: "b" is now the least recently used
    cache.add(b"d")
    assert len(cache) == 3
    assert b"b" not in cache
    assert all(k in cache for k in (b"a", b"c", b"d"))


def test_auth_disabled_authorizes_everything() -> None:
    cfg = WebConfig()
    assert not cfg.auth_enabled
    assert cfg.authorize(None) and cfg.authorize(basic("anyone", "anything"))


# --------------------------------------------------------------------------------------------
# Real TLS round trips through ThreadingHTTPServer
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(cfg: WebConfig) -> Iterator[tuple[int, list[str]]]:
    """Serve /metrics over the config's TLS and auth, wired as the module docstring describes.

    Yields the port and the paths of requests that reached do_GET at all.
    """
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        timeout = 5

        def do_GET(self) -> None:
            requests.append(self.path)
            if not cfg.authorize(self.headers.get("Authorization")):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b"gpu_up 1\n"
            self.send_response(200)
            for name, value in cfg.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: object, client_address: object) -> None:
            pass  # rejected handshakes are expected in these tests

    server = Server(("127.0.0.1", 0), Handler)
    ctx = cfg.ssl_context()
    assert ctx is not None
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def client_context(certs: dict[str, Path], client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs["server_crt"]))
    if client is not None:
        ctx.load_cert_chain(str(certs[f"{client}_crt"]), str(certs[f"{client}_key"]))
    return ctx


def fetch(
    port: int, ctx: ssl.SSLContext, authorization: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"https://127.0.0.1:{port}/metrics")
    if authorization:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), b""


def tls_config(certs: dict[str, Path], **extra: object) -> WebConfig:
    return WebConfig(cert_file=str(certs["server_crt"]), key_file=str(certs["server_key"]), **extra)  # type: ignore[arg-type]


def test_https_round_trip(tmp_path: Path, certs: dict[str, Path]) -> None:
    path = write(
        tmp_path,
        f"""
tls_server_config:
  cert_file: {certs["server_crt"]}
  key_file: {certs["server_key"]}
http_server_config:
  headers:
    X-Frame-Options: deny
""",
    )
    cfg = load_web_config(str(path))
    with serve(cfg) as (port, requests):
        status, headers, body = fetch(port, client_context(certs))
        assert (status, body) == (200, b"gpu_up 1\n")
        assert headers["X-Frame-Options"] == "deny"
        assert requests == ["/metrics"]

        # A client that does not trust the certificate refuses the connection.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch(port, ssl.create_default_context())


def test_https_with_basic_auth(certs: dict[str, Path]) -> None:
    cfg = tls_config(certs, basic_auth_users={"alice": ALICE_HASH})
    with serve(cfg) as (port, _):
        ctx = client_context(certs)
        status, headers, _ = fetch(port, ctx)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert fetch(port, ctx, basic("alice", "wrong"))[0] == 401
        assert fetch(port, ctx, basic("alice", ALICE_PW))[0] == 200


def test_min_version_is_enforced(certs: dict[str, Path]) -> None:
    with serve(tls_config(certs, min_version="TLS13")) as (port, requests):
        old = client_context(certs)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(OSError):
            fetch(port, old)
        assert requests == []
        assert fetch(port, client_context(certs))[0] == 200


def test_stalled_client_does_not_block_other_scrapes(certs: dict[str, Path]) -> None:
    """The handshake runs in the connection's thread, not in accept(): a silent client is harmless."""
    with serve(tls_config(certs)) as (port, _), socket.create_connection(("127.0.0.1", port)):
        assert fetch(port, client_context(certs))[0] == 200


@pytest.mark.parametrize("auth_type", ["RequireAndVerifyClientCert", "RequireAnyClientCert"])
def test_mutual_tls_requires_a_trusted_client_cert(certs: dict[str, Path], auth_type: str) -> None:
    cfg = tls_config(certs, client_auth_type=auth_type, client_ca_file=str(certs["client_crt"]))
    with serve(cfg) as (port, requests):
        with pytest.raises(OSError):  # ssl.SSLError, URLError or a reset, depending on timing
            fetch(port, client_context(certs))  # no client certificate
        with pytest.raises(OSError):
            fetch(port, client_context(certs, "rogue"))  # a certificate the CA did not issue
        assert requests == []  # neither got as far as an HTTP request

        status, _, body = fetch(port, client_context(certs, "client"))
        assert (status, body) == (200, b"gpu_up 1\n")
        assert requests == ["/metrics"]


def test_verify_client_cert_if_given(certs: dict[str, Path]) -> None:
    cfg = tls_config(
        certs, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(certs["client_crt"])
    )
    with serve(cfg) as (port, requests):
        assert fetch(port, client_context(certs))[0] == 200  # no certificate: fine
        assert fetch(port, client_context(certs, "client"))[0] == 200
        with pytest.raises(OSError):
            fetch(port, client_context(certs, "rogue"))  # a certificate that does not verify: refused
        assert requests == ["/metrics", "/metrics"]


def test_public_api() -> None:
    """The names other modules import."""
    assert {"WebConfig", "WebConfigError", "load_web_config"} <= set(webconfig.__all__)
    assert issubclass(WebConfigError, ValueError)
