"""Export: write a pulled manifest and its blobs from the store into an OCI layout
(`imagevol pull --output oci:DIR:TAG`), as `skopeo copy` without `--all` does.
"""

from __future__ import annotations

from ..errors import UsageError
from ..manifest import Descriptor
from ..reference import LayoutReference, parse_any
from ..store import Store
from .plan import PullResult


def export_layout(store: Store, result: PullResult, dest: str | LayoutReference) -> Descriptor:
    """Write the pulled manifest and its blobs into an OCI layout (`oci:DIR[:TAG]`), as `skopeo copy`
    without `--all` does: the tag names the manifest chosen for the node. Blobs are files of the
    layout's own: reflinks of the store's verified files where the file systems allow, else
    in-kernel copies; never hard links (a writable name for an inode the store serves from)."""
    from ..sinks.layout import LayoutSink

    ref = parse_any(dest) if isinstance(dest, str) else dest
    if not isinstance(ref, LayoutReference):
        raise UsageError(f"--output must be an OCI layout (oci:DIR[:TAG]), not {dest!r}")
    sink = LayoutSink.for_reference(ref)
    m = result.manifest
    for d in (m.config, *m.layers):
        if d.data is not None and not store.has_blob(d.digest):
            sink.put_blob_bytes(d.data, d.digest)
        else:
            sink.put_blob_file(store.blob_path(d.digest), d.digest, d.size, mode="clone")
    desc = sink.put_manifest(m.raw, m.media_type)
    sink.tag(desc, ref.tag)
    return desc
