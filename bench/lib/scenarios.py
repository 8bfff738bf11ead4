"""One timed run of each contender. Every run gets fresh directories and removes them after."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import proc


@dataclass
class Ctx:
    """What every scenario needs."""

    py: str  # an interpreter with oras-py and urllib3
    imagevol: list[str]  # the imagevol command
    registry_url: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT
    work: Path  # scratch directory (same file system as the stores)
    model_sizes: dict[str, int]
    timeout: float
    mode: str  # bind (root) or hardlink
    lib: Path  # bench/lib
    env: dict[str, str] = field(default_factory=dict)
    counter: int = 0

    def fresh(self, what: str) -> Path:
        self.counter += 1
        return self.work / f"{what}-{self.counter}"


@dataclass
class Run:
    seconds: float
    rss_mib: float | None = None
    written_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: float | None = None

    @classmethod
    def of(cls, *ms: proc.Measured, extra: dict[str, Any] | None = None) -> Run:
        """One run from one or more commands run one after the other (times and CPU add up)."""
        reg = sum(m.watched_cpu_s.get("registry", 0.0) for m in ms)
        return cls(
            sum(m.seconds for m in ms),
            max(m.rss_mib for m in ms),
            sum(m.written_bytes for m in ms),
            {
                "registry_cpu_s": round(reg, 3),
                "other_cpu_s": round(sum(m.other_cpu_s for m in ms), 3),
                "load_before": ms[0].load_before,
                "quiet": all(m.quiet for m in ms),
                **(extra or {}),
            },
            sum(m.cpu_s for m in ms),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seconds": round(self.seconds, 4)}
        if self.cpu_s is not None:
            d["cpu_s"] = round(self.cpu_s, 3)
        if self.rss_mib is not None:
            d["rss_mib"] = round(self.rss_mib, 1)
        if self.written_bytes is not None:
            d["written_bytes"] = self.written_bytes
        d.update(self.extra)
        return d


# ------------------------------------------------------------------------------------------ helpers


def prime_page_cache(directory: Path) -> int:
    """Read every file below ``directory`` once (the registry's storage), so that the first round
    finds it in the page cache as the later rounds do. Returns the bytes read."""
    n = 0
    buf = bytearray(8 << 20)
    for dirpath, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while k := f.readinto(buf):
                    n += k
    return n


def settle(*inputs: Path, warm: Sequence[tuple[list[str], dict[str, str] | None]] = ()) -> bool:
    """Give every run the same memory to start from: write back and drop the page cache, then
    read the inputs (the registry's storage, the model) back in, and run each `warm` command once
    (argv, env) so that every contender's own code (interpreter, modules, byte code, binaries) is
    cached, as on a machine that runs it routinely: a dropped cache otherwise bills each Python
    tool 0.2-0.4 s of disk reads at start-up. On this class of VM a run that finds memory full of
    an earlier run's page cache pays for reclaim and for fresh host pages, and that cost went to
    whoever ran next (cold runs of one contender varied 6-12 s). Needs root; returns False (and
    changes nothing) otherwise."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    for d in inputs:
        prime_page_cache(d)
    for argv, env in warm:
        subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
    return True


def rmtree(path: Path) -> None:
    """Remove a tree that may hold read-only directories (snapshots are sealed 0555)."""
    if not os.path.lexists(path):
        return
    if is_mountpoint_below(path):
        raise RuntimeError(f"refusing to remove {path}: something is still mounted below it")

    def onerror(func: Any, p: str, exc: Any) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o755)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o755)
        except OSError:
            pass
        func(p)

    shutil.rmtree(path, onerror=onerror)  # onexc is 3.12+


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def is_mountpoint_below(path: Path) -> bool:
    p = os.path.realpath(path)
    return any(m == p or m.startswith(p + "/") for m in mountpoints())


def force_unmount_below(path: Path) -> list[str]:
    """Last resort at exit: lazily unmount whatever is still mounted below ``path`` (only our own
    scratch directory is ever passed)."""
    p = os.path.realpath(path)
    libc = ctypes.CDLL(None, use_errno=True)
    done = []
    for m in sorted(mountpoints(), key=len, reverse=True):
        if (m == p or m.startswith(p + "/")) and libc.umount2(os.fsencode(m), 2) == 0:  # MNT_DETACH
            done.append(m)
    return done


def check_files(directory: Path, sizes: dict[str, int]) -> None:
    """Every model file is present at the top of ``directory`` with its size."""
    for name, size in sizes.items():
        st = os.stat(directory / name)
        if st.st_size != size:
            raise RuntimeError(f"{directory / name}: {st.st_size} bytes, expected {size}")


def listing(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """(mode, size, inode, mtime_ns) of everything below root/blobs and root/snapshots."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for top in ("blobs", "snapshots"):
        base = root / top
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[os.path.relpath(p, root)] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_ino, st.st_mtime_ns)
    return out


def _json(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError:
        return {}


# ------------------------------------------------------------------------------------------ imagevol


def imagevol_cold_and_warm(ctx: Ctx, ref: str) -> tuple[Run, Run]:
    """Cold: `imagevol --root FRESH mount REF TARGET` with an empty store. Warm: the same reference
    into a second target with the content present; the blobs/ and snapshots/ listings must not
    change (no file data written). Both targets are unmounted, the store removed."""
    root = ctx.fresh("store")
    t1 = ctx.fresh("target")
    t2 = ctx.fresh("target")
    base = [*ctx.imagevol, "--root", str(root)]
    mounted: list[Path] = []
    try:
        m = proc.run(
            [*base, "mount", ref, str(t1), "--mode", ctx.mode, "--progress", "none", "--json"],
            timeout=ctx.timeout,
            env=ctx.env,
        )
        mounted.append(t1)
        doc = _json(m.stdout)
        check_files(t1, ctx.model_sizes)
        pull_s = (doc.get("pull") or {}).get("seconds")
        cold = Run.of(
            m,
            extra={
                "in_process_s": doc.get("seconds"),
                "pull_s": pull_s,
                "materialize_and_mount_s": round(doc["seconds"] - pull_s, 4) if doc.get("seconds") and pull_s else None,
                "flavour": doc.get("flavour"),
                "downloaded": (doc.get("pull") or {}).get("downloadedBytes"),
            },
        )
        before = listing(root)
        w = proc.run(
            [*base, "mount", ref, str(t2), "--mode", ctx.mode, "--progress", "none", "--json"],
            timeout=ctx.timeout,
            env=ctx.env,
        )
        mounted.append(t2)
        after = listing(root)
        check_files(t2, ctx.model_sizes)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        wdoc = _json(w.stdout)
        warm = Run.of(
            w,
            extra={
                "in_process_s": wdoc.get("seconds"),
                "store_unchanged": not changed,
                "changed": changed[:10],
                "offline": (wdoc.get("pull") or {}).get("offline"),
            },
        )
    finally:
        for t in reversed(mounted):
            proc.run([*base, "unmount", str(t)], timeout=ctx.timeout, env=ctx.env, check=False)
        force_unmount_below(ctx.work / root.name)
        for p in (t2, t1, root):
            rmtree(p)
    return cold, warm


def imagevol_pack(ctx: Ctx, model: Path, target: str, fmt: str) -> Run:
    cmd = [*ctx.imagevol, "pack", str(model), target, "--format", fmt, "--progress", "none", "--no-explain", "--json"]
    if fmt == "image":
        cmd += ["--compression", "none"]
    m = proc.run(cmd, timeout=ctx.timeout, env=ctx.env)
    doc = _json(m.stdout)
    return Run.of(
        m, extra={"in_process_s": doc.get("seconds"), "bytes_pushed": doc.get("bytesPushed", doc.get("bytes_pushed"))}
    )


# ------------------------------------------------------------------------------------------ peers


def oras_pull(ctx: Ctx, ref: str) -> Run:
    out = ctx.fresh("oras-out")
    try:
        m = proc.run([ctx.py, str(ctx.lib / "oras_cli.py"), "pull", ref, str(out)], timeout=ctx.timeout, env=ctx.env)
        check_files(out, ctx.model_sizes)
        return Run.of(m)
    finally:
        rmtree(out)


def oras_push(ctx: Ctx, model: Path, ref: str) -> Run:
    files = sorted(str(p) for p in model.iterdir() if p.is_file())
    m = proc.run([ctx.py, str(ctx.lib / "oras_cli.py"), "push", ref, *files], timeout=ctx.timeout, env=ctx.env)
    return Run.of(m)


def skopeo_umoci(ctx: Ctx, ref: str) -> Run:
    """`skopeo copy docker://REF oci:DIR:t` then `umoci raw unpack --image DIR:t OUT`."""
    layout = ctx.fresh("skopeo-layout")
    out = ctx.fresh("umoci-out")
    try:
        a = proc.run(
            ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:t"],
            timeout=ctx.timeout,
            env=ctx.env,
        )
        b = proc.run(["umoci", "raw", "unpack", "--image", f"{layout}:t", str(out)], timeout=ctx.timeout, env=ctx.env)
        check_files(out, ctx.model_sizes)
        return Run.of(a, b, extra={"skopeo_s": round(a.seconds, 4), "umoci_s": round(b.seconds, 4)})
    finally:
        rmtree(out)
        rmtree(layout)


def limit(ctx: Ctx, repo: str, tag: str) -> Run:
    out = ctx.fresh("limit-out")
    try:
        m = proc.run(
            [ctx.py, str(ctx.lib / "onepass.py"), ctx.registry_url, repo, tag, str(out)],
            timeout=ctx.timeout,
            env=ctx.env,
        )
        return Run.of(m)
    finally:
        rmtree(out)
