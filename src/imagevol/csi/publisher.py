"""Publishing and unpublishing volumes for the CSI node service: background jobs, shared pulls,
records that survive a restart.

Deadlines. A NodePublishVolume call starts a job (or attaches to the one already running for the
same volume id and target path) and waits for it at most until shortly before the caller's
deadline. A job not done by then keeps running and the call ends with :class:`Pending` (gRPC
ABORTED, "operation pending"); the caller's retry attaches to the same job, so a pull that outlives
any one deadline is neither restarted nor duplicated. A finished job's failure is delivered once, to
the call waiting for it or else to the next retry (within :data:`FAILED_RESULT_TTL`); the retry after
that starts a new attempt. A failure nobody collects within that time is dropped (the pod is gone),
so failed jobs do not pile up. A successful job leaves a mounted volume, which answers every later
retry at once.

Shared pulls. Jobs pull through a table of pulls keyed by (reference, platforms, platform policy,
pull policy, credentials): concurrent publishes of one image, whatever their volume ids, wait on
one pull. The pull runs under the store's shared gc lock and ends by taking a lease (kind ``pull``,
this process) on the chosen manifest, so gc cannot reclaim the content between the pull and the
volumes made from it; the lease goes when the last job using the pull has made its volume (and
with the process, if it dies). The pull also builds the snapshot, as ``imagevol mount`` does
(:func:`imagevol.compose.pull_and_materialize`: the largest missing layer of an image is extracted
while it downloads); that is store content, and no volume exposes it before the access check
below. Each job then makes its volume from the snapshot, found ready.

References. A reference the plugin pulled that was not in the store before is marked as the
plugin's (``R/csi/refs/``): when its last volume is unpublished, or a publish ends without a volume
(unpublished while pulling, a missing subPath) and no other volume uses it, the plugin forgets the
reference, so ``imagevol gc`` can reclaim the content. References pulled by hand (``imagevol
pull``) stay.

Private content (Kubernetes KEP-2535, for every digest). The store serves every pod on the node,
and a pull takes whatever it finds in the store without asking the registry: a reference pulled
before (pullPolicy missing or never), a digest reference under any repository name, and any blob
that another image's manifest names (a manifest that copies another image's layer descriptor gets
that image's bytes). So every digest a volume uses (the root, each index walked, the manifest, the
config, the layers) that a pull with a volume's own secret (``nodePublishSecretRef``) fetches
first is marked private (``R/csi/private/<alg>-<hex>.json``, written before the fetch starts, so a
publish that finds the content meanwhile is checked too). Before a publish is served, each private
digest it uses must be confirmed by the registry of the volume's own reference with the volume's
own credentials (its secret, or none: the node's auth files): the pull itself fetched it with them,
or the registry serves it there (a manifest: GET by digest, verified; a blob: the bytes of a random
4 KiB slice, compared with the store's, so a registry that only claims to hold the blob cannot
confirm it; see :meth:`~imagevol.registry.client.RegistryClient.confirm`). The registry itself
is asked, never a mirror. A refusal fails the publish (PERMISSION_DENIED, naming the digest of the
volume's own manifest that was refused); pullPolicy never, which cannot ask, is refused unless the
answer is cached. Positive answers are cached per (credential identity, registry/repository,
digest) in ``R/csi/allowed/`` for ``PluginConfig.access_ttl`` seconds (wall clock, so a restart
keeps them and their expiry); the identity is an HMAC of the secret under a random per-store key
(``R/csi/identity.key``, 0600), and file names hash all three, so nothing on disk names a secret or
can be tested against a guessed one without that key. Content pulled without a volume secret
(anonymously, or with the node's credentials) is public and not marked: node-wide credentials
serve every pod by design.

Records. Each published volume has the store's volume record (target, manifest, lease) and a small
CSI record (``R/csi/volumes/<hash of target>.json``: volume id and attributes). On start the plugin
reconciles records with the mount table: records of volumes whose mount is gone (a reboot) are
dropped, half-made volumes of a killed plugin are undone, and the plugin's references with no
volume left are forgotten. A publish retry for a target that is already mounted answers at once;
unpublish works from the records, whichever process published.

Volume ids. A target holds one volume id: a publish of another id at a target that holds a volume
is refused (ALREADY_EXISTS), and an unpublish naming another id than the one published there
leaves the volume alone (the spec's answer for a volume that is not published there: OK).

Unpublish during publish. A job still pulling is cancelled (it will not mount; the pull itself
finishes for the store and its other users, and a job cancelled before its pull started does not
start it) and the call goes on at once; a job in its short mounting step is waited for, then its
volume is unmounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compose import pull_and_materialize
from ..errors import ImagevolError, NotFoundError, StoreError, UsageError
from ..fetch import PullResult, plan_pull
from ..materialize import MaterializeOptions, materialize
from ..platform import Platform
from ..progress import ProgressEvent
from ..registry.egress import EgressPolicy
from ..registry.transport import RegistryOptions
from ..store import Store
from ..unpack.applier import ApplyOptions
from ..volume import Volume, create_volume, list_volumes, mountpoints, reconcile, remove_volume, resolve_subpath
from . import DEFAULT_DRIVER_NAME
from .access import Access, used_digests
from .attrs import VolumeSpec, registry_credentials
from .metrics import Metrics
from .records import CSI_DIR, name_hash, read_json, write_json
from .status import Cancelled, Conflict, Pending

log = logging.getLogger("imagevol.csi")

FAILED_RESULT_TTL = 300.0
"""Seconds a failure nobody has been told about waits for the caller's retry."""
MAX_CONCURRENT_PULLS = 4
DEFAULT_ACCESS_TTL = 3600.0
"""Seconds a registry's confirmation that credentials may read a private digest is reused."""


def materialize_options() -> MaterializeOptions:
    """How the plugin materializes every volume's snapshot: the shared pull builds it with these
    (while downloading, where it can) and :meth:`Publisher._make_volume` finds it ready."""
    return MaterializeOptions(apply=ApplyOptions())


@dataclass
class SharedPull:
    """One pull, waited on by every job that needs it."""

    key: tuple[Any, ...]
    image: str
    future: Future[PullResult] = field(default_factory=Future)
    users: int = 0
    lease: str | None = None
    started: float = field(default_factory=time.monotonic)
    total: int = 0
    downloaded: int = 0
    jobs: list[Job] = field(default_factory=list)  # the jobs waiting on it (under Publisher._mu)
    running: bool = False
    streamed: list[str] = field(default_factory=list)  # layers extracted while they downloaded

    def progress_text(self) -> str:
        mib = 1 << 20
        secs = time.monotonic() - self.started
        if not self.running:
            return f"waiting {secs:.1f} s for one of the {MAX_CONCURRENT_PULLS} pull slots"
        if self.total:
            return f"{self.downloaded / mib:.1f} of {self.total / mib:.1f} MiB after {secs:.1f} s"
        return f"resolving after {secs:.1f} s"


@dataclass
class Job:
    """Publishing one volume at one target."""

    volume_id: str
    target: Path
    spec: VolumeSpec
    started: float = field(default_factory=time.monotonic)
    future: Future[Volume] = field(default_factory=Future)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while mounting
    cancelled: bool = False
    state: str = "queued"  # queued | pulling | mounting | done
    pull: SharedPull | None = None
    done_at: float | None = None

    def describe(self) -> str:
        if self.state == "pulling" and self.pull is not None:
            return f"pulling {self.spec.image}: {self.pull.progress_text()}"
        return f"{self.state} {self.spec.image} ({time.monotonic() - self.started:.1f} s)"


@dataclass
class VolumeStats:
    """What NodeGetVolumeStats reports: the file system the volume lives on, and its condition."""

    bytes_total: int
    bytes_available: int
    bytes_used: int
    inodes_total: int
    inodes_available: int
    inodes_used: int
    abnormal: bool = False
    message: str = ""


@dataclass
class PluginConfig:
    """Settings of one plugin process."""

    root: Path
    node_id: str
    driver_name: str = DEFAULT_DRIVER_NAME
    platforms: list[Platform] = field(default_factory=list)
    options: RegistryOptions = field(default_factory=RegistryOptions)
    access_ttl: float = DEFAULT_ACCESS_TTL  # seconds a registry's "these credentials may read it" holds


MAX_WAIT = 365 * 86400.0
"""Waits longer than this are waits without limit (a lock or a condition cannot hold a larger timeout)."""


def _wait_limit(timeout: float | None) -> float | None:
    """`timeout` for a lock or future wait: None (no limit) for None, NaN or anything over MAX_WAIT."""
    return timeout if timeout is not None and timeout < MAX_WAIT else None


def canonical_target(target: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(target))))


def _subpath_inside(snap: Any, subpath: str, ref: str) -> bool:
    """Whether ``subpath`` names a file or directory inside the snapshot, reached without symlinks
    (one answer for missing, through a symlink, or under a file: nothing about the node leaks)."""
    try:
        resolve_subpath(snap.path, subpath, artifact=snap.flavour != "image", ref=ref)
    except UsageError:
        raise
    except ImagevolError:
        return False
    return True


class Publisher:
    """The node service's state: jobs by (volume id, target), shared pulls, CSI records.

    One class of about 550 lines on purpose: jobs, shared pulls and the records they leave share
    one lock (``_mu``) and one lifecycle (start, publish, unpublish, shutdown), and their
    invariants (a job attaches to at most one shared pull, a pull's lease outlives it only while a
    job uses it) are easier to hold in one place; the private-content gate is :class:`Access`
    (access.py) and the record files are records.py."""

    def __init__(self, config: PluginConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        if config.options.egress is None:  # pods choose references: an egress policy always applies
            config.options = dataclasses.replace(config.options, egress=EgressPolicy())
        self.store = Store(config.root)
        self.metrics = metrics or Metrics()
        self._mu = threading.Lock()
        self._jobs: dict[tuple[str, Path], Job] = {}
        self._pulls: dict[tuple[Any, ...], SharedPull] = {}
        self._pull_slots = threading.BoundedSemaphore(MAX_CONCURRENT_PULLS)
        self._start_mu = threading.Lock()
        self._started = False
        self._closing = False
        self.access = Access(self.store, config.access_ttl)

    # ---- paths

    @property
    def _volumes_dir(self) -> Path:
        return self.store.root / CSI_DIR / "volumes"

    @property
    def _refs_dir(self) -> Path:
        return self.store.root / CSI_DIR / "refs"

    def _record_path(self, target: Path) -> Path:
        return self._volumes_dir / f"{name_hash(os.fspath(target))}.json"

    def _ref_marker(self, ref_key: str) -> Path:
        return self._refs_dir / f"{name_hash(ref_key)}.json"

    # ---- lifecycle

    def start(self) -> None:
        """Make the store usable and reconcile the records with the mount table (idempotent)."""
        with self._start_mu:
            if not self._started:
                self._start()

    def _start(self) -> None:
        self.store.ensure()
        self.store.meta.schema_version()
        gone = reconcile(self.store)  # drops records of volumes whose mount is gone
        for v in gone:
            log.info("reconcile: volume at %s (%s) is no longer mounted; record dropped", v.target, v.ref)
        recorded = {v.target for v in list_volumes(self.store)}  # also undoes half-made volumes
        kept = 0
        for path in sorted(self._volumes_dir.glob("*.json")) if self._volumes_dir.is_dir() else []:
            doc = read_json(path)
            target = Path(doc["target"]) if doc and isinstance(doc.get("target"), str) else None
            if target is None or target not in recorded:
                path.unlink(missing_ok=True)
            else:
                kept += 1
        for path in sorted(self._refs_dir.glob("*.json")) if self._refs_dir.is_dir() else []:
            doc = read_json(path)
            if doc and isinstance(doc.get("ref"), str):
                self._forget_ref_if_unused(doc["ref"])
            else:
                path.unlink(missing_ok=True)
        self.access.sweep()
        self.metrics.volumes.set(kept)
        log.info("store %s ready: %d volume(s) published by this plugin", self.store.root, kept)
        self._started = True

    def ensure_started(self) -> None:
        if self._closing:
            raise StoreError("the plugin is shutting down", hint="the CO retries once the plugin is back")
        if not self._started:
            try:
                self.start()
            except ImagevolError:
                raise
            except Exception as e:
                raise StoreError(
                    f"the store at {self.store.root} is unusable: {e}",
                    hint="check the plugin's --root volume (a writable directory on the node)",
                ) from None

    def probe(self) -> tuple[bool, str]:
        """(ready, why not): the store root is a writable directory and its metadata opens."""
        root = self.store.root
        try:
            self.ensure_started()
        except Exception as e:
            msg = e.message if isinstance(e, ImagevolError) else f"{type(e).__name__}: {e}"
            return False, msg
        if not root.is_dir():
            return False, f"store root {root} is not a directory"
        probe = root / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            return False, f"store root {root} is not writable: {e.strerror or e}"
        try:
            self.store.meta.schema_version()
        except Exception as e:
            msg = e.message if isinstance(e, ImagevolError) else f"{type(e).__name__}: {e}"
            return False, f"store {root} is unusable: {msg}"
        return True, ""

    def shutdown(self, timeout: float) -> None:
        """Refuse new work; let jobs that are mounting finish (at most `timeout` seconds). Pulls are
        left as they are: a pull killed with the process resumes at the next publish."""
        self._closing = True
        deadline = time.monotonic() + timeout
        with self._mu:
            jobs = list(self._jobs.values())
        for job in jobs:
            left = max(0.0, deadline - time.monotonic())
            if job.lock.acquire(timeout=left):
                job.cancelled = True
                job.lock.release()

    # ---- publish

    def existing(self, target: Path, spec: VolumeSpec, volume_id: str | None = None) -> Volume | None:
        """The volume already mounted at `target` if it is this spec's (and, given `volume_id`, this
        volume's); Conflict if another's."""
        rec = self.store.meta.get_volume_by_target(os.fspath(target))
        if rec is None:
            return None
        mounted = os.fspath(target) in mountpoints() if rec.mode == "bind" else os.path.lexists(target)
        if not mounted:
            return None
        doc = read_json(self._record_path(target))
        if doc is not None and volume_id is not None and doc.get("volumeId") not in (None, volume_id):
            raise Conflict(
                f"target {target} already holds volume {doc.get('volumeId')} ({doc.get('image')}); "
                f"this request publishes volume {volume_id} there",
                hint="each volume needs a target of its own; unpublish the other volume first",
            )
        if doc is not None:
            same = (
                doc.get("image") == spec.image
                and (doc.get("subPath") or None) == spec.subpath
                and (doc.get("platform") or "") == spec.platform_attr  # the attribute, not --platform
                and doc.get("platformPolicy") == spec.policy
            )
            what = doc.get("image")
        else:  # published by a process that died before writing its CSI record, or by hand
            same = rec.ref == spec.ref_key
            what = rec.ref
        if not same:
            raise Conflict(
                f"target {target} already holds another volume ({what}); this request asks for {spec.describe()}",
                hint="unpublish that volume first; a pod's volume attributes cannot change while it runs",
            )
        return Volume(rec.id, target, rec.ref or "", rec.digest, rec.snapshot_key or "", rec.mode, spec.subpath,
                      rec.created_at, True)  # fmt: skip

    def publish(
        self,
        volume_id: str,
        target: str | os.PathLike[str],
        spec: VolumeSpec,
        *,
        secrets: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Volume:
        """Mount `spec` read-only at `target`; see the module docs. Raises :class:`Pending` when the
        work outlives `timeout` seconds (None: wait until done)."""
        self.ensure_started()
        tgt = canonical_target(target)
        found = self.existing(tgt, spec, volume_id)
        if found is not None:
            return found
        key = (volume_id, tgt)
        now = time.monotonic()
        with self._mu:
            self._sweep_locked(now)
            job = self._jobs.get(key)
            if job is not None and job.future.done():
                stale = job.future.exception() is None or (now - (job.done_at or now)) > FAILED_RESULT_TTL
                if stale or job.spec != spec:
                    del self._jobs[key]
                    job = None
            if job is not None and job.cancelled and not job.future.done():
                raise Pending(
                    f"volume {volume_id} at {tgt} was unpublished while it was being published; that "
                    "work is still ending",
                    "retry in a moment",
                )
            if job is not None and job.spec != spec:
                raise Pending(
                    f"volume {volume_id} is being published at {tgt} with other attributes ({job.spec.describe()})",
                    "retry once it is done, or unpublish it",
                )
            if job is None:
                for other in self._jobs.values():
                    if other.target == tgt and not other.future.done():
                        raise Conflict(
                            f"target {tgt} is being published for volume {other.volume_id}",
                            hint="each volume needs a target of its own",
                        )
                creds = dict(secrets or {})
                options = self._options_for(spec, creds)
                job = Job(volume_id, tgt, spec)
                self._jobs[key] = job
                threading.Thread(
                    target=self._run_job,
                    args=(job, options, self._creds_key(creds)),
                    name=f"csi-publish-{volume_id[:16]}",
                    daemon=True,
                ).start()
        try:
            return job.future.result(timeout=_wait_limit(timeout))
        except FutureTimeout:
            raise Pending(
                f"volume {volume_id}: {job.describe()}; the work goes on",
                "the next NodePublishVolume call for this volume attaches to it",
            ) from None
        except BaseException:
            # The job's own failure, delivered: the next retry starts a new attempt. Anything else
            # (the wait itself failed) leaves a job that still runs where the retry finds it.
            with self._mu:
                if self._jobs.get(key) is job and job.future.done():
                    del self._jobs[key]
            raise

    def _sweep_locked(self, now: float) -> None:
        """Drop finished jobs whose failure nobody collected within FAILED_RESULT_TTL (under _mu)."""
        for key, job in list(self._jobs.items()):
            if job.future.done() and job.done_at is not None and now - job.done_at > FAILED_RESULT_TTL:
                del self._jobs[key]

    def _options_for(self, spec: VolumeSpec, secrets: dict[str, str]) -> RegistryOptions:
        base = self.config.options
        lookup = registry_credentials(secrets, spec.ref, base.authfile)
        return base if lookup is None else dataclasses.replace(base, credentials=lookup)

    @staticmethod
    def _creds_key(secrets: dict[str, str]) -> str:
        if not secrets:
            return ""
        h = hashlib.sha256()
        for k in sorted(secrets):
            h.update(k.encode() + b"\0" + secrets[k].encode() + b"\0")
        return h.hexdigest()

    def _run_job(self, job: Job, options: RegistryOptions, creds_key: str) -> None:
        shared: SharedPull | None = None
        res: PullResult | None = None
        vol: Volume | None = None
        error: BaseException | None = None
        try:
            if job.cancelled:  # unpublished before it started: no pull for nobody
                raise Cancelled(f"volume {job.volume_id} was unpublished before its pull started")
            job.state = "pulling"
            shared = self._attach_pull(job, options, creds_key)
            job.pull = shared
            res = shared.future.result()
            with job.lock:
                if job.cancelled:
                    raise Cancelled(
                        f"volume {job.volume_id} was unpublished (or the plugin stopped) before it was mounted"
                    )
                job.state = "mounting"
                vol = self._make_volume(job, res)
            self.metrics.publish_seconds.observe(time.monotonic() - job.started)
        except BaseException as e:
            error = e
            if not isinstance(e, Cancelled):
                log.info("publish of volume %s (%s) failed: %s", job.volume_id, job.spec.image, e)
        finally:
            # The pull's lease goes before anyone hears of the outcome: once the caller knows, gc
            # sees only what the volume holds.
            if shared is not None:
                self._release_pull(shared, job)
        job.state = "done"
        job.done_at = time.monotonic()
        if error is not None:
            if job.cancelled:  # unpublished: nobody waits for this outcome
                with self._mu:
                    if self._jobs.get((job.volume_id, job.target)) is job:
                        del self._jobs[(job.volume_id, job.target)]
            job.future.set_exception(error)
            if res is not None or shared is not None:
                # The pull may have made the plugin's reference (also when its content was then refused
                # to this volume), and no volume holds it: forget it (if nothing else uses it), or gc
                # could never reclaim the content.
                try:
                    self._forget_ref_if_unused(res.reference if res is not None else job.spec.ref_key)
                except Exception as e:
                    log.warning("cannot release %s after the failed publish: %s", job.spec.image, e)
            return
        with self._mu:
            if self._jobs.get((job.volume_id, job.target)) is job:
                del self._jobs[(job.volume_id, job.target)]
        job.future.set_result(vol)  # type: ignore[arg-type]

    def _make_volume(self, job: Job, res: PullResult) -> Volume:
        store = self.store
        spec = job.spec

        def warn(msg: str) -> None:
            log.warning("volume %s (%s): %s", job.volume_id, spec.image, msg)

        with store.lock("gc", shared=True):
            # Built by the shared pull (_run_pull): found ready here.
            snap = materialize(store, res.manifest, options=materialize_options(), warn=warn)
            if spec.subpath and not _subpath_inside(snap, spec.subpath, res.reference):
                kind = "image" if snap.flavour == "image" else f"{snap.flavour} artifact"
                raise NotFoundError(
                    f'sub path "{spec.subpath}" does not exist in {spec.image} ({kind}, {res.digest.short})',
                    hint="fix the volume attribute subPath; `imagevol inspect REF` lists the layers and titles",
                )
            vol = create_volume(store, snap, job.target, ref=res.reference, mode="auto", subpath=spec.subpath)
        write_json(
            self._record_path(job.target),
            {
                "volumeId": job.volume_id,
                "target": os.fspath(job.target),
                "image": spec.image,
                "reference": res.reference,
                "digest": str(res.digest),
                "platform": spec.platform_attr,  # as the pod gave it: a restart with other --platform flags
                "platforms": [str(p) for p in spec.platforms],  # keeps its volumes
                "platformPolicy": spec.policy,
                "pullPolicy": spec.pull_policy,
                "subPath": spec.subpath,
                "storeVolumeId": vol.id,
                "publishedAt": time.time(),
            },
        )
        self._count_volumes()
        return vol

    # ---- shared pulls

    def _attach_pull(self, job: Job, options: RegistryOptions, creds_key: str) -> SharedPull:
        spec = job.spec
        key = (spec.ref_key, spec.platforms, spec.policy, spec.pull_policy, creds_key)
        with self._mu:
            sp = self._pulls.get(key)
            if sp is None or (sp.future.done() and sp.future.exception() is not None):
                sp = SharedPull(key, spec.image)
                self._pulls[key] = sp
                threading.Thread(
                    target=self._run_pull, args=(sp, spec, options, creds_key), name="csi-pull", daemon=True
                ).start()
            sp.users += 1
            sp.jobs.append(job)
            return sp

    def _release_pull(self, sp: SharedPull, job: Job) -> None:
        with self._mu:
            sp.users -= 1
            with contextlib.suppress(ValueError):
                sp.jobs.remove(job)
            drop = sp.users == 0 and sp.future.done()
            if drop and self._pulls.get(sp.key) is sp:
                del self._pulls[sp.key]
        if drop:
            self._drop_lease(sp)

    def _drop_lease(self, sp: SharedPull) -> None:
        lease, sp.lease = sp.lease, None
        if lease is not None:
            try:
                self.store.meta.remove_lease(lease)
            except Exception as e:  # it expires with the process anyway
                log.warning("cannot remove lease %s: %s", lease, e)

    def _run_pull(self, sp: SharedPull, spec: VolumeSpec, options: RegistryOptions, creds_key: str) -> None:
        store = self.store

        def progress(ev: ProgressEvent) -> None:
            if ev.kind == "resolved" and ev.size:
                sp.total = ev.size
            elif ev.kind == "bytes" and not ev.cached:
                sp.downloaded += ev.n
                self.metrics.pull_bytes.inc(ev.n)

        fetched: set[str] = set()  # blobs this pull downloaded (all of them: nothing found in the store)
        found: set[str] = set()

        def tracking(ev: ProgressEvent) -> None:
            if ev.kind == "bytes" and ev.digest:
                (found if ev.cached else fetched).add(ev.digest)
            progress(ev)

        with self._pull_slots:
            with self._mu:
                # Every volume that wanted it was unpublished while it waited for a slot.
                abandoned = bool(sp.jobs) and all(j.cancelled for j in sp.jobs)
                if abandoned and self._pulls.get(sp.key) is sp:
                    del self._pulls[sp.key]
            if abandoned:
                sp.future.set_exception(Cancelled(f"the pull of {spec.image} was not started: no volume wants it"))
                return
            sp.started = time.monotonic()
            sp.running = True
            try:
                existed = store.meta.get_ref(spec.ref_key) is not None
                # As imagevol.mount does: content the pull found or fetched cannot be collected before
                # the lease below holds it.
                with store.lock("gc", shared=True):
                    plan = plan_pull(
                        spec.ref,
                        root=store,
                        platforms=list(spec.platforms),
                        policy=spec.policy,
                        pull_policy=spec.pull_policy,
                        options=options,
                        progress=tracking,
                    )
                    used = used_digests(plan.selection)
                    if creds_key and plan.offline is None:
                        # What this secret fetches first is private, marked before the fetch starts.
                        self.access.mark_private([u for u in used if not store.has_blob(u.digest)])
                    # The snapshot is built with the pull (the largest layer extracted while it
                    # downloads, where it can): store content, exposed by no volume before Access.admit.
                    res, snap, sp.streamed = pull_and_materialize(
                        plan, materialize_options(), lambda msg: log.warning("pull %s: %s", spec.image, msg)
                    )
                    if not existed and store.meta.get_ref(res.reference) is not None:
                        # The plugin's reference (forgotten with its last volume, or at once if refused).
                        write_json(self._ref_marker(res.reference), {"ref": res.reference, "since": time.time()})
                    proved: set[str] = set()
                    if not res.offline:  # manifests were fetched (verified) from the registry just now
                        proved = {str(u.digest) for u in used if u.manifest} | (fetched - found)
                    self.access.admit(spec, res, used, proved, options, creds_key)
                    lease = f"csi-pull:{os.getpid()}:{uuid.uuid4().hex[:8]}"
                    store.meta.add_lease(lease, [res.root_digest, res.digest], kind="pull", pid=os.getpid())
                sp.lease = lease
                self.metrics.pulls.labels("success").inc()
                self.metrics.pull_seconds.observe(time.monotonic() - sp.started)
                log.info(
                    "pulled %s -> %s: %d bytes downloaded, %d reused, snapshot %s%s, %.2f s",
                    spec.image, res.digest, res.downloaded, res.reused, "built" if snap.created else "found",
                    f" ({len(sp.streamed)} layer(s) extracted while downloading)" if sp.streamed else "",
                    time.monotonic() - sp.started,
                )  # fmt: skip
            except BaseException as e:
                self.metrics.pulls.labels("failure").inc()
                self.metrics.pull_seconds.observe(time.monotonic() - sp.started)
                with self._mu:
                    if self._pulls.get(sp.key) is sp:
                        del self._pulls[sp.key]  # the next attempt pulls afresh
                sp.future.set_exception(e)
                return
        with self._mu:
            orphan = sp.users == 0
            if orphan and self._pulls.get(sp.key) is sp:
                del self._pulls[sp.key]
        if orphan:
            self._drop_lease(sp)
        sp.future.set_result(res)

    # ---- health

    def volume_stats(self, volume_id: str, path: str | os.PathLike[str]) -> VolumeStats:
        """Usage and condition of the volume published at `path` (NotFoundError if none is, or
        another volume is)."""
        self.ensure_started()
        tgt = canonical_target(path)
        rec = self.store.meta.get_volume_by_target(os.fspath(tgt))
        doc = read_json(self._record_path(tgt))
        if rec is None or (doc is not None and doc.get("volumeId") not in (None, volume_id)):
            raise NotFoundError(
                f"volume {volume_id} is not published at {tgt}",
                hint="NodeGetVolumeStats answers for a path this plugin published the volume at",
            )
        problems: list[str] = []
        if rec.mode == "bind" and os.fspath(tgt) not in mountpoints():
            problems.append(f"{tgt} is no longer mounted")
        elif rec.mode != "bind" and not os.path.lexists(tgt):
            problems.append(f"{tgt} is gone")
        snap = self.store.meta.get_snapshot(rec.snapshot_key) if rec.snapshot_key else None
        if snap is None or snap.state != "ready":
            problems.append(f"its snapshot {rec.snapshot_key or '?'} is not ready in the store")
        elif not os.path.isdir(snap.path) or os.path.islink(snap.path):
            problems.append(f"its snapshot {snap.path} is missing from the store")
        where = snap.path if snap is not None and not problems else os.fspath(self.store.root)
        st = os.statvfs(where)
        usage = VolumeStats(
            bytes_total=st.f_blocks * st.f_frsize,
            bytes_available=st.f_bavail * st.f_frsize,
            bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            inodes_total=st.f_files,
            inodes_available=st.f_favail,
            inodes_used=st.f_files - st.f_ffree,
            abnormal=bool(problems),
            message="; ".join(problems) + ("; unpublish and publish it again" if problems else ""),
        )
        return usage

    # ---- unpublish

    def unpublish(self, volume_id: str, target: str | os.PathLike[str], *, timeout: float | None = None) -> bool:
        """Unmount the volume at `target`, release its content and remove the target; True if a
        volume was there. Idempotent. Raises :class:`Pending` if a job is mounting it and does not
        finish within `timeout`."""
        self.ensure_started()
        tgt = canonical_target(target)
        key = (volume_id, tgt)
        record = read_json(self._record_path(tgt))
        if record is not None and record.get("volumeId") not in (None, volume_id):
            # Another volume is published there: this one is not, and that one is not ours to undo.
            log.warning(
                "unpublish of volume %s at %s: the target holds volume %s; left in place",
                volume_id, tgt, record.get("volumeId"),
            )  # fmt: skip
            return False
        with self._mu:
            job = self._jobs.get(key)
        if job is not None:
            limit = _wait_limit(timeout)
            if not job.lock.acquire(timeout=-1 if limit is None else max(0.0, limit)):
                raise Pending(f"volume {volume_id} is being mounted at {tgt}", "retry in a moment")
            job.cancelled = True
            job.lock.release()
            with self._mu:  # a job still running stays in the table: it leaves when its thread is done
                if self._jobs.get(key) is job and job.future.done():
                    del self._jobs[key]
            record = read_json(self._record_path(tgt))  # the job may just have written it
        ref_key: str | None = None
        try:
            vol = remove_volume(self.store, tgt)
            ref_key = vol.ref or None
            removed = True
        except NotFoundError:
            removed = False
            if os.fspath(tgt) in mountpoints():
                raise ImagevolError(
                    f"{tgt} is a mount point that imagevol has no record of",
                    hint=f"it was not mounted by this plugin; check it (`findmnt {tgt}`) and unmount it by hand",
                ) from None
            if record is not None and isinstance(record.get("reference"), str):
                ref_key = record["reference"]
        try:
            os.rmdir(tgt)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            log.warning("target %s is left in place: %s", tgt, e.strerror)
        self._record_path(tgt).unlink(missing_ok=True)
        if ref_key:
            self._forget_ref_if_unused(ref_key)
        self._count_volumes()
        return removed

    def _forget_ref_if_unused(self, ref_key: str) -> None:
        """Forget a reference the plugin pulled once no volume, job or pull uses it (then gc may
        reclaim its content). Under the lock that starting a pull takes, so no pull of it starts
        in between."""
        marker = self._ref_marker(ref_key)
        if not marker.exists():
            return
        with self._mu:
            if any(j.spec.ref_key == ref_key for j in self._jobs.values() if not j.future.done()):
                return
            if any(sp.key[0] == ref_key for sp in self._pulls.values()):
                return
            if any(rec.ref == ref_key for rec in self.store.meta.list_volumes()):
                return
            self.store.meta.remove_ref(ref_key)
            marker.unlink(missing_ok=True)
        log.info("forgot %s: no volume uses it any more (gc may reclaim its content)", ref_key)

    def _count_volumes(self) -> None:
        with contextlib.suppress(OSError):
            self.metrics.volumes.set(sum(1 for _ in self._volumes_dir.glob("*.json")))


__all__ = ["Conflict", "Job", "PluginConfig", "Publisher", "SharedPull", "VolumeStats", "canonical_target"]
