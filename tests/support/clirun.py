"""Running the imagevol CLI as a separate process, and checking what it left behind.

``Imagevol(root, home)`` runs ``python -m imagevol --root ROOT ...`` with a private HOME (no stray
auth file or registries.conf), in the foreground (``run``) or as its own process group
(``popen``, so a test can SIGKILL it and everything it started). ``crash(specs, ...)`` runs it
under ``tests/support/crashpoint.py``. ``cleanup()`` unmounts every mount under the watched
directories (imagevol's own unmount first, then ``umount -l`` as a safety net).

``HostGuard`` snapshots what a hostile layer must never change: a sentinel tree (names, types,
modes, owners, contents), ``/etc`` (listing and the hash of ``/etc/passwd``), the top of the
filesystem, and every path under a test directory except the store and the targets; ``check()``
compares.

``mountpoints()``, ``tree()`` and ``sha256_file()`` are small helpers shared by the suites.
Nothing here uses imagevol's code (except ``cleanup``'s in-process unmount, teardown only).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

RUN_TIMEOUT = 180
CRASHPOINT = str(Path(__file__).with_name("crashpoint.py"))
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def mountpoints() -> set[str]:
    """Mount points of this namespace (``/proc/self/mountinfo``, octal escapes decoded)."""
    out = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            raw = line.split(b" ")[4]
            out.add(os.fsdecode(raw.decode("unicode_escape").encode("latin-1")))
    return out


def mount_options(target: str | Path) -> set[str]:
    """Per-mount options (``ro``/``rw``, ``nosuid``, ...) of the mount at ``target``."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split(b" ")
        if os.fsdecode(fields[4].decode("unicode_escape").encode("latin-1")) == str(target):
            return set(fields[5].decode().split(","))
    raise AssertionError(f"{target} is not mounted")


def mounts_under(directory: Path) -> set[str]:
    d = str(directory).rstrip("/") + "/"
    return {m for m in mountpoints() if m.startswith(d)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def tree(path: Path, skip: tuple[Path, ...] = ()) -> dict[bytes, tuple]:
    """{relative path (bytes): (kind, mode, uid, gid, content hash / link target / '')} below
    ``path``, symlinks not followed, the directories ``skip`` left out (not entered). Names are
    bytes so non-UTF-8 names compare exactly."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(path)
    pruned = {os.fsencode(os.path.abspath(s)) for s in skip}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in pruned]
        for name in sorted(dirnames + filenames):
            if os.path.join(dirpath, name) in pruned:
                continue
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, base)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what: bytes | str = hashlib.sha256(f.read()).hexdigest()
                kind = "file"
            elif stat.S_ISLNK(st.st_mode):
                what, kind = os.readlink(p), "symlink"
            elif stat.S_ISDIR(st.st_mode):
                what, kind = "", "dir"
            else:
                what, kind = str(st.st_rdev), "node"
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, what)
    return out


def _env(home: Path) -> dict[str, str]:
    drop = ("REGISTRY_AUTH_FILE", "CONTAINERS_REGISTRIES_CONF", "IMAGEVOL_ROOT", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Imagevol:
    """``python -m imagevol --root ROOT ...``; ``watch`` lists directories whose mounts
    ``cleanup()`` removes."""

    root: Path
    home: Path
    watch: list[Path] = field(default_factory=list)
    #: every target ``mount`` was asked for; ``cleanup()`` unmounts these too
    targets: list[Path] = field(default_factory=list)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "imagevol", "--root", str(self.root), *args]

    def run(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=_env(self.home))

    def popen(self, *args: str, log: Path, crash: tuple[str, ...] = ()) -> subprocess.Popen:
        """Started in its own session (``os.killpg(p.pid, SIGKILL)`` kills it all); output to ``log``."""
        argv = self.argv(*args)
        if crash:
            argv = [sys.executable, CRASHPOINT, *crash, "--", "--root", str(self.root), *args]
        fh = open(log, "wb")  # noqa: SIM115 - the child owns it
        try:
            return subprocess.Popen(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=_env(self.home), start_new_session=True
            )
        finally:
            fh.close()

    def crash(self, specs: tuple[str, ...] | list[str], *args: str, timeout: float = RUN_TIMEOUT):
        """Run ``args`` with the crash points ``specs`` (see crashpoint.py)."""
        argv = [sys.executable, CRASHPOINT, *specs, "--", "--root", str(self.root), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(self.home))

    # ---- commands

    def pull(self, ref: str, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.run("pull", ref, "--progress", "none", *args, timeout=timeout)

    def mount(self, ref: str, target: Path, *args: str) -> subprocess.CompletedProcess[str]:
        self.targets.append(Path(target))
        return self.run("mount", ref, str(target), "--progress", "none", "--json", *args)

    def mount_ok(self, ref: str, target: Path, *args: str) -> dict:
        r = self.mount(ref, target, *args)
        assert r.returncode == 0, f"mount {ref} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        return json.loads(r.stdout)

    def unmount(self, target: Path) -> subprocess.CompletedProcess[str]:
        return self.run("unmount", str(target))

    def volumes(self, *args: str) -> list[dict]:
        r = self.run("volumes", "--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def images(self) -> list[dict]:
        r = self.run("images", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def fsck(self) -> dict:
        r = self.run("fsck", "--json")
        doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
        assert r.returncode == 0 and doc.get("ok") is True, (
            f"fsck found problems ({r.returncode}):\n{r.stdout}\n{r.stderr}"
        )
        return doc

    def blob(self, digest: str) -> Path:
        alg, hex_ = digest.split(":", 1)
        return self.root / "blobs" / alg / hex_

    def assert_blob(self, digest: str, size: int) -> None:
        """The blob is in the store, of ``size`` bytes, and its content hashes to ``digest``."""
        path = self.blob(digest)
        assert path.is_file(), f"{digest} is not in the store"
        assert path.stat().st_size == size
        assert sha256_file(path) == digest

    def snapshot_dirs(self) -> list[str]:
        d = self.root / "snapshots"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def cleanup(self) -> None:
        """Unmount what is still mounted under the watched directories (teardown, not under test)."""
        left: set[str] = {str(t) for t in self.targets} & mountpoints()
        for d in self.watch:
            left |= mounts_under(d)
        if not left:
            return
        try:
            from imagevol.compose import unmount

            for t in sorted(left, reverse=True):
                try:
                    unmount(t, root=self.root)
                except Exception as e:  # teardown must go on
                    print(f"teardown: imagevol could not unmount {t}: {e}", file=sys.stderr)
        except ImportError:
            pass
        for _ in range(3):
            for t in sorted(left & mountpoints(), reverse=True):
                subprocess.run(["umount", "-l", t], capture_output=True, timeout=30)
        still = left & mountpoints()
        assert not still, f"still mounted: {sorted(still)}"


def refused(r: subprocess.CompletedProcess[str], *codes: int) -> None:
    """Exit status in ``codes``, one ``error:`` line first, no traceback (the message itself may
    speak of unexpected content, unlike :func:`clear_error`)."""
    assert r.returncode in codes, f"exit {r.returncode}, wanted {codes}:\n{r.stdout}\n{r.stderr}"
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def clear_error(r: subprocess.CompletedProcess[str], *codes: int) -> None:
    """Exit status in ``codes``, one ``error:`` line first, no traceback."""
    assert r.returncode in codes, f"exit {r.returncode}, wanted {codes}:\n{r.stdout}\n{r.stderr}"
    assert r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr


@dataclass
class HostGuard:
    """What must not change: see the module docstring. ``skip`` are paths below ``top`` that may."""

    top: Path
    sentinel: Path
    skip: tuple[Path, ...]
    before: dict = field(default_factory=dict)

    def state(self) -> dict:
        with open("/etc/passwd", "rb") as f:
            passwd = hashlib.sha256(f.read()).hexdigest()
        return {
            "sentinel": tree(self.sentinel),
            "etc": sorted(os.listdir("/etc")),
            "passwd": passwd,
            "top-level": sorted(os.listdir("/")),
            "outside": tree(self.top, self.skip),
        }

    def __enter__(self) -> HostGuard:
        self.before = self.state()
        return self

    def check(self) -> None:
        after = self.state()
        for k in self.before:
            if after[k] != self.before[k]:
                if isinstance(after[k], dict):
                    a, b = after[k], self.before[k]
                    diff = sorted({p for p in a.keys() | b.keys() if a.get(p) != b.get(p)})[:20]
                else:
                    diff = [after[k], self.before[k]]
                raise AssertionError(f"{k} changed outside the store and the target: {diff}")

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.check()


def make_sentinel(path: Path) -> Path:
    """A little "host" tree a hostile layer would love to write into."""
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "passwd").write_bytes(b"root:x:0:0:sentinel:/root:/bin/sh\n")
    (path / "victim").write_bytes(b"do not touch")
    (path / "dir").mkdir()
    os.chmod(path / "etc", 0o755)
    return path


def content_ok(path: Path, want: dict[str, bytes]) -> bool:
    """The regular files under `path` are exactly `want` (relative path -> bytes)."""
    got = {}
    for dirpath, _, filenames in os.walk(path):
        for n in filenames:
            full = os.path.join(dirpath, n)
            got[os.path.relpath(full, path)] = full
    return set(got) == set(want) and all(Path(got[k]).read_bytes() == v for k, v in want.items())
