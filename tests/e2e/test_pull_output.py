"""`imagevol pull --output oci:DIR:TAG` writes a layout that skopeo and umoci (the oracles) read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.fixtures import build_core_layout, push_layout_tag
from tests.support.oci import Client

pytestmark = pytest.mark.e2e


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("node", "weights"), [("linux/arm/v7", b"armv7 weights"), ("linux/s390x", b"s390x weights")])
def test_output_layout_read_by_skopeo_and_umoci(registry, tmp_path, node, weights) -> None:
    layout = tmp_path / "src"
    build_core_layout(layout)
    push_layout_tag(Client(registry), layout, "four-platform", "out/fixtures")
    out = tmp_path / "out"
    r = run(
        sys.executable,
        "-m",
        "imagevol",
        "--root",
        str(tmp_path / "store"),
        "pull",
        f"{registry.host}/out/fixtures:four-platform",
        "--platform",
        node,
        "--output",
        f"oci:{out}:t",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    digest = json.loads(r.stdout)["digest"]
    sk = run("skopeo", "inspect", f"oci:{out}:t")
    assert sk.returncode == 0, sk.stderr
    info = json.loads(sk.stdout)
    assert info["Digest"] == digest
    assert f"{info['Os']}/{info['Architecture']}" in node
    unpacked = tmp_path / "unpacked"
    um = run("umoci", "raw", "unpack", "--image", f"{out}:t", str(unpacked))
    assert um.returncode == 0, um.stderr
    assert (unpacked / "model" / "weights.bin").read_bytes() == weights
    # Blobs are the layout's own files (reflinks or copies), never the store's inodes: writing
    # into the layout, as its owner may, leaves the store's verified blob as it was (issue item 1 c;
    # they used to be hard links, and the write changed the store).
    man = json.loads((out / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    for d in (man["config"]["digest"], *(x["digest"] for x in man["layers"])):
        exported = out / "blobs" / "sha256" / d.split(":")[1]
        stored = tmp_path / "store" / "blobs" / "sha256" / d.split(":")[1]
        a, b = os.stat(exported), os.stat(stored)
        assert (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev)
        assert exported.read_bytes() == stored.read_bytes()
        before = stored.read_bytes()
        with open(exported, "ab") as f:  # root: modes do not stop it
            f.write(b"tampered")
        assert stored.read_bytes() == before
    r = run(sys.executable, "-m", "imagevol", "--root", str(tmp_path / "store"), "fsck", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True, r.stdout + r.stderr


def test_output_must_be_a_layout(registry, tmp_path) -> None:
    layout = tmp_path / "src"
    build_core_layout(layout)
    push_layout_tag(Client(registry), layout, "arm64-only", "out/fixtures")
    r = run(
        sys.executable,
        "-m",
        "imagevol",
        "--root",
        str(tmp_path / "store"),
        "pull",
        f"{registry.host}/out/fixtures:arm64-only",
        "--platform",
        "linux/arm64",
        "--output",
        "registry.example/x:y",
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: ")
