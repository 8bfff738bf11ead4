"""`imagevol pack` end to end: each format packed and pushed to a real registry, then read back
by tools no one here wrote: skopeo (the index, copies), umoci (unpack of the image), oras-py (the
artifact), and by `imagevol mount` (the round trip). Also: blobs already present are skipped,
chunked uploads, cross-repository mounts, token auth, OCI layouts read by skopeo and umoci."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagevol.pack import DEFAULT_PLATFORMS, TREE_TITLE, pack
from imagevol.registry.credentials import Credential
from imagevol.registry.transport import RegistryOptions
from tests.support.need import need_tool
from tests.support.trees import compare, scan

pytestmark = pytest.mark.e2e

MiB = 1 << 20
TIMEOUT = 180
CLI = [sys.executable, "-m", "imagevol"]


def imagevol(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check and r.returncode != 0:
        raise AssertionError(f"imagevol {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def make_model(root: Path, *, shard: int = 3 * MiB) -> Path:
    """A model directory with weights, configs, docs, code, an empty directory, a private
    directory, an executable, symlinks and hard links."""
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"hidden_size": 16}')
    (root / "README.md").write_text("# tiny model\n")
    (root / "model-00001-of-00002.safetensors").write_bytes(os.urandom(shard))
    (root / "model-00002-of-00002.safetensors").write_bytes(os.urandom(shard // 2 + 7))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text('{"v": 1}')
    (root / "tokenizer" / "merges.txt").write_text("a b\n")
    os.link(root / "tokenizer" / "merges.txt", root / "tokenizer" / "merges-link.txt")
    (root / "empty").mkdir()
    (root / "private").mkdir()
    (root / "private" / "key").write_text("k")
    (root / "private" / "key").chmod(0o600)
    (root / "private").chmod(0o700)
    (root / "serve.sh").write_text("#!/bin/sh\nexec true\n")
    (root / "serve.sh").chmod(0o755)
    (root / "current").symlink_to("model-00001-of-00002.safetensors")
    (root / "tokenizer" / "up").symlink_to("../config.json")
    return root


def plain_files(tree: dict) -> dict[str, str]:
    """{path: sha256} of the regular files of a scan."""
    return {p: n.sha256 for p, n in tree.items() if n.kind == "file"}


def tree_diffs(got: Path, want: Path, *, hardlinks: bool = True, drop: tuple[str, ...] = ()) -> list[str]:
    g, w = scan(got), scan(want)
    for p in drop:
        g.pop(p, None)
    diffs = compare(g, w, ignore_write_bits=False, mtimes=(), skip_root_mode=True)
    if not hardlinks:
        diffs = [d for d in diffs if not d.startswith("hard-link groups")]
    return diffs


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("pack") / "model")


def skopeo_raw(registry, ref: str) -> dict:
    return json.loads(run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{ref}").stdout)


# ----------------------------------------------------------------------------------------- image


def test_image_index_has_every_platform_with_the_same_layers(registry, model: Path, unique_repo: str) -> None:
    need_tool("skopeo")
    ref = f"{registry.host}/{unique_repo}:v1"
    r = imagevol("pack", str(model), ref, "--large-file-size", "1", "--progress", "none")
    lines = r.stdout.splitlines()
    digest = lines[0]
    assert digest.startswith("sha256:")
    # the explain table: every runtime mounts the image on the three default nodes
    table = r.stdout
    for node in ("linux/amd64", "linux/arm64", "linux/arm/v7"):
        assert f"node {node}" in table
    rows = [x for x in lines if x.strip().startswith(("imagevol ", "crio ", "containerd "))]
    assert len(rows) == 9 and all(" mounts " in x for x in rows), table

    index = skopeo_raw(registry, f"{unique_repo}:v1")
    assert (
        "sha256:"
        + hashlib.sha256(
            run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout.encode()
        ).hexdigest()
        == digest
    )
    plats = []
    for m in index["manifests"]:
        p = m["platform"]
        plats.append("/".join(x for x in (p["os"], p["architecture"], p.get("variant", "")) if x))
    assert plats == list(DEFAULT_PLATFORMS)
    layer_lists = set()
    configs = set()
    for m in index["manifests"]:
        child = skopeo_raw(registry, f"{unique_repo}@{m['digest']}")
        layer_lists.add(tuple(x["digest"] for x in child["layers"]))
        configs.add(child["config"]["digest"])
    assert len(layer_lists) == 1, "every platform must share the same layer blobs"
    assert len(next(iter(layer_lists))) == 3  # small files + one layer per shard
    assert len(configs) == len(DEFAULT_PLATFORMS)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_image_copied_by_skopeo_and_unpacked_by_umoci_equals_the_source(
    registry, model: Path, unique_repo: str, tmp_path: Path, compression: str
) -> None:
    need_tool("skopeo")
    need_tool("umoci")
    ref = f"{registry.host}/{unique_repo}:t"
    res = pack(model, ref, platforms=["linux/amd64", "linux/arm64"], compression=compression, large_file_size=1 * MiB)
    assert res.blobs_pushed == 5  # small-files layer, two shard layers, two configs
    layout = tmp_path / "layout"
    run("skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:t")
    out = tmp_path / "bundle"
    args = ["umoci", "raw", "unpack"] + (["--rootless"] if os.geteuid() != 0 else [])
    run(*args, "--image", f"{layout}:t", str(out))
    assert tree_diffs(out, model) == []


def test_agnostic_image_explained(registry, model: Path, unique_repo: str) -> None:
    ref = f"{registry.host}/{unique_repo}:any"
    r = imagevol("pack", str(model), ref, "--agnostic", "--progress", "none", "--json")
    doc = json.loads(r.stdout)
    assert len(doc["manifests"]) == 1 and doc["manifests"][0]["platform"] is None
    verdict = {(tuple(n["node"]), o["runtime"]): o["mounts"] for n in doc["explain"]["nodes"] for o in n["outcomes"]}
    for node in (("linux/amd64",), ("linux/arm64",), ("linux/arm/v7",)):
        assert verdict[(node, "imagevol")] and verdict[(node, "crio")]
    # containerd matches a platform-less entry through its config (linux/amd64)
    assert verdict[(("linux/amd64",), "containerd")]
    assert not verdict[(("linux/arm64",), "containerd")]
    assert not verdict[(("linux/arm/v7",), "containerd")]


# ----------------------------------------------------------------------------------------- artifacts


def test_artifact_pulled_by_oras_gives_the_files(registry, model: Path, unique_repo: str, tmp_path: Path) -> None:
    import oras.client as oras_client

    ref = f"{registry.host}/{unique_repo}:art"
    res = pack(model, ref, format="artifact", artifact_type="application/vnd.example.model.v1")
    assert res.media_type == "application/vnd.oci.image.manifest.v1+json"
    out = tmp_path / "oras-out"
    client = oras_client.OrasClient(hostname=registry.host, insecure=True)
    client.pull(target=ref, outdir=str(out))
    got = plain_files(scan(out))
    want = plain_files(scan(model))
    # every file raw layers can carry (0644 files; hard links as two copies) is there, bit for bit
    for path in (
        "config.json",
        "README.md",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/merges.txt",
        "tokenizer/merges-link.txt",
    ):
        assert got[path] == want[path], path
    # what raw layers cannot say travels in the tree layer, which ORAS leaves as a tar file
    assert TREE_TITLE in got and "serve.sh" not in got


def test_modelpack_pushed_and_inspected(registry, model: Path, unique_repo: str) -> None:
    ref = f"{registry.host}/{unique_repo}:mp"
    imagevol("pack", str(model), ref, "--format", "modelpack", "--progress", "none", "--no-explain")
    tree = json.loads(imagevol("inspect", ref, "--json").stdout)["tree"]
    assert tree["flavour"] == "modelpack"
    assert tree["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    types = {x["title"]: x["mediaType"] for x in tree["layers"]}
    assert types["model-00001-of-00002.safetensors"] == "application/vnd.cncf.model.weight.v1.raw"
    assert types["README.md"] == "application/vnd.cncf.model.doc.v1.raw"
    assert types["serve.sh"] == "application/vnd.cncf.model.code.v1.raw"
    assert types["tokenizer/tokenizer.json"] == "application/vnd.cncf.model.weight.config.v1.raw"
    config = json.loads(run("skopeo", "inspect", "--config", "--raw", "--tls-verify=false", f"docker://{ref}").stdout)
    assert config["modelfs"]["diffIds"] == [x["digest"] for x in tree["layers"]]


def test_artifact_index_over_platforms(registry, model: Path, unique_repo: str) -> None:
    ref = f"{registry.host}/{unique_repo}:multi"
    pack(model, ref, format="modelpack", platforms="linux/amd64,linux/arm64,linux/arm/v7")
    index = skopeo_raw(registry, f"{unique_repo}:multi")
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64", "arm"]
    assert len({m["digest"] for m in index["manifests"]}) == 1


# ----------------------------------------------------------------------------------------- push mechanics


def test_second_push_skips_and_large_blobs_go_in_chunks(registry, model: Path, unique_repo: str) -> None:
    ref = f"{registry.host}/{unique_repo}:c"
    log_before = registry.log_file.stat().st_size
    r = imagevol(
        "pack",
        str(model),
        ref,
        "--format",
        "artifact",
        "--chunk-size",
        "1",
        "--json",
        "--progress",
        "none",
        "--no-explain",
    )
    first = json.loads(r.stdout)
    # 3 MiB and 1.5 MiB shards in 1 MiB PATCH requests; the small files in one PUT each
    assert first["blobsPushed"] == len({x["digest"] for x in first["layers"]}) + 1  # + the empty config
    with open(registry.log_file, "rb") as f:
        f.seek(log_before)
        log = f.read().decode(errors="replace")
    patches = [x for x in log.splitlines() if f"PATCH /v2/{unique_repo}/blobs/uploads/" in x]
    assert len(patches) >= 5, log[-2000:]
    second = json.loads(
        imagevol(
            "pack",
            str(model),
            ref,
            "--format",
            "artifact",
            "--chunk-size",
            "1",
            "--json",
            "--progress",
            "none",
            "--no-explain",
        ).stdout
    )
    assert second["digest"] == first["digest"]
    assert second["blobsPushed"] == 0 and second["bytesPushed"] == 0
    assert second["blobsSkipped"] == first["blobsPushed"]


def test_chunk_counts_through_the_api(registry, tmp_path: Path, unique_repo: str) -> None:
    d = tmp_path / "one"
    d.mkdir()
    (d / "blob.bin").write_bytes(os.urandom(3 * MiB + 5))
    res = pack(d, f"{registry.host}/{unique_repo}:x", format="artifact", chunk_size=1 * MiB)
    assert res.chunks == 4 and res.blobs_pushed == 2
    got = skopeo_raw(registry, f"{unique_repo}:x")
    assert got["layers"][0]["size"] == 3 * MiB + 5


def _log_since(registry, offset: int) -> str:
    with open(registry.log_file, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_large_blobs_are_hashed_while_they_upload(
    registry, tmp_path: Path, unique_repo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob from ``stream_min_size`` on is read once: hashed while its PATCH requests go out, its
    digest given with the final PUT (no HEAD before: its digest was not known). The digest cache then
    lets a second push skip it without reading it; without the cache it is sent again."""
    from imagevol.reference import parse_reference
    from imagevol.sinks import digestcache
    from imagevol.sinks.registry import RegistrySink

    monkeypatch.setattr(digestcache, "RACY_NS", 0)  # the files are written just now
    d = tmp_path / "m"
    d.mkdir()
    big = os.urandom(3 * MiB + 5)
    (d / "weights.bin").write_bytes(big)
    (d / "config.json").write_text('{"a": 1}')
    ref = f"{registry.host}/{unique_repo}:s"
    cache = tmp_path / "digests.json"

    def push(cache_file: Path | None, to: str = ref) -> tuple:
        sink = RegistrySink(parse_reference(to), chunk_size=1 * MiB, stream_min_size=2 * MiB)
        events: list = []
        before = registry.log_file.stat().st_size
        res = pack(
            d,
            to,
            format="artifact",
            sink=sink,
            digest_cache=cache_file if cache_file is not None else tmp_path / "none" / "x.json",
            progress=events.append,
        )
        return res, events, _log_since(registry, before)

    first, events, log = push(cache)
    weights = "sha256:" + hashlib.sha256(big).hexdigest()
    assert {x.title: str(x.digest) for x in first.layers}["weights.bin"] == weights
    assert first.chunks == 4 and first.blobs_pushed == 3 and first.bytes_pushed == len(big) + 8 + 2
    assert f"HEAD /v2/{unique_repo}/blobs/{weights}" not in log  # nothing to ask before: hashed on the way
    assert f"PUT /v2/{unique_repo}/blobs/uploads/" in log
    # progress: the streamed blob is named by its file until its digest is known
    mine = [e for e in events if e.digest == "upload:weights.bin"]
    assert mine[0].kind == "blob-start" and mine[-1].kind == "blob-done"
    assert sum(e.n for e in mine if e.kind == "bytes") == len(big)
    assert mine[-1].message == f"pushed {weights}"
    # what the registry holds is the file, bit for bit
    manifest = skopeo_raw(registry, f"{unique_repo}:s")
    assert [x["digest"] for x in manifest["layers"]] == [str(x.digest) for x in first.layers]

    second, _, log = push(cache)
    assert second.digest == first.digest
    assert second.blobs_pushed == 0 and second.bytes_pushed == 0 and second.blobs_skipped == 3
    assert f"HEAD /v2/{unique_repo}/blobs/{weights}" in log and f"PATCH /v2/{unique_repo}/" not in log

    third, _, _ = push(None)  # no cache: the large blob goes again, the small ones are asked for first
    assert third.digest == first.digest
    assert third.blobs_pushed == 1 and third.blobs_skipped == 2 and third.bytes_pushed == len(big)

    # a repository without the blob: the cached digest is asked for, then the blob is read and sent
    fourth, _, log = push(cache, f"{registry.host}/{unique_repo}-other:s")
    assert fourth.digest == first.digest and fourth.blobs_pushed == 3 and fourth.blobs_skipped == 0
    assert f"HEAD /v2/{unique_repo}-other/blobs/{weights}" in log and f"PATCH /v2/{unique_repo}-other/" in log


def test_image_layers_stream_from_the_files(registry, tmp_path: Path, unique_repo: str) -> None:
    """An uncompressed image layer is sent from the file it holds (tar header, the file, padding),
    hashed on the way; umoci unpacks what skopeo copies of it."""
    need_tool("skopeo")
    need_tool("umoci")
    from imagevol.reference import parse_reference
    from imagevol.sinks.registry import RegistrySink

    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "big.bin").write_bytes(os.urandom(3 * MiB + 123))
    (d / "small.txt").write_text("small")
    ref = f"{registry.host}/{unique_repo}:img"
    work = tmp_path / "work"
    work.mkdir()
    sink = RegistrySink(parse_reference(ref), chunk_size=1 * MiB, stream_min_size=1 * MiB)
    res = pack(
        d, ref, platforms=["linux/amd64"], large_file_size=1 * MiB, sink=sink, workdir=work, digest_cache=tmp_path / "c"
    )
    assert res.chunks >= 4 and res.blobs_pushed == 3
    assert list(work.iterdir()) == []  # the scratch directory is gone
    layout = tmp_path / "layout"
    run("skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:t")
    out = tmp_path / "bundle"
    run("umoci", "raw", "unpack", *(["--rootless"] if os.geteuid() != 0 else []), "--image", f"{layout}:t", str(out))
    assert tree_diffs(out, d) == []


def test_cross_repository_mount(registry, model: Path, unique_repo: str) -> None:
    base = f"{unique_repo}-base"
    first = pack(
        model, f"{registry.host}/{base}:v1", format="image", platforms=["linux/amd64"], large_file_size=1 * MiB
    )
    second = pack(
        model,
        f"{registry.host}/{unique_repo}:v1",
        format="image",
        platforms=["linux/amd64"],
        large_file_size=1 * MiB,
        mount_from=[f"{registry.host}/{base}"],
    )
    assert second.digest == first.digest
    assert second.blobs_mounted == first.blobs_pushed and second.blobs_pushed == 0
    assert second.bytes_pushed == 0


def test_push_with_token_auth(token_registry, model: Path, unique_repo: str) -> None:
    user, password = next(iter(token_registry.users.items()))
    options = RegistryOptions(credentials=lambda host, repo: Credential(user, password))
    ref = f"{token_registry.host}/{unique_repo}:tok"
    res = pack(
        model,
        ref,
        format="image",
        platforms=["linux/arm64"],
        options=options,
        chunk_size=1 * MiB,
        large_file_size=1 * MiB,
    )
    assert res.blobs_pushed == 4 and res.chunks > 0
    again = pack(model, ref, format="image", platforms=["linux/arm64"], options=options, large_file_size=1 * MiB)
    assert again.blobs_skipped == 4 and again.digest == res.digest
    other = pack(
        model,
        f"{token_registry.host}/{unique_repo}-copy:tok",
        format="image",
        platforms=["linux/arm64"],
        options=options,
        large_file_size=1 * MiB,
        mount_from=[unique_repo],
    )
    assert other.blobs_mounted == 4


# ----------------------------------------------------------------------------------------- layouts


def test_layout_sink_read_by_skopeo_and_umoci(model: Path, tmp_path: Path) -> None:
    need_tool("skopeo")
    need_tool("umoci")
    layout = tmp_path / "new" / "layout"
    r = imagevol("pack", str(model), f"oci:{layout}:v1", "--platform", "linux/amd64,linux/arm64", "--progress", "none")
    digest = r.stdout.splitlines()[0]
    info = json.loads(run("skopeo", "inspect", f"oci:{layout}:v1").stdout)
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    raw = run("skopeo", "inspect", "--raw", f"oci:{layout}:v1").stdout
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == digest
    # umoci 0.4 has no platform choice: an index of two manifests is "ambiguous" to it; give it one
    pack(model, f"oci:{layout}:one", platforms=["linux/amd64"], large_file_size=1 * MiB)
    out = tmp_path / "bundle"
    run("umoci", "raw", "unpack", *(["--rootless"] if os.geteuid() != 0 else []), "--image", f"{layout}:one", str(out))
    assert tree_diffs(out, model) == []
    # another tag in the same layout, then the first tag replaced
    pack(model, f"oci:{layout}:art", format="artifact")
    pack(model, f"oci:{layout}:v1", platforms=["linux/arm64"])
    tags = {
        e["annotations"]["org.opencontainers.image.ref.name"]
        for e in json.loads((layout / "index.json").read_text())["manifests"]
    }
    assert tags == {"v1", "one", "art"}
    info = json.loads(run("skopeo", "inspect", "--override-arch", "arm64", f"oci:{layout}:v1").stdout)
    assert info["Architecture"] == "arm64"


# ----------------------------------------------------------------------------------------- mount round trip


@pytest.mark.parametrize(
    ("fmt", "compression"), [("image", "none"), ("image", "zstd"), ("artifact", "gzip"), ("modelpack", "none")]
)
def test_pack_push_mount_round_trip(
    registry, model: Path, unique_repo: str, tmp_path: Path, fmt: str, compression: str
) -> None:
    ref = f"{registry.host}/{unique_repo}:rt"
    imagevol(
        "pack",
        str(model),
        ref,
        "--format",
        fmt,
        "--compression",
        compression,
        "--large-file-size",
        "1",
        "--progress",
        "none",
        "--no-explain",
    )
    target = tmp_path / "vol"
    root = tmp_path / "store"
    r = imagevol("--root", str(root), "mount", ref, str(target), "--mode", "copy", "--progress", "none", "--json")
    snapshot = Path(json.loads(r.stdout)["snapshot"])
    try:
        want = scan(model)
        for where, hardlinks in ((target, fmt == "image"), (snapshot, fmt == "image")):
            got = scan(where)
            # the artifact tree layer is extracted at the root: no trace of its title remains
            assert TREE_TITLE not in got
            # a volume is read-only: modes compare without write bits. Hard links: a copy-mode volume
            # keeps an image's hard links as its snapshot does; artifacts link their files to the blobs.
            diffs = compare(got, want, ignore_write_bits=True, mtimes=(), skip_root_mode=True)
            if not hardlinks:
                diffs = [d for d in diffs if not d.startswith("hard-link groups")]
            assert diffs == [], f"{where}: {r.stderr}"
    finally:
        imagevol("--root", str(root), "unmount", str(target), check=False)
