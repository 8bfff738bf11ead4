#!/usr/bin/env python3
"""Extraction while pulling, on a link slower than the machine.

`imagevol.mount` of an image not yet in the store extracts its largest layer while it downloads
(``stream=True``, the default); ``stream=False`` pulls everything first. On loopback with 2 cores
both cost the same; on a slower link the overlap should show. This script (as root):

1. creates a network namespace and a veth pair (host side 10.213.0.1/24, namespace side
   10.213.0.2/24, names carrying this process's pid) and shapes the host side, i.e. what the
   registry sends, with ``tc qdisc replace dev H root tbf rate RATE burst 4mb latency 100ms``;
2. starts a loopback docker-registry (tests/support/registry.py), pushes a tar+gzip image built by
   umoci (one layer: two random shards of --size-mib in all plus small JSON files; bench/lib/
   publish.py), then serves the same storage with a second ``docker-registry serve`` on
   10.213.0.1:PORT (plain http), reachable from the namespace only through the shaped veth;
3. per --rate, per round, in rotating order: ``imagevol.mount(REF, TARGET, root=FRESH_STORE,
   stream=True|False)`` in a fresh Python process inside the namespace, timed whole by
   /usr/bin/time, and the bare transfer of the layer (``curl -s -o /dev/null``) the same way.
   Before each run: sync, drop the page cache, read the registry's storage back in and load the
   contenders' code (imagevol's modules, curl) into the page cache again. After each
   mount: the files' sizes are checked, the volume unmounted and the store removed.

Processes enter the namespace with ``nsenter --net=/run/netns/NS`` (what ``ip netns exec`` does
for the network) because ``ip netns exec`` also gives the command a private mount namespace: the
bind mount made by imagevol would vanish with the process and could not be checked or unmounted.

imagevol runs from a copy of src/imagevol taken at the start (others edit the tree), with
byte-code caches under the scratch directory (``PYTHONDONTWRITEBYTECODE`` unset), as installed
tools do. Everything is removed at exit: namespace, veth, registries, scratch directory.

    python bench/slow_link.py [--size-mib 2048] [--rounds 3] [--rate 2gbit ...] [--out bench/results/slow_link.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import urllib3  # noqa: E402
from bench.lib import publish  # noqa: E402
from bench.lib.model import make_model  # noqa: E402
from bench.lib.proc import process_cpu_s, wait_quiet  # noqa: E402
from bench.lib.scenarios import check_files, force_unmount_below, is_mountpoint_below, rmtree, settle  # noqa: E402
from bench.write_patterns import OtherCPU  # noqa: E402

from tests.support.registry import Registry, registry_binary  # noqa: E402

HOST_IP = "10.213.0.1"
NS_IP = "10.213.0.2"
PREFIX = 24
SUBNET = "10.213.0.0/24"
REPO_NAME = "bench/targz"
TAG = "v1"
MIB = 1 << 20
# A run is "undisturbed" when the rest of the machine used less than this many CPUs on average
# while it ran (others' CPU seconds / wall seconds). The medians are given over all runs and over
# these alone: on a shared machine a test suite next door can double a run.
UNDISTURBED = 0.25
CONTENDERS = ("mount stream=True", "mount stream=False", "bare transfer (curl)")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

# Runs inside the namespace, in a fresh interpreter, timed whole by /usr/bin/time.
MOUNT_HELPER = r"""
import json, sys
import imagevol
from imagevol.registry.transport import RegistryOptions
ref, target, root, stream, host = sys.argv[1:6]
res = imagevol.mount(ref, target, root=root, stream=stream == "1",
                     options=RegistryOptions(insecure_hosts=frozenset({host})))
print(json.dumps({"in_process_s": res.seconds, "pull_s": res.pull.seconds, "downloaded": res.pull.downloaded,
                  "streamed": res.streamed, "mode": res.volume.mode, "imagevol": imagevol.__file__}))
"""
# Run after each page-cache drop (scenarios.settle's warm): loads the code a mount runs (imagevol's
# modules but the CSI plugin's, and what they import) into the page cache, as on a machine that runs
# it routinely; otherwise every run pays 0.2-0.4 s of disk reads at start-up.
WARM_HELPER = r"""
import importlib, pkgutil, imagevol
for m in pkgutil.walk_packages(imagevol.__path__, "imagevol."):
    if not m.name.startswith(("imagevol.csi", "imagevol.cli.csi", "imagevol.__main__")):
        try:
            importlib.import_module(m.name)
        except Exception:
            pass
"""
UNMOUNT_HELPER = "import sys, imagevol; imagevol.unmount(sys.argv[1], root=sys.argv[2])"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}: {r.stderr.strip()}")
    return r


# --------------------------------------------------------------------------- the link


class Link:
    """A namespace and a veth pair into it, the host side shaped with tbf. Names carry the pid."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.ns = f"ivbench-{pid}"
        self.host_if = f"ivb{pid}h"  # at most 15 characters: pids have at most 7 digits
        self.ns_if = f"ivb{pid}n"
        self.rate: str | None = None

    def up(self) -> None:
        routes = sh("ip", "-4", "route", "show", "to", "match", HOST_IP).stdout
        if SUBNET in routes:
            raise RuntimeError(f"{SUBNET} is already routed here ({routes.strip()}): another run still up?")
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{HOST_IP}/{PREFIX}", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{NS_IP}/{PREFIX}", "dev", self.ns_if)
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.ns_if, "up")
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")

    def shape(self, rate: str) -> None:
        sh(
            "tc",
            "qdisc",
            "replace",
            "dev",
            self.host_if,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "4mb",
            "latency",
            "100ms",
        )
        self.rate = rate

    def qdisc(self) -> str:
        return sh("tc", "qdisc", "show", "dev", self.host_if, check=False).stdout.strip()

    def enter(self) -> list[str]:
        """Prefix that runs a command in the namespace's network (and nothing else of it)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def down(self) -> None:
        # Deleting the namespace deletes its end of the pair, and with it the host end.
        sh("ip", "netns", "del", self.ns, check=False)
        if sh("ip", "link", "show", self.host_if, check=False).returncode == 0:
            sh("ip", "link", "del", self.host_if, check=False)


def free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class LinkRegistry:
    """A second docker-registry serving ``reg``'s storage on HOST_IP:PORT, plain http."""

    def __init__(self, reg: Registry) -> None:
        self.port = free_port(HOST_IP)
        self.host = f"{HOST_IP}:{self.port}"
        self.url = f"http://{self.host}"
        config = json.loads(reg.config_file.read_text())
        config["http"]["addr"] = self.host
        config["http"].pop("tls", None)
        self.config_file = reg.root / "config-link.yml"
        self.config_file.write_text(json.dumps(config, indent=2))
        self.log_file = reg.root / "registry-link.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with open(self.log_file, "ab") as log_fh:
            self.proc = subprocess.Popen(
                [registry_binary(), "serve", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        pm = urllib3.PoolManager()
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"registry on {self.host} exited: {self.log_file.read_text()[-2000:]}")
            try:
                if pm.request("GET", f"{self.url}/v2/", timeout=2.0, retries=False).status in (200, 401):
                    return
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"registry on {self.host} not ready: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --------------------------------------------------------------------------- timed commands


def timed(enter: list[str], cmd: list[str], env: dict[str, str], work: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` in the namespace (``enter``) under /usr/bin/time, so the time covers ``cmd``
    alone; returns wall, user, sys, peak RSS and the output. Kills the process group on timeout."""
    tf = work / "time.out"
    tf.unlink(missing_ok=True)
    full = [*enter, "/usr/bin/time", "-f", "%e %U %S %M", "-o", str(tf), *cmd]
    p = subprocess.Popen(
        full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... -> {p.returncode}: {err.strip()[-2000:]}")
    fields = tf.read_text().strip().splitlines()[-1].split()
    return {
        "wall_s": float(fields[0]),
        "user_s": float(fields[1]),
        "sys_s": float(fields[2]),
        "rss_mib": round(int(fields[3]) / 1024, 1),
        "stdout": out,
    }


def files_below(d: Path) -> dict[str, int]:
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, d)] = os.lstat(p).st_size
    return out


class Bench:
    def __init__(self, a: argparse.Namespace, work: Path, link: Link, env: dict[str, str], py: str) -> None:
        self.a = a
        self.work = work
        self.link = link
        self.env = env
        self.py = py
        self.timeout = 120 + 120 * max(1.0, a.size_mib / 1024)
        self.counter = 0
        self.reg: Registry | None = None
        self.lreg: LinkRegistry | None = None
        self.model_sizes: dict[str, int] = {}
        self.layer: dict[str, Any] = {}

    def reg_cpu(self, since: float) -> float:
        return (process_cpu_s(self.lreg.proc.pid) if self.lreg and self.lreg.proc else 0.0) - since

    def run_one(self, contender: str) -> dict[str, Any]:
        assert self.reg is not None and self.lreg is not None
        warm = [([self.py, "-c", WARM_HELPER], self.env), (["curl", "--version"], None)]
        if not settle(self.reg.storage_dir, warm=warm):
            raise RuntimeError("could not drop the page cache (needs root and /proc/sys/vm/drop_caches)")
        self.counter += 1
        waited, quiet = wait_quiet()
        load = os.getloadavg()
        reg_cpu0 = process_cpu_s(self.lreg.proc.pid) if self.lreg.proc else 0.0
        meter = OtherCPU({os.getpid(), self.lreg.proc.pid if self.lreg.proc else -1})
        if contender == "bare transfer (curl)":
            url = f"{self.lreg.url}/v2/{REPO_NAME}/blobs/{self.layer['digest']}"
            cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url]
            r = timed(self.link.enter(), cmd, self.env, self.work, self.timeout)
            shares = meter.stop(r["user_s"] + r["sys_s"] + self.reg_cpu(reg_cpu0))
            code, size = r.pop("stdout").split()
            if code != "200" or int(size) != self.layer["size"]:
                raise RuntimeError(f"curl: HTTP {code}, {size} bytes, wanted 200 and {self.layer['size']}")
            r["bytes"] = int(size)
        else:
            store = self.work / f"store-{self.counter}"
            target = self.work / f"target-{self.counter}"
            stream = "1" if contender == "mount stream=True" else "0"
            ref = f"{self.lreg.host}/{REPO_NAME}:{TAG}"
            cmd = [self.py, "-c", MOUNT_HELPER, ref, str(target), str(store), stream, self.lreg.host]
            try:
                r = timed(self.link.enter(), cmd, self.env, self.work, self.timeout)
                shares = meter.stop(r["user_s"] + r["sys_s"] + self.reg_cpu(reg_cpu0))
                doc = json.loads(r.pop("stdout").strip().splitlines()[-1])
                r.update(doc)
                check_files(target, self.model_sizes)
                found = files_below(target)
                if found != self.model_sizes:
                    raise RuntimeError(f"{target}: files {found}, expected {self.model_sizes}")
                if stream == "1" and not doc["streamed"]:
                    raise RuntimeError("stream=True did not extract while downloading (streamed is empty)")
                if stream == "0" and doc["streamed"]:
                    raise RuntimeError("stream=False streamed a layer")
                r["files_checked"] = len(found)
            finally:
                if target.exists() or is_mountpoint_below(target):
                    subprocess.run(
                        [self.py, "-c", UNMOUNT_HELPER, str(target), str(store)],
                        env=self.env,
                        capture_output=True,
                        timeout=120,
                    )
                force_unmount_below(target)
                force_unmount_below(store)
                rmtree(target)
                rmtree(store)
        r["registry_cpu_s"] = round(self.reg_cpu(reg_cpu0), 3)
        # Sampled right after the command: other users' processes, and the rest (softirq of the
        # shaped link, writeback of what the mount wrote, ...).
        r.update(shares)
        r["quiet_wait_s"] = round(waited, 1)
        r["quiet"] = quiet
        r["load_before"] = [round(x, 2) for x in load]
        r["contender"] = contender
        return r


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict[str, Any]], layer_mib: float) -> dict[str, dict[str, Any]]:
    med: dict[str, dict[str, Any]] = {}
    for c in CONTENDERS:
        rs = [r for r in runs if r["contender"] == c]
        if not rs:
            continue
        walls = [r["wall_s"] for r in rs]
        calm = [r["wall_s"] for r in rs if r["other_cpu_s"] < UNDISTURBED * r["wall_s"]]
        m: dict[str, Any] = {
            "n": len(rs),
            "wall_s": round(statistics.median(walls), 2),
            "wall_min_s": min(walls),
            "wall_max_s": max(walls),
            "layer_mib_per_s": round(layer_mib / statistics.median(walls)),
            "user_s": round(statistics.median(r["user_s"] for r in rs), 2),
            "sys_s": round(statistics.median(r["sys_s"] for r in rs), 2),
            "rss_mib": round(statistics.median(r["rss_mib"] for r in rs), 1),
            "registry_cpu_s": round(statistics.median(r["registry_cpu_s"] for r in rs), 2),
            "other_cpu_s": round(statistics.median(r["other_cpu_s"] for r in rs), 2),
            "kernel_etc_s": round(statistics.median(r["kernel_etc_s"] for r in rs), 2),
            "not_quiet": sum(not r["quiet"] for r in rs),
            "undisturbed_n": len(calm),
            "undisturbed_wall_s": round(statistics.median(calm), 3) if calm else None,
            "undisturbed_wall_min_s": min(calm) if calm else None,
            "undisturbed_wall_max_s": max(calm) if calm else None,
            "load1_before": round(statistics.median(r["load_before"][0] for r in rs), 2),
            "load1_before_min": min(r["load_before"][0] for r in rs),
            "load1_before_max": max(r["load_before"][0] for r in rs),
        }
        if "in_process_s" in rs[0]:
            m["in_process_s"] = round(statistics.median(r["in_process_s"] for r in rs), 2)
            m["pull_s"] = round(statistics.median(r["pull_s"] for r in rs), 2)
        med[c] = m
    return med


def undisturbed(m: dict[str, Any]) -> str:
    if not m["undisturbed_n"]:
        return f"none of {m['n']}"
    return (
        f"{m['undisturbed_n']} of {m['n']}: {m['undisturbed_wall_s']:.2f} s "
        f"({m['undisturbed_wall_min_s']:.2f}-{m['undisturbed_wall_max_s']:.2f})"
    )


def table(rate: str, med: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"rate {rate}:",
        "| contender | median wall | min-max | layer MiB/s | undisturbed runs: median wall (min-max) | user | sys "
        "| peak RSS | registry CPU | others' CPU | load1 before (median, min-max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c, m in med.items():
        lines.append(
            f"| {c} | {m['wall_s']:.2f} s | {m['wall_min_s']:.2f}-{m['wall_max_s']:.2f} s | {m['layer_mib_per_s']} "
            f"| {undisturbed(m)} | {m['user_s']:.2f} s | {m['sys_s']:.2f} s | {m['rss_mib']:.0f} MiB "
            f"| {m['registry_cpu_s']:.2f} s | {m['other_cpu_s']:.2f} s "
            f"| {m['load1_before']:.2f} ({m['load1_before_min']:.2f}-{m['load1_before_max']:.2f}) |"
        )
    return "\n".join(lines)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return sh("git", "-C", str(REPO), *args, check=False).stdout

    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "src_changes": git("status", "--porcelain", "src").split("\n")[:-1],
    }


def machine(work: Path, py: str) -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "filesystem": sh("findmnt", "-n", "-o", "FSTYPE", "--target", str(work), check=False).stdout.strip(),
        "python": sh(py, "-c", "import platform; print(platform.python_version())", check=False).stdout.strip(),
        "registry": sh(registry_binary(), "--version", check=False).stdout.strip(),
        "curl": sh("curl", "--version", check=False).stdout.split("\n")[0],
        "umoci": sh("umoci", "--version", check=False).stdout.strip(),
    }


def get_manifest(url: str, ref: str) -> tuple[dict[str, Any], str]:
    r = urllib3.PoolManager().request(
        "GET", f"{url}/v2/{REPO_NAME}/manifests/{ref}", headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"}
    )
    if r.status != 200:
        raise RuntimeError(f"manifest {ref}: HTTP {r.status}")
    return json.loads(r.data), r.headers.get("Docker-Content-Digest", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="model size: two shards plus small files (2048)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per rate (3)")
    ap.add_argument("--rate", action="append", help="tbf rate of the link, repeatable (default 2gbit)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slow_link.json")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="interpreter with urllib3")
    a = ap.parse_args()
    rates: list[str] = a.rate or ["2gbit"]
    if os.geteuid() != 0:
        sys.exit("slow_link.py needs root: network namespaces, tc, bind mounts, dropping the page cache")
    for tool in ("ip", "tc", "nsenter", "curl", "umoci", "skopeo", "/usr/bin/time", registry_binary()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found")
    # SIGTERM/SIGHUP unwind through the finally below like Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    t_all = time.monotonic()
    log("copying src/imagevol")
    work = Path(tempfile.mkdtemp(prefix="imagevol-slow-link-")).resolve()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("IMAGEVOL_ROOT", "REGISTRY_AUTH_FILE", "IMAGEVOL_DEBUG", "PYTHONDONTWRITEBYTECODE")
    }
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    snap = work / "imagevol-src"
    shutil.copytree(REPO / "src" / "imagevol", snap / "imagevol", ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = str(snap) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    source = {"at_start": source_state(), "snapshot_sha256": tree_digest(snap)}
    link = Link()
    b = Bench(a, work, link, env, a.python)
    per_rate: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    try:
        probe = subprocess.run(
            [a.python, "-c", "import imagevol; print(imagevol.__file__)"], env=env, capture_output=True, text=True
        ).stdout.strip()
        if not probe.startswith(str(snap)):
            raise RuntimeError(f"imagevol is imported from {probe!r}, not from the copy {snap}")
        log(f"imagevol from {probe}")
        link.up()
        link.shape(rates[0])
        b.reg = Registry.start(work / "registry")
        log(f"namespace {link.ns} up, registry {b.reg.url}; writing the model ({a.size_mib} MiB)")
        model = work / "model"
        t = time.monotonic()
        b.model_sizes = make_model(model, a.size_mib)
        setup["model_s"] = round(time.monotonic() - t, 1)
        setup["umoci_targz_s"] = publish.push_umoci_targz(model, work, f"{b.reg.host}/{REPO_NAME}:{TAG}", b.timeout)
        rmtree(model)
        manifest, mdigest = get_manifest(b.reg.url, TAG)
        big = max(manifest["layers"], key=lambda d: d["size"])
        b.layer = {"digest": big["digest"], "size": big["size"], "mediaType": big["mediaType"]}
        setup["manifest_digest"] = mdigest
        setup["layers"] = len(manifest["layers"])
        log(f"pushed {REPO_NAME}:{TAG} ({len(manifest['layers'])} layer, {big['size'] / MIB:.0f} MiB gzip) {setup}")
        b.reg.stop()  # the push is done: only the registry behind the link serves from here on
        b.lreg = LinkRegistry(b.reg)
        b.lreg.start()
        log(f"registry on {b.lreg.url} (namespace {link.ns}, veth {link.host_if}/{link.ns_if})")
        layer_mib = big["size"] / MIB
        for rate in rates:
            link.shape(rate)
            qdisc = link.qdisc()
            log(f"rate {rate}: {qdisc}")
            runs: list[dict[str, Any]] = []
            orders: list[list[str]] = []
            for rnd in range(a.rounds):
                k = rnd % len(CONTENDERS)
                order = list(CONTENDERS[k:] + CONTENDERS[:k])
                orders.append(order)
                for c in order:
                    r = b.run_one(c)
                    r["round"] = rnd + 1
                    runs.append(r)
                    log(
                        f"{rate} round {rnd + 1}/{a.rounds} {c:22} {r['wall_s']:.2f} s user {r['user_s']:.2f} "
                        f"sys {r['sys_s']:.2f} rss {r['rss_mib']:.0f} MiB others {r['other_cpu_s']:.2f} "
                        f"kernel {r['kernel_etc_s']:.2f} "
                        f"load {r['load_before'][0]:.2f}"
                        + ("" if r["quiet"] else " (not quiet)")
                        + (f" in-process {r['in_process_s']:.2f} s pull {r['pull_s']:.2f} s" if "pull_s" in r else "")
                    )
            per_rate[rate] = {"qdisc": qdisc, "orders": orders, "medians": summarize(runs, layer_mib), "runs": runs}
    finally:
        if b.lreg is not None:
            b.lreg.stop()
        if b.reg is not None:
            b.reg.stop()
        link.down()
        force_unmount_below(work)
        rmtree(work)
    source["at_end"] = source_state()
    doc = {
        "command": "python bench/slow_link.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size_mib": a.size_mib,
        "model_files": b.model_sizes,
        "layer": b.layer,
        "rounds": a.rounds,
        "rates": rates,
        "what": (
            "registry on the host, client in a network namespace behind a veth whose host side is shaped "
            "with tbf (burst 4mb, latency 100ms); each run a whole process timed by /usr/bin/time (wall, "
            "user, sys, peak RSS); page cache dropped, the registry's storage read back in and the contenders' "
            "code loaded again (imagevol's modules, curl) before every run, then up to 45 s of waiting for "
            "less than 0.2 CPU busy elsewhere (bench/lib/proc.py wait_quiet; "
            "quiet=false when the run had to start anyway); other_cpu_s: other users' processes during the run "
            "(undisturbed runs: less than 0.25 CPU on average); kernel_etc_s: the rest of the machine's busy time "
            "(softirq of the shaped link, writeback, steal); every mount a fresh store, bind mount as root, "
            "files' sizes checked, then unmounted"
        ),
        "machine": machine(Path(tempfile.gettempdir()), a.python),
        "source": source,
        "setup": setup,
        "per_rate": per_rate,
        "total_s": round(time.monotonic() - t_all, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\n{a.size_mib} MiB tar+gzip image (one {layer_mib:.0f} MiB layer), median of {a.rounds} rounds\n")
    for rate in rates:
        print(table(rate, per_rate[rate]["medians"]))
        print()
    print(f"wrote {a.out} ({doc['total_s']} s in all)")


if __name__ == "__main__":
    main()
