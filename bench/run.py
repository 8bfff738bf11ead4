#!/usr/bin/env python3
"""imagevol against its peers on one machine, over a loopback docker-registry.

    python bench/run.py [--size-mib 2048] [--rounds 3] [--out bench/results] [--workdir /tmp]

Starts a loopback registry (tests/support/registry.py), writes a synthetic model (two random
safetensors shards and small JSON files), pushes it as an ORAS artifact (oras-py), as a tar+gzip
image (umoci + skopeo) and with `imagevol pack` (artifact; image, uncompressed), then per round, in
rotating order: cold pull+mount with imagevol vs oras-py pull vs skopeo copy + umoci raw unpack vs
the one-pass limit; warm mount; pack+push vs oras-py push. Prints medians and ratios, writes
OUT/results.json and OUT/chart.png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench.lib import proc, publish, report, scenarios  # noqa: E402
from bench.lib.model import make_model  # noqa: E402


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ checks


def _has_modules(py: str, modules: list[str]) -> bool:
    code = "import " + ", ".join(modules)
    return subprocess.run([py, "-c", code], capture_output=True, timeout=60).returncode == 0


def find_python() -> str:
    """An interpreter with imagevol, oras-py and urllib3: this one, else the repo's .venv."""
    need = ["imagevol", "oras.client", "urllib3"]
    for py in (sys.executable, str(REPO / ".venv" / "bin" / "python")):
        if os.path.exists(py) and _has_modules(py, need):
            return py
    fail(
        "no interpreter with imagevol, oras (oras==0.2.43) and urllib3: run `./dev setup` "
        "(or `pip install -e '.[test]'`), then run this with .venv/bin/python"
    )
    raise AssertionError


def find_imagevol(py: str) -> list[str]:
    script = Path(py).parent / "imagevol"
    return [str(script)] if script.exists() else [py, "-m", "imagevol"]


def check_tools() -> None:
    missing = [t for t in ("skopeo", "umoci") if shutil.which(t) is None]
    from tests.support.registry import registry_available, registry_binary

    if not registry_available():
        missing.append(f"docker-registry ({registry_binary()})")
    if missing:
        fail(
            "missing: " + ", ".join(missing) + " (Debian packages docker-registry, skopeo, umoci; `./dev setup` "
            "installs them)"
        )


def ensure_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib (pip)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "matplotlib"],
            check=True,
            timeout=600,
        )


def _version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def machine(py: str, imagevol: list[str], workdir: Path) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = line.split(":", 1)[1].strip()
    fstype = _version(["stat", "-f", "-c", "%T", str(workdir)])
    pyv = subprocess.run(
        [
            py,
            "-c",
            "import sys, oras.version as o, urllib3\n"
            "try:\n import isal; iv = isal.__version__\nexcept ImportError:\n iv = 'missing'\n"
            "print(sys.version.split()[0], o.__version__, urllib3.__version__, iv)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    from tests.support.registry import registry_binary

    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "mem_total": mem,
        "kernel": platform.release(),
        "workdir_fs": fstype,
        "python": pyv[0] if pyv else platform.python_version(),
        "tools": {
            "imagevol": _version([*imagevol, "--version"]),
            "oras-py": pyv[1] if len(pyv) > 1 else "unknown",
            "urllib3": pyv[2] if len(pyv) > 2 else "unknown",
            "isal": pyv[3] if len(pyv) > 3 else "unknown",  # imagevol's gzip inflater (zlib when missing)
            "skopeo": _version(["skopeo", "--version"]),
            "umoci": _version(["umoci", "--version"]),
            "docker-registry": _version([registry_binary(), "--version"]),
        },
        "euid": os.geteuid(),
    }


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="model size (default 2048)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians are taken over them (default 3)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where results.json, chart.png go")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch parent (default: the temp dir); needs room for about 6 x the model size",
    )
    ap.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="do not drop the page cache and re-read the inputs before each run (done by default as root)",
    )
    a = ap.parse_args()
    if a.rounds < 3:
        print("warning: fewer than 3 rounds: medians are not meaningful", file=sys.stderr)
    check_tools()
    py = find_python()
    imagevol = find_imagevol(py)
    ensure_matplotlib()
    from tests.support.registry import Registry

    work = Path(tempfile.mkdtemp(prefix="imagevol-bench-", dir=a.workdir)).resolve()
    gib = max(1.0, a.size_mib / 1024)
    timeout = 120 + 120 * gib
    # Python tools run as installed tools do: with byte-code caches (kept under the scratch dir, so
    # nothing is written into the source tree), whatever PYTHONDONTWRITEBYTECODE says here.
    drop = ("IMAGEVOL_ROOT", "REGISTRY_AUTH_FILE", "IMAGEVOL_DEBUG", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    mode = "bind" if os.geteuid() == 0 else "hardlink"
    facts = machine(py, imagevol, work)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in report.SCENARIOS}
    setup: dict[str, Any] = {}
    orders: list[list[str]] = []
    source_at_start = source_state()
    # Others edit src/ while this runs (an editable install would pick their edits up mid-run): the
    # tree is copied once and every imagevol command imports that copy (PYTHONPATH comes first).
    snap = work / "imagevol-src"
    shutil.copytree(REPO / "src" / "imagevol", snap / "imagevol", ignore=shutil.ignore_patterns("__pycache__"))
    env["PYTHONPATH"] = str(snap) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    source_at_start["snapshot_sha256"] = tree_digest(snap)
    probe = subprocess.run(
        [py, "-c", "import imagevol; print(imagevol.__file__)"], env=env, capture_output=True, text=True, timeout=60
    ).stdout.strip()
    if not probe.startswith(str(snap)):
        fail(f"imagevol is imported from {probe}, not from the snapshot {snap}")
    reg = None
    t_all = time.monotonic()
    try:
        reg = Registry.start(work / "registry")
        proc.WATCH["registry"] = reg.pid
        log(f"registry {reg.url}, scratch {work}, mode {mode}, python {py}")
        model = work / "model"
        t = time.monotonic()
        sizes = make_model(model, a.size_mib)
        setup["model_s"] = round(time.monotonic() - t, 2)
        setup["model_files"] = sizes
        total = sum(sizes.values())
        log(f"model: {len(sizes)} files, {total / (1 << 20):.0f} MiB in {setup['model_s']} s")
        ctx = scenarios.Ctx(
            py=py,
            imagevol=imagevol,
            registry_url=reg.url,
            host=reg.host,
            work=work,
            model_sizes=sizes,
            timeout=timeout,
            mode=mode,
            lib=HERE / "lib",
            env=env,
        )
        refs = {
            "oras": f"{reg.host}/bench/oras:v1",
            "pack-artifact": f"{reg.host}/bench/pack-artifact:v1",
            "pack-image": f"{reg.host}/bench/pack-image:v1",
            "targz": f"{reg.host}/bench/umoci-targz:v1",
        }
        setup["push_oras_s"] = round(
            publish.push_oras(py, HERE / "lib" / "oras_cli.py", model, refs["oras"], timeout).seconds, 2
        )
        log(f"pushed ORAS artifact ({setup['push_oras_s']} s)")
        setup["umoci_targz_s"] = publish.push_umoci_targz(model, work, refs["targz"], timeout)
        log(f"pushed umoci tar+gzip image ({setup['umoci_targz_s']})")
        for fmt in ("artifact", "image"):
            r = scenarios.imagevol_pack(ctx, model, refs[f"pack-{fmt}"], fmt)
            setup[f"pack_{fmt}_s"] = round(r.seconds, 2)
            log(f"pushed imagevol pack --format {fmt} ({r.seconds:.1f} s)")
        primed = scenarios.prime_page_cache(reg.storage_dir)
        log(f"read the registry's storage once ({primed >> 20} MiB) so round 1 finds it cached like the others")

        def cold_iv(name: str) -> Any:
            def go() -> str:
                cold, warm = scenarios.imagevol_cold_and_warm(ctx, refs[name])
                runs[f"cold/imagevol-{name}"].append(cold.to_dict())
                runs[f"warm/imagevol-{name}"].append(warm.to_dict())
                return f"cold {cold.seconds:.2f} s (rss {cold.rss_mib:.0f} MiB), warm {warm.seconds:.3f} s"

            return go

        def record(key: str, fn: Any) -> Any:
            def go() -> str:
                r = fn()
                runs[key].append(r.to_dict())
                return f"{r.seconds:.2f} s" + (f" (rss {r.rss_mib:.0f} MiB)" if r.rss_mib else "")

            return go

        cold_jobs = [
            ("imagevol mount ORAS artifact", cold_iv("oras")),
            ("oras-py pull", record("cold/oras-pull", lambda: scenarios.oras_pull(ctx, refs["oras"]))),
            ("one-pass limit", record("cold/limit", lambda: scenarios.limit(ctx, "bench/oras", "v1"))),
            ("imagevol mount pack artifact", cold_iv("pack-artifact")),
            ("imagevol mount umoci tar+gzip", cold_iv("targz")),
            (
                "skopeo copy + umoci raw unpack",
                record("cold/skopeo-umoci", lambda: scenarios.skopeo_umoci(ctx, refs["targz"])),
            ),
            ("imagevol mount pack image", cold_iv("pack-image")),
        ]
        # Loads each contender's code into the page cache after a drop (see scenarios.settle).
        warmups = [
            ([py, "-c", "import imagevol.cli, imagevol.mount, imagevol.pack, oras.client, urllib3, hashlib"], env),
            ([py, str(HERE / "lib" / "oras_cli.py"), "--help"], env),
            ([*imagevol, "--help"], env),
            (["skopeo", "--version"], None),
            (["umoci", "--version"], None),
        ]
        for rnd in range(a.rounds):
            # A fresh repository per push: every contender uploads every byte.
            def pack_job(fmt: str, r: int = rnd) -> Any:
                return lambda: scenarios.imagevol_pack(ctx, model, f"{reg.host}/bench/push-iv-{fmt}-{r}:v1", fmt)

            push_jobs = [
                ("imagevol pack artifact + push", record("push/imagevol-artifact", pack_job("artifact"))),
                (
                    "oras-py push",
                    record(
                        "push/oras-push",
                        lambda r=rnd: scenarios.oras_push(ctx, model, f"{reg.host}/bench/push-oras-{r}:v1"),
                    ),
                ),
                ("imagevol pack image + push", record("push/imagevol-image", pack_job("image"))),
            ]
            # Round-robin: rotate the order by one each round, and reverse it every other round, so
            # that no contender always runs first, or always after the same neighbour.
            order = []
            for jobs in (cold_jobs, push_jobs):
                k = rnd % len(jobs)
                turn = jobs[k:] + jobs[:k]
                order += turn[::-1] if rnd % 2 else turn
            orders.append([name for name, _ in order])
            for name, job in order:
                if a.settle:
                    scenarios.settle(reg.storage_dir, model, warm=warmups)
                log(f"round {rnd + 1}/{a.rounds}: {name}: {job()}")
    finally:
        if reg is not None:
            reg.stop()
        left = scenarios.force_unmount_below(work)
        if left:
            print(f"warning: unmounted leftovers {left}", file=sys.stderr)
        scenarios.rmtree(work)

    med = report.medians(runs)
    ts = report.targets(med, runs, a.size_mib)
    tab = report.table(med, a.size_mib)
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "python bench/run.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size_mib": a.size_mib,
        "model_bytes": sum(setup.get("model_files", {}).values()),
        "rounds": a.rounds,
        "mount_mode": mode,
        "page_cache": (
            "dropped before every run, then the registry's blobs and the model read back in: each run starts "
            "from the same memory, its inputs cached"
            if a.settle and os.geteuid() == 0
            else "not dropped: the registry's blobs and the model are served from memory after the first read"
        ),
        "machine": facts,
        "setup": setup,
        "orders": orders,
        "source": {"at_start": source_at_start, "at_end": source_state()},
        "medians": med,
        "targets": ts,
        "runs": runs,
        "total_s": round(time.monotonic() - t_all, 1),
        "imagevol_version": importlib.metadata.version("imagevol") if _importable("imagevol") else None,
    }
    (a.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    title = f"imagevol vs peers: {a.size_mib} MiB model, loopback registry, {facts['nproc']} CPUs, median of {a.rounds}"
    report.chart(med, a.out / "chart.png", title)
    print()
    print(tab)
    print(report.noise_text(med))
    print()
    print(report.targets_text(ts))
    print(f"\nwrote {a.out / 'results.json'} and {a.out / 'chart.png'} ({doc['total_s']} s in all)")


def tree_digest(root: Path) -> str:
    """sha256 over the relative paths and contents of the files below root (sorted)."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_state() -> dict[str, Any]:
    """The commit measured, and whether src/ differed from it (others may be editing it)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "src_changes": git("status", "--porcelain", "src").split("\n")[:-1],
    }


def _importable(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
