"""Layer plans: which entries go into which tar layer (:func:`plan_image_layers` for images, the
``.imagevol-tree`` layer of artifacts in :func:`_tree_plan`) and which platforms the index gets
(:func:`_resolve_platforms`). Pure functions of the scanned entries and the options; nothing is read
or written here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..platform import Platform, parse_platform, parse_platform_list
from .spec import DEFAULT_LARGE_FILE_SIZE, DEFAULT_PLATFORMS, TREE_TITLE, Entry

# ------------------------------------------------------------------------------------------------
# Layer plans


@dataclass
class LayerPlan:
    """Entries that go into one tar layer."""

    name: str
    entries: list[Entry]


def plan_image_layers(entries: Sequence[Entry], large_file_size: int = DEFAULT_LARGE_FILE_SIZE) -> list[LayerPlan]:
    """Split an image: one layer per file of ``large_file_size`` bytes or more (with the hard links
    to it), everything else in one first layer (always present, possibly empty)."""
    large = {e.path for e in entries if e.kind == "file" and e.size >= large_file_size}
    small: list[Entry] = []
    own: dict[str, list[Entry]] = {}
    for e in entries:
        if e.kind == "file" and e.path in large:
            own[e.path] = [e]
        elif e.kind == "hardlink" and e.target in large:
            own[e.target].append(e)
        else:
            small.append(e)
    plans = [LayerPlan("files", small)]
    plans += [LayerPlan(path, group) for path, group in own.items()]
    return plans


def _plain_mode(mode: int) -> bool:
    """A file whose read-only mode is 0444 (0644, 0664, 0666, 0444): what a raw layer reproduces."""
    return (mode & 0o7777 & ~0o222) == 0o444


def _tree_plan(entries: Sequence[Entry], raw_paths: set[str]) -> LayerPlan | None:
    """The `.imagevol-tree` layer of an artifact, or None when raw layers say everything.

    Directories that hold a raw file below them and are 0755 come into being anyway; anything else
    (other directories, symlinks, files that are not raw layers) needs it.
    """
    covered: set[str] = set()
    for p in raw_paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            covered.add("/".join(parts[:i]))
    in_tree: set[str] = set()
    needed = False
    for e in entries:
        if e.kind == "dir":
            if e.mode != 0o755 or e.path not in covered:
                needed = True
        elif e.kind == "symlink" or e.path not in raw_paths:
            needed = True  # a symlink, or a file a raw layer cannot reproduce (its mode)
            in_tree.add(e.path)
    if not needed:
        return None
    if any(e.path == TREE_TITLE for e in entries):
        raise UsageError(
            f"the directory has a top-level {TREE_TITLE!r}, the name imagevol gives its tree layer",
            hint="rename it, or pack with --format image",
        )
    chosen = [e for e in entries if e.kind == "dir" or e.path in in_tree]
    return LayerPlan(TREE_TITLE, chosen)


def _resolve_platforms(
    fmt: str, platforms: Sequence[Platform | str] | str | None, agnostic: bool
) -> list[Platform] | None:
    """The index entries' platforms; None for a bare manifest (artifacts without --platform)."""
    if agnostic and platforms:
        raise UsageError("--agnostic and --platform exclude each other", hint="give one of them")
    if isinstance(platforms, str):
        plats = parse_platform_list(platforms)
    elif platforms:
        plats = []
        for p in platforms:
            for q in parse_platform_list(p) if isinstance(p, str) else [p]:
                if q not in plats:
                    plats.append(q)
    else:
        plats = []
    for p in plats:
        if not p.os or not p.architecture:
            raise UsageError(f"platform {p} needs an OS and an architecture", hint="e.g. linux/arm64")
    if agnostic:
        return [] if fmt == "image" else None
    if plats:
        return plats
    if fmt == "image":
        return [parse_platform(p) for p in DEFAULT_PLATFORMS]
    return None
