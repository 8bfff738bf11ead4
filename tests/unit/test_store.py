"""Store: blobs, digest safety, metadata, locks, gc and fsck."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from imagevol import mediatypes as mt
from imagevol.digest import Digest, digest_bytes
from imagevol.errors import DigestMismatchError, InvalidDigestError, NotFoundError, StoreError, UsageError
from imagevol.store import FsckResult, GcResult, Lease, Meta, RefRecord, Store, fsck, gc

HEX = "a" * 64


def _tree(path) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        out.extend(os.path.relpath(os.path.join(dirpath, n), path) for n in dirs + files)
    return sorted(out)


def _blob_files(store: Store) -> list[str]:
    return [p for p in _tree(store.root / "blobs") if p.count(os.sep) == 1]


def _manifest(config: Digest, layers: list[Digest]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": {"mediaType": mt.OCI_CONFIG, "digest": config, "size": 2},
            "layers": [{"mediaType": mt.OCI_LAYER, "digest": d, "size": 1} for d in layers],
        }
    ).encode()


# -- blobs -----------------------------------------------------------------------------------------
def test_put_has_open_read(tmp_path):
    store = Store(tmp_path / "store")
    assert not (tmp_path / "store").exists()  # created on first write, not before
    d = store.put_bytes(b"hello")
    assert d == digest_bytes(b"hello")
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o700
    path = store.blob_path(d)
    assert path == store.root / "blobs" / "sha256" / d.hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.has_blob(d) and store.has_blob(d, 5) and not store.has_blob(d, 4)
    with store.open_blob(d) as f:
        assert f.read() == b"hello"
    assert store.read_blob(d, 5) == b"hello"
    assert list(store.iter_blobs()) == [(d, 5)]
    assert store.blob_size(d) == 5


def test_put_is_idempotent_and_checks_expected(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"data")
    assert store.put_bytes(b"data", d) == d
    assert store.put_bytes(b"data", d) == d
    assert store.put_bytes(b"data") == d
    assert _blob_files(store) == [f"sha256{os.sep}{d.hex}"]
    assert os.listdir(store.root / "ingest") == []


def test_put_sha512(tmp_path):
    store = Store(tmp_path)
    d = digest_bytes(b"data", "sha512")
    assert store.put_bytes(b"data", d) == d
    assert store.blob_path(d).parent.name == "sha512"
    assert store.read_blob(d, 100) == b"data"


def test_verification_refuses_wrong_bytes_and_leaves_blobs_unchanged(tmp_path):
    store = Store(tmp_path)
    store.put_bytes(b"existing")
    before = _tree(store.root / "blobs")
    with pytest.raises(DigestMismatchError):
        store.put_bytes(b"evil bytes", digest_bytes(b"good bytes"))
    assert _tree(store.root / "blobs") == before
    assert os.listdir(store.root / "ingest") == []
    assert not store.has_blob(digest_bytes(b"good bytes"))
    assert not store.has_blob(digest_bytes(b"evil bytes"))


def test_open_missing_blob(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(NotFoundError):
        store.open_blob(digest_bytes(b"nope"))
    with pytest.raises(NotFoundError):
        store.read_blob(digest_bytes(b"nope"), 10)
    assert not store.has_blob(digest_bytes(b"nope"))


def test_read_blob_size_cap_and_corruption(tmp_path):
    store = Store(tmp_path)
    d = store.put_bytes(b"x" * 100)
    with pytest.raises(StoreError):
        store.read_blob(d, 99)
    path = store.blob_path(d)
    os.chmod(path, 0o644)
    path.write_bytes(b"y" * 100)
    with pytest.raises(DigestMismatchError):
        store.read_blob(d, 100)


def test_remove_blob(tmp_path):
    store = Store(tmp_path)
    d = store.put_bytes(b"gone soon")
    assert store.remove_blob(d)
    assert not store.remove_blob(d)
    assert not store.has_blob(d)


BAD_DIGESTS = [
    "sha256:../../x",
    "sha256:../../../../etc/passwd",
    "sha256:" + HEX + "/../../x",
    "sha256/" + HEX,
    "../sha256:" + HEX,
    "sha256:" + HEX.upper(),
    "sha256:" + HEX[:-1],
    "md5:" + "a" * 32,
    "sha256:",
    "",
    "/etc/passwd",
]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_traversal_digests_are_refused_before_any_path(tmp_path, bad):
    root = tmp_path / "store"
    store = Store(root)
    calls = [
        lambda: store.blob_path(bad),
        lambda: store.has_blob(bad),
        lambda: store.open_blob(bad),
        lambda: store.read_blob(bad, 10),
        lambda: store.put_bytes(b"x", bad),
        lambda: store.ingest(bad, 1),
        lambda: store.remove_blob(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidDigestError):
            call()
    assert list(tmp_path.iterdir()) == []  # nothing created, inside or outside the root
    meta_calls = [
        lambda: store.meta.set_ref("docker.io/library/x:latest", bad, media_type=mt.OCI_MANIFEST),
        lambda: store.meta.set_children(bad, []),
        lambda: store.meta.set_children(digest_bytes(b"p"), [bad]),
        lambda: store.meta.add_lease("l", [bad], kind="volume"),
        lambda: store.meta.set_snapshot("k", "/p", "ready", digest=bad),
        lambda: store.meta.add_volume("v", "/mnt/v", None, bad, None, "ro"),
    ]
    for call in meta_calls:
        with pytest.raises(InvalidDigestError):
            call()
    assert os.listdir(tmp_path) == ["store"]
    assert _tree(root / "blobs") == [] and _tree(root / "ingest") == []


def test_store_root_is_not_escaped_by_symlinked_blob(tmp_path):
    store = Store(tmp_path / "store")
    d = digest_bytes(b"secret")
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    store.ensure()
    (store.root / "blobs" / "sha256").mkdir()
    os.symlink(outside, store.blob_path(d))
    assert not store.has_blob(d)  # a symlink is not a blob
    with pytest.raises(OSError):
        store.open_blob(d)


# -- metadata --------------------------------------------------------------------------------------
def test_meta_schema_and_wal(tmp_path):
    store = Store(tmp_path)
    meta = store.meta
    assert isinstance(meta, Meta)
    assert meta.schema_version() == 1
    assert meta._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert meta._db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert (store.root / "meta.db").exists()
    assert store.meta is meta  # cached


def test_meta_refuses_newer_schema(tmp_path):
    store = Store(tmp_path)
    store.meta._db.execute("INSERT INTO schema_version (version) VALUES (99)")
    store.close()
    with pytest.raises(StoreError, match="schema 99"):
        Meta(tmp_path / "meta.db")


def test_refs(tmp_path):
    meta = Store(tmp_path).meta
    d1, d2 = digest_bytes(b"m1"), digest_bytes(b"m2")
    t0 = time.time()
    meta.set_ref("docker.io/library/a:1", d1, media_type=mt.OCI_MANIFEST, platform="linux/amd64", source="x")
    rec = meta.get_ref("docker.io/library/a:1")
    assert isinstance(rec, RefRecord)
    assert rec.digest == d1 and isinstance(rec.digest, Digest)
    assert (rec.media_type, rec.platform, rec.source) == (mt.OCI_MANIFEST, "linux/amd64", "x")
    assert rec.pulled_at >= t0 - 1
    meta.set_ref("docker.io/library/a:1", d2, media_type=mt.OCI_INDEX)
    meta.set_ref("docker.io/library/b:1", d2, media_type=mt.OCI_INDEX)
    assert meta.get_ref("docker.io/library/a:1").digest == d2
    assert [r.ref for r in meta.list_refs()] == ["docker.io/library/a:1", "docker.io/library/b:1"]
    assert [r.ref for r in meta.refs_to(d2)] == ["docker.io/library/a:1", "docker.io/library/b:1"]
    assert meta.remove_ref("docker.io/library/a:1")
    assert not meta.remove_ref("docker.io/library/a:1")
    assert meta.get_ref("docker.io/library/a:1") is None


def test_children(tmp_path):
    meta = Store(tmp_path).meta
    p = digest_bytes(b"parent")
    kids = [digest_bytes(b"c"), digest_bytes(b"a"), digest_bytes(b"b"), digest_bytes(b"a")]
    meta.set_children(p, kids)
    assert meta.children(p) == kids[:3]  # order kept, duplicates dropped
    assert meta.parents(kids[0]) == [p]
    meta.set_children(p, [kids[2]])  # replaces
    assert meta.children(p) == [kids[2]]
    assert meta.all_children() == {p: [kids[2]]}
    assert meta.children(digest_bytes(b"unknown")) == []
    meta.remove_children_of([p])
    assert meta.children(p) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_leases(tmp_path):
    meta = Store(tmp_path).meta
    a, b, c = digest_bytes(b"a"), digest_bytes(b"b"), digest_bytes(b"c")
    meta.add_lease("vol-1", [a], kind="volume")
    meta.add_lease("old", [b], kind="volume", expires_at=time.time() - 1)
    meta.add_lease("later", [b], kind="volume", expires_at=time.time() + 3600)
    meta.add_lease("pull-live", [c], kind="pull", pid=os.getpid())
    meta.add_lease("pull-dead", [c], kind="pull", pid=_dead_pid())
    leases = {lease.id: lease for lease in meta.leases()}
    assert all(isinstance(lease, Lease) for lease in leases.values())
    assert {k: v.expired for k, v in leases.items()} == {
        "vol-1": False,
        "old": True,
        "later": False,
        "pull-live": False,
        "pull-dead": True,
    }
    assert leases["vol-1"].roots == (a,)
    meta.add_lease("vol-1", [b], kind="volume")  # adds roots
    assert set(meta.get_lease("vol-1").roots) == {a, b}
    meta.remove_lease("vol-1")
    assert meta.get_lease("vol-1") is None
    assert "vol-1" not in {lease.id for lease in meta.leases()}


def test_snapshots(tmp_path):
    meta = Store(tmp_path).meta
    d = digest_bytes(b"m")
    meta.set_snapshot("snap-1", "/s/1", "building", digest=d)
    snap = meta.get_snapshot("snap-1")
    assert (snap.key, snap.path, snap.state, snap.digest) == ("snap-1", "/s/1", "building", d)
    meta.set_snapshot("snap-1", "/s/1", "ready", digest=d)
    meta.set_snapshot("snap-0", "/s/0", "ready")
    assert [s.key for s in meta.list_snapshots()] == ["snap-0", "snap-1"]
    assert meta.get_snapshot("snap-1").state == "ready"
    assert meta.get_snapshot("snap-0").digest is None
    assert meta.remove_snapshot("snap-1") and not meta.remove_snapshot("snap-1")
    assert meta.get_snapshot("snap-1") is None


def test_volumes(tmp_path):
    meta = Store(tmp_path).meta
    d = digest_bytes(b"m")
    rec = meta.add_volume("v1", "/mnt/a", "docker.io/library/a:1", d, "snap-1", "overlay")
    assert meta.get_volume("v1") == rec
    assert meta.get_volume_by_target("/mnt/a") == rec
    assert rec.digest == d and rec.created_at > 0
    meta.add_volume("v2", target="/mnt/b", ref=None, digest=d, snapshot_key=None, mode="bind", created_at=5.0)
    assert [v.id for v in meta.list_volumes()] == ["v2", "v1"]
    with pytest.raises(StoreError):
        meta.add_volume("v3", "/mnt/a", None, d, None, "bind")  # target taken
    with pytest.raises(StoreError):
        meta.add_volume("v1", "/mnt/c", None, d, None, "bind")  # id taken
    assert meta.remove_volume("v1") and not meta.remove_volume("v1")
    assert meta.get_volume_by_target("/mnt/a") is None


_REF_WRITER = r"""
import sys
from imagevol.digest import digest_bytes
from imagevol.store import Store
root, who = sys.argv[1], sys.argv[2]
meta = Store(root).meta
for i in range(40):
    meta.set_ref(f"example.com/{who}:{i}", digest_bytes(f"{who}{i}".encode()), media_type="m")
    meta.set_children(digest_bytes(f"{who}{i}".encode()), [digest_bytes(b"shared")])
"""


def test_meta_concurrent_processes(tmp_path):
    root = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, "-c", _REF_WRITER, str(root), f"w{n}"], stderr=subprocess.PIPE, text=True)
        for n in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    meta = Store(root).meta
    assert len(meta.list_refs()) == 160
    assert len(meta.parents(digest_bytes(b"shared"))) == 160


# -- locks -----------------------------------------------------------------------------------------
_TRY_LOCK = r"""
import sys
from imagevol.errors import StoreError
from imagevol.store import Store
try:
    with Store(sys.argv[1]).lock(sys.argv[2], shared=sys.argv[3] == "shared", blocking=False):
        print("got")
except StoreError:
    print("busy")
"""


def _try_lock(root, name: str, shared: bool) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(root), name, "shared" if shared else "excl"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_named_locks_across_processes(tmp_path):
    store = Store(tmp_path)
    with store.lock("gc"):
        assert _try_lock(tmp_path, "gc", shared=False) == "busy"
        assert _try_lock(tmp_path, "gc", shared=True) == "busy"
        assert _try_lock(tmp_path, "other", shared=False) == "got"
    assert _try_lock(tmp_path, "gc", shared=False) == "got"
    with store.lock("gc", shared=True):
        assert _try_lock(tmp_path, "gc", shared=True) == "got"
        assert _try_lock(tmp_path, "gc", shared=False) == "busy"
    assert (store.root / "locks" / "gc.lock").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_lock_names_are_validated(tmp_path, name):
    with pytest.raises(UsageError), Store(tmp_path).lock(name):
        pass


# -- gc --------------------------------------------------------------------------------------------
def _image(store: Store, tag: bytes):
    """Store config + 2 layers + a manifest naming them; returns (manifest, [config, layers...])."""
    config = store.put_bytes(b'{"c":"' + tag + b'"}')
    layers = [store.put_bytes(b"layer-" + tag + bytes([i])) for i in range(2)]
    manifest = store.put_bytes(_manifest(config, layers))
    return manifest, [config, *layers]


def test_gc_keeps_what_is_referenced_and_removes_the_rest(tmp_path):
    store = Store(tmp_path)
    meta = store.meta
    # ref'd manifest with recorded children
    m1, kids1 = _image(store, b"ref")
    meta.set_ref("r/a:1", m1, media_type=mt.OCI_MANIFEST)
    meta.set_children(m1, kids1)
    # ref'd index -> manifest, children known only from the JSON
    m2, kids2 = _image(store, b"idx")
    index = store.put_bytes(
        json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [{"digest": m2}]}).encode()
    )
    meta.set_ref("r/b:1", index, media_type=mt.OCI_INDEX)
    # volume lease, live pull lease, dead pull lease, expired lease
    leased = store.put_bytes(b"leased by a volume")
    meta.add_lease("vol", [leased], kind="volume")
    pulling, pull_kids = _image(store, b"pull")
    meta.set_children(pulling, pull_kids)
    meta.add_lease("pull-live", [pulling], kind="pull", pid=os.getpid())
    dead = store.put_bytes(b"dead pull")
    meta.add_lease("pull-dead", [dead], kind="pull", pid=_dead_pid())
    expired = store.put_bytes(b"expired lease")
    meta.add_lease("old", [expired], kind="volume", expires_at=time.time() - 10)
    # volume record, snapshot in use, snapshot building, ready snapshot not in use
    vol_m = store.put_bytes(b"volume manifest")
    meta.add_volume("v1", "/mnt/v1", None, vol_m, "snap-used", "overlay")
    used = store.put_bytes(b"snapshot used")
    meta.set_snapshot("snap-used", "/s/u", "ready", digest=used)
    building = store.put_bytes(b"snapshot building")
    meta.set_snapshot("snap-b", "/s/b", "building", digest=building)
    idle = store.put_bytes(b"snapshot idle")
    meta.set_snapshot("snap-idle", "/s/i", "ready", digest=idle)
    # garbage
    orphan_m, orphan_kids = _image(store, b"orphan")
    meta.set_children(orphan_m, orphan_kids)
    loose = store.put_bytes(b"loose")

    keep = {m1, *kids1, index, m2, *kids2, leased, pulling, *pull_kids, vol_m, used, building}
    garbage = {dead, expired, idle, orphan_m, *orphan_kids, loose}
    sizes = {d: store.blob_size(d) for d in garbage}

    dry = gc(store, dry_run=True)
    assert isinstance(dry, GcResult) and dry.dry_run
    assert set(dry.removed) == garbage
    assert dry.bytes_freed == sum(sizes.values())
    assert all(store.has_blob(d) for d in keep | garbage)  # dry run removed nothing
    assert {lease.id for lease in meta.leases()} >= {"pull-dead", "old"}

    res = gc(store)
    assert set(res.removed) == garbage and res.bytes_freed == sum(sizes.values())
    assert res.kept == len(keep)
    assert sorted(res.expired_leases) == ["old", "pull-dead"]
    assert all(store.has_blob(d) for d in keep)
    assert not any(store.has_blob(d) for d in garbage)
    assert {lease.id for lease in meta.leases()} == {"vol", "pull-live"}
    assert meta.children(orphan_m) == []
    assert meta.children(m1) == kids1

    again = gc(store)
    assert again.removed == [] and again.bytes_freed == 0


def test_gc_removes_stale_ingests_whose_lock_is_free(tmp_path):
    store = Store(tmp_path)
    old = time.time() - 48 * 3600
    stale_d, busy_d, fresh_d = digest_bytes(b"stale"), digest_bytes(b"busy"), digest_bytes(b"fresh")
    with store.ingest(stale_d, 5) as ing:
        ing.write_at(0, b"st")
        ing.mark_complete(0, 2)
        stale_dir = ing.dir
    with store.ingest(fresh_d, 5) as ing:
        fresh_dir = ing.dir
    busy = store.ingest(busy_d, 4)
    busy_dir = busy.dir
    tmpfile = store.root / "ingest" / "put-1-2-abc.tmp"
    tmpfile.write_bytes(b"x")
    for d in (stale_dir, busy_dir):
        for p in [d, *d.iterdir()]:
            os.utime(p, (old, old))
    os.utime(tmpfile, (old, old))

    dry = gc(store, dry_run=True)
    assert sorted(dry.removed_ingests) == sorted([stale_dir.name, tmpfile.name])
    assert stale_dir.exists() and tmpfile.exists()

    res = gc(store)
    assert sorted(res.removed_ingests) == sorted([stale_dir.name, tmpfile.name])
    assert not stale_dir.exists() and not tmpfile.exists()
    assert busy_dir.exists() and fresh_dir.exists()
    # the live ingest is intact and still commits
    busy.write_at(0, b"busy")
    busy.commit()
    assert store.has_blob(busy_d)


def test_gc_takes_the_gc_lock(tmp_path):
    store = Store(tmp_path)
    with store.lock("gc", shared=True), pytest.raises(StoreError):
        gc(store, blocking=False)


# -- fsck ------------------------------------------------------------------------------------------
def test_fsck_clean_store(tmp_path):
    store = Store(tmp_path)
    m, kids = _image(store, b"ok")
    store.meta.set_ref("r/ok:1", m, media_type=mt.OCI_MANIFEST)
    store.meta.set_children(m, kids)
    res = fsck(store)
    assert isinstance(res, FsckResult)
    assert res.ok and res.checked == 4 and res.bytes_checked > 0


def test_fsck_detects_flipped_byte_and_repair_quarantines(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(3 * (1 << 20) + 5)
    with store.ingest(digest_bytes(data), len(data)) as ing:
        ing.write_at(0, data)
        ing.commit()
    d = digest_bytes(data)
    m = store.put_bytes(_manifest(store.put_bytes(b"{}"), [d]))
    store.meta.set_ref("r/x:1", m, media_type=mt.OCI_MANIFEST)
    store.meta.set_children(m, [d])
    store.meta.set_ref("r/direct:1", d, media_type=mt.OCI_LAYER)

    path = store.blob_path(d)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(2_000_000)
        b = f.read(1)
        f.seek(2_000_000)
        f.write(bytes([b[0] ^ 0x01]))
    os.chmod(path, 0o444)

    res = fsck(store)
    assert not res.ok and res.corrupted == [d]
    assert res.quarantined == [] and store.has_blob(d)  # report only

    fixed = fsck(store, repair=True)
    assert fixed.corrupted == [d] and fixed.quarantined == [d]
    assert not store.has_blob(d)
    q = list((store.root / "quarantine" / "sha256").iterdir())
    assert len(q) == 1 and q[0].name.startswith(d.hex)
    assert fixed.dangling_refs == ["r/direct:1"] and fixed.removed_refs == ["r/direct:1"]
    assert store.meta.get_ref("r/direct:1") is None
    assert store.meta.get_ref("r/x:1") is not None
    assert fixed.missing_children == [(m, d)]  # reported, so a re-pull can fetch it

    after = fsck(store)
    assert after.corrupted == [] and after.missing_children == [(m, d)]


def test_fsck_wrong_perms_stray_files_and_dangling_children(tmp_path):
    store = Store(tmp_path)
    d = store.put_bytes(b"perm")
    os.chmod(store.blob_path(d), 0o644)
    (store.root / "blobs" / "sha256" / "not-a-digest").write_bytes(b"?")
    gone = digest_bytes(b"never stored")
    store.meta.set_children(gone, [d])
    res = fsck(store)
    assert res.wrong_perms == [d]
    assert res.stray_files == [os.path.join("blobs", "sha256", "not-a-digest")]
    assert res.corrupted == []
    fixed = fsck(store, repair=True)
    assert fixed.fixed_perms == [d]
    assert stat.S_IMODE(store.blob_path(d).stat().st_mode) == 0o444
    assert fixed.removed_children_of == [gone]
    assert store.meta.children(gone) == []


def test_hold_keeps_content_from_gc_and_lets_go_on_the_way_out(tmp_path):
    """Store.hold is the one gc-lock-plus-lease: gc waits while it is held, the lease names the
    digests, and it is gone afterwards even when the block raises."""
    import threading

    store = Store(tmp_path)
    d = store.put_bytes(b"held content")
    ran = threading.Event()
    with store.hold([d], kind="mount") as lease:
        assert [x.roots for x in store.meta.leases() if x.id == lease] == [(d,)]
        t = threading.Thread(target=lambda: (gc(store), ran.set()))
        t.start()
        assert not ran.wait(0.5), "gc ran while the content was held"
    t.join(10)
    assert ran.is_set()
    assert not store.meta.leases()
    with pytest.raises(RuntimeError), store.hold([d]):
        raise RuntimeError("boom")
    assert not store.meta.leases()
