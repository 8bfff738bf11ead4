"""Put the synthetic model into the loopback registry the three ways the benchmark compares."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import proc


def push_oras(py: str, oras_cli: Path, model: Path, target: str, timeout: float) -> proc.Measured:
    """An ORAS artifact pushed by oras-py: one layer per file, titled with its base name."""
    files = sorted(str(p) for p in model.iterdir() if p.is_file())
    return proc.run([py, str(oras_cli), "push", target, *files], timeout=timeout)


def push_umoci_targz(model: Path, work: Path, target: str, timeout: float) -> dict[str, float]:
    """A tar+gzip image built by umoci (model files at the root of the rootfs), copied to the
    registry with skopeo (blobs as they are: still one gzip layer)."""
    layout = work / "umoci-layout"
    bundle = work / "umoci-bundle"
    times: dict[str, float] = {}
    try:
        times["init"] = proc.run(["umoci", "init", "--layout", str(layout)], timeout=timeout).seconds
        times["new"] = proc.run(["umoci", "new", "--image", f"{layout}:v1"], timeout=timeout).seconds
        times["unpack"] = proc.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], timeout=timeout).seconds
        rootfs = bundle / "rootfs"
        for p in sorted(model.iterdir()):
            shutil.copyfile(p, rootfs / p.name)
            (rootfs / p.name).chmod(0o644)
        times["repack"] = proc.run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)], timeout=timeout).seconds
        times["skopeo-copy"] = proc.run(
            ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{target}"],
            timeout=timeout,
        ).seconds
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(layout, ignore_errors=True)
    return times
