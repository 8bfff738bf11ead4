"""Choosing the manifest for a node: runtime-faithful platform matching, a per-volume policy, and a
trace of every decision (what `imagevol explain` prints).

Semantics ("how a runtime ranks index entries"):
- `crio` (containers/image v5.36, CRI-O 1.34): entries ranked by the node's wanted-platform list,
  exact string match (arm: v8..v5, arm64: v8); entries WITHOUT a platform are candidates of the lowest
  rank in OCI indexes; Docker manifest lists have no platform-less fallback; among equal ranks an
  instance annotated `io.github.containers.compression.zstd: "true"` wins, then the first entry. A
  chosen entry that is itself an index is NOT mountable by CRI-O (an error, with CRI-O's text).
- `containerd` (containerd 2.1, containerd/platforms v1.0.0-rc.2): `platforms.Only(node)` priority
  vector with normalization, `os.features` ignored; the matching entries and those without a platform
  are sorted (platform-less last) and only the FIRST is followed (nested indexes the same way); a
  platform-less manifest then matches through its config's os/architecture, or the selection fails.
- `imagevol`: the CRI-O rule (the `native` policy), plus backtracking through nested indexes and the
  `any` policy: if nothing matches, the first remaining entry in index order, with a warning.
"""

from __future__ import annotations

from .. import mediatypes as mt
from ..errors import ImagevolError, ManifestError, NoMatchError
from ..jsonutil import loads as json_loads
from ..manifest import MAX_CONFIG_SIZE, Descriptor, Index, Manifest
from ..platform import ContainerdMatcher, CrioMatcher, Platform, normalize
from ..sources.base import Source
from .runtimes import (
    ARTIFACT_IS_IMAGE_ERROR,
    NESTED_ARTIFACT_ERROR,
    NESTED_IMAGE_ERROR,
    CrioNestedIndexError,
    CrioUnusableEntryError,
    crio_image_name,
    crio_pull_error,
    go_config_platform,
)
from .trace import EntryVerdict, IndexStep, Selection, platform_text

POLICIES = ("native", "any")
SEMANTICS = ("imagevol", "crio", "containerd")
MAX_DEPTH = 8


def platforms_in(index: Index) -> list[str]:
    out = []
    for d in index.manifests:
        out.append(platform_text(d.platform) if d.platform is not None else "(no platform)")
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
                            + (platform_text(cp) if cp and (cp.os or cp.architecture) else "no platform"),
                        )
                        step.entries.append(v)
                        continue
                    v = EntryVerdict(pos, d, "platform-less", r, note=f"no platform; config says {platform_text(cp)}")
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
                        ok = ", ".join(dict.fromkeys(platform_text(p) for p in same[0].accepted()))
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
        if self.semantics == "containerd":
            return self._select_containerd(root, doc)
        if self.semantics == "crio":
            return self._select_crio(root, doc)
        steps: list[IndexStep] = []
        found = self._walk(root, doc, steps, 0, set())
        if found is not None:
            desc, man, how, plat, warns = found
            return Selection(root, desc, man, how, plat, steps, warns)
        if self.policy == "any" and self.semantics == "imagevol":
            fb = self._fallback(root, doc, steps, 0, {str(root.digest)})
            if fb is not None:
                desc, man, plat = fb
                taken = platform_text(plat) if plat else "no platform"
                warn = (
                    f"no entry matches {', '.join(platform_text(p) for p in self.node)}; policy 'any' took "
                    f"{desc.digest.short} ({taken}), the first entry in index order"
                )
                return Selection(root, desc, man, "fallback", plat, steps, [warn])
        raise self._no_match(root, doc, steps)

    # --- the runtimes ---------------------------------------------------------
    def _visit(self, desc: Descriptor, index: Index, steps: list[IndexStep], depth: int, seen: set[str]) -> IndexStep:
        if depth >= self.max_depth:
            raise ManifestError(
                f"index nesting deeper than {self.max_depth} levels at {desc.digest}",
                hint="nested indexes this deep are refused",
            )
        if str(desc.digest) in seen:
            raise ManifestError(f"index cycle: {desc.digest} contains itself", hint="the index is malformed")
        seen.add(str(desc.digest))
        step = IndexStep(str(desc.digest), index.media_type)
        steps.append(step)
        return step

    def _select_containerd(self, root: Descriptor, doc: Index) -> Selection:
        """containerd 2.1 ``images.Manifest``: at each index, keep the entries without a platform or
        matching ``Only(node)``, sort them stably (platformed by priority, platform-less last), and
        follow only the FIRST; a platform-less manifest then matches through its config's platform."""
        matcher = self._cmatchers[0]
        steps: list[IndexStep] = []
        seen: set[str] = set()
        desc, index, depth = root, doc, 0
        while True:
            step = self._visit(desc, index, steps, depth, seen)
            cands: list[tuple[tuple[int, int, int], EntryVerdict]] = []
            for pos, d in all_entries(index):
                if d.platform is None:
                    v = EntryVerdict(pos, d, "platform-less", note="no platform: sorted after the platformed entries")
                    cands.append(((1, 0, pos), v))
                else:
                    r = matcher.rank(d.platform)
                    if r is None:
                        step.entries.append(EntryVerdict(pos, d, "no-match", note=self._no_match_note(d.platform)))
                        continue
                    v = EntryVerdict(pos, d, "match", (0, r))
                    cands.append(((0, r, pos), v))
                step.entries.append(v)
            cands.sort(key=lambda c: c[0])
            if not cands:
                step.reason = "no entry matches"
                raise self._no_match(root, doc, steps)
            first = cands[0][1]
            for _, v in cands[1:]:
                v.note = (v.note + "; " if v.note else "") + "not tried: containerd keeps only the first candidate"
            step.chosen = first.position
            d = first.descriptor
            if mt.is_index(d.media_type):
                child = self.source.manifest(d)
                if not isinstance(child, Index):
                    raise ManifestError(
                        f"manifest: invalid desc {d.digest}: media-type: expected index but found manifest"
                    )
                step.reason = f"entry {first.position} is a nested index; containerd descends into it"
                desc, index, depth = d, child, depth + 1
                continue
            if not mt.is_manifest(d.media_type):
                step.reason = f"entry {first.position} comes first and has a media type containerd does not know"
                raise ManifestError(
                    f"unexpected media type {d.media_type} for {d.digest}: not found",
                    hint="containerd stops at the first candidate; remove the entry or give it a platform",
                )
            man = self.source.manifest(d)
            if not isinstance(man, Manifest):
                raise ManifestError(f"manifest: invalid desc {d.digest}: media-type: expected manifest but found index")
            if d.platform is not None:
                step.reason = f"entry {first.position} ({first.platform}) ranks first for the node"
                return Selection(root, d, man, "platform", d.platform, steps, [])
            cp, err = go_config_platform(self.source.blob_bytes(man.config, MAX_CONFIG_SIZE))
            if err is not None:
                step.reason = f"entry {first.position} has no platform and its config is not a platform in JSON"
                raise ManifestError(err, hint=f"the config {man.config.digest} of entry {first.position} is not JSON")
            assert cp is not None
            if not matcher.match(cp):
                first.verdict = "no-match"
                first.note = (
                    f"no platform; its config says {platform_text(normalize(cp))}; containerd tries no other entry"
                )
                step.reason = f"entry {first.position} has no platform and its config does not match"
                raise self._no_match(root, doc, steps)
            first.note = f"no platform; config says {platform_text(normalize(cp))}"
            step.reason = f"entry {first.position} has no platform; its config matches the node"
            return Selection(root, d, man, "platform-less", None, steps, [])

    def _no_match_note(self, p: Platform) -> str:
        if p.os == "unknown" and p.architecture == "unknown":
            return "unknown/unknown is not a wildcard (often an attestation manifest)"
        matchers = self._cmatchers if self.semantics == "containerd" else self._crio
        same = [m for m in matchers if m.accepted() and m.accepted()[0].architecture == p.architecture]
        if same:
            ok = ", ".join(dict.fromkeys(platform_text(x) for x in same[0].accepted()))
            return f"the node accepts only {ok}"
        return ""

    def _select_crio(self, root: Descriptor, doc: Index) -> Selection:
        """containers/image v5.36 as CRI-O 1.34 calls it: one instance chosen from the top index.

        OCI index: the best rank in the wanted-platform list, entries without a platform ranked last,
        then an instance annotated zstd (CRI-O never sets PreferGzipInstances), then index order.
        Docker list: for each wanted platform in turn, the first entry matching it. A chosen entry
        that is itself an index is not mountable (see :class:`CrioNestedIndexError`)."""
        matcher = self._crio[0]
        steps: list[IndexStep] = []
        step = self._visit(root, doc, steps, 0, set())
        best: tuple[tuple[int, int, int], EntryVerdict] | None = None
        for pos, d in all_entries(doc):
            zstd = not doc.is_docker and d.annotations.get(mt.ANN_ZSTD_INSTANCE) == "true"
            if d.platform is None:
                if doc.is_docker:
                    v = EntryVerdict(
                        pos, d, "no-match", note="no platform; Docker manifest lists have no platform-less fallback"
                    )
                    step.entries.append(v)
                    continue
                v = EntryVerdict(pos, d, "platform-less", note="no platform: a candidate of the lowest rank")
                key = (1 << 30, 0 if zstd else 1, pos)
            else:
                r = matcher.rank(d.platform)
                if r is None:
                    step.entries.append(EntryVerdict(pos, d, "no-match", note=self._no_match_note(d.platform)))
                    continue
                v = EntryVerdict(pos, d, "match", (0, r))
                key = (r, 0 if zstd else 1, pos)
            if zstd:
                v.note = (v.note + "; " if v.note else "") + "zstd instance: preferred over a gzip one of equal rank"
            step.entries.append(v)
            if best is None or key < best[0]:
                best = (key, v)
        if best is None:
            step.reason = "no entry matches"
            raise self._no_match(root, doc, steps)
        v = best[1]
        step.chosen = v.position
        d = v.descriptor
        if mt.is_index(d.media_type):
            step.reason = f"entry {v.position} is chosen, and it is itself an index"
            raise CrioNestedIndexError(
                crio_pull_error(self.source, NESTED_IMAGE_ERROR, NESTED_ARTIFACT_ERROR), steps, d
            )
        if not mt.is_manifest(d.media_type):
            step.reason = f"entry {v.position} is chosen, and its media type is not a manifest's"
            raise CrioUnusableEntryError(
                f"CRI-O 1.34 chooses entry {v.position} ({d.digest}) of {root.digest}, whose media type "
                f"{d.media_type} is neither an image nor an artifact manifest: the pull fails",
                "containers/image chooses by platform only; give the entry another platform or remove it",
                steps,
                d,
            )
        man = self.source.manifest(d)
        if not isinstance(man, Manifest):
            raise ManifestError(f"entry {v.position} of {root.digest} is not a manifest")
        if v.verdict == "match":
            step.reason = f"entry {v.position} ({v.platform}) ranks first for the node"
            return Selection(root, d, man, "platform", d.platform, steps, [])
        step.reason = f"entry {v.position} has no platform and nothing ranks higher"
        return Selection(root, d, man, "platform-less", None, steps, [])

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
        node = ", ".join(platform_text(p) for p in self.node)
        present = platforms_in(index)
        if self.semantics == "crio":
            w = self._crio[0].accepted()[0]
            kind = "manifest list" if index.is_docker else "image index"
            inner = f'no image found in {kind} for architecture "{w.architecture}", variant "{w.variant}", OS "{w.os}"'
            msg = crio_pull_error(
                self.source,
                f"choosing an image from manifest list {crio_image_name(self.source)}: {inner}",
                ARTIFACT_IS_IMAGE_ERROR if index.is_docker else f"choose instance: {inner}",
            )
        elif self.semantics == "containerd":
            msg = f"no match for platform in manifest {root.digest}: not found"
        else:
            msg = f"no manifest in {root.digest.short} matches {node} (policy {self.policy})"
        hint = f"the index offers: {', '.join(present) or 'nothing'}"
        if self.semantics == "imagevol" and self.policy == "native" and index.manifests:
            hint += "; mount it anyway with --platform-policy any"
            first = index.manifests[0].platform
            if first is not None:
                hint += f" or --platform {platform_text(first)}"
            hint += "; or repack it platform-less with `imagevol pack --agnostic`"
        return NoMatchError(msg, hint=hint, trace=steps)


# CRI-O 1.34 (internal/storage/image.go, internal/ociartifact/store.go) and containers/image v5.36
# (copy/copy.go, copy/single.go, manifest.FromBlob): the texts a failed pull prints.
def all_entries(index: Index) -> list[tuple[int, Descriptor]]:
    """Every entry of an index with its position, in index order, including the media types imagevol
    ignores (the runtimes do not skip them)."""
    try:
        doc = json_loads(index.raw)
        raw = doc.get("manifests") if isinstance(doc, dict) else None
        if isinstance(raw, list) and len(raw) == len(index.manifests) + len(index.ignored):
            return [(i, Descriptor.from_dict(e, f"manifests[{i}]")) for i, e in enumerate(raw)]
    except (ImagevolError, ValueError):
        pass
    return list(enumerate(index.manifests))


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
