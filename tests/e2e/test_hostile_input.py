"""Hostile input files, end to end through the CLI (issue "Trust the store", items 10 and 11).

Item 10: an OCI layout whose files are not regular files: a FIFO `index.json` or blob (the open
used to block forever), `index.json` linked to `/dev/zero` (read without end), a blob linked to
`/etc/passwd`, a device node as a blob, a symlinked blob directory. Each `imagevol mount` runs with a
20 s timeout, so code that hangs fails the test (subprocess.TimeoutExpired) instead of hanging CI;
every case ends in exit 4 with one `error:` line naming the file and what it is.

Item 11: tar layers served by the real registry: a PAX number of 5000 digits, 70,000 hard links
to one file, more entries than `--max-entries`: exit 4 with the reason (no `unexpected` error,
no snapshot left).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.clirun import HostGuard, Imagevol, clear_error, make_sentinel
from tests.support.layout import LayoutWriter
from tests.support.tars import E, hardlinks_gz, many_entries_gz, push_image, tar_layer

pytestmark = pytest.mark.e2e

HANG_GUARD = 20  # seconds: a mount that hangs on a FIFO is killed and the test fails


@pytest.fixture
def guard(tmp_path: Path, iv: Imagevol) -> Iterator[HostGuard]:
    sentinel = make_sentinel(tmp_path / "sentinel")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "src").mkdir()
    g = HostGuard(tmp_path, sentinel, skip=(iv.root, iv.home, tmp_path / "mnt", tmp_path / "src"))
    with g:
        yield g


def _mount(iv: Imagevol, ref: str, target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return iv.run("mount", ref, str(target), *args, timeout=HANG_GUARD)


# --------------------------------------------------------------------------- item 10: OCI layouts


def _layout(path: Path) -> tuple[LayoutWriter, dict[str, str]]:
    """A one-layer image tagged `t`; returns the writer and the blob paths by role."""
    w = LayoutWriter(path)
    desc = w.image({"hello.txt": b"hello\n"})
    w.tag(desc, "t")
    man = w.blobs[desc["digest"]]
    doc = json.loads(man)
    hexes = {
        "manifest": desc["digest"].split(":")[1],
        "config": doc["config"]["digest"].split(":")[1],
        "layer": doc["layers"][0]["digest"].split(":")[1],
    }
    return w, {k: str(path / "blobs" / "sha256" / h) for k, h in hexes.items()}


def _replace(path: str, how: str) -> None:
    os.unlink(path)
    if how == "fifo":
        os.mkfifo(path)
    elif how == "dev-zero":
        os.symlink("/dev/zero", path)
    elif how == "passwd":
        os.symlink("/etc/passwd", path)
    elif how == "chardev":
        os.mknod(path, 0o600 | 0o020000, os.makedev(1, 5))  # what /dev/zero is
    else:
        raise AssertionError(how)


LAYOUT_CASES = {
    # case: (file, replaced by, what stderr names)
    "index-fifo": ("index.json", "fifo", "index.json in OCI layout {p!r} is a FIFO, not a regular file"),
    "index-dev-zero": ("index.json", "dev-zero", "index.json in OCI layout {p!r} is a symbolic link"),
    "oci-layout-fifo": ("oci-layout", "fifo", "oci-layout in OCI layout {p!r} is a FIFO"),
    "manifest-fifo": ("manifest", "fifo", "is a FIFO, not a regular file"),
    "config-chardev": ("config", "chardev", "is a character device, not a regular file"),
    "layer-fifo": ("layer", "fifo", "is a FIFO, not a regular file"),
    "layer-passwd": ("layer", "passwd", "is a symbolic link, not a regular file"),
    "layer-chardev": ("layer", "chardev", "is a character device, not a regular file"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_layout_file_not_regular_refused(iv, guard, tmp_path, case) -> None:
    """Found by this issue: a FIFO hung `mount` forever, `index.json` -> /dev/zero grew without
    end, a blob -> /etc/passwd was read (then failed its digest). Now: exit 4 naming the file."""
    layout = tmp_path / "src" / "layout"
    _, blobs = _layout(layout)
    which, how, needle = LAYOUT_CASES[case]
    _replace(blobs.get(which, str(layout / which)), how)
    target = tmp_path / "mnt" / "v"
    r = _mount(iv, f"oci:{layout}:t", target)
    clear_error(r, 4)
    assert needle.format(p=str(layout)) in r.stderr, r.stderr
    assert "hint: every file and directory inside an OCI layout must be a real one" in r.stderr, r.stderr
    assert not os.path.lexists(target)
    iv.fsck()


def test_layout_symlinked_blob_directory_refused(iv, guard, tmp_path) -> None:
    """`blobs/sha256` a symlink to a copy of itself: refused (a link inside a layout may point
    anywhere), naming the directory."""
    layout = tmp_path / "src" / "layout"
    _layout(layout)
    shutil.move(layout / "blobs" / "sha256", tmp_path / "src" / "elsewhere")
    os.symlink(tmp_path / "src" / "elsewhere", layout / "blobs" / "sha256")
    r = _mount(iv, f"oci:{layout}:t", tmp_path / "mnt" / "v")
    clear_error(r, 4)
    assert f"blobs/sha256 in OCI layout {str(layout)!r} is a symbolic link" in r.stderr, r.stderr


def test_layout_path_itself_may_be_a_symlink(iv, guard, tmp_path) -> None:
    """Only the files inside a layout are restricted: the user's own path may be a link."""
    layout = tmp_path / "src" / "layout"
    _layout(layout)
    os.symlink(layout, tmp_path / "src" / "link")
    target = tmp_path / "mnt" / "v"
    r = _mount(iv, f"oci:{tmp_path / 'src' / 'link'}:t", target)
    assert r.returncode == 0, r.stderr
    assert (target / "hello.txt").read_bytes() == b"hello\n"
    assert iv.unmount(target).returncode == 0


@pytest.mark.parametrize("which", ["index.json", "oci-layout"])
def test_output_into_a_layout_with_a_fifo_refused(registry, client, iv, guard, tmp_path, which) -> None:
    """The sibling on the write side: `pull --output oci:DIR` into an existing layout read its
    `oci-layout` and `index.json` with read_bytes(): a FIFO hung it. Now exit 4 naming the file."""
    repo = f"hostile/out-{os.urandom(4).hex()}"
    push_image(client, repo, "t", [tar_layer([E("a", b"x")])])
    out = tmp_path / "src" / "out"
    LayoutWriter(out).write_index()
    os.unlink(out / which)
    os.mkfifo(out / which)
    r = iv.run("pull", f"{registry.host}/{repo}:t", "--output", f"oci:{out}:t", timeout=HANG_GUARD)
    clear_error(r, 4)
    assert f"{which} in OCI layout {str(out)!r} is a FIFO, not a regular file" in r.stderr, r.stderr


def test_output_replaces_a_symlinked_blob(registry, client, iv, guard, tmp_path) -> None:
    """A blob of the output layout that is a symlink (here to /etc/passwd) is not taken for the
    blob (it was, when its target had the blob's size): it is replaced by the real one, and the
    link's target is not written."""
    repo = f"hostile/out-link-{os.urandom(4).hex()}"
    layer = tar_layer([E("a", b"x")])
    push_image(client, repo, "t", [layer])
    blob = gzip.compress(layer, mtime=0)
    passwd = Path("/etc/passwd").read_bytes()
    out = tmp_path / "src" / "out"
    LayoutWriter(out).write_index()
    from tests.support.layout import sha

    link = out / "blobs" / "sha256" / sha(blob).split(":")[1]
    os.symlink("/etc/passwd", link)
    r = iv.run("pull", f"{registry.host}/{repo}:t", "--output", f"oci:{out}:t", timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink() and link.read_bytes() == blob
    assert Path("/etc/passwd").read_bytes() == passwd


# --------------------------------------------------------------------------- item 11: tar layers


@pytest.fixture(scope="module")
def client(registry) -> oci.Client:
    return oci.Client(registry)


def _refused_layer(iv: Imagevol, ref: str, target: Path, needle: str, *args: str) -> None:
    r = _mount(iv, ref, target, *args)
    clear_error(r, 4)
    assert needle in r.stderr, r.stderr
    assert not os.path.lexists(target)
    assert [n for n in iv.snapshot_dirs() if not n.startswith(".info-")] == []
    iv.fsck()


def test_pax_number_of_5000_digits_refused(registry, client, iv, guard, tmp_path) -> None:
    """Found by this issue: exit 1 with `unexpected ValueError` (int() of more than 4300 digits)."""
    repo = f"hostile/pax-digits-{os.urandom(4).hex()}"
    push_image(client, repo, "t", [tar_layer([E("a", b"x", pax={"uid": "1" * 5000})])])
    _refused_layer(iv, f"{registry.host}/{repo}:t", tmp_path / "mnt" / "v", "PAX uid has 5000 digits")


def test_70000_hard_links_refused(registry, client, iv, guard, tmp_path) -> None:
    """Found by this issue: exit 1 with `unexpected OSError: Too many links` (ext4 allows 65,000)."""
    repo = f"hostile/links-{os.urandom(4).hex()}"
    push_image(client, repo, "t", [gzip.decompress(hardlinks_gz(70_000))])
    _refused_layer(iv, f"{registry.host}/{repo}:t", tmp_path / "mnt" / "v", "too many links")


def test_max_entries_on_the_command_line(registry, client, iv, guard, tmp_path) -> None:
    """`--max-entries 1000` refuses a layer of 2,000 entries (exit 4, the option named in the
    hint); `--max-entries 0` lifts the limit."""
    repo = f"hostile/entries-{os.urandom(4).hex()}"
    push_image(client, repo, "t", [gzip.decompress(many_entries_gz(2000))])
    ref = f"{registry.host}/{repo}:t"
    target = tmp_path / "mnt" / "v"
    _refused_layer(iv, ref, target, "layer holds more than 1000 entries", "--max-entries", "1000")
    r = _mount(iv, ref, target, "--max-entries", "1000")
    assert "hint: an inode bomb, or a very large layer: raise the limit with --max-entries" in r.stderr
    r = _mount(iv, ref, target, "--max-entries", "0")
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(target / "d000000")) + len(os.listdir(target / "d000001")) == 2000 - 2
    assert iv.unmount(target).returncode == 0
