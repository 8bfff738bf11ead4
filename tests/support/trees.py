"""Describe a directory tree the way a runtime would see it, and compare two trees.

``scan(root)`` lstat()s every entry below ``root`` (never following a symlink, never leaving the
tree) and records its kind, mode, owner, size, content hash, symlink target, mtime and inode.
``compare(a, b)`` lists the differences in words; ``hardlink_groups`` gives the sets of paths that
share an inode. Nothing here uses imagevol's code.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

WHITEOUT_PREFIX = ".wh."


@dataclass(frozen=True)
class Node:
    kind: str  # file, dir, symlink, fifo, chr, blk, sock
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int
    sha256: str | None
    link: str | None
    mtime_ns: int
    dev: int
    ino: int


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
    ):
        if test(mode):
            return name
    return "sock"


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def scan(root: str | os.PathLike[str], *, hash_files: bool = True) -> dict[str, Node]:
    """``{relative path: Node}`` of everything below ``root``; the root itself is ``"."``."""
    root = os.fspath(root)
    out: dict[str, Node] = {}

    def visit(path: str, rel: str) -> None:
        st = os.lstat(path)
        kind = _kind(st.st_mode)
        out[rel] = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else 0,
            sha256=file_sha256(path) if kind == "file" and hash_files else None,
            link=os.readlink(path) if kind == "symlink" else None,
            mtime_ns=st.st_mtime_ns,
            dev=st.st_dev,
            ino=st.st_ino,
        )
        if kind == "dir":
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), name if rel == "." else f"{rel}/{name}")

    visit(root, ".")
    return out


def hardlink_groups(tree: dict[str, Node]) -> set[frozenset[str]]:
    """Sets (of two or more) of non-directory paths that share one inode."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for path, n in tree.items():
        if n.kind != "dir":
            by_inode.setdefault((n.dev, n.ino), set()).add(path)
    return {frozenset(paths) for paths in by_inode.values() if len(paths) > 1}


def whiteouts(tree: dict[str, Node]) -> list[str]:
    return sorted(p for p in tree if os.path.basename(p).startswith(WHITEOUT_PREFIX))


def compare(
    got: dict[str, Node],
    want: dict[str, Node],
    *,
    ignore_write_bits: bool = True,
    mtimes: tuple[str, ...] = ("file", "symlink"),
    skip_root_mode: bool = False,
    owners: bool = True,
) -> list[str]:
    """Differences between two scans, in words (empty: the trees match).

    ignore_write_bits: compare modes without the write bits (a sealed read-only snapshot has none).
    mtimes: the kinds whose mtimes must match exactly.
    """
    diffs: list[str] = []
    for path in sorted(set(got) - set(want)):
        diffs.append(f"{path}: unexpected {got[path].kind}")
    for path in sorted(set(want) - set(got)):
        diffs.append(f"{path}: missing {want[path].kind}")
    mask = ~0o222 if ignore_write_bits else ~0
    for path in sorted(set(got) & set(want)):
        g, w = got[path], want[path]
        if g.kind != w.kind:
            diffs.append(f"{path}: is a {g.kind}, want a {w.kind}")
            continue
        if g.kind != "symlink" and not (path == "." and skip_root_mode) and g.mode & mask != w.mode & mask:
            diffs.append(f"{path}: mode {g.mode:o}, want {w.mode:o}")
        if owners and (g.uid, g.gid) != (w.uid, w.gid):
            diffs.append(f"{path}: owner {g.uid}:{g.gid}, want {w.uid}:{w.gid}")
        if g.kind == "file" and (g.size, g.sha256) != (w.size, w.sha256):
            diffs.append(f"{path}: content differs ({g.size} bytes vs {w.size})")
        if g.link != w.link:
            diffs.append(f"{path}: symlink to {g.link!r}, want {w.link!r}")
        if g.kind in mtimes and g.mtime_ns != w.mtime_ns:
            diffs.append(f"{path}: mtime {g.mtime_ns}, want {w.mtime_ns}")
    gl, wl = hardlink_groups(got), hardlink_groups(want)
    if gl != wl:
        diffs.append(f"hard-link groups {sorted(map(sorted, gl))}, want {sorted(map(sorted, wl))}")
    return diffs


def listing(root: str | os.PathLike[str]) -> set[str]:
    """Relative paths of every entry below ``root`` (empty if it does not exist)."""
    root = os.fspath(root)
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):  # never follows symlinks
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            out.add(name if rel == "." else f"{rel}/{name}")
    return out
