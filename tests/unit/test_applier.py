"""The layer applier on well-formed layers: files, dirs, links, metadata, compression, whiteouts."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from imagevol.errors import ContentRefusedError, UnsafeContentError, UsageError
from imagevol.unpack.applier import ApplyOptions, ApplyStats, apply_layer
from imagevol.unpack.compression import open_decompressed, sniff
from tests.support.need import IS_ROOT, root_only

MiB = 1 << 20


# -- layer building (tarfile *writing*; extraction is the applier's job) ----------------------------


def F(name, data=b"", mode=0o644, **kw):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    return _set(ti, kw), io.BytesIO(data)


def D(name, mode=0o755, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, mode
    return _set(ti, kw), None


def S(name, target, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
    return _set(ti, kw), None


def H(name, target, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    return _set(ti, kw), None


def DEV(name, typ=tarfile.CHRTYPE, major=1, minor=3, mode=0o666):
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor, ti.mode = typ, major, minor, mode
    return ti, None


def _set(ti, kw):
    ti.mtime = kw.pop("mtime", 1_600_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def layer(*entries, fmt=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=pax_headers) as tf:
        for ti, data in entries:
            tf.addfile(ti, data)
    return buf.getvalue()


def raw_header(name: bytes, typ: bytes, size: int = 0, linkname: bytes = b"", mode: int = 0o644) -> bytes:
    """One ustar header block, hand-made (for types tarfile cannot write)."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % 1_600_000_000
    h[156:157] = typ
    h[157 : 157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def apply(root, data: bytes, **kw) -> ApplyStats:
    return apply_layer(root, io.BytesIO(data), **kw)


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def mode_of(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# -- files, directories, links, metadata -----------------------------------------------------------


def test_files_dirs_modes_and_mtimes(root):
    data = layer(
        D("usr", mtime=1000),
        D("usr/bin", 0o755, mtime=2000),
        F("usr/bin/tool", b"#!/bin/sh\n", 0o755, mtime=3000),
        F("usr/bin/su", b"suid", 0o4755, mtime=3000),
        D("usr/share", 0o2775, mtime=4000),
        D("tmp", 0o1777, mtime=5000),
        F("tmp/x", b"", 0o600),
        F("etc/conf", b"implied parent", 0o640),
    )
    stats = apply(root, data)
    assert (root / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
    assert mode_of(root / "usr/bin/tool") == 0o755
    assert mode_of(root / "usr/bin/su") == 0o4755
    assert mode_of(root / "usr/share") == 0o2775
    assert mode_of(root / "tmp") == 0o1777
    assert mode_of(root / "tmp/x") == 0o600
    assert mode_of(root / "etc") == 0o755  # implied parent
    assert mode_of(root / "etc/conf") == 0o640
    # directory mtimes are set after their children were written
    assert os.stat(root / "usr").st_mtime == 1000
    assert os.stat(root / "usr/bin").st_mtime == 2000
    assert os.stat(root / "tmp").st_mtime == 5000
    assert os.stat(root / "usr/bin/tool").st_mtime == 3000
    assert (stats.files, stats.dirs, stats.bytes) == (4, 4, len("#!/bin/sh\n") + 4 + 14)
    assert stats.skipped == []


def test_root_directory_entry_sets_root_metadata(root):
    apply(root, layer(D("./", 0o750, mtime=1234), F("./a", b"a")))
    assert mode_of(root) == 0o750
    assert os.stat(root).st_mtime == 1234
    assert (root / "a").read_bytes() == b"a"


def test_symlinks_are_stored_verbatim(root):
    apply(
        root,
        layer(
            S("abs", "/etc/passwd", mtime=777),
            S("rel", "../x/y"),
            S("dangling", "nowhere"),
            D("bin"),
            S("bin/sh", "busybox"),
        ),
    )
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "rel") == "../x/y"
    assert os.readlink(root / "dangling") == "nowhere"
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.lstat(root / "abs").st_mtime == 777


def test_hardlinks_share_the_inode(root):
    stats = apply(
        root,
        layer(
            F("bin/busybox", b"bb", 0o755),
            H("bin/sh", "bin/busybox"),
            H("/bin/ls", "/bin/busybox"),
            H("./bin/cat", "./bin/../bin/busybox"),
        ),
    )
    ino = os.stat(root / "bin/busybox").st_ino
    for name in ("sh", "ls", "cat"):
        assert os.stat(root / "bin" / name).st_ino == ino
    assert os.stat(root / "bin/busybox").st_nlink == 4
    assert stats.hardlinks == 3


def test_hardlink_to_a_symlink_links_the_symlink(root):
    apply(root, layer(F("target", b"t"), S("link", "target"), H("link2", "link")))
    assert os.path.islink(root / "link2")
    assert os.lstat(root / "link2").st_ino == os.lstat(root / "link").st_ino
    assert os.readlink(root / "link2") == "target"


def test_hardlink_to_a_lower_layer_file(root):
    apply(root, layer(F("lib/libc.so", b"libc")))
    apply(root, layer(H("lib/libc.so.6", "lib/libc.so")))
    assert os.stat(root / "lib/libc.so.6").st_ino == os.stat(root / "lib/libc.so").st_ino


def test_setuid_strip_policy(root):
    data = layer(F("su", b"x", 0o4755), F("wall", b"x", 0o2755), D("shared", 0o2775))
    apply(root, data, options=ApplyOptions(setuid="strip"))
    assert mode_of(root / "su") == 0o755
    assert mode_of(root / "wall") == 0o755
    assert mode_of(root / "shared") == 0o2775  # setgid on a directory only sets group inheritance


def test_duplicates_last_wins(root):
    apply(root, layer(F("a", b"first"), F("a", b"second"), S("b", "x"), F("b", b"file"), D("c"), F("c", b"f")))
    assert (root / "a").read_bytes() == b"second"
    assert (root / "b").read_bytes() == b"file"
    assert (root / "c").read_bytes() == b"f"


def test_duplicates_refuse_policy(root):
    with pytest.raises(UnsafeContentError, match="twice"):
        apply(root, layer(F("a", b"1"), F("a", b"2")), options=ApplyOptions(duplicates="refuse"))
    # a directory listed twice is not a conflict
    apply(root, layer(D("d"), F("d/x"), D("d")), options=ApplyOptions(duplicates="refuse"))


def test_invalid_policy_is_a_usage_error():
    with pytest.raises(UsageError):
        ApplyOptions(devices="maybe")
    with pytest.raises(UsageError):
        ApplyOptions(duplicates="first")


# -- replacing content of lower layers ------------------------------------------------------------


def test_dir_over_dir_keeps_children_and_takes_metadata(root):
    apply(root, layer(D("d", 0o755), F("d/lower", b"l")))
    apply(root, layer(D("d", 0o700, mtime=42), F("d/upper", b"u")))
    assert sorted(os.listdir(root / "d")) == ["lower", "upper"]
    assert mode_of(root / "d") == 0o700
    assert os.stat(root / "d").st_mtime == 42


def test_file_over_symlink_replaces_the_link(root, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    apply(root, layer(S("link", str(victim)), F("target", b"t"), S("rel", "target")))
    apply(root, layer(F("link", b"new"), F("rel", b"new2")))
    assert not os.path.islink(root / "link")
    assert (root / "link").read_bytes() == b"new"
    assert (root / "rel").read_bytes() == b"new2"
    assert (root / "target").read_bytes() == b"t"
    assert victim.read_bytes() == b"untouched"


def test_non_dir_over_lower_dir_removes_the_dir(root):
    apply(root, layer(D("d"), D("d/sub"), F("d/sub/f", b"x"), S("d/l", "/")))
    apply(root, layer(F("d", b"now a file")))
    assert (root / "d").read_bytes() == b"now a file"


def test_dir_over_lower_file_and_symlink(root):
    apply(root, layer(F("a", b"x"), S("b", "/")))
    apply(root, layer(D("a"), D("b"), F("b/inside", b"i")))
    assert (root / "a").is_dir() and not os.path.islink(root / "b")
    assert (root / "b/inside").read_bytes() == b"i"


def test_file_over_lower_hardlink_does_not_change_the_other_name(root):
    apply(root, layer(F("a", b"shared"), H("b", "a")))
    apply(root, layer(F("b", b"replaced")))
    assert (root / "a").read_bytes() == b"shared"
    assert (root / "b").read_bytes() == b"replaced"


# -- whiteouts -------------------------------------------------------------------------------------


def test_whiteouts_remove_lower_layer_entries(root):
    apply(root, layer(D("a"), F("a/b", b"b"), F("a/c", b"c"), D("d"), F("d/e"), S("s", "a")))
    stats = apply(root, layer(F("a/.wh.b"), F(".wh.d"), F(".wh.s"), F(".wh.never-existed")))
    assert sorted(os.listdir(root)) == ["a"]
    assert os.listdir(root / "a") == ["c"]
    assert stats.whiteouts == 4
    assert stats.files == 0


def test_opaque_directory_hides_lower_children_only(root):
    apply(root, layer(D("x"), F("x/old"), D("x/sub"), F("x/sub/deep"), F("keep")))
    apply(root, layer(D("x"), F("x/new1"), F("x/.wh..wh..opq"), F("x/new2")))
    assert sorted(os.listdir(root / "x")) == ["new1", "new2"]
    assert (root / "keep").exists()


def test_opaque_marker_first(root):
    apply(root, layer(D("x"), F("x/old")))
    apply(root, layer(F("x/.wh..wh..opq"), F("x/new")))
    assert os.listdir(root / "x") == ["new"]


def test_opaque_keeps_this_layers_subtree_but_not_lower_content_in_it(root):
    apply(root, layer(D("x"), D("x/sub"), F("x/sub/lower"), F("x/other")))
    apply(root, layer(F("x/sub/upper"), F("x/.wh..wh..opq")))
    assert os.listdir(root / "x") == ["sub"]
    assert os.listdir(root / "x/sub") == ["upper"]


def test_file_and_its_whiteout_in_one_layer_keep_the_file(root):
    apply(root, layer(F("f", b"lower"), F("g", b"lower")))
    apply(root, layer(F("f", b"upper"), F(".wh.f"), F(".wh.g"), F("g", b"upper")))
    assert (root / "f").read_bytes() == b"upper"
    assert (root / "g").read_bytes() == b"upper"


def test_whiteout_of_a_dir_this_layer_also_writes(root):
    apply(root, layer(D("x"), F("x/lower")))
    apply(root, layer(D("x"), F("x/upper"), F(".wh.x")))
    assert os.listdir(root / "x") == ["upper"]


def test_aufs_metadata_entries_are_skipped(root):
    stats = apply(root, layer(F(".wh..wh.plnk/123.456"), D(".wh..wh.aufs")))
    assert os.listdir(root) == []
    assert len(stats.skipped) == 2 and all("AUFS" in w for w in stats.skipped)


def test_whiteout_names_refused_in_artifact_layers(root):
    with pytest.raises(UnsafeContentError, match="whiteout"):
        apply(root, layer(F("data/.wh.x")), options=ApplyOptions(whiteouts=False))
    apply(root, layer(F("data/model.bin", b"w")), options=ApplyOptions(whiteouts=False))
    assert (root / "data/model.bin").read_bytes() == b"w"


# -- tar formats -----------------------------------------------------------------------------------


def test_gnu_long_names_and_long_link_names(root):
    long_dir = "d" * 90 + "/" + "e" * 90
    long_file = long_dir + "/" + "f" * 120
    data = layer(
        F(long_file, b"long"),
        S("sym", "/" + long_file),
        H("hard" + "h" * 110, long_file),
        fmt=tarfile.GNU_FORMAT,
    )
    assert b"././@LongLink" in data
    apply(root, data)
    assert (root / long_file).read_bytes() == b"long"
    assert os.readlink(root / "sym") == "/" + long_file
    assert os.stat(root / ("hard" + "h" * 110)).st_ino == os.stat(root / long_file).st_ino


def test_pax_headers(root):
    long_file = "p" * 150 + "/ünïcødé-" + "q" * 130
    xattr_entry = F("x", b"x")
    xattr_entry[0].pax_headers = {"SCHILY.xattr.user.origin": "imagevol"}
    data = layer(
        F(long_file, b"pax", mtime=1_700_000_000.5),
        S("l" * 120, "t" * 300),
        F("big-ids", b"", uid=3_000_000, gid=4_000_000),
        xattr_entry,
        pax_headers={"comment": "a global header, as git archive writes"},
    )
    stats = apply(root, data)
    assert (root / long_file).read_bytes() == b"pax"
    assert os.stat(root / long_file).st_mtime_ns == 1_700_000_000_500_000_000
    assert os.readlink(root / ("l" * 120)) == "t" * 300
    assert sorted(os.listdir(root)) == sorted(["p" * 150, "l" * 120, "big-ids", "x"])
    if IS_ROOT:
        st = os.stat(root / "big-ids")
        assert (st.st_uid, st.st_gid) == (3_000_000, 4_000_000)
        assert os.getxattr(root / "x", "user.origin") == b"imagevol"
    assert stats.skipped == []


def test_pax_global_headers_are_ignored_like_containerd_does(root):
    data = layer(F("a", b"a"), F("b", b"b"), pax_headers={"path": "evil", "mtime": "5"})
    apply(root, data)
    assert sorted(os.listdir(root)) == ["a", "b"]
    assert os.stat(root / "a").st_mtime == 1_600_000_000


def test_security_xattrs_are_skipped_with_a_warning(root):
    entry = F("ping", b"x", 0o755)
    entry[0].pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}
    warnings: list[str] = []
    stats = apply(root, layer(entry), warn=warnings.append)
    assert warnings == stats.skipped
    assert any("security.capability" in w for w in warnings)


def test_ustar_prefix_field(root):
    name = "a" * 120 + "/" + "b" * 50
    data = layer(F(name, b"ustar"), fmt=tarfile.USTAR_FORMAT)
    apply(root, data)
    assert (root / name).read_bytes() == b"ustar"


def test_old_style_directory_entry(root):
    data = raw_header(b"olddir/", b"\0", mode=0o755) + bytes(1024)
    apply(root, data)
    assert (root / "olddir").is_dir()


def test_unknown_and_sparse_entries_are_skipped_with_a_warning(root):
    data = (
        raw_header(b"sparse", b"S", size=512)
        + bytes(512)
        + raw_header(b"weird", b"Z", size=3)
        + b"abc".ljust(512, b"\0")
        + raw_header(b"after", b"0", size=2)
        + b"ok".ljust(512, b"\0")
        + bytes(1024)
    )
    stats = apply(root, data)
    assert os.listdir(root) == ["after"]
    assert (root / "after").read_bytes() == b"ok"
    assert len(stats.skipped) == 2


def test_empty_layers(root):
    assert apply(root, b"").files == 0
    assert apply(root, bytes(1024)).files == 0
    assert apply(root, gzip.compress(bytes(1024)), compression="gzip").files == 0


def test_not_a_tar_is_refused(root):
    with pytest.raises(ContentRefusedError, match="not a valid tar"):
        apply(root, b"this is not a tar archive".ljust(1024, b"!"))


def test_truncated_tar_is_refused(root):
    data = layer(F("big", b"x" * 5000))
    with pytest.raises(ContentRefusedError, match="end of data"):
        apply(root, data[:2048])


# -- compression -----------------------------------------------------------------------------------


def test_sniff():
    assert sniff(b"\x1f\x8b\x08\x00") == "gzip"
    assert sniff(b"\x28\xb5\x2f\xfd") == "zstd"
    assert sniff(b"ustar") == "none"
    assert sniff(b"") == "none"
    assert sniff(b"\x1f") == "none"


COMPRESSORS = {
    "none": lambda b: b,
    "gzip": gzip.compress,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
}


@pytest.mark.parametrize("declared", ["declared", "sniffed"])
@pytest.mark.parametrize("comp", sorted(COMPRESSORS))
def test_compressed_layers(root, comp, declared):
    data = COMPRESSORS[comp](layer(D("d"), F("d/f", b"content" * 1000)))
    apply(root, data, compression=comp if declared == "declared" else None)
    assert (root / "d/f").read_bytes() == b"content" * 1000


def test_docker_plain_tar_media_type_with_gzip_bytes(root):
    # rootfs.diff.tar is sometimes gzip: the caller passes compression=None and the bytes decide
    apply(root, gzip.compress(layer(F("f", b"gz"))), compression=None)
    assert (root / "f").read_bytes() == b"gz"


def test_multi_member_gzip_and_multi_frame_zstd():
    a, b = b"a" * 70000, b"b" * 70000
    gz = gzip.compress(a) + gzip.compress(b)
    assert open_decompressed(io.BytesIO(gz), "gzip").read() == a + b
    z = zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b)
    assert open_decompressed(io.BytesIO(z)).read() == a + b


@pytest.mark.parametrize(
    "blob",
    [gzip.compress(b"x" * 1000)[:-4], gzip.compress(b"x") + b"trailing junk", b"\x1f\x8bnot gzip at all"],
    ids=["truncated", "trailing-garbage", "corrupt"],
)
def test_bad_gzip_is_refused(blob):
    with pytest.raises(ContentRefusedError, match="gzip"):
        open_decompressed(io.BytesIO(blob), "gzip").read()


def test_unsupported_compression():
    with pytest.raises(ContentRefusedError, match="unsupported"):
        open_decompressed(io.BytesIO(b""), "bzip2")


def _zero_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        ti = tarfile.TarInfo("zeros")
        ti.size = size
        header = ti.tobuf(tarfile.PAX_FORMAT)
        gz.write(header)
        chunk = bytes(MiB)
        for _ in range(size // MiB):
            gz.write(chunk)
        gz.write(bytes(1024))
    return buf.getvalue()


def test_decompression_bomb_limits(root):
    bomb = _zero_bomb(64 * MiB)
    assert len(bomb) < MiB
    with pytest.raises(ContentRefusedError, match="max_ratio") as exc:
        apply(root, bomb, options=ApplyOptions(max_ratio=100))
    assert "raise the limit" in (exc.value.hint or "")
    assert exc.value.exit_code == 4
    with pytest.raises(ContentRefusedError, match="max_size=1048576"):
        apply(root, bomb, options=ApplyOptions(max_size=MiB))
    # zstd: a few bytes that expand enormously; the limit stops it long before the end
    z = zstandard.ZstdCompressor(level=19).compress(bytes(256 * MiB))
    with pytest.raises(ContentRefusedError, match="max_size"):
        open_decompressed(io.BytesIO(z), max_size=8 * MiB).read()
    # within the limits
    stats = apply(root, bomb, options=ApplyOptions(max_ratio=2000, max_size=65 * MiB))
    assert stats.bytes == 64 * MiB


# -- large files are streamed ----------------------------------------------------------------------


class _PatternReader(io.RawIOBase):
    """`size` bytes of a position-dependent pattern with zero runs, generated on the fly."""

    def __init__(self, size: int) -> None:
        self.size, self.pos = size, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.size - self.pos)
        block = self.pos // MiB
        # a MiB of zeros every 4 MiB (becomes a hole), else a pattern
        pattern = hashlib.sha256(str(block).encode()).digest() * (n // 32 + 1)
        b[:n] = bytes(n) if block % 4 == 1 else pattern[:n]
        self.pos += n
        return n


class _RecordingReader(io.RawIOBase):
    def __init__(self, f):
        self.f, self.max_read = f, 0

    def readable(self):
        return True

    def readinto(self, b):
        self.max_read = max(self.max_read, len(b))
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("direct", ["1", "0"], ids=["direct", "page-cache"])
def test_large_file_is_streamed_in_chunks(root, tmp_path, monkeypatch, direct):
    """A large file is extracted in bounded pieces, written around the page cache (O_DIRECT,
    through aligned buffers) or through it, with its runs of zeros left as holes."""
    monkeypatch.setenv("IMAGEVOL_DIRECT_IO", direct)
    size = 64 * MiB + 12345
    blob = tmp_path / "layer.tar"
    with blob.open("wb") as out, tarfile.open(fileobj=out, mode="w|") as tf:
        ti = tarfile.TarInfo("models/weights.bin")
        ti.size = size
        tf.addfile(ti, io.BufferedReader(_PatternReader(size), MiB))
    expected = hashlib.sha256()
    src = _PatternReader(size)
    while chunk := src.read(MiB):
        expected.update(chunk)
    with blob.open("rb", buffering=0) as f:
        rec = _RecordingReader(f)
        stats = apply_layer(root, rec, compression="none")
    assert stats.bytes == size
    assert rec.max_read <= MiB  # the input is read in bounded pieces, never whole
    got = hashlib.sha256()
    with (root / "models/weights.bin").open("rb") as f:
        while chunk := f.read(MiB):
            got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()
    st = os.stat(root / "models/weights.bin")
    assert st.st_size == size
    assert st.st_blocks * 512 <= size - 15 * MiB  # 16 MiB of zero runs: holes, not written zeros


def test_trailing_zeros_make_a_full_size_file(root):
    apply(root, layer(F("z", b"x" + bytes(3 * MiB))))
    assert os.stat(root / "z").st_size == 3 * MiB + 1
    with (root / "z").open("rb") as f:
        assert f.read(1) == b"x" and f.read() == bytes(3 * MiB)


# -- ownership and devices -------------------------------------------------------------------------


@root_only("chown")
def test_ownership_is_kept_when_root(root):
    apply(
        root,
        layer(
            D("home", uid=0, gid=0),
            D("home/u", 0o700, uid=1000, gid=1000),
            F("home/u/f", b"x", uid=1000, gid=100),
            S("home/u/l", "f", uid=1001, gid=1002),
            F("home/u/suid", b"x", 0o4755, uid=1000, gid=1000),
        ),
    )
    assert (os.stat(root / "home/u").st_uid, os.stat(root / "home/u").st_gid) == (1000, 1000)
    assert (os.stat(root / "home/u/f").st_uid, os.stat(root / "home/u/f").st_gid) == (1000, 100)
    lst = os.lstat(root / "home/u/l")
    assert (lst.st_uid, lst.st_gid) == (1001, 1002)
    assert mode_of(root / "home/u/suid") == 0o4755  # chown before chmod keeps the setuid bit


def test_ownership_not_kept_when_asked(root):
    apply(root, layer(F("f", b"x", uid=1000, gid=1000)), options=ApplyOptions(preserve_owner=False))
    assert os.stat(root / "f").st_uid == os.geteuid()


def test_devices_are_skipped_with_a_warning_by_default(root):
    warnings: list[str] = []
    stats = apply(
        root,
        layer(DEV("dev/null"), DEV("dev/sda", tarfile.BLKTYPE, 8, 0), DEV("run/fifo", tarfile.FIFOTYPE)),
        warn=warnings.append,
    )
    assert not (root / "dev/null").exists() and not (root / "run/fifo").exists()
    assert len(warnings) == 3 and stats.skipped == warnings
    assert "devices='skip'" in warnings[0]


def test_devices_refuse_policy(root):
    with pytest.raises(UnsafeContentError, match="refused"):
        apply(root, layer(DEV("dev/null")), options=ApplyOptions(devices="refuse"))


def test_devices_create_policy(root):
    stats = apply(
        root,
        layer(DEV("run/fifo", tarfile.FIFOTYPE, mode=0o620), DEV("dev/null", mode=0o666)),
        options=ApplyOptions(devices="create"),
    )
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert mode_of(root / "run/fifo") == 0o620
    if (root / "dev/null").exists():
        st = os.lstat(root / "dev/null")
        assert stat.S_ISCHR(st.st_mode)
        assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
        assert mode_of(root / "dev/null") == 0o666
    else:  # no CAP_MKNOD here
        assert any("dev/null" in w for w in stats.skipped)
