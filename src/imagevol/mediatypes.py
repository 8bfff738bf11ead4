"""Media types of the OCI image spec, Docker schema2 and the artifact flavours users push.

Also the classification rules: manifest vs index, image vs artifact (CRI-O's rule), and the
effective artifact type.
"""

from __future__ import annotations

# OCI
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
OCI_EMPTY_DATA = b"{}"
OCI_LAYOUT_HEADER = "application/vnd.oci.layout.header.v1+json"

# Docker schema2
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_PLUGIN_CONFIG = "application/vnd.docker.plugin.v1+json"
# Docker schema1: refused.
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# Artifact flavours
ORAS_UNKNOWN_CONFIG = "application/vnd.unknown.config.v1+json"
ORAS_UNKNOWN_ARTIFACT = "application/vnd.unknown.artifact.v1"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_LAYER_PREFIX = "application/vnd.cncf.model."
KITOPS_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
KITOPS_LAYER_PREFIX = "application/vnd.kitops.modelkit."
DOCKER_AI_CONFIG_PREFIX = "application/vnd.docker.ai.model.config."
DOCKER_AI_PREFIX = "application/vnd.docker.ai."

# Annotations
ANN_TITLE = "org.opencontainers.image.title"
ANN_CNCF_FILEPATH = "org.cncf.model.filepath"
ANN_CNAI_FILEPATH = "org.cnai.model.filepath"
ANN_CNCF_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANN_ORAS_UNPACK = "io.deis.oras.content.unpack"
# containers/image marks the zstd twin of a gzip instance in an index (preferred unless PreferGzipInstances).
ANN_ZSTD_INSTANCE = "io.github.containers.compression.zstd"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CREATED = "org.opencontainers.image.created"
# imagevol's own: a tar layer of an artifact whose entries are relative to the volume root (the
# directories, symlinks and modes raw layers cannot carry); other tools see a file at its title.
ANN_IMAGEVOL_ROOT = "io.imagevol.layer.root"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
# What imagevol can read, in the order sent in an Accept header.
ACCEPT_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
IMAGE_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

OCI_TAR_LAYERS = frozenset({OCI_LAYER, OCI_LAYER_ND, DOCKER_LAYER})
OCI_GZIP_LAYERS = frozenset({OCI_LAYER_GZIP, OCI_LAYER_ND_GZIP, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN})
OCI_ZSTD_LAYERS = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_ND_ZSTD})
IMAGE_LAYER_TYPES = OCI_TAR_LAYERS | OCI_GZIP_LAYERS | OCI_ZSTD_LAYERS


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_docker(media_type: str) -> bool:
    return media_type.startswith("application/vnd.docker.")


def layer_compression(media_type: str) -> str | None:
    """'none', 'gzip' or 'zstd' for a tar-typed layer (by its suffix); None if it is not a tar type.

    Docker's plain `rootfs.diff.tar` may in fact be compressed: callers sniff the bytes.
    """
    if media_type in OCI_TAR_LAYERS:
        return "none"
    if media_type in OCI_GZIP_LAYERS:
        return "gzip"
    if media_type in OCI_ZSTD_LAYERS:
        return "zstd"
    for suffix, comp in ((".tar", "none"), (".tar+gzip", "gzip"), (".tar.gzip", "gzip"), (".tar+zstd", "zstd")):
        if media_type.endswith(suffix):
            return comp
    return None


def is_image(manifest_media_type: str, config_media_type: str, artifact_type: str | None) -> bool:
    """CRI-O's rule: an image iff the manifest is OCI/Docker, the config type is "" or an image
    config, and there is no `artifactType`. Everything else is an artifact."""
    return (
        manifest_media_type in MANIFEST_TYPES
        and config_media_type in ("", OCI_CONFIG, DOCKER_CONFIG)
        and not artifact_type
    )


def crio_pulls_as_image(manifest_media_type: str, config_media_type: str) -> bool:
    """CRI-O 1.34 copies an image first (containers/image: an OCI/Docker manifest whose config is an image
    config); only when that fails does it try an OCI artifact. So `artifactType` does not matter here,
    unlike in :func:`is_image` (the artifact path's own rule, and imagevol's)."""
    return manifest_media_type in MANIFEST_TYPES and config_media_type in ("", OCI_CONFIG, DOCKER_CONFIG)


def effective_artifact_type(artifact_type: str | None, config_media_type: str) -> str:
    """`artifactType` if set, else the config's media type (OCI image spec, artifacts guidance)."""
    return artifact_type or config_media_type
