"""Extraction while pulling (`imagevol mount` of an image not yet in the store), end to end through
the fault-injecting proxy: the largest layer is applied as it downloads, still lands verified in
the store, and a wrong, cut or refused stream leaves no snapshot and no volume behind."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.clirun import Imagevol, content_ok, refused
from tests.support.proxy import Fault, Proxy
from tests.support.registry import Registry
from tests.support.tars import E, gz, push_image, tar_layer

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def tar_member(layer: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


class Img:
    def __init__(self, registry: Registry, repo: str, layers: list[bytes], files: dict[str, bytes]) -> None:
        self.repo = repo
        self.digest = push_image(oci.Client(registry), repo, "v1", layers)
        self.blobs = [oci.sha256_digest(gz(raw)) for raw in layers]
        self.files = files

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:v1"


@pytest.fixture(scope="module")
def image(registry: Registry) -> Img:
    """A small base layer, then a bigger one that replaces a file and deletes another (whiteout)."""
    base = tar_layer([E("etc", kind="dir"), E("etc/keep.txt", b"keep"), E("etc/gone.txt", b"gone"), E("w.bin", b"old")])
    weights = os.urandom(12 * MiB + 77)
    top = tar_layer([E("w.bin", weights), E("etc/.wh.gone.txt", b""), E("tok/vocab.json", b'{"a": 1}')])
    files = {"etc/keep.txt": b"keep", "w.bin": weights, "tok/vocab.json": b'{"a": 1}'}
    return Img(registry, "stream/model", [base, top], files)


@pytest.fixture(scope="module")
def bomb(registry: Registry) -> Img:
    """4 MiB of zeros (gzip shrinks them about 1000 times: refused under --max-ratio 2 within the
    first MiB) ahead of 6 MiB of random bytes that keep the download going for seconds when paced."""
    files = {"a-zeros.bin": bytes(4 * MiB), "b-random.bin": os.urandom(6 * MiB)}
    return Img(registry, "stream/bomb", [tar_layer([E(n, d) for n, d in sorted(files.items())])], files)


def _nothing_left(iv: Imagevol, target: Path) -> None:
    assert iv.volumes() == []
    assert iv.snapshot_dirs() == []
    assert not target.exists() or not any(target.iterdir())
    iv.fsck()


def test_largest_layer_is_extracted_while_it_downloads(image: Img, px: Proxy, iv: Imagevol, tmp_path: Path) -> None:
    doc = iv.mount_ok(image.ref(px.host), tmp_path / "a")
    assert doc["streamedLayers"] == [image.blobs[1]]
    assert content_ok(tmp_path / "a", image.files)
    # The streamed blob went to the store like any other: verified, and one GET brought it.
    for d in image.blobs:
        assert iv.blob(d).is_file()
        assert oci.sha256_digest(iv.blob(d).read_bytes()) == d
    assert len(px.requests_for(image.blobs[1])) == 1
    iv.fsck()
    # A second mount finds everything in the store: nothing streamed, nothing fetched.
    before = len(px.requests)
    again = iv.mount_ok(image.ref(px.host), tmp_path / "b")
    assert again["streamedLayers"] == [] and again["snapshotCreated"] is False
    assert len(px.requests) == before
    assert content_ok(tmp_path / "b", image.files)


def test_a_streamed_layer_listed_twice(registry: Registry, px: Proxy, iv: Imagevol, tmp_path: Path) -> None:
    """The largest layer appears twice in the manifest: streamed once, then read from the store."""
    base = tar_layer([E("a.txt", b"a")])
    top = tar_layer([E("w.bin", os.urandom(3 * MiB))])
    img = Img(registry, "stream/twice", [base, top, top], {"a.txt": b"a", "w.bin": tar_member(top, "w.bin")})
    doc = iv.mount_ok(img.ref(px.host), tmp_path / "a")
    assert doc["streamedLayers"] == [img.blobs[1]]
    assert content_ok(tmp_path / "a", img.files)
    iv.fsck()


def test_wrong_bytes_in_the_streamed_layer_leave_nothing(image: Img, px: Proxy, iv: Imagevol, tmp_path: Path) -> None:
    px.fault = Fault(match=image.blobs[1], wrong_bytes=True, flip_offset=5 * MiB + 3)
    r = iv.mount(image.ref(px.host), tmp_path / "a")
    refused(r, 4)
    assert "digest" in r.stderr.lower()
    assert px.fault_hits >= 1
    assert not iv.blob(image.blobs[1]).exists()
    _nothing_left(iv, tmp_path / "a")
    px.fault = None
    doc = iv.mount_ok(image.ref(px.host), tmp_path / "a")
    assert content_ok(tmp_path / "a", image.files) and doc["streamedLayers"] == [image.blobs[1]]


@pytest.mark.parametrize("ignore_range", [False, True], ids=["range-honoured", "range-ignored"])
def test_cut_stream_resumes_without_repeating_bytes_to_the_extractor(
    image: Img, px: Proxy, iv: Imagevol, tmp_path: Path, ignore_range: bool
) -> None:
    """Cut after 1 MiB; the retry asks for the rest with Range. A server that ignores Range sends
    the whole blob again: the extractor must still see each byte once (the result would differ)."""
    px.fault = Fault(match=image.blobs[1], truncate_after=MiB + 5, ignore_range=ignore_range, times=2)
    doc = iv.mount_ok(image.ref(px.host), tmp_path / "a", "--retries", "4")
    assert px.fault_hits == 2
    reqs = px.requests_for(image.blobs[1])
    assert len(reqs) >= 2 and any(q.range for q in reqs)
    if ignore_range:
        assert any(q.range and q.status == 200 for q in reqs), reqs
    assert doc["streamedLayers"] == [image.blobs[1]]
    assert content_ok(tmp_path / "a", image.files)
    assert oci.sha256_digest(iv.blob(image.blobs[1]).read_bytes()) == image.blobs[1]
    iv.fsck()


def test_refused_layer_stops_the_pull_and_leaves_nothing(bomb: Img, px: Proxy, iv: Imagevol, tmp_path: Path) -> None:
    """The extractor refuses the layer early; the download still under way is cancelled rather
    than finished (the proxy, paced at 1 MiB/s, sent well under the blob's size)."""
    digest = bomb.blobs[0]
    size = len(gz(tar_layer([E(n, d) for n, d in sorted(bomb.files.items())])))
    px.rate_limit = MiB
    r = iv.mount(bomb.ref(px.host), tmp_path / "a", "--max-ratio", "2")
    refused(r, 4)
    assert "max_ratio" in r.stderr
    assert px.bytes_for(digest) < size * 0.75, (px.bytes_for(digest), size)
    assert not iv.blob(digest).exists()
    _nothing_left(iv, tmp_path / "a")
    px.rate_limit = None
    doc = iv.mount_ok(bomb.ref(px.host), tmp_path / "a")
    assert content_ok(tmp_path / "a", bomb.files) and doc["snapshotCreated"] is True


def test_stream_false_builds_the_same_snapshot(image: Img, registry: Registry, tmp_path: Path) -> None:
    """The library's `stream=False` (pull everything, then extract) gives the same tree."""
    import imagevol
    from imagevol.registry.transport import RegistryOptions

    opts = RegistryOptions()
    a = imagevol.mount(image.ref(registry.host), str(tmp_path / "a"), root=tmp_path / "s1", options=opts, mode="copy")
    b = imagevol.mount(
        image.ref(registry.host), str(tmp_path / "b"), root=tmp_path / "s2", options=opts, mode="copy", stream=False
    )
    assert a.streamed == [image.blobs[1]] and b.streamed == []
    assert a.snapshot.key == b.snapshot.key
    assert content_ok(tmp_path / "a", image.files) and content_ok(tmp_path / "b", image.files)
    imagevol.unmount(str(tmp_path / "a"), root=tmp_path / "s1")
    imagevol.unmount(str(tmp_path / "b"), root=tmp_path / "s2")
