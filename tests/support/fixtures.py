"""The "Core" fixture set: one OCI layout holding every shape the selection rules must handle,
and a pusher that copies a tagged tree from a layout to a registry byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .layout import LayoutWriter, plat

FOUR = "four-platform"
NOPLAT = "single-no-platform"
ARM64_ONLY = "arm64-only"
DOCKER_LIST = "docker-list"
NESTED = "nested"
ARTIFACT = "empty-config-artifact"
MIXED = "mixed-artifact"
ALL = (FOUR, NOPLAT, ARM64_ONLY, DOCKER_LIST, NESTED, ARTIFACT, MIXED)


def build_core_layout(path: Path) -> LayoutWriter:
    w = LayoutWriter(path)
    amd = w.image({"model/weights.bin": b"amd64 weights"}, arch="amd64")
    arm64 = w.image({"model/weights.bin": b"arm64 weights"}, arch="arm64", variant="v8")
    armv7 = w.image({"model/weights.bin": b"armv7 weights"}, arch="arm", variant="v7")
    s390x = w.image({"model/weights.bin": b"s390x weights"}, arch="s390x")
    w.tag(
        w.index(
            [
                (amd, plat("linux", "amd64")),
                (arm64, plat("linux", "arm64", "v8")),
                (armv7, plat("linux", "arm", "v7")),
                (s390x, plat("linux", "s390x")),
            ]
        ),
        FOUR,
    )
    w.tag(w.index([(amd, None)]), NOPLAT)
    w.tag(w.index([(arm64, plat("linux", "arm64", "v8"))]), ARM64_ONLY)
    d_amd = w.image({"model/weights.bin": b"amd64 weights"}, arch="amd64", docker=True)
    d_arm = w.image({"model/weights.bin": b"arm64 weights"}, arch="arm64", variant="v8", docker=True)
    w.tag(w.index([(d_amd, plat("linux", "amd64")), (d_arm, plat("linux", "arm64", "v8"))], docker=True), DOCKER_LIST)
    inner = w.index([(amd, plat("linux", "amd64")), (arm64, plat("linux", "arm64", "v8"))])
    w.tag(w.index([(inner, None)]), NESTED)
    art = w.artifact({"model.safetensors": b"artifact weights", "config.json": b"{}"})
    w.tag(art, ARTIFACT)
    w.tag(w.index([(amd, plat("linux", "amd64")), (art, None)]), MIXED)
    return w


def push_tree(client: Any, layout: Path, desc: dict[str, Any], repo: str, tag: str | None) -> str:
    """Push the blobs and manifests under `desc` (children first), then tag the root."""
    blobs = Path(layout) / "blobs" / "sha256"

    def data(d: dict[str, Any]) -> bytes:
        return (blobs / d["digest"].split(":", 1)[1]).read_bytes()

    def push(d: dict[str, Any], ref: str) -> None:
        body = data(d)
        doc = json.loads(body)
        if "manifests" in doc:
            for child in doc["manifests"]:
                push(child, child["digest"])
        else:
            client.push_blob(repo, data(doc["config"]))
            for layer in doc.get("layers", []):
                client.push_blob(repo, data(layer))
        client.push_manifest(repo, ref, body, d["mediaType"])

    push(desc, desc["digest"])
    if tag:
        client.push_manifest(repo, tag, data(desc), desc["mediaType"])
    return desc["digest"]


def push_layout_tag(client: Any, layout: Path, tag: str, repo: str) -> str:
    index = json.loads((Path(layout) / "index.json").read_text())
    for d in index["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return push_tree(client, layout, d, repo, tag)
    raise KeyError(tag)


# What each runtime does on each node, per fixture: (fixture, node, runtime, policy) -> expected.
# Expected: ("mounts", entry position or None for a direct manifest, kind) or ("fails", None, None).
def expectations() -> list[tuple[str, str, str, str, tuple[str, int | None, str | None]]]:
    M = "mounts"
    F = "fails"
    rows: list[tuple[str, str, str, str, tuple[str, int | None, str | None]]] = []

    def add(fx: str, node: str, table: dict[tuple[str, str], tuple[str, int | None, str | None]]) -> None:
        for (rt, pol), exp in table.items():
            rows.append((fx, node, rt, pol, exp))

    def same(exp: tuple[str, int | None, str | None], *, any_exp=None, crio=None, containerd=None) -> dict:
        return {
            ("imagevol", "native"): exp,
            ("imagevol", "any"): any_exp or exp,
            ("crio", "native"): crio or exp,
            ("containerd", "native"): containerd or exp,
        }

    add(FOUR, "linux/amd64", same((M, 0, "image")))
    add(FOUR, "linux/arm64", same((M, 1, "image")))
    add(FOUR, "linux/arm/v6", same((F, None, None), any_exp=(M, 0, "image")))
    add(NOPLAT, "linux/amd64", same((M, 0, "image")))
    # containerd matches a platform-less entry by its config, which says linux/amd64.
    add(NOPLAT, "linux/arm64", same((M, 0, "image"), containerd=(F, None, None)))
    add(NOPLAT, "linux/arm/v6", same((M, 0, "image"), containerd=(F, None, None)))
    add(ARM64_ONLY, "linux/amd64", same((F, None, None), any_exp=(M, 0, "image")))
    add(ARM64_ONLY, "linux/arm64", same((M, 0, "image")))
    add(ARM64_ONLY, "linux/arm/v6", same((F, None, None), any_exp=(M, 0, "image")))
    add(DOCKER_LIST, "linux/amd64", same((M, 0, "image")))
    add(DOCKER_LIST, "linux/arm64", same((M, 1, "image")))
    add(DOCKER_LIST, "linux/arm/v6", same((F, None, None), any_exp=(M, 0, "image")))
    # CRI-O 1.34 (containers/image) cannot mount an index whose chosen entry is an index.
    add(NESTED, "linux/amd64", same((M, 0, "image"), crio=(F, None, None)))
    add(NESTED, "linux/arm64", same((M, 1, "image"), crio=(F, None, None)))
    add(NESTED, "linux/arm/v6", same((F, None, None), any_exp=(M, 0, "image")))
    for node in ("linux/amd64", "linux/arm64", "linux/arm/v6"):
        add(ARTIFACT, node, same((M, None, "artifact"), containerd=(F, None, None)))
    add(MIXED, "linux/amd64", same((M, 0, "image")))
    add(MIXED, "linux/arm64", same((M, 1, "artifact"), containerd=(F, None, None)))
    add(MIXED, "linux/arm/v6", same((M, 1, "artifact"), containerd=(F, None, None)))
    return rows
