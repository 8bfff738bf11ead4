"""`imagevol mount` end to end: real registry, real read-only bind mounts (run as root).

- the Core fixture set mounted on linux/amd64, linux/arm64 and linux/arm/v6 under both policies,
  one shared store (snapshots shared);
- an image built by umoci (modes, setuid, owners, symlinks, hard links, whiteouts, an opaque
  directory) mounted from the registry and from two OCI layouts, each compared with
  `umoci raw unpack` of the same image;
- an ORAS artifact pushed by oras-py: files identical, raw files hard-linked to their blobs;
- ModelPack, KitOps and Docker-model artifacts at the paths their specs define;
- volume semantics: EROFS, exec, sub paths, unmount, stale volumes, rm, gc, a fast second mount;
- hostile layers: refused (exit 4) or contained, nothing outside the store and target touched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import fixtures as core
from tests.support.clirun import Imagevol, mount_options, mountpoints
from tests.support.models import docker_model, kitops, modelpack
from tests.support.need import need_tool
from tests.support.oci import Client
from tests.support.tars import TITLE, E, gz, push_artifact, push_image, tar_layer
from tests.support.trees import compare, file_sha256, hardlink_groups, listing, scan, whiteouts

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 120
NODES = ("linux/amd64", "linux/arm64", "linux/arm/v6")
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ORAS_UNPACK = "io.deis.oras.content.unpack"


# --------------------------------------------------------------------------- running imagevol


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Imagevol]:
    c = Imagevol(tmp_path / "store", tmp_path / "home")
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def client(registry) -> Client:
    return Client(registry)


def _repo(name: str) -> str:
    return f"mount/{name}-{os.urandom(4).hex()}"


# --------------------------------------------------------------------------- 1. Core fixtures

# model/weights.bin of the manifest at each position of each fixture's (innermost) index.
WEIGHTS = {
    core.FOUR: [b"amd64 weights", b"arm64 weights", b"armv7 weights", b"s390x weights"],
    core.NOPLAT: [b"amd64 weights"],
    core.ARM64_ONLY: [b"arm64 weights"],
    core.DOCKER_LIST: [b"amd64 weights", b"arm64 weights"],
    core.NESTED: [b"amd64 weights", b"arm64 weights"],
    core.MIXED: [b"amd64 weights", None],
}
ARTIFACT_FILES = {"model.safetensors": b"artifact weights", "config.json": b"{}"}
CORE_ROWS = sorted((fx, node, pol, exp) for fx, node, rt, pol, exp in core.expectations() if rt == "imagevol")


@pytest.fixture(scope="module")
def core_mounts(registry, client, tmp_path_factory) -> Iterator[tuple[Imagevol, str, dict]]:
    """Every Core fixture x node x policy mounted once (4 at a time) into ONE store."""
    base = tmp_path_factory.mktemp("core-mounts")
    layout = base / "layout"
    core.build_core_layout(layout)
    repo = _repo("core")
    for fx in core.ALL:
        core.push_layout_tag(client, layout, fx, repo)
    c = Imagevol(base / "store", base / "home")

    def one(row):
        fx, node, pol, _ = row
        target = base / "mnt" / f"{fx}-{node.replace('/', '-')}-{pol}"
        t0 = time.monotonic()
        r = c.mount(f"{registry.host}/{repo}:{fx}", target, "--platform", node, "--platform-policy", pol)
        return (fx, node, pol), (r, target, time.monotonic() - t0)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(pool.map(one, CORE_ROWS))
        yield c, repo, results
    finally:
        c.cleanup()


@pytest.mark.parametrize(
    ("fixture", "node", "policy", "expected"),
    CORE_ROWS,
    ids=lambda v: v.replace("/", "-") if isinstance(v, str) else "",
)
def test_core_fixture_mounts(core_mounts, fixture, node, policy, expected) -> None:
    _, _, results = core_mounts
    r, target, _ = results[(fixture, node, policy)]
    status, position, kind = expected
    if status == "fails":
        assert r.returncode == 3, f"expected exit 3, got {r.returncode}:\n{r.stdout}\n{r.stderr}"
        assert r.stderr.startswith("error: no manifest"), r.stderr
        assert node in r.stderr
        assert "hint: " in r.stderr
        if policy == "native":
            assert "--platform-policy any" in r.stderr
        assert str(target) not in mountpoints()
        assert not target.exists(), "a failed mount left its target behind"
        return
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert str(target) in mountpoints()
    assert doc["mode"] == "bind"
    if kind == "image":
        assert doc["flavour"] == "image"
        want = WEIGHTS[fixture][position]
        assert (target / "model" / "weights.bin").read_bytes() == want
        assert sorted(listing(target)) == ["model", "model/weights.bin"]
    else:
        assert doc["flavour"] == "artifact"
        got = {p: (target / p).read_bytes() for p in listing(target)}
        assert got == ARTIFACT_FILES


def test_core_snapshots_shared(core_mounts) -> None:
    """One snapshot per distinct manifest, however many (fixture, node, policy) mounts use it."""
    c, _, results = core_mounts
    digests = {json.loads(r.stdout)["digest"] for r, _, _ in results.values() if r.returncode == 0}
    names = [n for n in os.listdir(c.root / "snapshots") if not n.startswith(".")]
    snaps = {n.split("-")[0] for n in names}  # key: the manifest digest's hex, then the tree format
    assert len(names) == len(snaps) and snaps == {d.split(":")[1] for d in digests}
    # OCI amd64 + arm64 images, their Docker twins, and the artifact.
    assert len(snaps) == 5
    assert not [n for n in os.listdir(c.root / "snapshots") if n.startswith(".build-")]
    vols = c.volumes()
    assert len(vols) == sum(1 for r, _, _ in results.values() if r.returncode == 0)
    assert all(v["mounted"] for v in vols)


# --------------------------------------------------------------------------- 2. umoci image


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def _populate(rootfs: Path) -> None:
    for d in ("bin", "etc", "private", "empty", "data", "deldir/sub", "replaced", "opq", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    files = {
        "bin/hello": (b"#!/bin/sh\necho hello from umoci\n", 0o755),
        "bin/su": (b"setuid\n", 0o4755),
        "bin/sg": (b"setgid\n", 0o2711),
        "etc/conf": (b"conf\n", 0o644),
        "etc/owned": (b"owned by 1000\n", 0o640),
        "private/key": (b"secret\n", 0o600),
        "data/a": (b"shared inode\n", 0o644),
        "deleteme": (b"x\n", 0o644),
        "deldir/f": (b"y\n", 0o644),
        "deldir/sub/g": (b"z\n", 0o644),
        "replaced/old1": (b"o1\n", 0o644),
        "replaced/old2": (b"o2\n", 0o644),
        "opq/lower1": (b"l1\n", 0o644),
        "opq/sub/lower2": (b"l2\n", 0o644),
        "big.bin": (os.urandom(3 << 20), 0o444),
    }
    for name, (data, mode) in files.items():
        p = rootfs / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
    os.chown(rootfs / "etc/owned", 1000, 1001)
    os.chown(rootfs / "data", 123, 456)
    os.chmod(rootfs / "private", 0o700)
    os.chmod(rootfs / "tmp", 0o1777)
    os.symlink("../etc/conf", rootfs / "bin/rel")
    os.symlink("/etc/conf", rootfs / "abs")
    os.symlink("nowhere", rootfs / "dangling")
    os.lchown(rootfs / "dangling", 7, 8)
    os.link(rootfs / "data/a", rootfs / "data/b")
    os.link(rootfs / "data/a", rootfs / "etc/c")


@pytest.fixture(scope="module")
def umoci_image(registry, tmp_path_factory) -> dict:
    """L:t built by umoci: layer 1 (everything), layer 2 (umoci's whiteouts: a file, a directory,
    a directory's contents replaced), layer 3 (added raw: an opaque directory; umoci 0.4 never
    writes `.wh..wh..opq` itself); pushed by skopeo; copied back by skopeo into L2; the oracle is
    `umoci raw unpack` of L:t."""
    base = tmp_path_factory.mktemp("umoci")
    L, L2 = base / "L", base / "L2"
    _run("umoci", "init", "--layout", str(L))
    _run("umoci", "new", "--image", f"{L}:t")
    _run("umoci", "unpack", "--image", f"{L}:t", str(base / "b1"))
    _populate(base / "b1" / "rootfs")
    _run("umoci", "repack", "--image", f"{L}:t", str(base / "b1"))
    _run("umoci", "unpack", "--image", f"{L}:t", str(base / "b2"))
    r2 = base / "b2" / "rootfs"
    (r2 / "deleteme").unlink()
    shutil.rmtree(r2 / "deldir")
    for p in (r2 / "replaced").iterdir():
        p.unlink()
    (r2 / "replaced" / "new").write_bytes(b"new\n")
    _run("umoci", "repack", "--image", f"{L}:t", str(base / "b2"))
    opaque = base / "opaque.tar"
    opaque.write_bytes(
        tar_layer(
            [
                E("opq", kind="dir", mode=0o750),
                E("opq/.wh..wh..opq", mode=0),
                E("opq/fresh", b"fresh\n", mode=0o640, uid=5, gid=6),
            ]
        )
    )
    _run("umoci", "raw", "add-layer", "--image", f"{L}:t", str(opaque))
    oracle = base / "oracle"
    _run("umoci", "raw", "unpack", "--image", f"{L}:t", str(oracle))
    repo = _repo("umoci")
    ref = f"{registry.host}/{repo}:t"
    _run("skopeo", "copy", "--dest-tls-verify=false", f"oci:{L}:t", f"docker://{ref}")
    _run("skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{L2}:t")
    layers = []
    idx = json.loads((L / "index.json").read_text())
    man = json.loads((L / "blobs" / "sha256" / idx["manifests"][0]["digest"].split(":")[1]).read_bytes())
    for layer in man["layers"]:
        data = (L / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
        layers.append((layer["mediaType"], data))
    return {"ref": ref, "L": L, "L2": L2, "oracle": oracle, "layers": layers, "base": base}


def test_umoci_image_layers_are_what_we_think(umoci_image) -> None:
    """The fixture really holds the cases: three layers, whiteouts in layer 2, an opaque in 3."""
    import io
    import tarfile

    names = []
    for media_type, data in umoci_image["layers"]:
        fobj = io.BytesIO(data)
        with tarfile.open(fileobj=fobj, mode="r:*") as tf:
            names.append([m.name for m in tf])
        assert media_type.startswith(OCI_LAYER)
    assert len(names) == 3
    assert {"deleteme", "deldir", "replaced/old1"} <= {n.replace(".wh.", "") for n in names[1] if ".wh." in n}
    assert "opq/.wh..wh..opq" in names[2]
    oracle = scan(umoci_image["oracle"])
    assert oracle["bin/su"].mode == 0o4755 and oracle["private"].mode == 0o700
    assert (oracle["etc/owned"].uid, oracle["etc/owned"].gid) == (1000, 1001)
    assert frozenset({"data/a", "data/b", "etc/c"}) in hardlink_groups(oracle)
    assert "opq/lower1" not in oracle and "opq/fresh" in oracle


@pytest.mark.parametrize("source", ["registry", "layout", "layout-from-registry"])
def test_umoci_image_matches_umoci_unpack(umoci_image, source, tmp_path) -> None:
    """Byte for byte what `umoci raw unpack` gives: contents, modes (less the write bits imagevol
    seals away), owners, symlink targets, hard-link groups, mtimes of files, symlinks and
    directories (both tools restore a directory's layer mtime after applying whiteouts in it); no
    whiteout file left, the deleted paths absent."""
    ref = {
        "registry": umoci_image["ref"],
        "layout": f"oci:{umoci_image['L']}:t",
        "layout-from-registry": f"oci:{umoci_image['L2']}:t",
    }[source]
    c = Imagevol(tmp_path / "store", tmp_path / "home")  # a store of its own: its own snapshot
    try:
        target = tmp_path / "mnt"
        doc = c.mount_ok(ref, target)
        assert doc["flavour"] == "image" and doc["snapshotCreated"] is True
        got, want = scan(target), scan(umoci_image["oracle"])
        assert compare(got, want, mtimes=("file", "symlink", "dir")) == []
        assert whiteouts(got) == []
        for gone in ("deleteme", "deldir", "deldir/f", "replaced/old1", "replaced/old2", "opq/lower1", "opq/sub"):
            assert gone not in got, gone
        assert (target / "replaced" / "new").read_bytes() == b"new\n"
        assert (target / "opq" / "fresh").read_bytes() == b"fresh\n"
        assert os.readlink(target / "abs") == "/etc/conf"
        r = subprocess.run([str(target / "bin" / "hello")], capture_output=True, text=True, timeout=30)
        assert r.stdout == "hello from umoci\n"
    finally:
        c.cleanup()


# --------------------------------------------------------------------------- 3. ORAS artifact


def test_oras_artifact_hardlinked_to_blobs(registry, cli, tmp_path) -> None:
    import oras.client

    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    weights = src / "weights" / "model.safetensors"
    weights.write_bytes(os.urandom(2 << 20))
    config = src / "config.json"
    config.write_bytes(b'{"hidden_size": 8}')
    tok = src / "tokenizer"
    (tok / "sub").mkdir(parents=True)
    (tok / "vocab.txt").write_bytes(b"a\nb\n")
    (tok / "sub" / "merges.txt").write_bytes(b"a b\n")
    # oras-py titles a file by its basename; an annotation file gives the nested title (as `oras
    # push weights/model.safetensors` does).
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({str(weights): {TITLE: "weights/model.safetensors"}}))
    repo = _repo("oras")
    ref = f"{registry.host}/{repo}:t"
    oc = oras.client.OrasClient(hostname=registry.host, insecure=True)
    oc.push(
        target=ref,
        files=[str(weights), str(config), str(tok)],
        annotation_file=str(ann),
        disable_path_validation=True,
        quiet=True,
    )
    body, _, _ = Client(registry).get_manifest(repo, "t")
    man = json.loads(body)
    by_title = {layer["annotations"][TITLE]: layer for layer in man["layers"]}
    assert set(by_title) == {"weights/model.safetensors", "config.json", "tokenizer"}
    # oras-py marks a directory by its media type only (no io.deis.oras.content.unpack).
    assert by_title["tokenizer"]["mediaType"] == OCI_LAYER_GZIP

    target = tmp_path / "mnt"
    doc = cli.mount_ok(ref, target)
    assert doc["flavour"] == "artifact"
    files = {p for p in listing(target) if (target / p).is_file()}
    assert files == {"weights/model.safetensors", "config.json", "tokenizer/vocab.txt", "tokenizer/sub/merges.txt"}
    for rel in files:
        assert file_sha256(target / rel) == file_sha256(src / rel), rel
    for title in ("weights/model.safetensors", "config.json"):
        blob = cli.blob(by_title[title]["digest"])
        assert os.stat(target / title).st_ino == os.stat(blob).st_ino, f"{title} is a copy, not the blob"
        assert os.stat(target / title).st_mode & 0o777 == 0o444


# --------------------------------------------------------------------------- 4. model formats


@pytest.mark.parametrize("build", [modelpack, kitops, docker_model], ids=lambda f: f.__name__)
def test_model_format_paths(registry, client, cli, tmp_path, build) -> None:
    fx = build()
    repo = _repo(fx.name)
    fx.push(client, repo, "v1")
    target = tmp_path / "mnt"
    doc = cli.mount_ok(f"{registry.host}/{repo}:v1", target)
    assert doc["flavour"] == fx.name
    tree = scan(target)
    got = {p: (target / p).read_bytes() for p, n in tree.items() if n.kind == "file"}
    assert got == fx.files
    assert not [p for p, n in tree.items() if n.kind not in ("file", "dir")]
    for path, mode in fx.modes.items():
        assert tree[path].mode == mode, (path, oct(tree[path].mode))
    if "scripts/run.sh" in fx.files:
        r = subprocess.run([str(target / "scripts" / "run.sh")], capture_output=True, text=True, timeout=30)
        assert r.stdout == "serve\n"


# --------------------------------------------------------------------------- 5. volume semantics


@pytest.fixture(scope="module")
def plain(registry, client) -> dict:
    """An image (an executable, model files) and an artifact (nested titles), pushed once."""
    repo = _repo("plain")
    layer = tar_layer(
        [
            E("bin", kind="dir"),
            E("bin/hello", b"#!/bin/sh\necho hello from the volume\n", mode=0o755),
            E("model", kind="dir"),
            E("model/weights.bin", b"image weights"),
            E("model/sub", kind="dir"),
            E("model/sub/x", b"x"),
        ]
    )
    push_image(client, repo, "img", [layer])
    art = [
        (OCI_LAYER, b"artifact weights", {TITLE: "weights/model.safetensors"}),
        (OCI_LAYER, b"{}", {TITLE: "config.json"}),
    ]
    push_artifact(client, repo, "art", art)
    push_artifact(client, repo, "other", [(OCI_LAYER, b"other content " * 100, {TITLE: "other.bin"})])
    host = registry.host
    return {"img": f"{host}/{repo}:img", "art": f"{host}/{repo}:art", "other": f"{host}/{repo}:other", "repo": repo}


def test_read_only_and_exec(plain, cli, tmp_path) -> None:
    target = tmp_path / "mnt"
    cli.mount_ok(plain["img"], target)
    opts = mount_options(target)
    assert {"ro", "nosuid", "nodev"} <= opts and "noexec" not in opts
    for attempt in (
        lambda: open(target / "new", "wb"),  # noqa: SIM115
        lambda: open(target / "model" / "weights.bin", "ab"),  # noqa: SIM115
        lambda: os.mkdir(target / "d"),
        lambda: os.unlink(target / "model" / "weights.bin"),
        lambda: os.chmod(target / "bin" / "hello", 0o777),
    ):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS
    r = subprocess.run([str(target / "bin" / "hello")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "hello from the volume\n"


def test_subpath(plain, cli, tmp_path) -> None:
    t1 = tmp_path / "img-model"
    doc = cli.mount_ok(plain["img"], t1, "--subpath", "model")
    assert doc["subpath"] == "model"
    assert sorted(listing(t1)) == ["sub", "sub/x", "weights.bin"]
    assert (t1 / "weights.bin").read_bytes() == b"image weights"
    t2 = tmp_path / "art-weights"
    cli.mount_ok(plain["art"], t2, "--subpath", "weights")
    assert sorted(listing(t2)) == ["model.safetensors"]
    assert (t2 / "model.safetensors").read_bytes() == b"artifact weights"
    t3 = tmp_path / "art-file"
    cli.mount_ok(plain["art"], t3, "--subpath", "config.json")
    assert t3.is_file() and t3.read_bytes() == b"{}"
    vols = {v["target"]: v for v in cli.volumes()}
    assert vols[str(t2)]["subpath"] == "weights"

    for ref, kind in ((plain["img"], "image volume"), (plain["art"], "OCI artifact volume")):
        t = tmp_path / f"missing-{kind.split()[0]}"
        r = cli.mount(ref, t, "--subpath", "nope/deeper")
        assert r.returncode == 1, r.stderr
        assert f'sub path "nope/deeper" does not exist in {kind} "{ref}"' in r.stderr
        assert not t.exists()
    r = cli.mount(plain["img"], tmp_path / "dotdot", "--subpath", "../..")
    assert r.returncode in (1, 2) and not (tmp_path / "dotdot").exists()


def test_unmount_and_volumes(plain, cli, tmp_path) -> None:
    target = tmp_path / "mnt"
    doc = cli.mount_ok(plain["art"], target)
    vols = cli.volumes()
    assert [(v["target"], v["mounted"], v["id"]) for v in vols] == [(str(target), True, doc["id"])]
    # The same volume again: the existing one, not a second mount.
    again = cli.mount_ok(plain["art"], target)
    assert again["id"] == doc["id"]
    assert len(cli.volumes()) == 1
    r = cli.unmount(target)
    assert r.returncode == 0, r.stderr
    assert str(target) not in mountpoints()
    assert not target.exists(), "imagevol created the target, so unmount removes it"
    assert cli.volumes() == []
    r = cli.unmount(target)
    assert r.returncode == 1 and "no imagevol volume" in r.stderr


def test_unmount_keeps_existing_target(plain, cli, tmp_path) -> None:
    target = tmp_path / "mine"
    target.mkdir(mode=0o750)
    cli.mount_ok(plain["img"], target)
    assert (target / "model" / "weights.bin").exists()
    assert cli.unmount(target).returncode == 0
    assert target.is_dir() and os.listdir(target) == []
    assert os.stat(target).st_mode & 0o777 == 0o750


def test_manual_umount_then_prune(plain, cli, tmp_path) -> None:
    target = tmp_path / "mnt"
    cli.mount_ok(plain["img"], target)
    _run("umount", str(target))
    vols = cli.volumes()
    assert [(v["target"], v["mounted"]) for v in vols] == [(str(target), False)]
    r = cli.run("volumes")
    assert "GONE" in r.stdout
    pruned = cli.volumes("--prune")
    assert pruned == []
    assert cli.volumes() == []
    # The target is free again.
    cli.mount_ok(plain["img"], tmp_path / "mnt2")


def test_rm_refused_while_mounted_then_gc(plain, cli, client, tmp_path) -> None:
    target = tmp_path / "mnt"
    doc = cli.mount_ok(plain["img"], target)
    body, _, _ = client.get_manifest(plain["repo"], "img")
    man = json.loads(body)
    blobs = [doc["digest"], man["config"]["digest"], *(x["digest"] for x in man["layers"])]
    r = cli.run("rm", plain["img"])
    assert r.returncode == 1 and "in use" in r.stderr, r.stderr
    r = cli.run("gc")
    assert r.returncode == 0, r.stderr
    assert all(cli.blob(d).exists() for d in blobs)
    assert (target / "model" / "weights.bin").read_bytes() == b"image weights"
    assert cli.unmount(target).returncode == 0
    r = cli.run("rm", plain["img"])
    assert r.returncode == 0, r.stderr
    r = cli.run("gc", "--json")
    assert r.returncode == 0, r.stderr
    removed = set(json.loads(r.stdout)["removed"])
    assert set(blobs) <= removed
    assert not any(cli.blob(d).exists() for d in blobs)
    cli.fsck()


def test_gc_keeps_what_only_a_volume_holds(plain, cli, tmp_path) -> None:
    """Unrelated content is reclaimed; a volume's content stays even when no reference names it
    any more (its record dropped behind imagevol's back), until the volume goes."""
    from imagevol.store import Store

    target = tmp_path / "mnt"
    doc = cli.mount_ok(plain["art"], target)
    other = cli.run("pull", plain["other"], "--progress", "none", "--json")
    assert other.returncode == 0, other.stderr
    other_digest = json.loads(other.stdout)["digest"]
    assert cli.run("rm", plain["other"]).returncode == 0
    store = Store(cli.root)
    key = doc["reference"]
    assert store.meta.get_ref(key) is not None
    store.meta.remove_ref(key)
    r = cli.run("gc", "--json")
    assert r.returncode == 0, r.stderr
    removed = set(json.loads(r.stdout)["removed"])
    assert other_digest in removed
    assert doc["digest"] not in removed and cli.blob(doc["digest"]).exists()
    assert (target / "weights" / "model.safetensors").read_bytes() == b"artifact weights"
    assert cli.unmount(target).returncode == 0
    r = cli.run("gc", "--json")
    assert doc["digest"] in set(json.loads(r.stdout)["removed"])
    cli.fsck()


def test_gc_reclaims_snapshots(plain, cli, tmp_path) -> None:
    target = tmp_path / "mnt"
    doc = cli.mount_ok(plain["img"], target)
    assert cli.unmount(target).returncode == 0
    assert cli.run("rm", plain["img"]).returncode == 0
    assert cli.run("gc").returncode == 0
    assert not Path(doc["snapshot"]).exists()


def test_second_mount_is_fast_and_writes_nothing(plain, cli, tmp_path) -> None:
    first = cli.mount_ok(plain["img"], tmp_path / "a")
    assert first["snapshotCreated"] is True
    before = (listing(cli.root / "blobs"), listing(cli.root / "snapshots"))
    t0 = time.monotonic()
    second = cli.mount_ok(plain["img"], tmp_path / "b")
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"second mount took {elapsed:.2f}s"
    assert second["snapshotCreated"] is False and second["pull"]["offline"] is True
    assert second["snapshot"] == first["snapshot"]
    assert (listing(cli.root / "blobs"), listing(cli.root / "snapshots")) == before
    assert (tmp_path / "b" / "model" / "weights.bin").read_bytes() == b"image weights"


# --------------------------------------------------------------------------- 6. hostile layers


@dataclass
class Hostile:
    name: str
    kind: str  # image or artifact
    layers: list  # image: uncompressed tars; artifact: (media type, data, annotations)
    refused: str | None  # the reason stderr must give (exit 4), or None: contained
    check: object = None  # f(target, sentinel) for contained cases


def _hostile_cases(sentinel: Path) -> list[Hostile]:
    s = str(sentinel)
    up = "../" * 12
    return [
        Hostile(
            "symlink-etc-then-child",
            "image",
            [tar_layer([E("localetc", kind="symlink", link="/etc"), E("localetc/unbroken", b"inside")])],
            None,
            lambda t, _: (t / "etc" / "unbroken").read_bytes() == b"inside" and not Path("/etc/unbroken").exists(),
        ),
        Hostile(
            "symlinks-to-sentinel",
            "image",
            [
                tar_layer(
                    [
                        E("abs", kind="symlink", link=s),
                        E("abs/pwned", b"abs"),
                        E("rel", kind="symlink", link=up + s.lstrip("/")),
                        E("rel/pwned2", b"rel"),
                        E("dotdot", kind="symlink", link=".."),
                        E("dotdot/pwned3", b"dd"),
                    ]
                )
            ],
            None,
            lambda t, _: (
                (t / s.lstrip("/") / "pwned").read_bytes() == b"abs"
                and (t / s.lstrip("/") / "pwned2").read_bytes() == b"rel"
                and (t / "pwned3").read_bytes() == b"dd"
            ),
        ),
        Hostile(
            "hardlink-to-host-passwd",
            "image",
            [tar_layer([E("passwd", kind="hardlink", link=up + "etc/passwd")])],
            "does not exist inside the root",
        ),
        Hostile(
            "hardlink-resolves-inside",
            "image",
            [tar_layer([E("etc/passwd", b"root:x:0:0:fake\n"), E("pw", kind="hardlink", link=up + "etc/passwd")])],
            None,
            lambda t, _: (
                (t / "pw").read_bytes() == b"root:x:0:0:fake\n"
                and os.stat(t / "pw").st_ino == os.stat(t / "etc" / "passwd").st_ino
            ),
        ),
        Hostile(
            "hardlink-to-sentinel-file",
            "image",
            [tar_layer([E("victim", kind="hardlink", link=s + "/victim")])],
            "does not exist inside the root",
        ),
        Hostile(
            "whiteout-dotdot", "image", [tar_layer([E("a", b"a")]), tar_layer([E(".wh..", b"")])], "invalid whiteout"
        ),
        Hostile(
            "whiteout-dotdotdot",
            "image",
            [tar_layer([E("a", b"a")]), tar_layer([E(".wh...", b"")])],
            "invalid whiteout",
        ),
        Hostile(
            "whiteout-through-symlink",
            "image",
            [
                tar_layer([E("lnk", kind="symlink", link=s), E(s.lstrip("/") + "/victim", b"in root")]),
                tar_layer([E("lnk/.wh.victim", b"")]),
            ],
            None,
            lambda t, sen: not (t / s.lstrip("/") / "victim").exists() and (sen / "victim").exists(),
        ),
        Hostile(
            "dotdot-entry-clamped",
            "image",
            [tar_layer([E(up + "escape-file", b"clamped"), E("/abs-entry", b"abs")])],
            None,
            lambda t, _: (t / "escape-file").read_bytes() == b"clamped" and (t / "abs-entry").read_bytes() == b"abs",
        ),
        Hostile(
            "whiteout-of-a-symlink-removes-the-link",
            "image",
            [tar_layer([E("localetc", kind="symlink", link=s)]), tar_layer([E(".wh.localetc", b"")])],
            None,
            lambda t, sen: not os.path.lexists(t / "localetc") and (sen / "victim").read_bytes() == b"do not touch",
        ),
        Hostile(
            "file-over-lower-symlink",
            "image",
            [tar_layer([E("f", kind="symlink", link=s + "/victim")]), tar_layer([E("f", b"replaced")])],
            None,
            lambda t, _: not (t / "f").is_symlink() and (t / "f").read_bytes() == b"replaced",
        ),
        Hostile("symlink-named-dotdot", "image", [tar_layer([E("..", kind="symlink", link=s)])], "for the root"),
        Hostile("symlink-empty-target", "image", [tar_layer([E("e", kind="symlink", link="")])], "invalid symlink"),
        Hostile("non-dir-root", "image", [tar_layer([E("./", b"root as a file")])], "non-directory entry for the root"),
        Hostile(
            "artifact-title-dotdot", "artifact", [(OCI_LAYER, b"x", {TITLE: "../../escape"})], "has a '..' component"
        ),
        Hostile("artifact-title-absolute", "artifact", [(OCI_LAYER, b"x", {TITLE: s + "/escape"})], "is absolute"),
        Hostile(
            "artifact-title-through-symlink",
            "artifact",
            [
                (
                    OCI_LAYER_GZIP,
                    gz(tar_layer([E("d", kind="dir"), E("d/link", kind="symlink", link=s)])),
                    {TITLE: "d", ORAS_UNPACK: "true"},
                ),
                (OCI_LAYER, b"x", {TITLE: "d/link/pwned"}),
            ],
            "'d/link' is a symbolic link",
        ),
        Hostile(
            "artifact-tar-whiteout",
            "artifact",
            [(OCI_LAYER_GZIP, gz(tar_layer([E("d/.wh.victim", b"")])), {TITLE: "d", ORAS_UNPACK: "true"})],
            "whiteout names are not allowed",
        ),
        Hostile(
            "artifact-tar-escapes",
            "artifact",
            [
                (
                    OCI_LAYER_GZIP,
                    gz(tar_layer([E("d/ln", kind="symlink", link=s), E("d/ln/pwned", b"p"), E(up + "esc", b"e")])),
                    {TITLE: "d", ORAS_UNPACK: "true"},
                )
            ],
            None,
            lambda t, _: (t / s.lstrip("/") / "pwned").read_bytes() == b"p" and (t / "esc").read_bytes() == b"e",
        ),
    ]


HOSTILE_NAMES = [h.name for h in _hostile_cases(Path("/x"))]


def _host_state(tmp_path: Path, sentinel: Path, skip: tuple[Path, ...]) -> dict:
    outside = {p for p in listing(tmp_path) if not any(p == str(x) or p.startswith(f"{x}/") for x in skip)}
    with open("/etc/passwd", "rb") as f:
        passwd = hashlib.sha256(f.read()).hexdigest()
    return {
        "sentinel": scan(sentinel),
        "etc": sorted(os.listdir("/etc")),
        "passwd": passwd,
        "tmp": outside,
        "root-level": sorted(os.listdir("/")),
    }


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_layer(registry, client, cli, tmp_path, name) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "victim").write_bytes(b"do not touch")
    (sentinel / "dir").mkdir()
    case = next(h for h in _hostile_cases(sentinel) if h.name == name)
    repo = _repo("hostile")
    if case.kind == "image":
        push_image(client, repo, "t", case.layers)
    else:
        push_artifact(client, repo, "t", case.layers)
    target = tmp_path / "mnt"
    rel = (Path(cli.root.name), Path(cli.home.name), Path(target.name))
    before = _host_state(tmp_path, sentinel, rel)
    r = cli.mount(f"{registry.host}/{repo}:t", target)
    if case.refused:
        assert r.returncode == 4, f"expected exit 4, got {r.returncode}:\n{r.stdout}\n{r.stderr}"
        assert r.stderr.startswith("error: ") and case.refused in r.stderr, r.stderr
        assert not target.exists()
    else:
        assert r.returncode == 0, r.stderr
        assert case.check(target, sentinel), sorted(listing(target))
        assert cli.unmount(target).returncode == 0
    assert _host_state(tmp_path, sentinel, rel) == before
    snaps = cli.root / "snapshots"
    assert not [n for n in (os.listdir(snaps) if snaps.exists() else []) if n.startswith(".build-")]
    cli.fsck()


# --------------------------------------------------------------------------- 7. trusting the store


BOB = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]


@pytest.fixture
def world(cli) -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp dirs are 0700), for `bob` (uid 1000)."""
    import tempfile

    need_tool("setpriv")
    d = Path(tempfile.mkdtemp(prefix="imagevol-trust-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for m in sorted((m for m in mountpoints() if m.startswith(f"{d}/")), reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
    subprocess.run(["chmod", "-R", "u+w", str(d)], capture_output=True, timeout=30)
    shutil.rmtree(d, ignore_errors=True)


def _bob(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BOB, *argv], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def trust(registry, client) -> dict:
    """An artifact (its raw file is the store's blob) and an image whose files belong to uid 1000,
    with declared modes: a 0640 file, a 0750 directory, the root `./` 0751."""
    repo = _repo("trust")
    push_artifact(client, repo, "art", [(OCI_LAYER, b"verified weights", {TITLE: "w.bin"})])
    layer = tar_layer(
        [
            E("./", kind="dir", mode=0o751),
            E("private", kind="dir", mode=0o750, uid=1000, gid=1000),
            E("private/secret.txt", b"owner only", mode=0o640, uid=1000, gid=1000),
            E("w.bin", b"image weights", mode=0o644, uid=1000, gid=1000),
            E("run.sh", b"#!/bin/sh\necho ran\n", mode=0o755),
        ]
    )
    push_image(client, repo, "img", [layer])
    return {"art": f"{registry.host}/{repo}:art", "img": f"{registry.host}/{repo}:img"}


def test_root_cannot_write_the_store_through_a_hardlink_volume(trust, cli, tmp_path) -> None:
    """Issue item 1 (a): the same content at T1 (--mode bind) and T2 (--mode hardlink). Root's
    append into T2 used to go through the shared inode into the verified blob (artifact) or the
    shared snapshot (image), and T1 served the new bytes. Now T2 is a read-only bind: EROFS."""
    for ref, name, data in ((trust["art"], "w.bin", b"verified weights"), (trust["img"], "w.bin", b"image weights")):
        t1, t2 = tmp_path / f"t1-{len(data)}", tmp_path / f"t2-{len(data)}"
        d1 = cli.mount_ok(ref, t1, "--mode", "bind")
        d2 = cli.mount_ok(ref, t2, "--mode", "hardlink")
        f = t2 / name
        errors = []
        for attempt in (
            lambda f=f: os.chmod(f, 0o666),
            lambda f=f: open(f, "ab").write(b"tampered"),  # noqa: SIM115
        ):
            try:
                attempt()
            except OSError as e:
                errors.append(e.errno)
        assert (t1 / name).read_bytes() == data, "a bind volume of the same content changed"
        assert (Path(d1["snapshot"]) / name).read_bytes() == data
        if ref == trust["art"]:
            blob = cli.blob("sha256:" + hashlib.sha256(data).hexdigest())
            assert blob.read_bytes() == data, "the verified blob changed"
        assert errors == [errno.EROFS, errno.EROFS]
        assert d2["mode"] == "bind" and {"ro", "nosuid", "nodev"} <= mount_options(t2)
        assert cli.unmount(t2).returncode == 0 and cli.unmount(t1).returncode == 0
    cli.fsck()


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_file_owner_cannot_write_the_store_through_a_volume(trust, cli, world, mode) -> None:
    """Issue item 1 (b): w.bin belongs to uid 1000 (tar header). Through a hard-link volume, bob
    ran `chmod u+w` on the snapshot's inode and wrote: every volume of that content changed. Now
    `hardlink` is a read-only bind (EROFS) and a copy is bob's own file: the store and a bind
    volume of the same content stay as they were."""
    ro = world / "ro"
    cli.mount_ok(trust["img"], ro, "--mode", "bind")
    target = world / "v"
    doc = cli.mount_ok(trust["img"], target, "--mode", mode)
    assert os.stat(target / "w.bin").st_uid == 1000
    r = _bob("sh", "-c", f'chmod u+w "{target}/w.bin" && printf tampered >> "{target}/w.bin"')
    assert (ro / "w.bin").read_bytes() == b"image weights", "a bind volume of the same content changed"
    assert (Path(doc["snapshot"]) / "w.bin").read_bytes() == b"image weights", "the snapshot changed"
    if mode == "hardlink":
        assert doc["mode"] == "bind"
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr  # bob's own copy
        assert (target / "w.bin").read_bytes() == b"image weightstampered"
        assert os.stat(target / "w.bin").st_ino != os.stat(Path(doc["snapshot"]) / "w.bin").st_ino
    assert cli.unmount(target).returncode == 0 and cli.unmount(ro).returncode == 0
    cli.fsck()


@pytest.mark.parametrize("mode", ["bind", "copy"])
def test_declared_modes_are_shown(trust, cli, tmp_path, mode) -> None:
    """Issue item 3: a 0640 file is 0640, a 0750 directory 0750, the root as `./` declares (0751);
    before, every write bit was stripped (0440, 0550). Read-only comes from the mount."""
    target = tmp_path / "v"
    cli.mount_ok(trust["img"], target, "--mode", mode)
    modes = {
        p: stat.S_IMODE(os.lstat(target / p).st_mode) for p in ("", "private", "private/secret.txt", "w.bin", "run.sh")
    }
    assert modes == {"": 0o751, "private": 0o750, "private/secret.txt": 0o640, "w.bin": 0o644, "run.sh": 0o755}
    assert os.stat(target / "private/secret.txt").st_uid == 1000
    if mode == "bind":
        with pytest.raises(OSError) as ei:
            open(target / "private/secret.txt", "ab")  # noqa: SIM115
        assert ei.value.errno == errno.EROFS
    assert cli.unmount(target).returncode == 0


def test_subpath_through_a_symlink_out_gives_one_error(registry, client, cli, tmp_path) -> None:
    """Issue item 6 (CLI): `host -> /`; `--subpath host/etc/shadow` and `host/etc/missing` (and
    a sub path under a file) fail with the same exit code and text but for the sub path."""
    repo = _repo("hostlink")
    push_image(client, repo, "t", [tar_layer([E("host", kind="symlink", link="/"), E("f", b"x")])])
    ref = f"{registry.host}/{repo}:t"
    answers = set()
    for i, sub in enumerate(("host/etc/shadow", "host/etc/missing", "f/x")):
        t = tmp_path / f"s{i}"
        r = cli.mount(ref, t, "--subpath", sub)
        answers.add((r.returncode, r.stderr.replace(f'"{sub}"', '"X"')))
        assert not t.exists()
    assert len(answers) == 1, answers
    ((code, err),) = answers
    assert code == 1 and f'error: sub path "X" does not exist in image volume "{ref}"' in err and "hint:" in err


@pytest.mark.parametrize("mode", ["copy", "bind"])
def test_unmount_does_not_follow_a_swapped_parent(trust, cli, world, mode) -> None:
    """Issue item 8: root mounts at HOME/bob/models/data (bob owns `models`); bob moves `models`
    away and puts a symlink to a root-only directory holding data/precious.db in its place.
    `imagevol unmount HOME/bob/models/data` used to empty and remove the directory behind the
    symlink (copy) or rmdir it and forget a live mount (bind). Now it refuses, touching nothing;
    once bob puts the path back, the unmount completes."""
    bob = world / "home" / "bob"
    models = bob / "models"
    models.mkdir(parents=True)
    os.chown(bob, 1000, 1000)
    os.chown(models, 1000, 1000)
    secret = world / "secret"
    (secret / "data").mkdir(parents=True)
    os.chmod(secret, 0o700)
    precious = secret / "data" / "precious.db"
    if mode == "copy":
        precious.write_bytes(b"precious")
    target = models / "data"
    cli.mount_ok(trust["art"], target, "--mode", mode)
    assert (target / "w.bin").read_bytes() == b"verified weights"
    r = _bob("sh", "-c", f'mv "{models}" "{bob}/models.old" && ln -s "{secret}" "{models}"')
    assert r.returncode == 0, r.stderr
    r = cli.unmount(target)
    assert r.returncode == 1, r.stderr
    assert "error: the volume at" in r.stderr and "symbolic link" in r.stderr and "hint:" in r.stderr
    assert (secret / "data").is_dir()
    if mode == "copy":
        assert precious.read_bytes() == b"precious"
    assert [v["target"] for v in cli.volumes()] == [str(target)]  # the record stays
    if mode == "bind":
        assert f"{bob}/models.old/data" in mountpoints()
    # bob puts it back: the unmount goes through, and removes only what imagevol made
    r = _bob("sh", "-c", f'rm "{models}" && mv "{bob}/models.old" "{models}"')
    assert r.returncode == 0, r.stderr
    r = cli.unmount(target)
    assert r.returncode == 0, r.stderr
    assert not target.exists() and models.is_dir() and (secret / "data").is_dir()
    assert str(target) not in mountpoints() and cli.volumes() == []
    cli.fsck()


# --------------------------------------------------------------------------- fsck: blobs and snapshots


def _push_oras_inline_config(client: Client, repo: str) -> str:
    """An ORAS-style artifact whose empty config carries its content inline (`data: e30=`)."""
    from tests.support.oci import OCI_EMPTY, OCI_EMPTY_DATA, OCI_MANIFEST, descriptor, make_image_manifest

    payload = b"weights of an oras artifact"
    client.push_blob(repo, payload)
    client.push_blob(repo, OCI_EMPTY_DATA)  # ORAS pushes it too; imagevol never needs to fetch it
    config = {**descriptor(OCI_EMPTY, OCI_EMPTY_DATA), "data": "e30="}
    body, digest = make_image_manifest(
        config,
        [descriptor("application/vnd.oci.image.layer.v1.tar", payload, annotations={TITLE: "w.bin"})],
        artifact_type="application/vnd.example.model.v1",
    )
    client.push_manifest(repo, "v1", body, OCI_MANIFEST)
    return digest


def _fsck_json(cli: Imagevol, *args: str) -> tuple[int, dict]:
    r = cli.run("fsck", "--json", *args)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


def _all_plain(v: object) -> bool:
    """JSON of plain types only; every string that looks like a digest is exactly one."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _all_plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_all_plain(x) for x in v)
    if isinstance(v, str):
        return "Digest(" not in v and "(" not in v[:1]
    return v is None or isinstance(v, (bool, int, float))


def test_fsck_clean_right_after_pulling_an_oras_artifact_with_inline_empty_config(registry, client, cli) -> None:
    """Found by the issue "Trust the store": the inline empty config was recorded as a child of the
    manifest but never stored, so fsck reported missing_children and exited 4 after a clean pull."""
    repo = _repo("oras-inline")
    digest = _push_oras_inline_config(client, repo)
    r = cli.run("pull", f"{registry.host}/{repo}:v1", "--progress", "none")
    assert r.returncode == 0, r.stderr
    code, doc = _fsck_json(cli)
    assert code == 0 and doc["ok"] is True and doc["missing_children"] == [], doc
    t = cli.root.parent / "mnt-oras"
    cli.mount_ok(f"{registry.host}/{repo}:v1", t)
    assert (t / "w.bin").read_bytes() == b"weights of an oras artifact"
    code, doc = _fsck_json(cli)
    assert code == 0 and doc["snapshots_checked"] == 1 and doc["damaged_snapshots"] == {}, doc
    assert cli.unmount(t).returncode == 0

    # A store that pulled before the fix lacks the blob: reported as plain JSON, restored by --repair.
    empty = cli.blob("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")
    empty.unlink()
    code, doc = _fsck_json(cli)
    assert code == 4 and doc["ok"] is False
    assert _all_plain(doc), doc
    assert doc["missing_children"] == [[digest, "sha256:" + empty.name]]
    assert all(isinstance(p, str) for p in doc["problemsLeft"]) and len(doc["problemsLeft"]) == 1
    code, doc = _fsck_json(cli, "--repair")
    assert code == 0 and doc["restored"] == ["sha256:" + empty.name] and doc["problemsLeft"] == [], doc
    assert empty.read_bytes() == b"{}"
    cli.fsck()


def test_fsck_repair_exits_4_while_problems_remain(registry, client, cli) -> None:
    """Found by the issue "Trust the store": `fsck --repair` exited 0 with problems left."""
    repo = _repo("fsck-stray")
    push_artifact(client, repo, "v1", [("application/octet-stream", b"x", {TITLE: "x"})])
    assert cli.run("pull", f"{registry.host}/{repo}:v1", "--progress", "none").returncode == 0
    stray = cli.root / "blobs" / "sha256" / "not-a-digest"
    stray.write_bytes(b"?")
    r = cli.run("fsck", "--repair")
    assert r.returncode == 4, r.stdout + r.stderr
    assert r.stderr.startswith("error: 1 problem(s) left") and "\nhint: " in r.stderr, r.stderr
    stray.unlink()
    assert cli.run("fsck", "--repair").returncode == 0
    cli.fsck()


def test_fsck_finds_a_damaged_snapshot_keeps_it_while_mounted_and_repair_rebuilds(
    registry, client, cli, tmp_path
) -> None:
    repo = _repo("fsck-snap")
    push_image(
        client,
        repo,
        "v1",
        [tar_layer([E("data/", kind="dir"), E("data/model.bin", b"good weights"), E("data/cfg", b"{}")])],
    )
    ref = f"{registry.host}/{repo}:v1"
    t = tmp_path / "mnt"
    first = cli.mount_ok(ref, t)
    snap = Path(first["snapshot"])
    victim = snap / "data" / "model.bin"
    mode = victim.stat().st_mode
    os.chmod(victim, 0o644)
    victim.write_bytes(b"evil weights")  # same size: only the content digest tells
    os.chmod(victim, mode)
    assert (t / "data" / "model.bin").read_bytes() == b"evil weights"

    code, doc = _fsck_json(cli)
    assert code == 4 and list(doc["damaged_snapshots"]) == [snap.name], doc
    assert any(p.startswith("content: data/model.bin: sha256:") for p in doc["damaged_snapshots"][snap.name])
    assert doc["snapshots_in_use"] == {snap.name: [str(t)]}
    code, quick = _fsck_json(cli, "--quick")
    assert code == 0 and quick["damaged_snapshots"] == {}  # --quick does not read content

    # Mounted: reported, kept (it cannot be rebuilt under a live mount), exit 4 with a hint.
    r = cli.run("fsck", "--repair")
    assert r.returncode == 4 and "unmount the volumes on damaged snapshots" in r.stderr, r.stderr
    assert snap.is_dir() and (t / "data" / "model.bin").exists()

    assert cli.unmount(t).returncode == 0
    code, doc = _fsck_json(cli, "--repair")
    assert code == 0 and doc["dropped_snapshots"] == [snap.name] and doc["problemsLeft"] == [], doc
    assert not snap.exists()
    again = cli.mount_ok(ref, t)
    assert again["snapshotCreated"] is True and again["snapshot"] == str(snap)
    assert (t / "data" / "model.bin").read_bytes() == b"good weights"
    cli.fsck()
    assert cli.unmount(t).returncode == 0
