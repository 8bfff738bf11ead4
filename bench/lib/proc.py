"""Run one command and measure it: wall time, peak RSS and bytes written.

Peak RSS is GNU time's "%M" (``/usr/bin/time``): a child forked from this (large) Python process
would inherit its RSS high-water mark through fork, so ``ru_maxrss`` from our own wait4 would be
floored at this process's size; /usr/bin/time is small and forks the command itself. Bytes
written come from wait4(2): ``ru_oublock`` counts the 512-byte blocks the command and its
descendants dirtied (Linux task I/O accounting), i.e. file data written, page cache or not.

Before the clock starts, ``sync`` flushes the dirty pages earlier runs left behind (nothing is
dropped from the page cache), so no run pays for its predecessor's writeback.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass


class CommandFailed(RuntimeError):
    pass


# Processes whose CPU time is sampled around every command (the registry): name -> pid.
WATCH: dict[str, int] = {}


def process_cpu_s(pid: int) -> float:
    """utime + stime of a running process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


QUIET_CPU = 0.2  # at most this many CPUs busy elsewhere counts as a quiet machine
QUIET_MAX_WAIT = 45.0  # seconds to wait for quiet before running anyway (the run is then flagged)


def wait_quiet(window: float = 0.5) -> tuple[float, bool]:
    """Wait (at most QUIET_MAX_WAIT) until the machine is quiet: less than QUIET_CPU CPUs busy over
    a window while we sleep. Returns (seconds waited, quiet reached)."""
    t0 = time.monotonic()
    while True:
        b0 = system_busy_s()
        time.sleep(window)
        if (system_busy_s() - b0) / window < QUIET_CPU:
            return time.monotonic() - t0, True
        if time.monotonic() - t0 > QUIET_MAX_WAIT:
            return time.monotonic() - t0, False


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all CPUs; /proc/stat, not idle/iowait)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    cmd: list[str]
    seconds: float
    max_rss_kib: int
    written_bytes: int
    cpu_s: float  # user + system, the command and its descendants
    watched_cpu_s: dict[str, float]  # CPU of the WATCH processes during the command
    other_cpu_s: float  # CPU the rest of the machine used meanwhile (other users: noise)
    load_before: float  # 1-minute load average when the command started
    quiet_wait_s: float  # how long we waited for a quiet machine first
    quiet: bool  # whether it was quiet when the command started
    returncode: int
    stdout: str
    stderr: str

    @property
    def rss_mib(self) -> float:
        return self.max_rss_kib / 1024


def run(
    cmd: list[str],
    *,
    timeout: float,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    sync: bool = True,
) -> Measured:
    """Run ``cmd`` in its own process group; kill the group after ``timeout`` seconds."""
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    rss_fd, rss_file = -1, ""
    argv = list(cmd)
    if gnu_time:
        import tempfile

        rss_fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
        argv = [gnu_time, "-f", "%M", "-o", rss_file, *cmd]
    if sync:
        os.sync()
    waited, quiet = wait_quiet() if sync else (0.0, True)
    load = os.getloadavg()[0]
    watched0 = {k: process_cpu_s(p) for k, p in WATCH.items()}
    busy0 = system_busy_s()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        start_new_session=True,
    )
    os.close(out_w)
    os.close(err_w)
    bufs: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while chunk := os.read(fd, 65536):
            bufs[fd].append(chunk)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for r in readers:
        r.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: take the command down with us
        kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
    seconds = time.monotonic() - t0
    busy = system_busy_s() - busy0
    watched = {k: round(process_cpu_s(p) - watched0[k], 3) for k, p in WATCH.items()}
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(10)
    max_rss = int(ru.ru_maxrss)
    if rss_file:
        try:
            with open(rss_file) as f:
                max_rss = int(f.read().split()[-1])
        except (OSError, ValueError, IndexError):
            pass
        os.close(rss_fd)
        os.unlink(rss_file)
    m = Measured(
        cmd=list(cmd),
        seconds=seconds,
        max_rss_kib=max_rss,
        written_bytes=int(ru.ru_oublock) * 512,
        cpu_s=ru.ru_utime + ru.ru_stime,
        watched_cpu_s=watched,
        other_cpu_s=round(max(0.0, busy - (ru.ru_utime + ru.ru_stime) - sum(watched.values())), 3),
        load_before=round(load, 2),
        quiet_wait_s=round(waited, 2),
        quiet=quiet,
        returncode=proc.returncode,
        stdout=b"".join(bufs[out_r]).decode(errors="replace"),
        stderr=b"".join(bufs[err_r]).decode(errors="replace"),
    )
    if timed_out.is_set():
        raise CommandFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{m.stderr[-2000:]}")
    if check and m.returncode != 0:
        raise CommandFailed(
            f"exit {m.returncode}: {' '.join(cmd)}\nstdout: {m.stdout[-2000:]}\nstderr: {m.stderr[-2000:]}"
        )
    return m
