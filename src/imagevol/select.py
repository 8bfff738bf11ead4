"""Choosing the manifest for a node: runtime-faithful platform matching, a per-volume policy, and a
trace of every decision (what `imagevol explain` prints).

Semantics ("how a runtime ranks index entries"):
- `crio` (containers/image, CRI-O 1.34): entries ranked by the node's wanted-platform list, exact
  string match (arm: v8..v5, arm64: v8); entries WITHOUT a platform are candidates of the lowest rank
  in OCI indexes; Docker manifest lists have no platform-less fallback; ties go to the first entry;
  nested indexes resolve by the same rule, without backtracking.
- `containerd` (containerd 2.1): `platforms.Only(node)` priority vector with normalization; entries
  without a platform sort last and match through the os/architecture of their config.
- `imagevol`: the CRI-O rule (the `native` policy), plus backtracking through nested indexes and the
  `any` policy: if nothing matches, the first remaining entry in index order, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import mediatypes as mt
from .errors import ImagevolError, ManifestError, NoMatchError
from .jsonutil import loads as json_loads
from .manifest import MAX_CONFIG_SIZE, Descriptor, Index, Manifest
from .platform import ContainerdMatcher, CrioMatcher, Platform, normalize
from .sources.base import Source

POLICIES = ("native", "any")
SEMANTICS = ("imagevol", "crio", "containerd")
MAX_DEPTH = 8


@dataclass
class EntryVerdict:
    """What happened to one index entry."""

    position: int
    descriptor: Descriptor
    verdict: str  # match | platform-less | no-match | ignored | fallback
    rank: tuple[int, int] | None = None
    note: str = ""

    @property
    def platform(self) -> str | None:
        p = self.descriptor.platform
        return None if p is None else _fmt(p)

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "digest": str(self.descriptor.digest),
            "mediaType": self.descriptor.media_type,
            "platform": self.platform,
            "verdict": self.verdict,
            "rank": list(self.rank) if self.rank else None,
            "note": self.note,
        }


@dataclass
class IndexStep:
    """One index visited while selecting."""

    digest: str
    media_type: str
    entries: list[EntryVerdict] = field(default_factory=list)
    chosen: int | None = None  # position of the entry followed
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "mediaType": self.media_type,
            "entries": [e.to_dict() for e in self.entries],
            "chosen": self.chosen,
            "reason": self.reason,
        }


@dataclass
class Selection:
    """The manifest chosen for a node, and why."""

    root: Descriptor
    descriptor: Descriptor
    manifest: Manifest
    how: str  # direct | platform | platform-less | fallback
    platform: Platform | None
    steps: list[IndexStep] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root.digest),
            "digest": str(self.descriptor.digest),
            "mediaType": self.descriptor.media_type,
            "how": self.how,
            "platform": _fmt(self.platform) if self.platform else None,
            "kind": self.manifest.kind,
            "steps": [s.to_dict() for s in self.steps],
            "warnings": list(self.warnings),
        }


def _fmt(p: Platform) -> str:
    s = str(p)
    return s if s else "(empty)"


def platforms_in(index: Index) -> list[str]:
    out = []
    for d in index.manifests:
        out.append(_fmt(d.platform) if d.platform is not None else "(no platform)")
    return out


class Selector:
    """Selects with one semantics, node preference list and policy."""

    def __init__(
        self,
        source: Source,
        node: list[Platform],
        *,
        policy: str = "native",
        semantics: str = "imagevol",
        max_depth: int = MAX_DEPTH,
    ) -> None:
        if policy not in POLICIES:
            raise ImagevolError(f"unknown platform policy {policy!r}", hint="use native or any")
        if semantics not in SEMANTICS:
            raise ImagevolError(f"unknown runtime {semantics!r}", hint="use imagevol, crio or containerd")
        if not node:
            raise ImagevolError("no node platform given")
        self.source = source
        self.node = node
        self.policy = policy
        self.semantics = semantics
        self.max_depth = max_depth
        if semantics == "containerd":
            self._cmatchers = [ContainerdMatcher(node[0])]
        else:
            prefs = node if semantics == "imagevol" else node[:1]
            self._crio = [CrioMatcher(p) for p in prefs]

    # --- ranking ----------------------------------------------------------
    def _rank(self, p: Platform) -> tuple[int, int] | None:
        matchers = self._cmatchers if self.semantics == "containerd" else self._crio
        for i, m in enumerate(matchers):
            r = m.rank(p)
            if r is not None:
                return (i, r)
        return None

    def _config_platform(self, desc: Descriptor) -> Platform | None:
        """containerd reads a platform-less manifest's config to learn its platform."""
        try:
            doc = self.source.manifest(desc)
            if not isinstance(doc, Manifest):
                return None
            raw = self.source.blob_bytes(doc.config, MAX_CONFIG_SIZE)
            cfg = json_loads(raw)
        except (ImagevolError, ValueError):
            return None
        if not isinstance(cfg, dict):
            return None
        p = Platform(
            os=str(cfg.get("os") or ""),
            architecture=str(cfg.get("architecture") or ""),
            variant=str(cfg.get("variant") or ""),
        )
        return p

    def _rank_entries(self, index: Index, step: IndexStep) -> list[EntryVerdict]:
        """Candidates in the order this semantics tries them; also fills the step's verdicts."""
        docker = index.is_docker
        cands: list[tuple[tuple[int, int, int], EntryVerdict]] = []
        for pos, d in enumerate(index.manifests):
            if d.platform is None:
                if self.semantics == "containerd" and mt.is_index(d.media_type):
                    v = EntryVerdict(pos, d, "platform-less", note="nested index without platform: sorted last")
                    cands.append(((1, 1 << 30, 0), v))
                    step.entries.append(v)
                    continue
                if self.semantics == "containerd":
                    cp = self._config_platform(d)
                    r = self._rank(normalize(cp)) if cp and (cp.os or cp.architecture) else None
                    if r is None:
                        v = EntryVerdict(
                            pos,
                            d,
                            "no-match",
                            note="no platform; its config names "
                            + (_fmt(cp) if cp and (cp.os or cp.architecture) else "no platform"),
                        )
                        step.entries.append(v)
                        continue
                    v = EntryVerdict(pos, d, "platform-less", r, note=f"no platform; config says {_fmt(cp)}")
                    cands.append(((1, *r), v))
                    step.entries.append(v)
                    continue
                if docker:
                    v = EntryVerdict(
                        pos, d, "no-match", note="no platform; Docker manifest lists have no platform-less fallback"
                    )
                    step.entries.append(v)
                    continue
                v = EntryVerdict(pos, d, "platform-less", note="no platform: a candidate of the lowest rank")
                cands.append(((1, 1 << 30, 0), v))
                step.entries.append(v)
                continue
            r = self._rank(d.platform)
            if r is None:
                note = ""
                if d.platform.os == "unknown" and d.platform.architecture == "unknown":
                    note = "unknown/unknown is not a wildcard (often an attestation manifest)"
                else:
                    matchers = self._cmatchers if self.semantics == "containerd" else self._crio
                    same = [
                        m for m in matchers if m.accepted() and m.accepted()[0].architecture == d.platform.architecture
                    ]
                    if same:
                        ok = ", ".join(dict.fromkeys(_fmt(p) for p in same[0].accepted()))
                        note = f"the node accepts only {ok}"
                step.entries.append(EntryVerdict(pos, d, "no-match", note=note))
                continue
            v = EntryVerdict(pos, d, "match", r)
            cands.append(((0, *r), v))
            step.entries.append(v)
        for d in index.ignored:
            step.entries.append(EntryVerdict(-1, d, "ignored", note=f"unsupported media type {d.media_type}"))
        cands.sort(key=lambda c: (c[0], c[1].position))
        return [v for _, v in cands]

    # --- selection ----------------------------------------------------------
    def select(self, root: Descriptor, doc: Manifest | Index) -> Selection:
        if isinstance(doc, Manifest):
            return Selection(root, root, doc, "direct", root.platform, [], [])
        steps: list[IndexStep] = []
        found = self._walk(root, doc, steps, 0, set())
        if found is not None:
            desc, man, how, plat, warns = found
            return Selection(root, desc, man, how, plat, steps, warns)
        if self.policy == "any" and self.semantics == "imagevol":
            fb = self._fallback(root, doc, steps, 0, {str(root.digest)})
            if fb is not None:
                desc, man, plat = fb
                taken = _fmt(plat) if plat else "no platform"
                warn = (
                    f"no entry matches {', '.join(_fmt(p) for p in self.node)}; policy 'any' took "
                    f"{desc.digest.short} ({taken}), the first entry in index order"
                )
                return Selection(root, desc, man, "fallback", plat, steps, [warn])
        raise self._no_match(root, doc, steps)

    def _walk(
        self, desc: Descriptor, index: Index, steps: list[IndexStep], depth: int, seen: set[str]
    ) -> tuple[Descriptor, Manifest, str, Platform | None, list[str]] | None:
        if depth >= self.max_depth:
            raise ManifestError(
                f"index nesting deeper than {self.max_depth} levels at {desc.digest}",
                hint="nested indexes this deep are refused",
            )
        if str(desc.digest) in seen:
            raise ManifestError(f"index cycle: {desc.digest} contains itself", hint="the index is malformed")
        seen = seen | {str(desc.digest)}
        step = IndexStep(str(desc.digest), index.media_type)
        steps.append(step)
        cands = self._rank_entries(index, step)
        if not cands:
            step.reason = "no entry matches"
            return None
        for v in cands:
            child_desc = v.descriptor
            if mt.is_index(child_desc.media_type):
                child = self.source.manifest(child_desc)
                if not isinstance(child, Index):
                    continue
                step.chosen = v.position
                step.reason = f"entry {v.position} is a nested index; descending"
                found = self._walk(child_desc, child, steps, depth + 1, seen)
                if found is not None:
                    return found
                if self.semantics != "imagevol":
                    return None  # runtimes follow their first choice only
                continue
            man = self.source.manifest(child_desc)
            if not isinstance(man, Manifest):
                continue
            step.chosen = v.position
            if v.verdict == "match":
                step.reason = f"entry {v.position} ({v.platform}) matches the node"
                return child_desc, man, "platform", child_desc.platform, []
            step.reason = f"entry {v.position} has no platform and nothing ranks higher"
            return child_desc, man, "platform-less", None, []
        step.reason = "no usable entry"
        return None

    def _fallback(
        self, desc: Descriptor, index: Index, steps: list[IndexStep], depth: int, seen: set[str]
    ) -> tuple[Descriptor, Manifest, Platform | None] | None:
        """Policy `any`: the first entry in index order (descending into nested indexes)."""
        step = next((s for s in steps if s.digest == str(desc.digest)), None)
        if step is None:
            step = IndexStep(str(desc.digest), index.media_type)
            steps.append(step)
        for pos, d in enumerate(index.manifests):
            if str(d.digest) in seen or depth >= self.max_depth:
                continue
            child = self.source.manifest(d)
            if isinstance(child, Index):
                fb = self._fallback(d, child, steps, depth + 1, seen | {str(d.digest)})
                if fb is None:
                    continue
            elif not isinstance(child, Manifest):
                continue
            step.chosen = pos
            step.reason = f"policy any: entry {pos} is the first usable entry in index order"
            for e in step.entries:
                if e.position == pos:
                    e.verdict = "fallback"
            if isinstance(child, Manifest):
                # The deepest step is the one that names the manifest: keep it last.
                steps.remove(step)
                steps.append(step)
                return d, child, d.platform
            return fb
        return None

    def _no_match(self, root: Descriptor, index: Index, steps: list[IndexStep]) -> NoMatchError:
        node = ", ".join(_fmt(p) for p in self.node)
        present = platforms_in(index)
        if self.semantics == "crio":
            w = self._crio[0].accepted()[0]
            kind = "manifest list" if index.is_docker else "image index"
            msg = (
                f'choosing image instance: no image found in {kind} for architecture "{w.architecture}", '
                f'variant "{w.variant}", OS "{w.os}"'
            )
        elif self.semantics == "containerd":
            msg = "no match for platform in manifest: not found"
        else:
            msg = f"no manifest in {root.digest.short} matches {node} (policy {self.policy})"
        hint = f"the index offers: {', '.join(present) or 'nothing'}"
        if self.semantics == "imagevol" and self.policy == "native" and index.manifests:
            hint += "; mount it anyway with --platform-policy any"
            first = index.manifests[0].platform
            if first is not None:
                hint += f" or --platform {_fmt(first)}"
            hint += "; or repack it platform-less with `imagevol pack --agnostic`"
        return NoMatchError(msg, hint=hint, trace=steps)


def select_manifest(
    source: Source,
    node: list[Platform],
    *,
    policy: str = "native",
    semantics: str = "imagevol",
    resolved: tuple[Descriptor, Manifest | Index] | None = None,
) -> Selection:
    """Resolve the source's reference and choose the manifest for `node` (a preference list)."""
    root, doc = resolved if resolved is not None else source.resolve()
    return Selector(source, node, policy=policy, semantics=semantics).select(root, doc)
