"""A tiny FUSE filesystem in pure Python whose statfs can be made to hang.

It exists to test what a hung NFS/Lustre/FUSE mount does to the storage
collector with a *real* blocked ``statfs(2)``: the kernel keeps the caller in
``request_wait_answer`` until this server replies, exactly like a dead NFS
server keeps ``df`` waiting. No libfuse is needed: the server opens
``/dev/fuse``, mounts with ``mount(2)`` through ctypes and speaks the FUSE wire
protocol (``include/uapi/linux/fuse.h``) for what a statfs of the mount point
needs: INIT, GETATTR and LOOKUP of the (empty) root, STATFS. Everything else is
answered ENOSYS, at once, so only statfs can ever block.

Why the server runs in a child process: a process whose thread waits on a
FUSE request that its own server already read cannot exit, not even on
SIGKILL (the wait is uninterruptible), so it never closes ``/dev/fuse`` and the
mount stays hung for everyone (``df``, pytest's temp-dir cleanup in other
sessions). The child never touches the mount, is killed with its parent
(``PR_SET_PDEATHSIG``), and its death closes the device fd, which aborts the
connection: blocked callers get an error and a killed test process can exit.

Cleanup: ``unmount()`` (also at atexit) tells the child to abort and detach,
kills it if it does not, aborts through fusectl if anything is left, and
detaches with ``umount2(MNT_DETACH)``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_STATFS = 17
FUSE_INIT = 26
FUSE_INTERRUPT = 36
FUSE_BATCH_FORGET = 42

IN_HEADER = struct.Struct("<IIQQIIII")  # len, opcode, unique, nodeid, uid, gid, pid, extlen/padding
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags (prefix of fuse_init_in)
# fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
# max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
# fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
# mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
# fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
KSTATFS = struct.Struct("<QQQQQIIII24x")

MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
ROOT_ID = 1
FUSECTL = Path("/sys/fs/fuse/connections")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)

_live: set[FuseFS] = set()


def fuse_available() -> str | None:
    """None if a FUSE mount can be tried here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if os.geteuid() != 0:
        return "mounting needs root (CAP_SYS_ADMIN)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc}"
    return None


def detach(mountpoint: Path | str) -> None:
    """umount2(MNT_DETACH); quiet when nothing is mounted there."""
    _libc.umount2(os.fsencode(str(mountpoint)), MNT_DETACH)


def abort_connection(conn: str) -> bool:
    """Abort a FUSE connection through fusectl (mounted for the occasion if it is not)."""
    if (FUSECTL / conn / "abort").exists():
        try:
            (FUSECTL / conn / "abort").write_text("1")
            return True
        except OSError:
            return False
    tmp = tempfile.mkdtemp(prefix="gpufleet-fusectl-")
    try:
        if _libc.mount(b"fusectl", tmp.encode(), b"fusectl", 0, None) != 0:
            return False
        try:
            (Path(tmp) / conn / "abort").write_text("1")
            return True
        except OSError:
            return False
        finally:
            detach(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def _mountinfo_line(mountpoint: Path) -> bytes | None:
    target = os.fsencode(str(mountpoint))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return line
    return None


class FuseFS:
    """One mounted test filesystem, served by a child process.

    ``block_statfs()`` makes every later STATFS wait (unanswered) until
    ``release_statfs()``; ``statfs_requests`` counts the STATFS requests the
    kernel delivered, which is how a test sees whether a caller probed again.
    """

    def __init__(self, mountpoint: Path | str, *, blocks: int = 1000, bfree: int = 600, bavail: int = 500,
                 files: int = 300, ffree: int = 200, bsize: int = 4096, name: str = "gpufleettest"):
        self.mountpoint = Path(mountpoint)
        self.name = name
        self.geometry = (blocks, bfree, bavail, files, ffree, bsize)
        self.conn: str | None = None  # fusectl connection number (the mount's device minor)
        self.errors: list[str] = []
        self._child: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._ctl_file = None
        self._lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------
    def mount(self) -> FuseFS:
        parent, child = socket.socketpair()
        _live.add(self)
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-S", os.path.abspath(__file__), "--serve", str(self.mountpoint), self.name,
                 str(child.fileno()), str(os.getpid()), ",".join(map(str, self.geometry))],
                pass_fds=(child.fileno(),), close_fds=True,
            )
        finally:
            child.close()
        self._ctl = parent
        self._ctl_file = parent.makefile("rwb", buffering=0)
        reply = self._readline(timeout=30)
        if not reply.startswith("ok "):
            self.unmount()
            raise OSError(errno.EPERM, f"FUSE server could not mount {self.mountpoint}: {reply or 'no answer'}")
        self.conn = reply.split()[1]
        return self

    def __enter__(self) -> FuseFS:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def unmount(self) -> None:
        """Abort the connection (blocked requests fail at once), then detach. Idempotent."""
        child, self._child = self._child, None
        if child is not None:
            with contextlib.suppress(OSError):
                self._command("quit", timeout=10)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()  # its device fd closes with it: the kernel aborts the connection
                child.wait(10)
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if _mountinfo_line(self.mountpoint) is not None:
            if self.conn is not None and not abort_connection(self.conn):
                self.errors.append(f"could not abort FUSE connection {self.conn}")
            detach(self.mountpoint)
        _live.discard(self)

    # -- control ------------------------------------------------------------------
    def _readline(self, timeout: float) -> str:
        assert self._ctl is not None and self._ctl_file is not None
        self._ctl.settimeout(timeout)
        try:
            return self._ctl_file.readline().decode().strip()
        except (TimeoutError, OSError) as exc:
            return f"error {exc}"

    def _command(self, cmd: str, timeout: float = 30) -> str:
        with self._lock:
            if self._ctl is None:
                raise OSError(errno.ENOTCONN, "FUSE server not running")
            self._ctl.sendall(cmd.encode() + b"\n")
            return self._readline(timeout)

    def block_statfs(self) -> None:
        assert self._command("block") == "ok"

    def release_statfs(self) -> None:
        if self._ctl is not None:
            assert self._command("release") == "ok"

    def _stats(self) -> tuple[int, int]:
        reply = self._command("stats").split()
        return int(reply[1]), int(reply[2])

    @property
    def statfs_requests(self) -> int:
        return self._stats()[0]

    @property
    def pending(self) -> int:
        """STATFS requests delivered and not answered yet."""
        return self._stats()[1]

    def mountinfo_line(self) -> str:
        """This mount's line of /proc/self/mountinfo, as the kernel prints it."""
        line = _mountinfo_line(self.mountpoint)
        if line is None:
            raise LookupError(f"{self.mountpoint} not in /proc/self/mountinfo")
        return line.decode()


@atexit.register
def _cleanup_all() -> None:
    for fs in list(_live):
        fs.unmount()


# -- the server (child process) ---------------------------------------------------------


class _Server:
    def __init__(self, fd: int, kstatfs: bytes):
        self.fd = fd
        self.kstatfs = kstatfs
        self.blocking = False
        self.pending: list[int] = []
        self.statfs_requests = 0

    def reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller was interrupted and gave up
                raise

    def handle(self, buf: bytes) -> None:
        _len, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
        body = buf[IN_HEADER.size:]
        if opcode == FUSE_INIT:
            _major, minor, readahead, _flags = INIT_IN.unpack_from(body)
            self.reply(unique, INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, 65536, 1, 0, 0, 0))
        elif opcode == FUSE_GETATTR:
            if nodeid != ROOT_ID:
                self.reply(unique, error=-errno.ENOENT)
            else:
                attr = ATTR.pack(ROOT_ID, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
                self.reply(unique, ATTR_OUT_HEAD.pack(1, 0, 0) + attr)
        elif opcode == FUSE_LOOKUP:
            self.reply(unique, error=-errno.ENOENT)  # the root is empty
        elif opcode == FUSE_STATFS:
            self.statfs_requests += 1
            if self.blocking:
                self.pending.append(unique)
            else:
                self.reply(unique, self.kstatfs)
        elif opcode in (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT):
            return  # no reply expected
        else:
            self.reply(unique, error=-errno.ENOSYS)

    def control(self, cmd: str) -> str | None:
        if cmd == "block":
            self.blocking = True
        elif cmd == "release":
            self.blocking = False
            pending, self.pending = self.pending, []
            for unique in pending:
                self.reply(unique, self.kstatfs)
        elif cmd == "stats":
            return f"stats {self.statfs_requests} {len(self.pending)}"
        elif cmd == "quit":
            return None
        else:
            return f"error unknown command {cmd!r}"
        return "ok"


def _serve(mountpoint: str, name: str, ctl_fd: int, parent_pid: int, geometry: str) -> int:
    # Die with the test process: the one thing that unblocks its threads if it is SIGKILLed.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        return 1
    ctl = socket.socket(fileno=ctl_fd)
    blocks, bfree, bavail, files, ffree, bsize = (int(v) for v in geometry.split(","))
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if _libc.mount(name.encode(), os.fsencode(mountpoint), f"fuse.{name}".encode(), 0, ctypes.c_char_p(data)) != 0:
        err = ctypes.get_errno()
        ctl.sendall(f"error mount: {os.strerror(err)}\n".encode())
        return 1
    server = _Server(fd, KSTATFS.pack(blocks, bfree, bavail, files, ffree, bsize, 255, bsize, 0))
    line = _mountinfo_line(Path(mountpoint))
    conn = line.split()[2].split(b":")[1].decode() if line else "?"
    ctl.sendall(f"ok {conn}\n".encode())
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([fd, ctl], [], [])
            if fd in ready:
                try:
                    server.handle(os.read(fd, 1 << 17))
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # unmounted or aborted
                        return 0
                    if exc.errno not in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        raise
            if ctl in ready:
                chunk = ctl.recv(4096)
                if not chunk:
                    return 0  # the test process is gone
                buf += chunk
                while b"\n" in buf:
                    cmd, buf = buf.split(b"\n", 1)
                    answer = server.control(cmd.decode().strip())
                    if answer is None:
                        return 0
                    ctl.sendall(answer.encode() + b"\n")
    finally:
        os.close(fd)  # the last device fd: the kernel aborts the connection, blocked callers get ENOTCONN
        detach(mountpoint)
        with contextlib.suppress(OSError):
            ctl.sendall(b"ok\n")


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--serve":
    sys.exit(_serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))
