"""Hostile layers: every breakout case of SPEC.md ("Layer extraction safety") and of containerd's
archive/tar_test.go (TestBreakouts, TestRelativeSymlinks), plus more of our own.

Each case either raises UnsafeContentError (exit code 4) or applies with everything contained in
``tmp/root``; in both outcomes nothing outside ``tmp/root`` may change: a sibling ``tmp/outside``
"host" tree (with ``etc/passwd``) is snapshotted before and after, and so is the real ``/etc``
(hashed, never written: literal ``/etc`` targets are root-relative, hence harmless).

Names and link targets may contain ``{out}``: the absolute path of the ``outside`` host tree.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagevol.errors import ImagevolError, UnsafeContentError
from imagevol.unpack.applier import ApplyOptions, apply_layer
from tests.support.need import root_only

TMP_ID = uuid.uuid4().hex[:12]  # for containerd's SymlinkOverridePath (writes to /tmp/breakout-*)


# -- layer entries -------------------------------------------------------------------------------


def F(name, data=b"", mode=0o644, pax=None):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, 1_600_000_000
    if pax:
        ti.pax_headers = dict(pax)
    return ti, data


def D(name, mode=0o755, mtime=1_600_000_000):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, mtime
    return ti, None


def S(name, target, pax=None):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, target, 0o777, 1_600_000_000
    if pax:
        ti.pax_headers = dict(pax)
    return ti, None


def H(name, target):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mtime = tarfile.LNKTYPE, target, 1_600_000_000
    return ti, None


def DEV(name, typ=tarfile.CHRTYPE, mode=0o666):
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor, ti.mode = typ, 1, 3, mode
    return ti, None


def build(entries, out: str, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            ti.name = ti.name.replace("{out}", out)
            ti.linkname = ti.linkname.replace("{out}", out)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# -- environment: tmp/root (the layer root) next to tmp/outside (the "host") ----------------------


@dataclass
class Env:
    top: Path
    root: Path
    outside: Path

    @property
    def out(self) -> str:
        return str(self.outside)

    def r(self, path: str) -> Path:
        """A path inside root, `{out}` expanded, NOT resolved."""
        return self.root / path.replace("{out}", self.out).lstrip("/")

    def resolve(self, path: str) -> Path:
        """Resolve `path` inside root the way a container would (symlinks root-relative)."""
        todo = [c for c in path.replace("{out}", self.out).split("/") if c not in ("", ".")]
        done: list[str] = []
        for _ in range(1000):
            if not todo:
                return self.root.joinpath(*done)
            c = todo.pop(0)
            if c == "..":
                if done:
                    done.pop()
                continue
            p = self.root.joinpath(*done, c)
            if os.path.islink(p):
                target = os.readlink(p)
                if target.startswith("/"):
                    done = []
                todo = [x for x in target.split("/") if x not in ("", ".")] + todo
                continue
            done.append(c)
        raise AssertionError(f"symlink loop resolving {path}")


@pytest.fixture
def env(tmp_path) -> Env:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc/passwd").write_bytes(b"root:x:0:0:host secret\n")
    (outside / "etc/shadow").write_bytes(b"host shadow\n")
    (outside / "perm400").write_bytes(b"...")
    os.chmod(outside / "perm400", 0o400)
    (outside / "also-exists-outside-root").write_bytes(b"...")
    os.chmod(outside / "also-exists-outside-root", 0o640)
    os.symlink("etc/passwd", outside / "passwd-link")
    return Env(tmp_path, root, outside)


def snapshot(top: Path, skip: Path) -> dict[str, tuple]:
    """Everything under `top` except the `skip` subtree: type, mode, owner, size, mtime, links,
    content hash, link target and xattrs of each entry (and of `top` itself)."""
    out: dict[str, tuple] = {}

    def record(p: Path) -> None:
        st = os.lstat(p)
        extra: object = None
        if stat.S_ISREG(st.st_mode):
            extra = hashlib.sha256(p.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            extra = os.readlink(p)
        try:
            xattrs = tuple(sorted(os.listxattr(p, follow_symlinks=False)))
        except OSError:
            xattrs = ()
        out[str(p.relative_to(top))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_nlink,
            st.st_ino,
            extra,
            xattrs,
        )

    record(top)
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n != skip]
        for n in dirnames + filenames:
            record(d / n)
    return out


def host_state() -> tuple:
    """The real host's /etc/passwd (content, inode, links) and the names in /etc and /tmp."""
    st = os.stat("/etc/passwd")
    with open("/etc/passwd", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return (
        digest,
        st.st_ino,
        st.st_nlink,
        st.st_mode,
        st.st_mtime_ns,
        sorted(os.listdir("/etc")),
        os.path.lexists(f"/tmp/breakout-{TMP_ID}"),
        os.path.lexists("/breakout"),
        os.path.lexists("/upandout"),
        os.path.lexists("/downandout"),
    )


# -- lower-layer helpers (plain filesystem operations, like containerd's fstest.Apply) -----------


def fs(*ops) -> Callable[[Env], None]:
    def apply(env: Env) -> None:
        for op, *args in ops:
            if op == "d":
                env.r(args[0]).mkdir(parents=True, exist_ok=True)
            elif op == "f":
                env.r(args[0]).parent.mkdir(parents=True, exist_ok=True)
                env.r(args[0]).write_bytes(args[1])
            elif op == "l":
                env.r(args[0]).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(args[1].replace("{out}", env.out), env.r(args[0]))
            elif op == "h":
                os.link(env.resolve(args[1]), env.resolve(args[0]))

    return apply


# -- validators ----------------------------------------------------------------------------------


def same_file(a: str, b: str):
    def check(env: Env) -> None:
        pa, pb = env.resolve(a), env.resolve(b)
        assert pa.is_relative_to(env.root) and pb.is_relative_to(env.root)
        assert os.path.samefile(pa, pb), f"{a} and {b} differ"

    return check


def not_same_file(a: str, b: str):
    def check(env: Env) -> None:
        assert not os.path.samefile(env.resolve(a), env.resolve(b))

    return check


def value(path: str, data: bytes):
    def check(env: Env) -> None:
        p = env.r(path)
        assert not os.path.islink(p), f"{path} is a symlink"
        assert p.read_bytes() == data

    return check


def missing(path: str):
    def check(env: Env) -> None:
        assert not os.path.lexists(env.r(path)), f"{path} exists"

    return check


def present(path: str):
    def check(env: Env) -> None:
        assert os.path.lexists(env.r(path)), f"{path} is missing"

    return check


def is_link(path: str, target: str | None = None):
    def check(env: Env) -> None:
        assert os.path.islink(env.r(path)), f"{path} is not a symlink"
        if target is not None:
            assert os.readlink(env.r(path)) == target.replace("{out}", env.out)

    return check


def is_dir(path: str):
    def check(env: Env) -> None:
        p = env.r(path)
        assert p.is_dir() and not p.is_symlink()

    return check


def both(*checks):
    def check(env: Env) -> None:
        for c in checks:
            c(env)

    return check


UNBROKEN = value("etc/unbroken", b"unbroken")
REFUSED = "refused"
CONTAINED = "contained"


@dataclass
class Case:
    id: str
    entries: list
    expect: object = CONTAINED  # REFUSED, CONTAINED or a validator(env)
    lower: Callable[[Env], None] | None = None
    after: Callable[[Env], None] | None = None  # also checked when refused
    options: dict = field(default_factory=dict)
    fmt: int = tarfile.PAX_FORMAT


ETC = [D("etc", 0o770), F("/etc/passwd", b"inside")]
LOWER_ETC = fs(("d", "etc"), ("f", "etc/passwd", b"inside"))
LOWER_ETC_USERS = fs(("d", "etc"), ("f", "etc/passwd", b"all users"), ("l", "localetc", "/etc"))
LOWER_ETC_WHITEDOUT = fs(
    ("d", "etc"), ("f", "etc/passwd", b"all users"), ("f", "etc/whitedout", b"ahhhh"), ("l", "localetc", "/etc")
)
LOWER_DNE = fs(("d", "etc"), ("f", "etc/passwd", b"all users"), ("l", "localetc", "/dne"))
LOWER_HOSTETC = fs(("l", "hostetc", "{out}/etc"))
BASE = [D("etc"), F("etc/hosts", b"127.0.0.1"), D("home"), D("home/derek", 0o700)]

# fmt: off
CONTAINERD = [
    Case("SymlinkAbsolute", [D("etc"), S("localetc", "/etc"), F("/localetc/unbroken", b"unbroken")], UNBROKEN),
    Case("SymlinkUpAndOut",
         [D("etc"), D("dummy"), S("localetc", "/dummy/../etc"), F("/localetc/unbroken", b"unbroken")], UNBROKEN),
    Case("SymlinkMultipleAbsolute",
         [D("etc"), D("dummy"), S("/dummy/etc", "/etc"), S("localetc", "/dummy/etc"),
          F("/dummy/etc/unbroken", b"unbroken")], UNBROKEN),
    Case("SymlinkMultipleRelative",
         [D("etc"), D("dummy"), S("/dummy/etc", "/etc"), S("localetc", "./dummy/etc"),
          F("/dummy/etc/unbroken", b"unbroken")], UNBROKEN),
    Case("SymlinkEmptyFile",
         [D("etc"), F("etc/emptied", b"notempty"), S("localetc", "/etc"), F("/localetc/emptied", b"")],
         value("etc/emptied", b"")),
    Case("HardlinkRelative",
         [*ETC, D("breakouts"), S("breakouts/d1", "../../etc"), H("breakouts/mypasswd", "/breakouts/d1/passwd")],
         same_file("/breakouts/mypasswd", "/etc/passwd")),
    Case("HardlinkDownAndOut",
         [*ETC, D("breakouts"), D("downandout"), S("breakouts/d1", "../downandout/../../etc"),
          H("breakouts/mypasswd", "/breakouts/d1/passwd")],
         same_file("/breakouts/mypasswd", "/etc/passwd")),
    Case("HardlinkAbsolute", [*ETC, S("localetc", "/etc"), H("localpasswd", "/localetc/passwd")],
         same_file("localpasswd", "/etc/passwd")),
    Case("HardlinkRelativeLong",
         [*ETC, S("localetc", "../../../../../../../etc"), H("localpasswd", "/localetc/passwd")],
         same_file("localpasswd", "/etc/passwd")),
    Case("HardlinkRelativeUpAndOut",
         [*ETC, S("localetc", "upandout/../../../etc"), H("localpasswd", "/localetc/passwd")],
         same_file("localpasswd", "/etc/passwd")),
    Case("HardlinkDirectRelative", [*ETC, H("localpasswd", "../../../../../etc/passwd")],
         same_file("localpasswd", "/etc/passwd")),
    Case("HardlinkDirectAbsolute", [*ETC, H("localpasswd", "/etc/passwd")],
         same_file("localpasswd", "/etc/passwd")),
    # containerd ignores entries that resolve to the root; imagevol refuses non-directory ones
    Case("SymlinkParentDirectory", [*ETC, S("..", "/etc/"), H("localpasswd", "/etc/passwd")], REFUSED),
    Case("SymlinkEmptyFilename", [*ETC, S("", "/etc/"), H("localpasswd", "/etc/passwd")], REFUSED),
    Case("SymlinkParentRelative",
         [*ETC, S("localetc/sub/..", "/etc/"), H("/localetc/localpasswd", "/etc/passwd")],
         same_file("/localetc/localpasswd", "/etc/passwd")),
    Case("SymlinkSlashEnded", [*ETC, D("localetc/"), H("/localetc/localpasswd", "/etc/passwd")],
         both(is_dir("localetc"), same_file("/localetc/localpasswd", "/etc/passwd"))),
    Case("SymlinkOverrideDirectory", [S("localetc", "/etc"), H("/localetc/localpasswd", "/etc/passwd")],
         both(is_link("localetc"), same_file("/localetc/localpasswd", "/etc/passwd")),
         lower=fs(("d", "etc"), ("f", "etc/passwd", b"inside"), ("d", "localetc"))),
    Case("SymlinkOverrideDirectoryRelative",
         [S("localetc", "../../etc"), H("/localetc/localpasswd", "/etc/passwd")],
         same_file("/localetc/localpasswd", "/etc/passwd"),
         lower=fs(("d", "etc"), ("f", "etc/passwd", b"inside"), ("d", "localetc"))),
    Case("DirectoryOverrideSymlink", [D("/localetc/"), H("/localetc/localpasswd", "/etc/passwd")],
         both(is_dir("localetc"), same_file("/localetc/localpasswd", "/etc/passwd")),
         lower=fs(("d", "etc"), ("f", "etc/passwd", b"inside"), ("l", "localetc", "/etc"))),
    Case("DirectoryOverrideSymlinkAndHardlink",
         [D("/localetc/"), F("/localetc/localpasswd", b"different")],
         both(not_same_file("/localetc/localpasswd", "/etc/passwd"), value("etc/passwd", b"inside")),
         lower=fs(("d", "etc"), ("f", "etc/passwd", b"inside"), ("l", "localetc", "etc"),
                  ("h", "/localetc/localpasswd", "/etc/passwd"))),
    Case("WhiteoutRootParent", [F(".wh...")], REFUSED, lower=LOWER_ETC, after=value("etc/passwd", b"inside")),
    Case("WhiteoutParent", [F("etc/.wh...")], REFUSED, lower=LOWER_ETC, after=value("etc/passwd", b"inside")),
    Case("WhiteoutRoot", [F(".wh..")], REFUSED, lower=LOWER_ETC, after=value("etc/passwd", b"inside")),
    Case("WhiteoutCurrentDirectory", [F("etc/.wh..")], REFUSED, lower=LOWER_ETC,
         after=value("etc/passwd", b"inside")),
    Case("WhiteoutSymlink", [F(".wh.localetc")],
         both(value("etc/passwd", b"all users"), missing("localetc")), lower=LOWER_ETC_USERS),
    Case("WhiteoutSymlinkPath", [F("localetc/.wh.whitedout")],
         both(value("etc/passwd", b"all users"), missing("etc/whitedout")), lower=LOWER_ETC_WHITEDOUT),
    Case("WhiteoutDirectoryName", [F(".wh.etc/somefile", b"non-empty")],
         both(value("etc/passwd", b"all users"), value(".wh.etc/somefile", b"non-empty")),
         lower=LOWER_ETC_WHITEDOUT),
    Case("WhiteoutDeadSymlinkParent", [F("localetc/.wh.etc")], value("etc/passwd", b"all users"),
         lower=LOWER_DNE),
    Case("WhiteoutRelativePath", [F("dne/../.wh.etc")], missing("etc/passwd"), lower=LOWER_DNE),
    Case("SymlinkOverridePath",
         [D("foo"), D("foo/tmp"), F(f"foo/tmp/breakout-{TMP_ID}", b"\0\1\2"), S("foo", "/"),
          F(f"foo/tmp/breakout-{TMP_ID}", b"\3\4\5"), D("foo"), D("foo/tmp"),
          F(f"foo/tmp/breakout-{TMP_ID}", b"\6\7\10")],
         both(value(f"foo/tmp/breakout-{TMP_ID}", b"\6\7\10"), value(f"tmp/breakout-{TMP_ID}", b"\3\4\5"))),
    Case("HardlinkSymlinkBeforeCreateTarget",
         [D("etc", 0o770), S("localpasswd", "/etc/passwd"), H("localpasswd-dup", "localpasswd"),
          F("/etc/passwd", b"after")],
         both(is_link("localpasswd-dup", "/etc/passwd"), same_file("localpasswd-dup", "/etc/passwd"))),
    Case("HardlinkSymlinkRelative",
         [*ETC, S("passwdlink", "../../../../../etc/passwd"), H("localpasswd", "/passwdlink")],
         both(is_link("localpasswd", "../../../../../etc/passwd"), same_file("/localpasswd", "/etc/passwd"))),
    Case("HardlinkSymlinkAbsolute",
         [*ETC, S("passwdlink", "/etc/passwd"), H("localpasswd", "/passwdlink")],
         both(is_link("localpasswd", "/etc/passwd"), same_file("/localpasswd", "/etc/passwd"))),
    Case("HardlinkSymlinkChmod",
         [S("{out}/also-exists-outside-root", "{out}/perm400"),
          H("sketchylink", "{out}/also-exists-outside-root")],
         is_link("sketchylink", "{out}/perm400")),
    # TestRelativeSymlinks: breakout links, then an entry written through each
    Case("RelativeSymlinksOther",
         [*BASE, S("home/derek/other", "../other"), S("home/derek/etc", "../../etc"),
          S("home/derek/updown", "up/../../other"), F("home/derek/etc/x", b"x"), F("home/derek/other/y", b"y"),
          F("home/derek/updown/z", b"z")],
         both(value("etc/x", b"x"), value("home/other/y", b"y"), value("home/other/z", b"z"))),
    Case("RelativeSymlinksBreakout",
         [*BASE, S("home/derek/breakout", "../../../breakout"), F("home/derek/breakout/x", b"x")],
         value("breakout/x", b"x")),
    Case("RelativeSymlinksRootBreakout", [*BASE, S("/breakout", "../../breakout"), F("breakout/x", b"x")],
         REFUSED),  # resolves to itself: a symlink loop
    Case("RelativeSymlinksUpAndOut", [*BASE, S("/breakout", "etc/../../upandout"), F("breakout/x", b"x")],
         value("upandout/x", b"x")),
    Case("RelativeSymlinksDownAndOut",
         [*BASE, S("/home/breakout", "derek/../../../downandout"), F("home/breakout/x", b"x")],
         value("downandout/x", b"x")),
    Case("RelativeSymlinksLocaletc", [*BASE, S("localetc", "/etc"), F("localetc/x", b"x")], value("etc/x", b"x")),
]

SPEC = [
    Case("spec-localetc-unbroken-lower-link", [F("localetc/unbroken", b"unbroken")], UNBROKEN,
         lower=fs(("l", "localetc", "/etc"))),
    Case("spec-localetc-host-link", [F("localetc/unbroken", b"unbroken")], value("{out}/etc/unbroken", b"unbroken"),
         lower=fs(("l", "localetc", "{out}/etc"))),
    Case("spec-hardlink-dotdot-etc-passwd", [H("localpasswd", "../../../../../etc/passwd")],
         same_file("localpasswd", "etc/passwd"), lower=LOWER_ETC),
    Case("spec-hardlink-dotdot-etc-passwd-absent", [H("localpasswd", "../../../../../etc/passwd")], REFUSED),
    Case("spec-symlink-named-dotdot", [S("..", "{out}/etc")], REFUSED),
    Case("spec-symlink-named-empty", [S("", "{out}/etc")], REFUSED),
    Case("spec-symlink-named-dotdot-slash", [S("../", "/etc")], REFUSED),
    Case("spec-whiteout-dot", [F(".wh..")], REFUSED, lower=LOWER_ETC, after=value("etc/passwd", b"inside")),
    Case("spec-whiteout-dotdot", [F(".wh...")], REFUSED, lower=LOWER_ETC, after=value("etc/passwd", b"inside")),
    Case("spec-whiteout-etc-dot", [F("etc/.wh..")], REFUSED, lower=LOWER_ETC,
         after=value("etc/passwd", b"inside")),
    Case("spec-whiteout-empty-name", [F("etc/.wh.")], REFUSED, lower=LOWER_ETC),
    Case("spec-whiteout-dir-type", [D(".wh..")], REFUSED, lower=LOWER_ETC),
    Case("spec-whiteout-symlink-removes-only-link", [F(".wh.localetc")],
         both(missing("localetc"), value("etc/passwd", b"all users")), lower=LOWER_ETC_USERS),
    Case("spec-whiteout-host-symlink-removes-only-link", [F(".wh.hostetc")], missing("hostetc"),
         lower=LOWER_HOSTETC),
    Case("spec-whiteout-through-symlink", [F("localetc/.wh.whitedout")],
         both(missing("etc/whitedout"), value("etc/passwd", b"all users"), is_link("localetc")),
         lower=LOWER_ETC_WHITEDOUT),
    Case("spec-opaque-after-child-keeps-child", [D("d"), F("d/new", b"n"), F("d/.wh..wh..opq")],
         both(value("d/new", b"n"), missing("d/old")), lower=fs(("d", "d"), ("f", "d/old", b"o"))),
    Case("spec-file-and-whiteout-same-layer", [F("f", b"upper"), F(".wh.f")], value("f", b"upper"),
         lower=fs(("f", "f", b"lower"))),
    Case("spec-root-entry-file-dot", [F(".", b"x")], REFUSED),
    Case("spec-root-entry-file-slash", [F("/", b"x")], REFUSED),
    Case("spec-root-entry-file-dotdot", [F("../..", b"x")], REFUSED),
    Case("spec-root-entry-symlink", [S("./", "{out}")], REFUSED),
    Case("spec-root-entry-hardlink", [*ETC, H(".", "etc/passwd")], REFUSED),
    Case("spec-root-entry-device", [DEV("/")], REFUSED),
    Case("spec-root-entry-directory-is-fine", [D("./", 0o755), D("a/.."), F("x", b"x")], value("x", b"x")),
    Case("spec-file-over-lower-host-symlink", [F("passwdlink", b"new")], value("passwdlink", b"new"),
         lower=fs(("l", "passwdlink", "{out}/etc/passwd"))),
    Case("spec-file-over-lower-etc-symlink", [F("passwdlink", b"new", 0o666)], value("passwdlink", b"new"),
         lower=fs(("l", "passwdlink", "/etc/passwd"))),
    Case("spec-dir-over-dir-keeps-children", [D("d", 0o700), F("d/new", b"n")],
         both(value("d/child", b"c"), value("d/new", b"n")), lower=fs(("d", "d"), ("f", "d/child", b"c"))),
    Case("spec-devices-refuse", [DEV("dev/null")], REFUSED, options={"devices": "refuse"}),
    Case("spec-devices-skip", [DEV("dev/null"), DEV("dev/sda", tarfile.BLKTYPE)], missing("dev/null")),
    Case("spec-duplicates-refuse", [F("a", b"1"), F("a", b"2")], REFUSED, options={"duplicates": "refuse"}),
    Case("spec-duplicates-refuse-link-then-file", [S("a", "{out}/etc/passwd"), F("a", b"2")], REFUSED,
         options={"duplicates": "refuse"}),
    Case("spec-duplicates-last", [F("a", b"1"), S("a", "{out}/etc/passwd"), F("a", b"last")], value("a", b"last")),
]

EXTRA = [
    Case("host-abs-symlink-then-child", [S("hostetc", "{out}/etc"), F("hostetc/passwd", b"pwned")],
         value("{out}/etc/passwd", b"pwned")),
    Case("lower-host-symlink-then-child", [F("hostetc/shadow", b"pwned")], value("{out}/etc/shadow", b"pwned"),
         lower=LOWER_HOSTETC),
    Case("lower-host-symlink-dir-entry", [D("hostetc", 0o777), F("hostetc/x", b"x")],
         both(is_dir("hostetc"), value("hostetc/x", b"x")), lower=LOWER_HOSTETC),
    Case("lower-host-symlink-file-chmod", [F("p", b"new", 0o4777)], value("p", b"new"),
         lower=fs(("l", "p", "{out}/perm400"))),
    Case("lower-host-symlink-dir-mtime", [D("d", 0o700, mtime=1)], is_dir("d"),
         lower=fs(("l", "d", "{out}/etc"))),
    Case("lower-host-symlink-xattr",
         [F("x", b"new", pax={"SCHILY.xattr.user.evil": "1", "SCHILY.xattr.trusted.evil": "1"})],
         value("x", b"new"), lower=fs(("l", "x", "{out}/etc/passwd"))),
    Case("lower-host-symlink-replaced-by-hardlink", [D("etc"), F("etc/f", b"f"), H("x", "etc/f")],
         same_file("x", "etc/f"), lower=fs(("l", "x", "{out}/etc/passwd"))),
    Case("lower-host-symlink-replaced-by-symlink", [S("x", "/etc/passwd")], is_link("x", "/etc/passwd"),
         lower=fs(("l", "x", "{out}/etc/passwd"))),
    Case("lower-dir-replaced-by-host-symlink", [S("d", "{out}"), F("d/new", b"n")],
         both(is_link("d"), value("{out}/new", b"n")), lower=fs(("d", "d"), ("f", "d/child", b"c"))),
    Case("lower-host-symlink-fifo", [DEV("p", tarfile.FIFOTYPE, 0o777)], present("p"),
         lower=fs(("l", "p", "{out}/etc/passwd")), options={"devices": "create"}),
    Case("lower-host-symlink-chardev", [DEV("null", mode=0o777)], CONTAINED,
         lower=fs(("l", "null", "{out}/etc/passwd")), options={"devices": "create"}),
    Case("hardlink-to-host-absolute", [H("x", "{out}/etc/passwd")], REFUSED),
    Case("hardlink-to-host-relative", [H("x", "../outside/etc/passwd")], REFUSED),
    Case("hardlink-through-lower-host-symlink", [H("x", "hostetc/passwd")], REFUSED, lower=LOWER_HOSTETC),
    Case("hardlink-through-layer-host-symlink", [S("h", "{out}/etc"), H("x", "h/passwd")], REFUSED),
    Case("hardlink-to-lower-host-symlink", [H("x", "hostpw")], is_link("x", "{out}/etc/passwd"),
         lower=fs(("l", "hostpw", "{out}/etc/passwd"))),
    Case("hardlink-to-directory", [D("etc"), H("x", "etc")], REFUSED),
    Case("hardlink-to-root", [H("x", "/")], REFUSED),
    Case("hardlink-to-dotdot", [H("x", "..")], REFUSED),
    Case("hardlink-target-missing", [H("x", "nothing/here")], REFUSED),
    Case("hardlink-through-file", [F("f", b"f"), H("x", "f/passwd")], REFUSED),
    Case("hardlink-pax-long-dotdot", [*ETC, H("x", "../" * 60 + "etc/passwd")], same_file("x", "etc/passwd")),
    Case("nul-in-pax-path", [F("y", b"x", pax={"path": "etc\x00/passwd"})], REFUSED),
    Case("nul-in-pax-linkpath", [S("x", "zz", pax={"linkpath": "/etc\x00/passwd"})], REFUSED),
    Case("name-component-too-long", [F("d/" + "x" * 256, b"x")], REFUSED),
    Case("path-too-long", [F(("a" * 200 + "/") * 25 + "f", b"x")], REFUSED),
    Case("symlink-loop", [S("a", "b"), S("b", "a"), F("a/x", b"x")], REFUSED),
    Case("symlink-self-loop", [S("a", "./a/"), F("a/x", b"x")], REFUSED),
    Case("symlink-to-itself-through-root", [S("a", "/a"), D("a/d")], REFUSED),
    Case("write-below-a-file", [F("f", b"f"), F("f/x", b"x")], REFUSED),
    Case("write-below-a-lower-host-file-link", [F("x/y", b"y")], value("{out}/etc/passwd/y", b"y"),
         lower=fs(("l", "x", "{out}/etc/passwd"))),
    Case("dotdot-name", [F("../../../../escape", b"x")], value("escape", b"x")),
    Case("dotdot-name-to-outside", [F("../outside/etc/passwd", b"pwned")], value("outside/etc/passwd", b"pwned")),
    Case("absolute-host-name", [F("{out}/etc/passwd", b"pwned")], value("{out}/etc/passwd", b"pwned")),
    Case("gnu-longname-dotdot", [F("../" * 40 + "etc/passwd-gnu", b"g"), S("l" * 101, "../" * 40 + "etc")],
         both(value("etc/passwd-gnu", b"g"), is_link("l" * 101)), fmt=tarfile.GNU_FORMAT),
    Case("symlink-to-slash", [S("rootlink", "/"), F("rootlink/etc/passwd", b"x")], value("etc/passwd", b"x")),
    Case("symlink-to-dotdot", [S("up", ".."), S("up2", "../../.."), F("up/a", b"a"), F("up2/b", b"b")],
         both(value("a", b"a"), value("b", b"b"))),
    Case("symlink-proc-self-root", [S("p", "/proc/self/root/etc"), F("p/passwd", b"x")],
         value("proc/self/root/etc/passwd", b"x")),
    Case("symlink-chain-to-host", [S("a", "b"), S("b", "{out}"), D("a/etc/new")], is_dir("{out}/etc/new")),
    Case("opaque-through-host-symlink", [F("hostetc/.wh..wh..opq")], is_link("hostetc"), lower=LOWER_HOSTETC),
    Case("whiteout-through-host-symlink", [F("hostetc/.wh.passwd")], is_link("hostetc"), lower=LOWER_HOSTETC),
    Case("whiteout-through-dotdot", [F("../.wh.outside"), F("../../.wh.etc")], CONTAINED),
    Case("whiteout-through-lower-dotdot-link", [F("up/.wh.outside")], CONTAINED, lower=fs(("l", "up", ".."))),
    Case("opaque-at-root", [F("keep", b"k"), F(".wh..wh..opq")], both(value("keep", b"k"), missing("etc")),
         lower=LOWER_ETC_USERS),
    Case("whiteout-in-artifact-layer", [F(".wh.etc")], REFUSED, lower=LOWER_ETC, options={"whiteouts": False},
         after=value("etc/passwd", b"inside")),
    Case("opaque-in-artifact-layer", [F("etc/.wh..wh..opq")], REFUSED, lower=LOWER_ETC,
         options={"whiteouts": False}),
]
# fmt: on

CASES = [*CONTAINERD, *SPEC, *EXTRA]


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_breakout(case: Case, env: Env):
    if case.lower:
        case.lower(env)
    before = snapshot(env.top, env.root)
    host_before = host_state()
    data = build(case.entries, env.out, case.fmt)
    options = ApplyOptions(**case.options)
    try:
        if case.expect == REFUSED:
            with pytest.raises(UnsafeContentError) as exc:
                apply_layer(env.root, io.BytesIO(data), options=options, warn=lambda _m: None)
            assert exc.value.exit_code == 4
        else:
            apply_layer(env.root, io.BytesIO(data), options=options, warn=lambda _m: None)
            if callable(case.expect):
                case.expect(env)
        if case.after:
            case.after(env)
    finally:
        assert snapshot(env.top, env.root) == before, "something outside the root changed"
        assert host_state() == host_before, "the real host changed"
    # whatever happened, nothing inside the root is a hardlink to something outside it
    outside_inodes = {os.lstat(p).st_ino for p in env.outside.rglob("*")}
    for p in env.root.rglob("*"):
        assert os.lstat(p).st_ino not in outside_inodes, p


def test_real_etc_is_never_touched_by_literal_etc_targets(env: Env):
    """Literal `/etc` targets and names are root-relative: the real /etc/passwd is untouched."""
    before = host_state()
    data = build(
        [
            S("localetc", "/etc"),
            F("localetc/passwd", b"pwned"),
            S("pw", "/etc/passwd"),
            F("pw", b"pwned"),
            F("/etc/shadow", b"pwned"),
            H("hl", "/etc/passwd"),
            F("etc/.wh.hostname"),
        ],
        env.out,
    )
    apply_layer(env.root, io.BytesIO(data), options=ApplyOptions())
    assert host_state() == before
    assert (env.root / "etc/passwd").read_bytes() == b"pwned"
    assert os.path.samefile(env.root / "hl", env.root / "etc/passwd")


def test_the_tree_changing_to_a_host_symlink_between_layers(env: Env):
    """A directory that a later layer writes into was swapped for a host symlink after a first layer."""
    apply_layer(env.root, io.BytesIO(build([D("data"), F("data/a", b"a")], env.out)))
    before = snapshot(env.top, env.root)
    os.rename(env.root / "data", env.root / "data.old")
    os.symlink(env.out + "/etc", env.root / "data")
    apply_layer(env.root, io.BytesIO(build([F("data/passwd", b"pwned"), F("data/.wh.shadow")], env.out)))
    assert snapshot(env.top, env.root) == before
    assert (env.root / env.out.lstrip("/") / "etc/passwd").read_bytes() == b"pwned"


@root_only("chown")
def test_ownership_and_modes_never_reach_outside(env: Env):
    before = snapshot(env.top, env.root)
    entries = [
        S("l", "{out}/etc/passwd"),
        F("f", b"x", 0o4777),
        S("d", "{out}/etc"),
        D("d", 0o777),
        S("l2", "{out}/etc"),
    ]
    for ti, _ in entries:
        ti.uid = ti.gid = 4242
    apply_layer(env.root, io.BytesIO(build(entries, env.out)))
    assert snapshot(env.top, env.root) == before
    assert os.lstat(env.root / "l2").st_uid == 4242


def test_mutated_headers_only_raise_imagevol_errors(env: Env):
    """Corrupted header fields (checksums fixed up) give ImagevolError or a contained tree, never
    another exception and never a change outside the root."""
    entries = [
        D("etc"),
        F("etc/passwd", b"inside"),
        F("l" * 150, b"long"),
        S("s", "{out}/etc"),
        H("h", "etc/passwd"),
        F("s/x", b"through"),
        F(".wh.gone"),
        DEV("dev/null"),
    ]
    base = build(entries, env.out, tarfile.GNU_FORMAT)
    headers, pos = [], 0
    while pos < len(base) and base[pos : pos + 512] != bytes(512):
        blk = base[pos : pos + 512]
        headers.append(pos)
        size = int(blk[124:136].split(b"\0")[0] or b"0", 8)
        pos += 512 + (0 if blk[156:157] in (b"1", b"2", b"3", b"4", b"5", b"6") else -(-size // 512) * 512)
    fields = [0, 1, 2, 99, 100, 101, 108, 116, 124, 134, 135, 136, 156, 157, 158, 329, 337]
    alphabet = b"/.\0 079aLKx5" + bytes([0x80, 0xFF])
    rnd = random.Random(1234)
    before = snapshot(env.top, env.root)
    for i in range(300):
        data = bytearray(base)
        for _ in range(rnd.randint(1, 3)):
            h = rnd.choice(headers)
            data[h + rnd.choice(fields)] = rnd.choice(alphabet)
            data[h + 148 : h + 156] = b" " * 8
            data[h + 148 : h + 156] = b"%06o\0 " % sum(data[h : h + 512])
        devices = rnd.choice(["skip", "refuse", "create"])
        layer_root = env.root / f"r{i}"  # a fresh root each time; all of them inside tmp/root
        layer_root.mkdir()
        try:
            apply_layer(
                layer_root, io.BytesIO(bytes(data)), options=ApplyOptions(devices=devices), warn=lambda _m: None
            )
        except ImagevolError as e:
            assert e.exit_code in (1, 4)
    assert snapshot(env.top, env.root) == before
