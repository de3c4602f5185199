"""fsinfo: CACHE_DIR is refused on network filesystems; watches there are polled."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpypeline.errors import StateError
from dpypeline.watching.fsinfo import (
    Mount,
    filesystem_type,
    is_network_filesystem,
    is_network_fstype,
    mount_for,
    parse_mountinfo,
    require_local_filesystem,
)

# Lines in the kernel's format, as on a JASMIN sci server (NFS group workspaces, Lustre and
# GPFS scratch, an sshfs mount) plus a local disk whose mount point contains a space.
MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime shared:13 - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
30 27 0:27 / /tmp rw,nosuid,nodev shared:14 - tmpfs tmpfs rw,size=8g
40 27 0:45 / /gws rw,relatime shared:20 - autofs systemd-1 rw,fd=33
41 40 0:52 /nopw/j04 /gws/nopw/j04 rw,relatime shared:21 - nfs4 gws-nfs:/nopw/j04 rw,vers=4.1
42 27 0:53 / /work/scratch-pw rw,relatime shared:22 - lustre 172.26.0.1@tcp:/scratchpw rw,flock
43 27 0:54 / /work/scratch-nopw rw shared:23 master:5 propagate_from:2 - gpfs scratch-nopw rw
44 27 0:55 / /home/users/alice/remote rw,nosuid,nodev - fuse.sshfs alice@host:/data rw,user_id=0
45 27 8:17 / /data/local\\040disk rw,relatime shared:24 - ext4 /dev/sdb1 rw
46 27 8:18 / /data/back\\134slash rw - xfs /dev/sdb2 rw
47 27 0:60 / /gws/nopw/j04/nemo rw - cifs //smb/nemo rw
this line is not mountinfo
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return str(path)


def _mounted_under(tmp_path: Path) -> str:
    """MOUNTINFO with every mount point moved under ``tmp_path/fs`` and created there.

    ``filesystem_type`` resolves real paths, so the mount points have to exist.
    """
    root = tmp_path / "fs"
    lines = []
    for line in MOUNTINFO.splitlines():
        fields = line.split(" ")
        if " - " in line and fields[4] != "/":
            point = root / parse_mountinfo(line)[0].mount_point.lstrip("/")
            point.mkdir(parents=True, exist_ok=True)
            fields[4] = str(point).replace("\\", "\\134").replace(" ", "\\040")
        lines.append(" ".join(fields))
    return _write(tmp_path, "\n".join(lines) + "\n")


def test_parse_reads_type_and_unescaped_mount_point() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    by_point = {m.mount_point: m for m in mounts}
    assert len(mounts) == 11
    assert by_point["/gws/nopw/j04"] == Mount("/gws/nopw/j04", "nfs4", "gws-nfs:/nopw/j04")
    assert by_point["/work/scratch-pw"].fstype == "lustre"
    assert by_point["/work/scratch-nopw"].fstype == "gpfs"  # several optional fields
    assert by_point["/home/users/alice/remote"].fstype == "fuse.sshfs"
    assert by_point["/data/local disk"].fstype == "ext4"
    assert by_point["/data/back\\slash"].fstype == "xfs"


@pytest.mark.parametrize(
    ("path", "mount_point"),
    [
        ("/", "/"),
        ("/etc/passwd", "/"),
        ("/proc/self", "/proc"),
        ("/gws", "/gws"),
        ("/gws/nopw/j04/nemo_vol1/means", "/gws/nopw/j04"),
        ("/gws/nopw/j04/nemo/x", "/gws/nopw/j04/nemo"),
        ("/gws/nopw/j04/nemo_vol1", "/gws/nopw/j04"),  # a prefix of the name is not a parent
        ("/gws/nopw/j045", "/gws"),
        ("/data/local disk/cache", "/data/local disk"),
        ("/data/local", "/"),
    ],
)
def test_longest_mount_point_wins(path: str, mount_point: str) -> None:
    mount = mount_for(path, parse_mountinfo(MOUNTINFO))
    assert mount is not None
    assert mount.mount_point == mount_point


def test_later_mount_on_same_point_hides_earlier() -> None:
    text = MOUNTINFO + "50 27 0:70 / /tmp rw - nfs server:/export rw\n"
    mount = mount_for("/tmp/x", parse_mountinfo(text))
    assert mount is not None
    assert mount.fstype == "nfs"


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("nfs", True),
        ("nfs4", True),
        ("lustre", True),
        ("gpfs", True),
        ("cifs", True),
        ("smb3", True),
        ("panfs", True),
        ("ceph", True),
        ("beegfs", True),
        ("9p", True),
        ("fuse", True),
        ("fuse.sshfs", True),
        ("fuse.s3fs", True),
        ("ext4", False),
        ("xfs", False),
        ("btrfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("fuseblk", False),  # ntfs-3g on a local block device
        ("unknown", False),
    ],
)
def test_network_filesystem_types(fstype: str, network: bool) -> None:
    assert is_network_fstype(fstype) is network


def test_require_local_filesystem_refuses_nfs_cache_dir(tmp_path: Path) -> None:
    mountinfo = _mounted_under(tmp_path)
    cache_dir = f"{tmp_path}/fs/gws/nopw/j04/nemo_vol1/.dpypeline"  # its nearest parent decides
    with pytest.raises(StateError) as info:
        require_local_filesystem(cache_dir, "CACHE_DIR", mountinfo=mountinfo)
    message = str(info.value)
    assert message.startswith(f"CACHE_DIR {cache_dir} is on a nfs4 filesystem;")
    assert "write-ahead log" in message
    assert "/var/lib/dpypeline" in message


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/work/scratch-pw/alice/state", "lustre"),
        ("/work/scratch-nopw/alice", "gpfs"),
        ("/home/users/alice/remote/q", "fuse.sshfs"),
        ("/gws/nopw/j04/nemo/state", "cifs"),
    ],
)
def test_require_local_filesystem_names_each_network_type(
    tmp_path: Path, path: str, fstype: str
) -> None:
    mountinfo = _mounted_under(tmp_path)
    path = f"{tmp_path}/fs{path}"
    with pytest.raises(StateError, match=f" is on a {fstype} filesystem"):
        require_local_filesystem(path, "CACHE_DIR", mountinfo=mountinfo)
    assert is_network_filesystem(path, mountinfo=mountinfo)
    require_local_filesystem(
        tmp_path / "fs" / "data" / "local disk", "CACHE_DIR", mountinfo=mountinfo
    )


def test_symlink_into_network_mount_is_resolved(tmp_path: Path) -> None:
    # A local-looking path that is a symlink must be judged by where it points.
    fake_mountinfo = (
        f"27 1 254:0 / / rw - ext4 /dev/vda rw\n60 27 0:80 / {tmp_path}/net rw - nfs s:/e rw\n"
    )
    (tmp_path / "net").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "net")
    mountinfo = _write(tmp_path, fake_mountinfo)
    assert filesystem_type(tmp_path / "link" / "cache", mountinfo=mountinfo) == "nfs"
    assert filesystem_type(tmp_path / "other", mountinfo=mountinfo) == "ext4"


def test_unreadable_mountinfo_gives_unknown_and_is_not_refused(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-mountinfo")
    assert filesystem_type("/", mountinfo=missing) == "unknown"
    require_local_filesystem(tmp_path, "CACHE_DIR", mountinfo=missing)


def test_real_mountinfo_proc_and_tmp_path(tmp_path: Path) -> None:
    assert filesystem_type("/proc") == "proc"
    assert filesystem_type("/proc/self/status") == "proc"
    local = filesystem_type(tmp_path)
    assert local not in ("", "unknown")
    assert filesystem_type(tmp_path / "not" / "yet" / "made") == local
    assert not is_network_filesystem(tmp_path)
    require_local_filesystem(tmp_path, "CACHE_DIR")
    require_local_filesystem(os.fspath(tmp_path / "new-cache"), "CACHE_DIR")
