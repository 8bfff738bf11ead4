"""`inspect` (the descriptor tree) and `explain` (what each runtime would mount on each node, and why).

Runtime predictions model CRI-O 1.34 (containers/image v5.36 instance choice, image copy first and
the artifact path only when it fails, artifact mounts, its error texts) and containerd 2.1
(containerd/platforms v1.0.0-rc.2 `Only`, `images.Manifest`: first candidate only, config-platform
matching for a platform-less entry, image volumes only for runnable images: containerd#11907). The
differential suite (tests/unit/test_differential.py) checks them against the runtimes' Go code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import mediatypes as mt
from ..errors import ImagevolError, NoMatchError
from ..manifest import MAX_CONFIG_SIZE, Descriptor, Index, Manifest, flavour, parse_config
from ..platform import Platform
from ..reference import Reference, runtime_reference
from ..sources.base import Source
from .runtimes import CrioNestedIndexError, CrioUnusableEntryError
from .select import (
    MAX_DEPTH,
    IndexStep,
    Selection,
    Selector,
    platforms_in,
)

RUNTIMES = ("imagevol", "crio", "containerd")
DEFAULT_NODES = ("linux/amd64", "linux/arm64", "linux/arm/v7")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def short_type(media_type: str) -> str:
    for prefix in ("application/vnd.oci.image.", "application/vnd.docker.distribution.", "application/vnd."):
        if media_type.startswith(prefix):
            return media_type[len(prefix) :]
    return media_type


# --- inspect ------------------------------------------------------------------
def describe_manifest(m: Manifest) -> dict[str, Any]:
    return {
        "kind": m.kind,
        "flavour": flavour(m),
        "artifactType": m.artifact_type,
        "effectiveArtifactType": None if m.is_image else m.effective_artifact_type,
        "config": {"mediaType": m.config.media_type, "digest": str(m.config.digest), "size": m.config.size},
        "layers": [
            {"mediaType": x.media_type, "digest": str(x.digest), "size": x.size, "title": x.title} for x in m.layers
        ],
        "size": m.total_size,
    }


def inspect_tree(source: Source, resolved: tuple[Descriptor, Manifest | Index] | None = None) -> dict[str, Any]:
    """The whole descriptor tree of a reference as plain data."""
    root, doc = resolved if resolved is not None else source.resolve()

    def node(desc: Descriptor, d: Manifest | Index, depth: int, seen: frozenset[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": str(desc.digest),
            "mediaType": d.media_type,
            "size": desc.size,
            "platform": desc.platform.to_dict() if desc.platform else None,
        }
        if isinstance(d, Manifest):
            out.update(describe_manifest(d))
            return out
        out["kind"] = "index"
        out["artifactType"] = d.artifact_type
        children = []
        for c in d.manifests:
            if str(c.digest) in seen or depth + 1 >= MAX_DEPTH:
                children.append({"digest": str(c.digest), "mediaType": c.media_type, "error": "cycle or too deep"})
                continue
            try:
                cd = source.manifest(c)
            except ImagevolError as e:
                children.append(
                    {
                        "digest": str(c.digest),
                        "mediaType": c.media_type,
                        "size": c.size,
                        "platform": c.platform.to_dict() if c.platform else None,
                        "error": str(e),
                    }
                )
                continue
            children.append(node(c, cd, depth + 1, seen | {str(c.digest)}))
        out["manifests"] = children
        out["ignored"] = [{"digest": str(c.digest), "mediaType": c.media_type} for c in d.ignored]
        return out

    return node(root, doc, 0, frozenset({str(root.digest)}))


def render_tree(ref: str, tree: dict[str, Any]) -> str:
    lines = [f"{ref}"]

    def plat(n: dict[str, Any]) -> str:
        p = n.get("platform")
        if not p:
            return "(no platform)"
        s = f"{p.get('os', '')}/{p.get('architecture', '')}"
        if p.get("variant"):
            s += f"/{p['variant']}"
        if p.get("os.version"):
            s += f" ({p['os.version']})"
        return s

    def walk(n: dict[str, Any], prefix: str, label: str) -> None:
        head = f"{prefix}{label}{n['digest'][:19]}  {short_type(n['mediaType'])}"
        if n.get("kind") == "index":
            lines.append(f"{head}  index, {len(n.get('manifests', []))} entries")
            kids = n.get("manifests", [])
            for i, c in enumerate(kids):
                last = i == len(kids) - 1 and not n.get("ignored")
                walk(
                    c,
                    prefix + ("   " if label.startswith("└") else ("│  " if label else "")),
                    ("└─ " if last else "├─ ") + f"[{i}] {plat(c)}  ",
                )
            for j, ig in enumerate(n.get("ignored", [])):
                last = j == len(n["ignored"]) - 1
                lines.append(f"{prefix}{'└─ ' if last else '├─ '}ignored {ig['digest'][:19]}  {ig['mediaType']}")
            return
        if "error" in n:
            lines.append(f"{head}  error: {n['error']}")
            return
        kind = n["kind"] if n["flavour"] in ("image", "artifact") else f"{n['kind']} ({n['flavour']})"
        extra = f"  artifactType {n['effectiveArtifactType']}" if n.get("effectiveArtifactType") else ""
        lines.append(f"{head}  {kind}, {human_size(n['size'])}{extra}")
        inner = prefix + ("   " if label.startswith("└") or not label else "│  ")
        cfg = n["config"]
        lines.append(f"{inner}config {short_type(cfg['mediaType'])}  {human_size(cfg['size'])}")
        for x in n["layers"]:
            t = f"  {x['title']}" if x.get("title") else ""
            lines.append(f"{inner}layer  {short_type(x['mediaType'])}  {human_size(x['size'])}  {x['digest'][:19]}{t}")

    walk(tree, "", "")
    return "\n".join(lines)


# --- explain ------------------------------------------------------------------
@dataclass
class Outcome:
    """What one runtime does for one node."""

    runtime: str
    node: list[Platform]
    policy: str
    mounts: bool
    summary: str
    selection: Selection | None = None
    error: str | None = None
    hint: str | None = None
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)
    steps: list[IndexStep] = field(default_factory=list)  # the trace when nothing was selected

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "node": [str(p) for p in self.node],
            "policy": self.policy if self.runtime == "imagevol" else None,
            "mounts": self.mounts,
            "summary": self.summary,
            "selection": self.selection.to_dict() if self.selection else None,
            "error": self.error,
            "hint": self.hint,
            "exitCode": self.exit_code,
            "notes": self.notes,
            "steps": [st.to_dict() for st in self.steps] if self.selection is None else None,
        }


def _content_summary(m: Manifest) -> str:
    fl = flavour(m)
    n = len(m.layers)
    return f"{fl}, {n} layer{'s' if n != 1 else ''}, {human_size(m.total_size)}"


def _crio_artifact(m: Manifest) -> tuple[bool, str, list[str]]:
    titled = [x for x in m.layers if x.title]
    skipped = len(m.layers) - len(titled)
    notes = []
    if skipped:
        untitled_tars = [x for x in m.layers if not x.title and mt.layer_compression(x.media_type) is not None]
        notes.append(f"{skipped} layer(s) without org.opencontainers.image.title or model filepath are skipped")
        if untitled_tars:
            notes.append(
                f"{len(untitled_tars)} untitled tar-typed layer(s): imagevol extracts them at the volume root, "
                "CRI-O skips them"
            )
    if not titled:
        return True, "mounts an EMPTY artifact volume (no layer has a title)", notes
    tars = [x for x in titled if mt.layer_compression(x.media_type) is not None]
    s = f"mounts as artifact: {len(titled)} file(s) at their titles"
    if tars:
        notes.append(
            f"{len(tars)} titled layer(s) typed tar: CRI-O mounts each as one file at its title, not extracted"
        )
    return True, s, notes


def predict(
    source: Source, resolved: tuple[Descriptor, Manifest | Index], node: list[Platform], runtime: str, policy: str
) -> Outcome:
    sel_policy = policy if runtime == "imagevol" else "native"
    try:
        sel = Selector(source, node, policy=sel_policy, semantics=runtime).select(*resolved)
    except NoMatchError as e:
        steps = e.trace if isinstance(e.trace, list) else []
        return Outcome(runtime, node, policy, False, "no match", error=e.message, hint=e.hint, exit_code=3, steps=steps)
    except CrioUnusableEntryError as e:
        return Outcome(
            runtime,
            node,
            policy,
            False,
            "fails: the chosen entry is a nested index"
            if isinstance(e, CrioNestedIndexError)
            else "fails: the chosen entry is not a manifest",
            error=e.message,
            hint=e.hint,
            exit_code=e.exit_code,
            steps=e.trace,
        )
    except ImagevolError as e:
        return Outcome(runtime, node, policy, False, "error", error=e.message, hint=e.hint, exit_code=e.exit_code)
    m = sel.manifest
    where = _where(sel)
    notes = list(sel.warnings)
    if runtime != "imagevol" and len(node) > 1:
        notes.append(f"{runtime} has no preference list: only the node's own platform {node[0]} counts")
    if runtime == "containerd" and node[0].os_features:
        notes.append("containerd 2.1 (containerd/platforms v1.0.0-rc.2) ignores os.features")
    if runtime == "imagevol":
        if len(sel.steps) > 1 and sel.how != "fallback":
            notes.append(
                "descended through a nested index (imagevol's own resolution; CRI-O 1.34 cannot mount "
                "an index whose chosen entry is an index)"
            )
        return Outcome(runtime, node, policy, True, f"mounts {where}: {_content_summary(m)}", sel, notes=notes)
    if runtime == "crio":
        if mt.crio_pulls_as_image(m.media_type, m.config.media_type):
            if m.artifact_type:
                notes.append(
                    f"artifactType {m.artifact_type} is set, but CRI-O's image copy succeeds first: it mounts the image"
                )
            return Outcome(
                runtime, node, policy, True, f"mounts {where}: {_content_summary_as_image(m)}", sel, notes=notes
            )
        ok, s, more = _crio_artifact(m)
        return Outcome(runtime, node, policy, ok, f"{s} ({where})", sel, notes=notes + more)
    # containerd: image volumes need a runnable image.
    runnable = False
    if m.config.media_type in mt.IMAGE_CONFIG_TYPES:
        try:
            cfg = parse_config(source.blob_bytes(m.config, MAX_CONFIG_SIZE))
            runnable = cfg.runnable and len(cfg.diff_ids) == len(m.layers)
        except (ImagevolError, ValueError, json.JSONDecodeError):
            runnable = False
    if not runnable:
        return Outcome(
            runtime,
            node,
            policy,
            False,
            f"fails: {where} is not a runnable image",
            sel,
            error=f"containerd 2.1 image volumes need an image config with rootfs.diff_ids; this manifest "
            f"has config {m.config.media_type} ({flavour(m)}) (containerd#11907)",
            hint="repack as an image (`imagevol pack --format image`) or use imagevol",
            exit_code=4,
            notes=notes,
        )
    return Outcome(runtime, node, policy, True, f"mounts {where}: {_content_summary(m)}", sel, notes=notes)


def _content_summary_as_image(m: Manifest) -> str:
    n = len(m.layers)
    return f"image, {n} layer{'s' if n != 1 else ''}, {human_size(m.total_size)}"


def _where(sel: Selection) -> str:
    if sel.how == "direct":
        return f"manifest {sel.descriptor.digest.short}"
    plat = str(sel.platform) if sel.platform else "no platform"
    label = {"platform": "", "platform-less": "platform-less ", "fallback": "fallback "}[sel.how]
    pos = sel.steps[-1].chosen if sel.steps else None
    return f"{label}entry {pos} ({plat}) {sel.descriptor.digest.short}"


def explain(
    source: Source,
    nodes: list[list[Platform]],
    runtimes: list[str],
    policy: str,
    resolved: tuple[Descriptor, Manifest | Index] | None = None,
) -> dict[str, Any]:
    resolved = resolved if resolved is not None else source.resolve()
    root, doc = resolved
    out: dict[str, Any] = {
        "source": source.describe(),
        "digest": str(root.digest),
        "mediaType": doc.media_type,
        "platforms": platforms_in(doc) if isinstance(doc, Index) else None,
        "references": _runtime_references(source),
        "nodes": [],
    }
    for node in nodes:
        outcomes = [predict(source, resolved, node, rt, policy) for rt in runtimes]
        out["nodes"].append({"node": [str(p) for p in node], "outcomes": outcomes})
    return out


def _runtime_references(source: Source) -> dict[str, Any] | None:
    """How the runtimes name the reference (distribution/reference, as they link it), where it differs
    from imagevol's own normalization."""
    ref = getattr(source, "ref", None)
    if not isinstance(ref, Reference):
        return None
    rt = runtime_reference(str(ref))
    out: dict[str, Any] = {"imagevol": str(ref), **rt.to_dict()}
    notes = []
    if rt.error is not None:
        notes.append(f"CRI-O and containerd refuse this reference: {rt.error}")
    else:
        if rt.docker_ref != str(ref):
            notes.append(
                f"containerd's CRI pulls {rt.docker_ref} (ParseDockerRef drops the tag when a digest is given)"
            )
        if rt.familiar != ref.familiar():
            notes.append(f"the runtimes print it as {rt.familiar} (FamiliarString)")
    out["notes"] = notes
    return out


def runtimes_accept_hint(ref: str, error: ImagevolError) -> str | None:
    """The hint for a reference imagevol refuses: plus what CRI-O and containerd do with it."""
    from ..errors import InvalidReferenceError

    if not isinstance(error, InvalidReferenceError) or ref.startswith("oci:"):
        return error.hint
    rt = runtime_reference(ref[len("docker://") :] if ref.startswith("docker://") else ref)
    if rt.error is not None:
        return error.hint
    said = f"CRI-O 1.34 and containerd 2.1 accept it (as {rt.docker_ref}); imagevol is stricter for its own pulls"
    return f"{error.hint}; {said}" if error.hint else said


def render_explain(ref: str, result: dict[str, Any], *, verbose: bool = False) -> str:
    lines = [f"{ref}  {short_type(result['mediaType'])} {result['digest'][:19]}"]
    if result["platforms"] is not None:
        lines.append("  entries: " + ", ".join(f"[{i}] {p}" for i, p in enumerate(result["platforms"])))
    for note in (result.get("references") or {}).get("notes", []):
        lines.append(f"  reference: {note}")
    for n in result["nodes"]:
        outcomes: list[Outcome] = n["outcomes"]
        policy = outcomes[0].policy if outcomes else "native"
        lines.append(f"node {','.join(n['node'])}  (policy {policy})")
        width = max(len(o.runtime) for o in outcomes)
        for o in outcomes:
            status = "mounts" if o.mounts else ("no match" if o.exit_code == 3 else "fails")
            text = o.summary if o.mounts else (o.error or o.summary)
            lines.append(f"  {o.runtime.ljust(width)}  {status.ljust(8)}  {text}")
            if not o.mounts and o.hint:
                lines.append(f"  {' ' * width}  {' ' * 8}  hint: {o.hint}")
            for note in o.notes:
                lines.append(f"  {' ' * width}  {' ' * 8}  note: {note}")
            if verbose:
                for st in o.selection.steps if o.selection is not None else o.steps:
                    lines.append(f"  {' ' * width}    index {st.digest[:19]}: {st.reason}")
                    for e in st.entries:
                        lines.append(
                            f"  {' ' * width}      [{e.position}] {e.platform or '(no platform)'}: "
                            f"{e.verdict}{' - ' + e.note if e.note else ''}"
                        )
    return "\n".join(lines)


def outcome_json(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    out["nodes"] = [{"node": n["node"], "outcomes": [o.to_dict() for o in n["outcomes"]]} for n in result["nodes"]]
    return out
