"""What a pack is made of, before anything is planned: the formats and defaults, the scan of the
directory (:class:`Entry`, :func:`scan_tree`: every dir, file, symlink and hard link, sorted, symlinks
not followed) and the ModelPack file-kind tables (:func:`modelpack_kind`). The lowest room of
``imagevol.pack``: it imports nothing from its siblings."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .. import mediatypes as mt
from ..errors import UsageError
from ..platform import Platform
from ..sinks.digestcache import file_identity

FORMATS = ("image", "artifact", "modelpack")
DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64/v8", "linux/arm/v7", "linux/ppc64le", "linux/s390x", "linux/riscv64")
DEFAULT_ARTIFACT_TYPE = "application/vnd.imagevol.data.v1"
DEFAULT_LARGE_FILE_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 4
TREE_TITLE = ".imagevol-tree"
RAW_FILE_TYPE = "application/octet-stream"
ANN_UNTESTED = "org.cncf.model.file.mediatype.untested"
AGNOSTIC_PLATFORM = Platform("linux", "amd64")

_LAYER_TYPES = {"none": mt.OCI_LAYER, "gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD}
_TAR_SUFFIX = {"none": "tar", "gzip": "tar+gzip", "zstd": "tar+zstd"}


# ------------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class Entry:
    """One thing in the directory. kind: ``dir``, ``file``, ``symlink`` or ``hardlink`` (another
    name of an earlier ``file``: ``target`` is that file's path)."""

    path: str
    kind: str
    mode: int
    size: int = 0
    source: str = ""
    target: str = ""
    identity: str = field(default="", compare=False)  # files: device, inode, size, mtime, ctime
    ctime_ns: int = field(default=0, compare=False)


def scan_tree(directory: str | os.PathLike[str]) -> list[Entry]:
    """Every entry below ``directory`` (not the directory itself), depth first, children sorted by
    the bytes of their names. Symlinks are not followed. Sockets, FIFOs and devices are refused."""
    root = Path(directory)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise UsageError(f"{directory} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{directory} is not a directory", hint="pack takes a directory")
    out: list[Entry] = []
    inodes: dict[tuple[int, int], str] = {}

    def walk(dir_path: str, rel: str) -> None:
        with os.scandir(dir_path) as it:
            children = sorted(it, key=lambda e: os.fsencode(e.name))
        for child in children:
            path = f"{rel}{child.name}"
            cst = child.stat(follow_symlinks=False)
            mode = stat.S_IMODE(cst.st_mode)
            if stat.S_ISDIR(cst.st_mode):
                out.append(Entry(path, "dir", mode))
                walk(child.path, path + "/")
            elif stat.S_ISLNK(cst.st_mode):
                out.append(Entry(path, "symlink", 0o777, target=os.readlink(child.path)))
            elif stat.S_ISREG(cst.st_mode):
                key = (cst.st_dev, cst.st_ino)
                first = inodes.get(key) if cst.st_nlink > 1 else None
                ident = file_identity(cst)
                if first is not None:
                    out.append(Entry(path, "hardlink", mode, cst.st_size, child.path, first, ident, cst.st_ctime_ns))
                else:
                    if cst.st_nlink > 1:
                        inodes[key] = path
                    out.append(Entry(path, "file", mode, cst.st_size, child.path, "", ident, cst.st_ctime_ns))
            else:
                raise UsageError(
                    f"{child.path} is a socket, FIFO or device: pack takes directories, files and symlinks only",
                    hint="move it out of the directory",
                )

    walk(str(root), "")
    return out


# ------------------------------------------------------------------------------------------------
# ModelPack

_WEIGHT_EXT = frozenset(
    {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".ckpt", ".tflite", ".pdparams"}
)
_WEIGHT_CONFIG_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "merges.txt",
        "special_tokens_map.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    }
)
_DOC_EXT = frozenset({".md", ".rst"})
_CODE_EXT = frozenset({".py", ".sh", ".ipynb"})
_DATASET_DIRS = frozenset({"data", "dataset", "datasets"})
_DATASET_EXT = frozenset({".parquet", ".arrow", ".jsonl", ".csv", ".tsv"})
_FORMAT_BY_EXT = {
    ".safetensors": "safetensors",
    ".gguf": "gguf",
    ".onnx": "onnx",
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".bin": "pytorch",
    ".ckpt": "pytorch",
    ".h5": "tensorflow",
    ".tflite": "tflite",
    ".msgpack": "flax",
    ".pdparams": "paddle",
}


def modelpack_kind(path: str, size: int = 0, large_file_size: int = DEFAULT_LARGE_FILE_SIZE) -> tuple[str, bool]:
    """(ModelPack layer kind, guessed) for a file path, first rule that applies:

    weight.config: config.json, generation_config.json, tokenizer*.json, tokenizer.model, vocab*,
    merges.txt, special_tokens_map.json, preprocessor_config.json, chat_template.jinja;
    doc: README*, LICENSE*, NOTICE*, *.md, *.rst; code: *.py, *.sh, *.ipynb;
    dataset: anything under a top-level data/, dataset/ or datasets/;
    weight: *.safetensors, *.bin, *.gguf, *.pt, *.pth, *.onnx, *.h5, *.msgpack, *.ckpt, *.tflite, *.pdparams;
    dataset: *.parquet, *.arrow, *.jsonl, *.csv, *.tsv;
    otherwise a guess (``guessed`` True, annotated ``org.cncf.model.file.mediatype.untested``):
    weight when ``large_file_size`` bytes or more, else weight.config.
    """
    name = path.rsplit("/", 1)[-1]
    lower = name.lower()
    ext = os.path.splitext(lower)[1]
    if (
        lower in _WEIGHT_CONFIG_NAMES
        or (lower.startswith("tokenizer") and lower.endswith(".json"))
        or lower.startswith("vocab")
    ):
        return "weight.config", False
    if lower.startswith(("readme", "license", "licence", "notice")) or ext in _DOC_EXT:
        return "doc", False
    if ext in _CODE_EXT:
        return "code", False
    if "/" in path and path.split("/", 1)[0].lower() in _DATASET_DIRS:
        return "dataset", False
    if ext in _WEIGHT_EXT:
        return "weight", False
    if ext in _DATASET_EXT:
        return "dataset", False
    return ("weight" if size >= large_file_size else "weight.config"), True
