"""The storage collector: which mounts it reports and the exact numbers it reads.

Inputs are the real NFS capture in /work/shared/fixtures (prometheus/procfs test
data), hand-written files in tests/fixtures/storage that follow the kernel's
formats (mountinfo with escapes, pseudo and shared filesystems, bind and
stacked mounts; mountstats with NFSv3 and v4 on one mountpoint, 9-field
per-op lines, tcp/udp/rdma; Lustre llite stats old and new; diskstats; an NVMe
sysfs tree), and real directories for statfs. Hung mounts are in
test_storage_hung.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from exporters import storage
from exporters.collector import render
from exporters.storage import Filters, StorageCollector
from exporters.storage_parse import parse_mountinfo, parse_mountstats, unescape
from tests.conftest import SHARED_FIXTURES, need_binary, parse, scrape_collector, value, wait_for

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "storage"
PROC = FIXTURES / "proc"
SYS = FIXTURES / "sys"
REAL_MOUNTSTATS = SHARED_FIXTURES / "procfs" / "proc" / "26231" / "mountstats"


class FakeStatvfs:
    """statvfs that answers from the path (no real filesystem is touched) and records its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @staticmethod
    def result(path: str) -> os.statvfs_result:
        n = len(path)
        return os.statvfs_result((4096, 4096, n * 1000, n * 600, n * 500, n * 100, n * 40, n * 40, 0, 255))

    def __call__(self, path: str) -> os.statvfs_result:
        self.calls.append(path)
        return self.result(path)


def tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
    return root


def mountinfo_line(mount_id: int, dev: str, mountpoint: Path | str, fstype: str, source: str,
                   opts: str = "rw,relatime") -> str:
    mp = str(mountpoint).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    return f"{mount_id} 1 {dev} / {mp} {opts} shared:{mount_id} - {fstype} {source} rw\n"


@pytest.fixture
def fixture_collector():
    statvfs = FakeStatvfs()
    c = StorageCollector(str(PROC), str(SYS), "/", statvfs=statvfs)
    c.fake = statvfs  # type: ignore[attr-defined]
    yield c
    c.close()


def fs_labels(samples: dict, name: str) -> dict[str, float]:
    return {lab["mountpoint"]: v for lab, v in samples.get(name, [])}


# -- mountinfo and filesystem selection ----------------------------------------------------------


def test_mountinfo_octal_escapes_are_decoded():
    assert unescape(rb"/mnt/a\040b\011c\012d\134e") == b"/mnt/a b\tc\nd\\e"
    mounts, problems = parse_mountinfo(
        rb"29 21 259:6 / /local\040scratch rw,relatime shared:31 - ext4 /dev/disk\040one rw" + b"\n"
    )
    assert problems == []
    assert mounts[0].mountpoint == "/local scratch" and mounts[0].source == "/dev/disk one"
    assert mounts[0].dev == "259:6" and mounts[0].root == "/" and not mounts[0].readonly


def test_default_selection_keeps_local_and_shared_filesystems_and_skips_pseudo_ones(fixture_collector):
    m = scrape_collector(fixture_collector)
    assert sorted(fs_labels(m, "filesystem_stuck")) == [
        "/", "/gpfs/fs1", "/home", "/local scratch", "/lustre/scratch", "/mnt/beegfs", "/mnt/ceph", "/mnt/gcs",
        "/mnt/legacy", "/mnt/ro disk", "/mnt/shared", "/mnt/tab\tdir\\x", "/mnt/weka", "/raid", "/scratch",
    ]
    # Only the chosen mounts were statfs'ed, each once.
    assert sorted(fixture_collector.fake.calls) == sorted(fs_labels(m, "filesystem_stuck"))


def test_every_reported_mount_has_stuck_and_readonly_series(fixture_collector):
    m = scrape_collector(fixture_collector)
    key = lambda lab: (lab["device"], lab["mountpoint"], lab["fstype"])  # noqa: E731
    stuck = {key(lab): v for lab, v in m["filesystem_stuck"]}
    assert stuck and set(stuck.values()) == {0}
    assert {key(lab) for lab, _ in m["filesystem_readonly"]} == set(stuck)
    assert {key(lab) for lab, _ in m["filesystem_size_bytes"]} == set(stuck)


def test_filesystem_values_labels_readonly_and_escapes(fixture_collector):
    m = scrape_collector(fixture_collector)
    r = FakeStatvfs.result("/raid")
    lab = {"device": "/dev/md0", "mountpoint": "/raid", "fstype": "xfs"}
    assert value(m, "filesystem_size_bytes", **lab) == r.f_blocks * 4096
    assert value(m, "filesystem_free_bytes", **lab) == r.f_bfree * 4096
    assert value(m, "filesystem_avail_bytes", **lab) == r.f_bavail * 4096
    assert value(m, "filesystem_files", **lab) == r.f_files
    assert value(m, "filesystem_files_free", **lab) == r.f_ffree
    assert value(m, "filesystem_readonly", **lab) == 0
    assert value(m, "filesystem_device_error", **lab) == 0
    assert value(m, "filesystem_readonly", mountpoint="/mnt/ro disk", device="/dev/sdb") == 1  # ro mount option
    assert value(m, "filesystem_readonly", mountpoint="/mnt/legacy", fstype="nfs") == 1
    assert value(m, "filesystem_stuck", mountpoint="/mnt/tab\tdir\\x", device="/dev/sdc") == 0
    assert value(m, "filesystem_size_bytes", mountpoint="/home", device="nas1:/home", fstype="nfs4") > 0
    assert value(m, "filesystem_size_bytes", mountpoint="/lustre/scratch", fstype="lustre",
                 device="10.0.0.1@o2ib:/scratch") > 0
    assert value(m, "filesystem_size_bytes", mountpoint="/mnt/gcs", fstype="fuse.gcsfuse", device="my-bucket") > 0


def test_bind_mounts_report_once_and_stacked_mounts_report_the_top_one(fixture_collector):
    m = scrape_collector(fixture_collector)
    mps = fs_labels(m, "filesystem_stuck")
    assert "/data" not in mps  # bind of /raid/datasets: same filesystem as /raid
    assert "/var/lib/docker" not in mps  # bind of a directory of /
    assert "/mnt/projects" not in mps  # bind of a directory of the NFSv4 mount on /mnt/shared
    assert [lab["fstype"] for lab, _ in m["filesystem_stuck"] if lab["mountpoint"] == "/scratch"] == ["xfs"]
    assert [lab["fstype"] for lab, _ in m["filesystem_stuck"] if lab["mountpoint"] == "/mnt/shared"] == ["nfs4"]


def test_bind_mount_kept_when_the_filesystem_root_is_filtered_out(tmp_path):
    mi = (mountinfo_line(1, "9:0", "/raid", "xfs", "/dev/md0")
          + "2 1 9:0 /datasets /data ro,relatime - xfs /dev/md0 rw\n")
    tree(tmp_path, {"proc/1/mountinfo": mi})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=FakeStatvfs(),
                         filters=Filters(mountpoint_exclude="^/raid$"))
    try:
        assert list(fs_labels(scrape_collector(c), "filesystem_stuck")) == ["/data"]
    finally:
        c.close()


def test_filesystem_values_equal_statvfs_of_real_directories(tmp_path):
    a, b = tmp_path / "mnt a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    mi = mountinfo_line(100, "8:1", a, "ext4", "/dev/sdx1") + mountinfo_line(101, "8:2", b, "xfs", "/dev/sdy",
                                                                               "ro,relatime")
    tree(tmp_path, {"proc/1/mountinfo": mi})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), "/",
                         filters=Filters(mountpoint_include="^" + str(tmp_path)))
    try:
        def matches() -> bool:
            m = scrape_collector(c)
            for path, dev in ((a, "/dev/sdx1"), (b, "/dev/sdy")):
                st = os.statvfs(path)
                lab = {"mountpoint": str(path), "device": dev}
                got = (value(m, "filesystem_size_bytes", **lab), value(m, "filesystem_free_bytes", **lab),
                       value(m, "filesystem_avail_bytes", **lab), value(m, "filesystem_files", **lab),
                       value(m, "filesystem_files_free", **lab))
                want = (st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize,
                        st.f_files, st.f_ffree)
                if got != want:  # free space on a busy disk may move between the two statfs calls
                    return False
            assert value(m, "filesystem_readonly", mountpoint=str(b)) == 1
            assert value(m, "filesystem_readonly", mountpoint=str(a)) == 0
            return True

        wait_for(matches, timeout=20)
    finally:
        c.close()


def test_rootfs_prefix_is_added_for_statfs_and_stripped_from_labels(tmp_path):
    # The agent in a container, host root bind-mounted at /host: its own mountinfo lists host mounts
    # below /host and container mounts elsewhere.
    mi = ("1 0 0:90 / / rw - overlay overlay rw\n"
          + "2 1 259:2 / /host rw,relatime - ext4 /dev/nvme0n1p2 rw\n"
          + "3 2 9:0 / /host/raid rw,relatime - xfs /dev/md0 rw\n"
          + "4 1 259:2 /var/lib/docker/containers/x/hosts /etc/hosts rw - ext4 /dev/nvme0n1p2 rw\n"
          + "5 1 8:5 / /data rw - ext4 /dev/sde rw\n")
    tree(tmp_path, {"proc/self/mountinfo": mi})
    fake = FakeStatvfs()
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), "/host/", statvfs=fake)
    try:
        m = scrape_collector(c)
        assert sorted(fs_labels(m, "filesystem_stuck")) == ["/", "/raid"]
        assert sorted(fake.calls) == ["/host", "/host/raid"]
        assert value(m, "filesystem_size_bytes", mountpoint="/raid") == FakeStatvfs.result("/host/raid").f_blocks * 4096
    finally:
        c.close()
    # PID 1's mountinfo of the host: host paths, statfs'ed below the prefix.
    tree(tmp_path, {"hostproc/1/mountinfo": mountinfo_line(2, "259:2", "/", "ext4", "/dev/nvme0n1p2")
                    + mountinfo_line(3, "9:0", "/raid", "xfs", "/dev/md0")})
    fake = FakeStatvfs()
    c = StorageCollector(str(tmp_path / "hostproc"), str(tmp_path / "sys"), "/host", statvfs=fake)
    try:
        assert sorted(fs_labels(scrape_collector(c), "filesystem_stuck")) == ["/", "/raid"]
        assert sorted(fake.calls) == ["/host", "/host/raid"]
    finally:
        c.close()


def test_mountinfo_falls_back_to_self_when_pid_1_is_hidden(tmp_path):
    tree(tmp_path, {"proc/self/mountinfo": mountinfo_line(1, "9:0", "/raid", "xfs", "/dev/md0")})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=FakeStatvfs())
    try:
        assert list(fs_labels(scrape_collector(c), "filesystem_stuck")) == ["/raid"]
    finally:
        c.close()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--collector.storage.fstype-include=^nfs4?$"], ["/home", "/mnt/legacy", "/mnt/shared"]),
        (["--collector.storage.fstype-include=^(ext4|xfs)$", "--collector.storage.mountpoint-exclude=^/(mnt|proc|sys|dev|run)($|/)"],
         ["/", "/local scratch", "/raid", "/scratch"]),
        (["--collector.storage.mountpoint-include=^/(raid|scratch)$"], ["/raid", "/scratch"]),
        (["--collector.storage.fstype-include=^fuse\\.", "--collector.storage.fstype-exclude="],
         ["/mnt/gcs", "/var/lib/lxcfs"]),
        (["--collector.storage.fstype-include=^tmpfs$", "--collector.storage.fstype-exclude=",
          "--collector.storage.mountpoint-exclude="], ["/dev/shm", "/run", "/run/user/1000"]),
    ],
)
def test_include_and_exclude_regexes(flags, expected):
    args = build_args(*flags, f"--path.procfs={PROC}", f"--path.sysfs={SYS}")
    c = storage.create(args)
    c.pool.close()
    fake = FakeStatvfs()
    c.pool = storage.StatfsPool(1, statvfs=fake)
    try:
        assert sorted(fs_labels(scrape_collector(c), "filesystem_stuck")) == expected
    finally:
        c.close()


def test_kubelet_pod_volumes_are_excluded_by_default(fixture_collector):
    m = scrape_collector(fixture_collector)
    assert not any("kubelet" in lab["mountpoint"] for name in m for lab, _ in m[name] if "mountpoint" in lab)


# -- NFS ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_MOUNTSTATS.exists(), reason="shared fixture procfs/proc/26231/mountstats absent")
def test_nfs_statistics_from_the_real_capture(tmp_path):
    shutil.copy(REAL_MOUNTSTATS, tree(tmp_path, {"proc/self/.keep": ""}) / "proc/self/mountstats")
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=FakeStatvfs())
    try:
        m = scrape_collector(c)
    finally:
        c.close()
    lab = {"export": "192.168.1.1:/srv/test", "mountpoint": "/mnt/nfs/test", "nfs_version": "4.0",
           "protocol": "tcp"}
    assert value(m, "storage_nfs_read_bytes_total", mode="normal", **lab) == 1207640230
    assert value(m, "storage_nfs_read_bytes_total", mode="direct", **lab) == 0
    assert value(m, "storage_nfs_write_bytes_total", mode="normal", **lab) == 0
    assert value(m, "storage_nfs_write_bytes_total", mode="direct", **lab) == 0
    assert value(m, "storage_nfs_server_read_bytes_total", **lab) == 1210214218
    assert value(m, "storage_nfs_server_write_bytes_total", **lab) == 0
    assert value(m, "storage_nfs_operations_total", operation="READ", **lab) == 1298
    assert value(m, "storage_nfs_operation_transmissions_total", operation="READ", **lab) == 1298
    assert value(m, "storage_nfs_operation_major_timeouts_total", operation="READ", **lab) == 0
    assert value(m, "storage_nfs_operation_sent_bytes_total", operation="READ", **lab) == 207680
    assert value(m, "storage_nfs_operation_received_bytes_total", operation="READ", **lab) == 1210292152
    assert value(m, "storage_nfs_operation_queue_seconds_total", operation="READ", **lab) == 0.006
    assert value(m, "storage_nfs_operation_rtt_seconds_total", operation="READ", **lab) == 79.386
    assert value(m, "storage_nfs_operation_execute_seconds_total", operation="READ", **lab) == 79.407
    assert value(m, "storage_nfs_operations_total", operation="ACCESS", **lab) == 2927395007
    assert value(m, "storage_nfs_operation_transmissions_total", operation="ACCESS", **lab) == 2927394995
    assert value(m, "storage_nfs_operation_sent_bytes_total", operation="ACCESS", **lab) == 526931094212
    assert value(m, "storage_nfs_operation_received_bytes_total", operation="ACCESS", **lab) == 362996810236
    # The capture's ACCESS queue time is a wrapped u64 (-154468 ms); it is passed on as the kernel printed it.
    assert value(m, "storage_nfs_operation_queue_seconds_total", operation="ACCESS", **lab) == pytest.approx(
        18446743919241604546 / 1000)
    assert value(m, "storage_nfs_operation_rtt_seconds_total", operation="ACCESS", **lab) == 1667369.447
    assert value(m, "storage_nfs_operation_execute_seconds_total", operation="ACCESS", **lab) == 1953587.717
    # NULL and WRITE were never used (all zeros): not exported. 8-field lines: no errors series.
    assert {lab["operation"] for lab, _ in m["storage_nfs_operations_total"]} == {"READ", "ACCESS"}
    assert "storage_nfs_operation_errors_total" not in m
    # ACCESS has fewer transmissions than requests: floored at 0 per operation.
    assert value(m, "storage_nfs_retransmissions_total", **lab) == 0
    assert value(m, "storage_nfs_transport_connects_total", **lab) == 1
    assert value(m, "storage_nfs_transport_sends_total", **lab) == 6428
    assert value(m, "storage_nfs_transport_receives_total", **lab) == 6428
    assert value(m, "storage_nfs_transport_bad_xids_total", **lab) == 0
    assert value(m, "gpufleet_exporter_storage_parse_errors_total", source="mountstats") == 0


def test_nfs_v3_and_v4_on_one_mountpoint_stay_separate(fixture_collector):
    m = scrape_collector(fixture_collector)
    series = {(lab["export"], lab["mountpoint"], lab["nfs_version"], lab["protocol"])
              for lab, _ in m["storage_nfs_transport_sends_total"]}
    assert series == {
        ("nas1:/home", "/home", "4.1", "tcp"),
        ("fs1:/export/data", "/mnt/shared", "3", "tcp"),
        ("fs1:/export/data", "/mnt/shared", "4.2", "rdma"),
        ("oldnas:/vol/legacy", "/mnt/legacy", "3", "udp"),
    }  # /mnt/projects (bind of the v4.2 mount) once only, kubelet volume excluded
    v3 = {"mountpoint": "/mnt/shared", "nfs_version": "3", "protocol": "tcp"}
    v4 = {"mountpoint": "/mnt/shared", "nfs_version": "4.2", "protocol": "rdma"}
    assert value(m, "storage_nfs_read_bytes_total", mode="normal", **v3) == 1000
    assert value(m, "storage_nfs_read_bytes_total", mode="direct", **v3) == 300
    assert value(m, "storage_nfs_write_bytes_total", mode="normal", **v3) == 2000
    assert value(m, "storage_nfs_write_bytes_total", mode="direct", **v3) == 400
    assert value(m, "storage_nfs_server_read_bytes_total", **v3) == 5000
    assert value(m, "storage_nfs_server_write_bytes_total", **v3) == 6000
    assert value(m, "storage_nfs_read_bytes_total", mode="normal", **v4) == 7000000000
    assert value(m, "storage_nfs_server_write_bytes_total", **v4) == 3500000000
    assert value(m, "storage_nfs_operations_total", operation="GETATTR", **v3) == 500
    assert value(m, "storage_nfs_operation_errors_total", operation="GETATTR", **v3) == 2
    assert value(m, "storage_nfs_operations_total", operation="NULL", **v3) == 1  # used once: exported
    assert value(m, "storage_nfs_retransmissions_total", **v3) == 2
    assert value(m, "storage_nfs_transport_connects_total", **v3) == 2
    assert value(m, "storage_nfs_transport_sends_total", **v3) == 12000
    assert value(m, "storage_nfs_transport_receives_total", **v3) == 11990
    assert value(m, "storage_nfs_transport_bad_xids_total", **v3) == 3
    assert value(m, "storage_nfs_operations_total", operation="WRITE", **v4) == 3338
    assert value(m, "storage_nfs_operation_transmissions_total", operation="WRITE", **v4) == 3340
    assert value(m, "storage_nfs_operation_errors_total", operation="WRITE", **v4) == 1
    assert value(m, "storage_nfs_operation_received_bytes_total", operation="READ", **v4) == 8000976640
    assert value(m, "storage_nfs_operation_rtt_seconds_total", operation="READ", **v4) == 15.26
    assert value(m, "storage_nfs_retransmissions_total", **v4) == 2
    assert value(m, "storage_nfs_transport_connects_total", **v4) == 1
    assert value(m, "storage_nfs_transport_sends_total", **v4) == 8000
    assert {lab["operation"] for lab, _ in m["storage_nfs_operations_total"] if lab["nfs_version"] == "4.2"} == {
        "READ", "WRITE"}


def test_nfs_nine_field_errors_and_udp_transport(fixture_collector):
    m = scrape_collector(fixture_collector)
    home = {"export": "nas1:/home", "mountpoint": "/home", "nfs_version": "4.1", "protocol": "tcp"}
    assert value(m, "storage_nfs_operation_errors_total", operation="OPEN", **home) == 12
    assert value(m, "storage_nfs_operation_errors_total", operation="WRITE", **home) == 3
    assert value(m, "storage_nfs_operation_errors_total", operation="READ", **home) == 0
    assert value(m, "storage_nfs_operation_major_timeouts_total", operation="READ", **home) == 1
    assert value(m, "storage_nfs_operation_queue_seconds_total", operation="GETATTR", **home) == 0.12
    assert value(m, "storage_nfs_operation_execute_seconds_total", operation="GETATTR", **home) == 31.0
    assert value(m, "storage_nfs_retransmissions_total", **home) == 4 + 3  # READ 12004-12000, GETATTR 75003-75000
    assert value(m, "storage_nfs_transport_connects_total", **home) == 3
    assert value(m, "storage_nfs_transport_bad_xids_total", **home) == 2
    udp = {"export": "oldnas:/vol/legacy", "mountpoint": "/mnt/legacy", "nfs_version": "3", "protocol": "udp"}
    assert value(m, "storage_nfs_transport_sends_total", **udp) == 100
    assert value(m, "storage_nfs_transport_receives_total", **udp) == 96
    assert value(m, "storage_nfs_transport_bad_xids_total", **udp) == 1
    assert not [lab for lab, _ in m["storage_nfs_transport_connects_total"] if lab["protocol"] == "udp"]
    assert value(m, "storage_nfs_retransmissions_total", **udp) == 4
    assert value(m, "storage_nfs_operation_major_timeouts_total", operation="GETATTR", **udp) == 2
    assert not [lab for lab, _ in m["storage_nfs_operation_errors_total"] if lab["protocol"] == "udp"]


def test_nfs_without_mountinfo_still_reports_every_mount(tmp_path):
    tree(tmp_path, {"proc/self/mountstats": (PROC / "1" / "mountstats").read_bytes()})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=FakeStatvfs())
    try:
        m = scrape_collector(c)
    finally:
        c.close()
    mps = sorted(lab["mountpoint"] for lab, _ in m["storage_nfs_transport_sends_total"])
    assert mps == ["/home", "/mnt/legacy", "/mnt/projects", "/mnt/shared", "/mnt/shared"]


def test_mountstats_version_falls_back_to_rpc_program_version():
    data = (b"device srv:/x mounted on /x with fstype nfs statvers=1.1\n"
            b"\topts:\trw,proto=tcp\n\tRPC iostats version: 1.1  p/v: 100003/3 (nfs)\n"
            b"device srv:/y mounted on /y with fstype nfs4 statvers=1.1\n\topts:\trw,proto=rdma6\n")
    mounts, problems = parse_mountstats(data)
    assert problems == []
    assert [(n.version, n.protocol) for n in mounts] == [("3", "tcp"), ("4", "rdma")]


# -- Lustre ---------------------------------------------------------------------------------------


def test_lustre_llite_stats_from_debugfs_summed_per_filesystem(fixture_collector):
    m = scrape_collector(fixture_collector)
    # Two instances of "scratch" (mounted twice) are one filesystem label; the suffix is dropped.
    assert sorted({lab["filesystem"] for lab, _ in m["storage_lustre_operations_total"]}) == ["home", "scratch"]
    assert value(m, "storage_lustre_read_bytes_total", filesystem="scratch") == 21474836480 + 12288
    assert value(m, "storage_lustre_reads_total", filesystem="scratch") == 5227 + 3
    assert value(m, "storage_lustre_write_bytes_total", filesystem="scratch") == 8589934592
    assert value(m, "storage_lustre_writes_total", filesystem="scratch") == 2110
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="open") == 3312 + 8
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="close") == 3312
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="getattr") == 9120 + 80
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="setattr") == 15
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="statfs") == 61
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="ioctl") == 12
    assert value(m, "storage_lustre_operation_seconds_total", filesystem="scratch", operation="open") == \
        pytest.approx((80521 + 100) / 1e6)
    assert value(m, "storage_lustre_operation_seconds_total", filesystem="scratch", operation="statfs") == 0.012
    assert not [lab for lab, _ in m["storage_lustre_operation_seconds_total"] if lab["operation"] == "ioctl"]
    assert value(m, "storage_lustre_write_bytes_total", filesystem="home") == 2000
    assert value(m, "storage_lustre_writes_total", filesystem="home") == 4
    assert "read_bytes" not in {lab["operation"] for lab, _ in m["storage_lustre_operations_total"]}
    assert value(m, "storage_lustre_operations_total", filesystem="scratch", operation="read") == 5227


def test_lustre_before_2_12_from_procfs(tmp_path):
    c = StorageCollector(str(PROC), str(tmp_path / "sys-without-debugfs"), statvfs=FakeStatvfs())
    try:
        m = scrape_collector(c)
    finally:
        c.close()
    assert value(m, "storage_lustre_read_bytes_total", filesystem="lustre") == 12345678
    assert value(m, "storage_lustre_reads_total", filesystem="lustre") == 36
    assert value(m, "storage_lustre_write_bytes_total", filesystem="lustre") == 5242880
    assert value(m, "storage_lustre_writes_total", filesystem="lustre") == 12
    assert value(m, "storage_lustre_operations_total", filesystem="lustre", operation="getattr") == 42
    assert value(m, "storage_lustre_operations_total", filesystem="lustre", operation="statfs") == 3
    assert "storage_lustre_operation_seconds_total" not in m  # [regs] lines carry no time


# -- block devices and NVMe -----------------------------------------------------------------------


def test_diskstats_whole_disks_only_with_units(fixture_collector):
    m = scrape_collector(fixture_collector)
    assert sorted(lab["device"] for lab, _ in m["storage_disk_reads_completed_total"]) == [
        "dm-0", "md0", "nvme0n1", "nvme1n1", "sda", "sdb", "vda"]
    d = {"device": "nvme1n1"}
    assert value(m, "storage_disk_reads_completed_total", **d) == 500000
    assert value(m, "storage_disk_writes_completed_total", **d) == 600000
    assert value(m, "storage_disk_read_bytes_total", **d) == 400000000 * 512
    assert value(m, "storage_disk_written_bytes_total", **d) == 500000000 * 512
    assert value(m, "storage_disk_read_time_seconds_total", **d) == 120
    assert value(m, "storage_disk_write_time_seconds_total", **d) == 300
    assert value(m, "storage_disk_io_in_flight", **d) == 3
    assert value(m, "storage_disk_io_time_seconds_total", **d) == 250
    assert value(m, "storage_disk_io_time_weighted_seconds_total", **d) == 420
    # The 14-field form of old kernels (no discard/flush fields).
    assert value(m, "storage_disk_read_bytes_total", device="sdb") == 800 * 512
    assert value(m, "storage_disk_io_time_weighted_seconds_total", device="sdb") == 0.04


def test_disk_regexes_can_add_partitions():
    args = build_args(f"--path.procfs={PROC}", f"--path.sysfs={SYS}",
                      "--collector.storage.disk-include=^(nvme\\d+n\\d+(p\\d+)?|loop\\d+)$",
                      "--collector.storage.disk-exclude=")
    c = storage.create(args)
    try:
        m = scrape_collector(c)
    finally:
        c.close()
    assert sorted(lab["device"] for lab, _ in m["storage_disk_reads_completed_total"]) == [
        "loop0", "nvme0n1", "nvme0n1p1", "nvme0n1p2", "nvme1n1"]


def test_nvme_controller_info_is_stripped(fixture_collector):
    m = scrape_collector(fixture_collector)
    assert sorted((lab["controller"], lab["model"], lab["serial"], lab["firmware_revision"], lab["state"], v)
                  for lab, v in m["storage_nvme_info"]) == [
        ("nvme0", "SAMSUNG MZ1L21T9HCLS-00A07", "S6GLNE0R912345", "GDC7302Q", "live", 1),
        ("nvme1", "KCM6DRUL3T84", "X1R0A0ABCDEF", "0106", "resetting", 1),
    ]


def test_nvme_state_is_read_every_collection_and_identity_every_ttl(tmp_path, monkeypatch):
    """A controller's state changes (live -> resetting -> dead) and is read each time; model,
    serial and firmware only change with the drive or a firmware activation: re-read once the
    TTL passes, at once for a new controller, and again next time after a failed read."""
    ctrl = tmp_path / "sys/class/nvme/nvme0"
    ctrl.mkdir(parents=True)
    for attr, text in (("model", "M1  \n"), ("serial", "S1\n"), ("firmware_rev", "F1\n"), ("state", "live\n")):
        (ctrl / attr).write_text(text)
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), str(tmp_path))
    now = [1000.0]
    monkeypatch.setattr(storage.time, "monotonic", lambda: now[0])

    def info():
        return sorted(tuple(lab[k] for k in ("controller", "model", "serial", "firmware_revision", "state"))
                      for lab, _ in scrape_collector(c)["storage_nvme_info"])

    try:
        assert info() == [("nvme0", "M1", "S1", "F1", "live")]
        (ctrl / "state").write_text("resetting\n")
        (ctrl / "firmware_rev").write_text("F2\n")
        now[0] += storage.NVME_IDENTITY_TTL - 1
        assert info() == [("nvme0", "M1", "S1", "F1", "resetting")]
        now[0] += 1
        assert info() == [("nvme0", "M1", "S1", "F2", "resetting")]
        new = tmp_path / "sys/class/nvme/nvme1"
        new.mkdir()
        (new / "model").write_text("M9\n")
        (new / "serial").mkdir()  # unreadable (EISDIR): counted, and read again next collection
        assert info() == [("nvme0", "M1", "S1", "F2", "resetting"), ("nvme1", "M9", "", "", "")]
        (new / "serial").rmdir()
        (new / "serial").write_text("S9\n")
        assert info()[1] == ("nvme1", "M9", "S9", "", "")
        assert c.parse_errors["nvme"] == 1
    finally:
        c.close()


def test_mount_table_changes_show_up_at_the_next_collection(tmp_path):
    """The mount table's parse and the filesystems chosen from it are reused while its bytes
    stay the same; a mount added, remounted read-only or removed shows at the next collection."""
    a = mountinfo_line(1, "0:40", "/scratch", "xfs", "/dev/md0")
    b = mountinfo_line(2, "0:41", "/nfs/home", "nfs4", "srv:/home")
    tree(tmp_path, {"proc/1/mountinfo": a})
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), "/", statvfs=FakeStatvfs())

    def readonly():
        return {lab["mountpoint"]: v for lab, v in scrape_collector(c)["filesystem_readonly"]}

    try:
        assert readonly() == {"/scratch": 0}
        assert readonly() == {"/scratch": 0}
        (tmp_path / "proc/1/mountinfo").write_text(a + b)
        assert readonly() == {"/scratch": 0, "/nfs/home": 0}
        (tmp_path / "proc/1/mountinfo").write_text(mountinfo_line(1, "0:40", "/scratch", "xfs", "/dev/md0", "ro") + b)
        assert readonly() == {"/scratch": 1, "/nfs/home": 0}
        (tmp_path / "proc/1/mountinfo").write_text(b)
        assert readonly() == {"/nfs/home": 0}
    finally:
        c.close()


# -- robustness -----------------------------------------------------------------------------------


def test_malformed_files_drop_only_the_affected_series_and_are_counted(tmp_path, caplog):
    ms = (PROC / "1" / "mountstats").read_text()
    ms = ms.replace("GETATTR: 500 502 1 60000 56000 10 900 950 2", "GETATTR: 500 502 x")
    ms = ms.replace("xprt:\trdma 0 0 1 0 30 8000 8000 0 16000 0 10 20 30 40 50 0 0 0 0 0 0 0 0 0 0\n",
                    "xprt:\trdma 0 0\n", 1)
    ds = (PROC / "diskstats").read_text().replace(
        "8      16 sdb 100 0 800 40 0 0 0 0 0 40 40", "8      16 sdb 100 0 800")
    lustre = (SYS / "kernel/debug/lustre/llite/home-ffff9a0b1c2d3000/stats").read_text() + "garbage here\n"
    tree(tmp_path, {
        "proc/1/mountinfo": (PROC / "1" / "mountinfo").read_text() + "this is not mountinfo\n",
        "proc/1/mountstats": ms,
        "proc/diskstats": ds,
        "sys/kernel/debug/lustre/llite/home-ffff9a0b1c2d3000/stats": lustre,
        "sys/class/nvme/nvme0/model": "M\n",
        "sys/class/nvme/nvme0/firmware_rev": "F\n",
        "sys/class/nvme/nvme0/state": "live\n",
        "sys/class/nvme/nvme0/serial/unreadable": "",  # a directory where a file should be: EISDIR
    })
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=FakeStatvfs())
    try:
        with caplog.at_level(logging.WARNING, logger="gpufleet.collector.storage"):
            m = scrape_collector(c)
            m = scrape_collector(c)
    finally:
        c.close()
    errors = {lab["source"]: v for lab, v in m["gpufleet_exporter_storage_parse_errors_total"]}
    assert errors == {"mountinfo": 2, "mountstats": 4, "lustre": 2, "diskstats": 2, "nvme": 2}  # two collections
    assert len(fs_labels(m, "filesystem_stuck")) == 15
    v3 = {"mountpoint": "/mnt/shared", "nfs_version": "3"}
    assert value(m, "storage_nfs_operations_total", operation="READ", **v3) == 40
    assert not [lab for lab, _ in m["storage_nfs_operations_total"] if lab["operation"] == "GETATTR"
                and lab["nfs_version"] == "3" and lab["mountpoint"] == "/mnt/shared"]
    v4 = {"mountpoint": "/mnt/shared", "nfs_version": "4.2"}
    assert value(m, "storage_nfs_read_bytes_total", mode="normal", **v4) == 7000000000
    assert not [lab for lab, _ in m["storage_nfs_transport_sends_total"] if lab["nfs_version"] == "4.2"]
    assert "sdb" not in {lab["device"] for lab, _ in m["storage_disk_reads_completed_total"]}
    assert value(m, "storage_disk_reads_completed_total", device="sda") == 9000
    assert value(m, "storage_lustre_writes_total", filesystem="home") == 4
    assert value(m, "storage_nvme_info", controller="nvme0", serial="", model="M", state="live") == 1
    logged = [r for r in caplog.records if "unreadable or malformed" in r.getMessage()]
    assert sorted(r.source for r in logged) == ["diskstats", "lustre", "mountinfo", "mountstats", "nvme"]


def test_unreadable_and_missing_files_never_fail_the_collection(tmp_path):
    (tmp_path / "proc" / "diskstats").mkdir(parents=True)  # unreadable as a file
    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "nothing"), statvfs=FakeStatvfs())
    try:
        m = scrape_collector(c)
    finally:
        c.close()
    assert value(m, "gpufleet_exporter_storage_parse_errors_total", source="diskstats") == 1
    assert value(m, "gpufleet_exporter_storage_parse_errors_total", source="mountinfo") == 0  # missing is no error
    assert not any(name.startswith(("filesystem_", "storage_")) for name in m)


def test_statfs_error_is_reported_as_device_error_without_sizes(tmp_path):
    tree(tmp_path, {"proc/1/mountinfo": mountinfo_line(1, "0:40", "/gone", "nfs4", "srv:/gone")
                    + mountinfo_line(2, "9:0", "/raid", "xfs", "/dev/md0")})

    def statvfs(path: str) -> os.statvfs_result:
        if path == "/gone":
            raise OSError(116, "Stale file handle")
        return FakeStatvfs.result(path)

    c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=statvfs)
    try:
        m = scrape_collector(c)
    finally:
        c.close()
    assert value(m, "filesystem_device_error", mountpoint="/gone") == 1
    assert value(m, "filesystem_stuck", mountpoint="/gone") == 0
    assert "/gone" not in fs_labels(m, "filesystem_size_bytes")
    assert value(m, "filesystem_device_error", mountpoint="/raid") == 0


# -- exposition and module protocol -------------------------------------------------------------


def test_promtool_check_metrics_is_clean(fixture_collector, tmp_path):
    promtool = need_binary("promtool")
    text = render(fixture_collector.collect())
    if REAL_MOUNTSTATS.exists():
        shutil.copy(REAL_MOUNTSTATS, tree(tmp_path, {"proc/self/.keep": ""}) / "proc/self/mountstats")
        c = StorageCollector(str(tmp_path / "proc"), str(tmp_path / "sys"), statvfs=FakeStatvfs())
        try:
            extra = parse(render(c.collect()))
        finally:
            c.close()
        assert "storage_nfs_operations_total" in extra
    for family in (b"filesystem_size_bytes", b"storage_nfs_operation_errors_total", b"storage_lustre_reads_total",
                   b"storage_disk_io_in_flight", b"storage_nvme_info", b"gpufleet_exporter_storage_parse_errors"):
        assert family in text
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"" and proc.stderr == b"", (proc.stdout + proc.stderr).decode()


def test_every_emitted_family_has_a_spec_and_specs_are_unique(fixture_collector):
    names = [s.name for s in storage.SPECS]
    assert len(names) == len(set(names))
    m = scrape_collector(fixture_collector)
    emitted = {n.removesuffix("_total") for n in m}
    assert emitted <= {n.removesuffix("_total") for n in names}
    assert all(s.name.startswith(("filesystem_", "storage_", "gpufleet_exporter_storage_")) for s in storage.SPECS)


def build_parser() -> argparse.ArgumentParser:
    """The agent's shared flags plus this module's group, as the agent builds them."""
    from exporters.cli import duration

    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--collector.interval", dest="interval", type=duration, default=5.0)
    p.add_argument("--collector.timeout", dest="timeout", type=duration, default=None)
    p.add_argument("--path.procfs", dest="procfs", default="/proc")
    p.add_argument("--path.sysfs", dest="sysfs", default="/sys")
    p.add_argument("--path.rootfs", dest="rootfs", default="/")
    storage.add_arguments(p)
    return p


def build_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(list(flags))


def test_module_protocol_flags_and_defaults():
    assert storage.COLLECTOR_NAME == "storage" and storage.DEFAULT_ENABLED is True and storage.COLLECTOR_HELP
    help_text = build_parser().format_help()
    assert "storage collector (--collector.storage)" in help_text
    for flag in ("mountpoint-include", "mountpoint-exclude", "fstype-include", "fstype-exclude", "disk-include",
                 "disk-exclude", "statfs-timeout", "statfs-workers"):
        assert f"--collector.storage.{flag}" in help_text
    assert "squashfs" in help_text and "lustre" in help_text  # defaults shown
    args = build_args("--path.procfs=/hostproc", "--path.rootfs=/host", "--collector.storage.statfs-workers=3",
                      "--collector.storage.statfs-timeout=500ms")
    assert all(k.startswith("storage_") for k in vars(args) if k not in ("interval", "timeout", "procfs", "sysfs",
                                                                           "rootfs"))
    c = storage.create(args)
    try:
        assert isinstance(c, StorageCollector) and c.name == "storage" and c.specs == storage.SPECS
        assert (c.procfs, c.rootfs, c.statfs_timeout, c.pool.workers) == ("/hostproc", "/host", 0.5, 3)
        assert len(c.pool.threads()) == 3
    finally:
        c.close()
    assert wait_for(lambda: not c.pool.threads(), timeout=10)
    with pytest.raises(SystemExit):
        build_args("--collector.storage.fstype-include=(")
    with pytest.raises(SystemExit):
        build_args("--collector.storage.statfs-workers=0")


def test_statfs_timeout_is_kept_well_below_the_collector_timeout(caplog):
    with caplog.at_level(logging.WARNING, logger="gpufleet.collector.storage"):
        c = storage.create(build_args("--collector.timeout=2s", "--collector.storage.statfs-timeout=1s"))
    c.close()
    assert c.statfs_timeout == 0.5
    assert any("statfs-timeout" in r.getMessage() for r in caplog.records)
    c = storage.create(build_args("--collector.interval=10s"))
    c.close()
    assert c.statfs_timeout == 1.0


def test_agent_serves_storage_series_and_promtool_accepts_them(monkeypatch, sim_state):
    """The module as the agent loads it."""
    import requests

    from exporters import agent

    assert "exporters.storage" in agent.COLLECTOR_MODULES
    promtool = need_binary("promtool")
    args = agent.build_parser().parse_args([
        "--gpu.backend=sim", f"--sim.state-file={sim_state.path}", "--web.listen-address=127.0.0.1:0",
        "--collector.interval=0.2s", "--collector.timeout=5s", f"--path.procfs={PROC}", f"--path.sysfs={SYS}",
        "--collector.storage.statfs-timeout=500ms",
    ])
    assert args.collector_storage is True
    exp = agent.Exporter(args)
    exp.start()
    try:
        host, port = exp.server.server_address[:2]
        url = f"http://{host}:{port}/metrics"
        text = wait_for(lambda: (t := requests.get(url, timeout=5).content) and b"storage_nvme_info{" in t
                        and b"gpu_up{" in t and t, timeout=30)
    finally:
        exp.stop()
    m = parse(text)
    assert value(m, "gpufleet_exporter_collector_success", collector="storage") == 1
    assert value(m, "storage_nfs_transport_sends_total", mountpoint="/home") == 90210
    # The fixture's mountpoints do not exist on this machine: statfs fails, and says so.
    assert value(m, "filesystem_device_error", mountpoint="/mnt/weka") == 1
    assert value(m, "filesystem_stuck", mountpoint="/mnt/weka") == 0
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"", (proc.stdout + proc.stderr).decode()
