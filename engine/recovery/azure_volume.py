"""Seed volumes on Azure Blob Storage: the image as a page blob, state and undo journal as block blobs.

Layout in the container (``[applier.azure]``), for each disk::

    <prefix><disk>.img                 page blob: the seed image (size rounded up to 512; "disk_size" metadata)
    <prefix><disk>.state.json          block blob: the applier state (SeedState as JSON), one Put Blob
    <prefix>journal/<disk>/<entry>     block blobs: undo entries (protocol.journal), one per apply group
    <prefix>.applier.lock              the lock blob; the running applier holds a lease on it

How each SeedVolume guarantee holds here:

* **write_ranges** keeps the in-order semantics (later writes win where they overlap) without sending a byte
  twice: the writes are coalesced into merged, 512-aligned extents of their *final* content, cut into chunks of
  at most 4 MiB (the Put Page limit), and each chunk is one ``upload_page`` — with at most ``max_concurrency``
  in flight and each chunk built only when its upload starts (memory: ``max_concurrency`` × 4 MiB). A chunk that
  is exactly one write's slice is sent without a copy. A sector only partly covered by the writes (never the
  case for the applier, whose writes are sector-aligned) is read first and merged.
* **read_ranges** downloads only what was ever written: the image's valid page ranges are listed once per
  volume and kept up to date in memory (bounded: a disk written in more than 64 Ki fragments is no longer
  tracked), so the before-images of a fresh disk — the whole initial copy — cost no request at all; the rest
  is read in spans of up to 4 MiB (ranges less than 256 KiB apart joined), ``max_concurrency`` at a time.
* **flush** is a no-op: Put Page is synchronous — when the service acknowledges it, the pages are durable
  (written to every replica in the primary region, whatever the account's redundancy), and ``write_ranges``
  returns only after every one of its ``upload_page`` calls returned.
* **save_state** and **put_entry** are single atomic blob writes (one Put Blob, or Put Block List for an entry
  larger than ``store.azure.single_put_max_bytes``): a reader sees the old or the new blob, never a mix.
* **copy_image_to** asks for the page ranges that hold data (``list_page_ranges``) and downloads only those,
  in parallel, into a local sparse file; the rest stays a hole.

Errors: reads raise :class:`StoreError` (``transient`` for throttling, timeouts, resets; mapped by
engine/azure_common.py, secrets scrubbed), which the applier's run loop answers by retrying its pass. The
writes of an apply group — ``put_entry``, ``write_ranges``, ``save_state`` — instead retry transient failures in
place (capped exponential backoff with jitter) until they succeed, because all three are idempotent and the
applier has no way to take back a half-applied group in a live process: raising would let it capture the
before-images of the retried group from a partly written image, and after a failed ``save_state`` its memory
would already be ahead of the stored state. Only cancellation (shutdown) interrupts them; the restarted applier
rolls the group back from its undo entry, as after a crash. A *non-transient* failure inside a group (the
container or blob deleted under us, permissions revoked, the lease broken) leaves the volume refusing every
further change until the applier is restarted, for the same reason.

One applier per container and prefix: the first use takes an infinite lease on the lock blob, with a lease id
kept in the local seed directory (``<seed_dir>/azure-lease.id``), so an applier restarted on the same machine
after a crash takes its lease back at once, while any other machine (or a second seed directory) is refused
with :class:`ApplierLocked`, naming the holder. The lease is renewed (i.e. checked) every 15 s and released on
close; if it was broken, changes stop (within 15 s: the image's Put Page requests cannot carry the lease of
another blob, so it is a lock between appliers, not a fence against any writer of the account). To move the
applier to another machine after its host died, break the lease (``az storage blob lease break
--container-name <c> --blob-name <prefix>.applier.lock``).
"""

from __future__ import annotations

import asyncio
import bisect
import datetime
import errno
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobClient, BlobLeaseClient

from engine.applier import ApplierLocked
from engine.azure_common import AzureContainer, backoff_delay
from engine.config import AzureCredentials, AzureStoreConfig, Config, ConfigError, SeedAzureConfig
from engine.fsutil import write_at, write_durably
from engine.recovery.volume import GroupCommit, Progress, SeedState, VolumeBroken
from engine.store.base import StoreError
from protocol.journal import EntryName

log = logging.getLogger(__name__)

T = TypeVar("T")

SECTOR = 512
MAX_PAGE_WRITE = 4 * 1024 * 1024  # the service's limit for one Put Page
READ_SPAN = 4 * 1024 * 1024  # largest ranged read
READ_GAP = 256 * 1024  # ranges closer than this are read as one span: fewer transactions, a little more data
LOCK_BLOB = ".applier.lock"  # disk ids never start with a dot: no disk's blobs can collide with it
LEASE_CHECK_S = 15.0
_LABEL = "azure seed"
_AUTH_HINT = ("check the account key / SAS token / connection string in store.azure or the environment (the seed "
              "volume uses the same account), and the SAS permissions and expiry")


def _up(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


def _down(n: int) -> int:
    return n // SECTOR * SECTOR


# --------------------------------------------------------------------------------------------- write planning


@dataclass(frozen=True, slots=True)
class PageChunk:
    """One ``upload_page``: ``[start, end)`` (512-aligned, at most 4 MiB) and the writes that land in it, in order."""

    start: int
    end: int
    writes: tuple[int, ...]  # indices into the writes, ascending (= the order they must be applied in)


@dataclass(frozen=True, slots=True)
class PagePlan:
    chunks: list[PageChunk]
    partial: list[int]  # starts of sectors the writes cover only in part: their current content is needed first

    def build(self, chunk: PageChunk, writes: Sequence[tuple[int, bytes | memoryview]],
              base: dict[int, bytes]) -> bytes | bytearray | memoryview:
        """The final content of ``chunk``: its writes applied in order over ``base`` (the partial sectors)."""
        if len(chunk.writes) == 1:
            offset, data = writes[chunk.writes[0]]
            if offset <= chunk.start and offset + len(data) >= chunk.end:  # one write's slice: no copy
                return memoryview(data)[chunk.start - offset:chunk.end - offset]
        buf = bytearray(chunk.end - chunk.start)
        view = memoryview(buf)
        lo = bisect.bisect_left(self.partial, chunk.start)
        for sector in self.partial[lo:bisect.bisect_left(self.partial, chunk.end)]:
            view[sector - chunk.start:sector - chunk.start + SECTOR] = base[sector]
        for i in chunk.writes:
            offset, data = writes[i]
            a, b = max(offset, chunk.start), min(offset + len(data), chunk.end)
            view[a - chunk.start:b - chunk.start] = memoryview(data)[a - offset:b - offset]
        return buf


def plan_page_writes(writes: Sequence[tuple[int, bytes | memoryview]], max_bytes: int = MAX_PAGE_WRITE) -> PagePlan:
    """Merged 512-aligned extents covering ``writes``, cut into chunks of at most ``max_bytes``."""
    assert max_bytes % SECTOR == 0 and max_bytes > 0
    spans = [(offset, offset + len(data)) for offset, data in writes if len(data)]
    aligned = _merge((_down(a), _up(b)) for a, b in spans)
    covered = _merge(spans)
    partial = sorted({_down(edge) for a, b in covered for edge in (a, b) if edge % SECTOR})
    chunks: list[list[Any]] = []
    for a, b in aligned:
        for start in range(a, b, max_bytes):
            chunks.append([start, min(b, start + max_bytes), []])
    starts = [c[0] for c in chunks]
    for i, (offset, data) in enumerate(writes):
        if not len(data):
            continue
        a, b = offset, offset + len(data)
        k = bisect.bisect_right(starts, a) - 1
        while k < len(chunks) and chunks[k][0] < b:
            chunks[k][2].append(i)
            k += 1
    return PagePlan([PageChunk(s, e, tuple(w)) for s, e, w in chunks], partial)


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint [start, end) spans covering ``spans`` (touching ones joined)."""
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def plan_reads(ranges: Sequence[tuple[int, int]], *, gap: int = READ_GAP,
               max_span: int = READ_SPAN) -> list[tuple[int, int]]:
    """[start, end) spans to download for ``ranges``: near ranges joined, none longer than ``max_span``."""
    spans: list[list[int]] = []
    for a, b in _merge((o, o + n) for o, n in ranges if n > 0):
        while a < b:
            if spans and a - spans[-1][1] <= gap and spans[-1][1] - spans[-1][0] < max_span:
                start = spans[-1][0]
                end = min(b, start + max_span)
                spans[-1][1] = end
            else:
                end = min(b, a + max_span)
                spans.append([a, end])
            a = end
    return [(a, b) for a, b in spans]


MAX_TRACKED_RANGES = 65536


class WrittenRanges:
    """Sorted, disjoint ``[start, end)`` spans of an image that were ever written (its valid page ranges).

    Before-images of never-written pages are zeros: a fresh seed disk (the initial copy) is read not at all. A
    disk written in more than MAX_TRACKED_RANGES separate fragments is no longer tracked (memory stays bounded;
    every read then goes to the service, as if nothing were known).
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> bool:
        """Record ``[start, end)``; False when there are too many fragments to keep tracking."""
        if start >= end:
            return True
        i = bisect.bisect_left(self.ends, start)  # the first span ending at or after start (touching it)
        j = bisect.bisect_right(self.starts, end)  # past the last span starting at or before end
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]
        return len(self.starts) <= MAX_TRACKED_RANGES

    def clip(self, start: int, end: int) -> list[tuple[int, int]]:
        """The written parts of ``[start, end)``."""
        out = []
        i = bisect.bisect_right(self.ends, start)
        while i < len(self.starts) and self.starts[i] < end:
            out.append((max(start, self.starts[i]), min(end, self.ends[i])))
            i += 1
        return out


async def bounded(items: Sequence[T], limit: int, fn: Callable[[T], Awaitable[None]]) -> None:
    """``fn`` on every item, at most ``limit`` at a time; the first failure cancels the rest and is raised."""
    if not items:
        return
    it = iter(items)

    async def worker() -> None:
        for item in it:  # one shared iterator: each item is taken by exactly one worker
            await fn(item)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# --------------------------------------------------------------------------------------------- the factory


class AzureVolumes(AzureContainer):
    """Opens Azure seed volumes in one container and prefix; holds the applier's lease while in use.

    A "not found" is never transient here: a seed container or blob deleted under us stays lost.
    """

    label = _LABEL
    auth_hint = _AUTH_HINT

    def __init__(self, store: AzureStoreConfig, seed: SeedAzureConfig, *, lease_id_file: Path | None = None,
                 credentials: AzureCredentials | None = None, holder: str = "") -> None:
        super().__init__(store, credentials or store.credentials(), seed.container, seed.prefix,
                         max_single_get_size=READ_SPAN, max_chunk_get_size=READ_SPAN)
        self.max_concurrency = seed.max_concurrency
        self.lease_id_file = lease_id_file
        self.holder = holder or f"{socket.gethostname()} pid {os.getpid()}"
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._lease: BlobLeaseClient | None = None
        self._watch: asyncio.Task[None] | None = None
        self.lease_lost: str | None = None
        self._lease_id: str | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: Config) -> AzureVolumes:
        """The volumes ``[applier.azure]`` describes, with the account of ``[store.azure]``."""
        try:
            creds = config.store.azure.credentials()
        except ValueError as exc:
            raise ConfigError(f'applier.volume = "azure" uses the account and credentials of [store.azure] (or the '
                              f"environment): {exc}") from None
        return cls(config.store.azure, config.applier.azure, credentials=creds,
                   lease_id_file=config.seed_dir / "azure-lease.id")

    def __call__(self, disk: str) -> AzureVolume:
        return AzureVolume(self, disk)

    async def list_disks(self) -> list[str]:
        await self.ready()
        suffix = ".state.json"
        names = []
        try:
            async for name in self.client.list_blob_names(name_starts_with=self.prefix or None):
                rest = name[len(self.prefix):]
                if rest.endswith(suffix) and "/" not in rest:
                    names.append(rest[: -len(suffix)])
        except Exception as exc:  # noqa: BLE001
            raise self.error("list", None, exc) from None
        return sorted(names)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._lease is not None and self.lease_lost is None:
            try:
                await self._lease.release()
            except Exception as exc:  # noqa: BLE001 - it ends with the lease's owner anyway
                log.warning("%s; it stays with this applier's lease id", self.error("release the lease on",
                                                                                     LOCK_BLOB, exc))
            self._lease = None
        await self.close_clients()

    # ------------------------------------------------------------------ the lease

    async def ready(self) -> None:
        """The container exists and this applier holds the lease (taken on first use)."""
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            await self.create_container()
            await self._acquire()
            self._ready = True
            self._watch = asyncio.create_task(self._keep_lease(), name="azure-seed-lease")

    def lease_id(self) -> str:
        """This seed directory's lease id (a new one is kept there on first use); without a directory, one for
        the life of this object. Stable, so an acquisition retried after a lost answer finds its own lease."""
        if self._lease_id is not None:
            return self._lease_id
        if self.lease_id_file is not None:
            try:
                self._lease_id = str(uuid.UUID(self.lease_id_file.read_text().strip()))
            except (FileNotFoundError, ValueError):
                self._lease_id = str(uuid.uuid4())
                self.lease_id_file.parent.mkdir(parents=True, exist_ok=True)
                write_durably(self.lease_id_file, self._lease_id.encode(), mode=0o600)
        else:
            self._lease_id = str(uuid.uuid4())
        return self._lease_id

    async def _acquire(self) -> None:
        lock = self.client.get_blob_client(self.prefix + LOCK_BLOB)
        try:
            await lock.upload_blob(b"", overwrite=False)
        except ResourceExistsError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self.error("create", LOCK_BLOB, exc) from None
        try:
            self._lease = await lock.acquire_lease(-1, lease_id=self.lease_id())
        except HttpResponseError as exc:
            if exc.status_code != 409 or getattr(exc, "error_code", None) not in ("LeaseAlreadyPresent", None):
                raise self.error("lease", LOCK_BLOB, exc) from None
            try:
                holder = (await lock.get_blob_properties()).metadata.get("holder", "unknown holder")
            except Exception:  # noqa: BLE001
                holder = "unknown holder"
            raise ApplierLocked(
                f"another applier holds the lease on {self.prefix}{LOCK_BLOB} in container {self.container!r} of "
                f"account {self.account!r} ({holder}): one applier per seed container and prefix. If it is gone "
                f"for good, break the lease (az storage blob lease break --container-name {self.container} "
                f"--blob-name {self.prefix}{LOCK_BLOB}) and start again") from None
        except Exception as exc:  # noqa: BLE001
            raise self.error("lease", LOCK_BLOB, exc) from None
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        try:
            await lock.set_blob_metadata({"holder": f"{self.holder} since {since}"}, lease=self._lease)
        except Exception as exc:  # noqa: BLE001 - informative only
            log.warning("%s", self.error("set the metadata of", LOCK_BLOB, exc))
        log.info("%s: holding the lease on %s%s in container %r of account %r", _LABEL, self.prefix, LOCK_BLOB,
                 self.container, self.account)

    async def _keep_lease(self) -> None:
        """Renew (an infinite lease: this checks it is still ours) until closed; note it if it was taken away."""
        assert self._lease is not None
        while self.lease_lost is None:
            await asyncio.sleep(LEASE_CHECK_S)
            await self.check_lease()

    async def check_lease(self) -> bool:
        """Whether the lease is still ours (a transient failure to ask counts as yes, until the next check)."""
        assert self._lease is not None
        if self.lease_lost is not None:
            return False
        try:
            await self._lease.renew()
        except Exception as exc:  # noqa: BLE001
            error = self.error("renew the lease on", LOCK_BLOB, exc)
            if error.transient:
                log.warning("%s; will check again", error)
                return True
            self.lease_lost = (f"the lease on {self.prefix}{LOCK_BLOB} in container {self.container!r} was lost "
                               f"(broken or taken over: {error})")
            log.error("%s: %s; this applier stops changing seed disks", _LABEL, self.lease_lost)
            return False
        return True

    # ------------------------------------------------------------------ errors and retries

    async def persist(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` (an idempotent write) until it succeeds; transient failures are retried in place."""
        attempt = 0
        while True:
            if self.lease_lost:
                raise StoreError(f"{_LABEL}: not changing {self.prefix}{name}: {self.lease_lost}", transient=False)
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001
                error = exc if isinstance(exc, StoreError) else self.error(op, name, exc)
                if not error.transient:
                    raise error from None
            delay = backoff_delay(attempt, self.settings.retry_initial_ms / 1000, self.settings.retry_max_ms / 1000)
            log.warning("%s; retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            attempt += 1


# --------------------------------------------------------------------------------------------- one disk


class AzureVolume:
    """One disk's image (page blob), state and undo entries; see the module docstring."""

    def __init__(self, volumes: AzureVolumes, disk: str) -> None:
        self.disk = disk
        self._v = volumes
        self.image_name = f"{disk}.img"
        self.state_name = f"{disk}.state.json"
        self.journal = f"journal/{disk}/"
        self._image: BlobClient = volumes.client.get_blob_client(volumes.prefix + self.image_name)
        self._state: BlobClient = volumes.client.get_blob_client(volumes.prefix + self.state_name)
        self._size: int | None = None  # the page blob's size (a multiple of 512), once known
        self._disk_size = 0  # the logical size (metadata "disk_size")
        self._group: int | None = None  # seq_to of a group whose entry is stored but whose state is not yet
        self._broken: str | None = None  # why this volume refuses changes (until it is opened again)
        self._written: WrittenRanges | None = None  # the image's valid page ranges, if tracked
        self._written_loaded = False

    def __repr__(self) -> str:
        return f"AzureVolume({self.disk!r}, {self._v!r})"

    # ------------------------------------------------------------------ state

    async def load_state(self) -> SeedState | None:
        await self._v.ready()
        try:
            data = await (await self._state.download_blob()).readall()
        except ResourceNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("read", self.state_name, exc) from None
        return SeedState(**json.loads(data))

    async def save_state(self, state: SeedState) -> None:
        await self._ready_to_change()
        data = json.dumps(asdict(state)).encode()
        await self._change("write", self.state_name, lambda: self._state.upload_blob(
            data, overwrite=True, content_settings=ContentSettings(content_type="application/json")))
        if self._group is not None and state.applied_seq >= self._group:
            self._group = None  # the group is committed

    # ------------------------------------------------------------------ the image

    async def ensure_size(self, size: int) -> None:
        await self._ready_to_change()
        if self._size is None:
            await self._probe()
        want = _up(size)
        try:
            if self._size is None:
                try:
                    await self._image.create_page_blob(want, metadata={"disk_size": str(size)},
                                                       match_condition=MatchConditions.IfMissing)
                    self._size, self._disk_size = want, size
                    return
                except ResourceExistsError:  # created meanwhile (never overwrite an image)
                    await self._probe()
                    if self._size is None:
                        raise StoreError(f"{_LABEL}: {self.image_name} was created and deleted meanwhile",
                                         transient=True) from None
            if self._size < want:
                await self._image.resize_blob(want)
                self._size = want
            if self._disk_size < size:
                await self._image.set_blob_metadata({"disk_size": str(size)})
                self._disk_size = size
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("resize", self.image_name, exc) from None

    async def _probe(self) -> None:
        self._size, self._disk_size = await self._properties() or (None, 0)

    async def _properties(self) -> tuple[int, int] | None:
        """(page blob size, logical disk size) of the image, None if there is none."""
        try:
            props = await self._image.get_blob_properties()
        except ResourceNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("read the properties of", self.image_name, exc) from None
        return props.size, int((props.metadata or {}).get("disk_size", props.size))

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        await self._ready_to_change()  # the before-images of a new group: not on a half-applied image
        return await self._read(ranges)

    async def _read(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of ``ranges``; only the parts ever written are downloaded (the rest are zeros)."""
        if not ranges:
            return []
        written = await self._written_ranges()
        pieces = [(o, o + n) for o, n in ranges if n > 0]
        if written is not None:
            pieces = [piece for a, b in pieces for piece in written.clip(a, b)]
        spans = plan_reads([(a, b - a) for a, b in pieces])
        data: dict[int, bytes] = {}

        async def fetch(span: tuple[int, int]) -> None:
            data[span[0]] = await self._download(*span)

        await bounded(spans, self._v.max_concurrency, fetch)
        starts = [a for a, _ in spans]
        out = []
        for offset, length in ranges:
            end = offset + length
            k = max(0, bisect.bisect_right(starts, offset) - 1)
            if k < len(spans) and spans[k][0] <= offset and end <= spans[k][1]:  # within one span: one copy
                out.append(data[spans[k][0]][offset - spans[k][0]:end - spans[k][0]])
                continue
            buf = bytearray(length)
            while k < len(spans) and spans[k][0] < end:
                a, b = max(offset, spans[k][0]), min(end, spans[k][1])
                if a < b:
                    buf[a - offset:b - offset] = memoryview(data[spans[k][0]])[a - spans[k][0]:b - spans[k][0]]
                k += 1
            out.append(bytes(buf))
        return out

    async def _written_ranges(self) -> WrittenRanges | None:
        """What was ever written to the image (listed once per volume, then kept up to date), None if unknown."""
        if not self._written_loaded:
            written = WrittenRanges()
            try:
                async for r in self._image.list_page_ranges():
                    if not r.cleared and not written.add(r.start, r.end + 1):
                        written = None  # too fragmented to keep in memory: read everything
                        break
            except ResourceNotFoundError:
                pass  # no image yet: nothing written
            except Exception as exc:  # noqa: BLE001
                raise self._v.error("list the page ranges of", self.image_name, exc) from None
            self._written, self._written_loaded = written, True
        return self._written

    async def _download(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the image in one request (Get Blob with a range); beyond its end: zeros.

        Not ``BlobClient.download_blob``: for a page blob, that one follows every download with a Get Page
        Ranges of the *whole* blob (to skip holes in later chunks, which a single-range read never has) — a
        second request per read that, on a fragmented seed image, lists every written range of the disk and
        cost more CPU than the data (measured: 2x slower reads on Azurite, most of the applier's CPU).
        """
        try:
            stream = await self._image._client.blob.download(range=f"bytes={start}-{end - 1}")
            chunk = b"".join([part async for part in stream])
        except HttpResponseError as exc:
            if exc.status_code != 416:  # 416: wholly beyond the image (never written): zeros
                raise self._v.error("read", self.image_name, exc) from None
            chunk = b""
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("read", self.image_name, exc) from None
        return chunk + bytes(end - start - len(chunk)) if len(chunk) < end - start else chunk

    async def write_ranges(self, writes: Sequence[tuple[int, bytes | memoryview]]) -> None:
        await self._ready_to_change()
        plan = plan_page_writes(writes)
        base: dict[int, bytes] = {}
        if plan.partial:  # sectors written in part (never by the applier, whose writes are sector-aligned)
            partial = [(s, SECTOR) for s in plan.partial]
            base = dict(zip(plan.partial, await self._change("read", self.image_name, lambda: self._read(partial))))

        async def upload(chunk: PageChunk) -> None:
            page = plan.build(chunk, writes, base)
            await self._change("write pages of", self.image_name, lambda: self._image.upload_page(
                page, offset=chunk.start, length=chunk.end - chunk.start))

        if self._written is not None:  # before the upload: an over-estimate only costs a read, never a wrong one
            for chunk in plan.chunks:
                if not self._written.add(chunk.start, chunk.end):
                    self._written = None
                    break
        await bounded(plan.chunks, self._v.max_concurrency, upload)

    async def flush(self) -> None:
        """Nothing to do: every ``upload_page`` of ``write_ranges`` has returned, and Put Page is durable when
        acknowledged (the service commits it to every replica before answering)."""

    async def copy_image_to(self, path: Path, progress: Progress | None = None) -> int:
        await self._v.ready()
        props = await self._properties()
        size = props[1] if props else 0  # no image: nothing was ever written
        valid: list[tuple[int, int]] = []
        try:
            if props is not None:
                valid = [(r.start, min(r.end + 1, size)) async for r in self._image.list_page_ranges()
                         if not r.cleared and r.start < size]
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("list the page ranges of", self.image_name, exc) from None
        # Near ranges are fetched together (a fragmented image has thousands of small ranges; a request costs
        # more than a few hundred KiB of zeros), but only the valid ranges are written into the copy.
        spans = plan_reads([(a, b - a) for a, b in valid])
        starts = [a for a, _ in valid]
        todo = sum(b - a for a, b in spans)
        done = 0
        reporting = asyncio.Lock()
        fd = await asyncio.to_thread(_create_sparse, path, size)
        try:
            async def fetch(span: tuple[int, int]) -> None:
                nonlocal done
                start, end = span
                chunk = await self._download(start, end)
                if chunk.count(0) != len(chunk):  # zero pages stay holes, as in the local copy
                    view = memoryview(chunk)
                    k = max(0, bisect.bisect_right(starts, start) - 1)
                    pieces = []
                    for a, b in valid[k:bisect.bisect_left(starts, end)]:
                        a, b = max(a, start), min(b, end)
                        if a < b:
                            pieces.append((a, view[a - start:b - start]))
                    await asyncio.to_thread(_pwrite_pieces, fd, pieces)
                done += end - start
                if progress:  # from a worker thread, one call at a time, as the local copy does
                    async with reporting:
                        await asyncio.to_thread(progress, size - (todo - done), size)

            await bounded(spans, self._v.max_concurrency, fetch)
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        if progress:
            await asyncio.to_thread(progress, size, size)
        return size

    # ------------------------------------------------------------------ the journal

    async def put_entry(self, name: str, data: bytes) -> None:
        await self._ready_to_change()
        parsed = EntryName.parse(name)
        if parsed is not None:
            self._group = parsed.seq_to  # from here until its state is saved, the image may be half-applied
        await self._change("write", self.journal + name, lambda: self._v.client.upload_blob(
            self._v.prefix + self.journal + name, data, overwrite=True, max_concurrency=self._v.max_concurrency))

    async def commit_group(self, group: GroupCommit) -> int:
        """Step by step: each is its own set of requests, and the event loop is where they wait."""
        await self.ensure_size(group.state.disk_size)
        before = await self.read_ranges(group.ranges)
        entry = await asyncio.to_thread(lambda: group.encode_entry(b"".join(before)))
        await self.put_entry(group.entry_name, entry)
        await self.write_ranges(group.writes)
        await self.flush()
        await self.save_state(group.state)
        return len(entry)

    async def list_entries(self) -> list[str]:
        await self._v.ready()
        start = self._v.prefix + self.journal
        try:
            return sorted([n[len(start):] async for n in self._v.client.list_blob_names(name_starts_with=start)])
        except ResourceNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("list", self.journal, exc) from None

    async def get_entry(self, name: str) -> bytes:
        await self._v.ready()
        try:
            downloader = await self._v.client.download_blob(self._v.prefix + self.journal + name,
                                                            max_concurrency=self._v.max_concurrency)
            return await downloader.readall()
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("read", self.journal + name, exc) from None

    async def delete_entry(self, name: str) -> None:
        await self._ready_to_change()
        try:
            await self._v.client.delete_blob(self._v.prefix + self.journal + name)
        except ResourceNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._v.error("delete", self.journal + name, exc) from None

    async def close(self) -> None:
        """The connection belongs to the AzureVolumes (closed with it)."""

    # ------------------------------------------------------------------ internals

    async def _ready_to_change(self) -> None:
        await self._v.ready()
        if self._broken is not None:
            raise VolumeBroken(errno.EIO, self._broken)
        if self._v.lease_lost:
            raise StoreError(f"{_LABEL}: disk {self.disk!r}: not changing it: {self._v.lease_lost}", transient=False)

    async def _change(self, op: str, name: str, call: Callable[[], Awaitable[T]]) -> T:
        """An idempotent write, retried in place on transient failures; a permanent one inside an apply group
        leaves the volume refusing changes until it is opened again (which rolls the group back)."""
        try:
            return await self._v.persist(op, name, call)
        except StoreError as exc:
            if self._group is None:
                raise
            self._broken = (f"{_LABEL}: disk {self.disk!r}: an apply group (up to sequence {self._group}) was "
                            f"interrupted by a failure that retrying cannot fix ({exc}); no more changes until "
                            "the volume is opened again, which rolls the group back from its undo entry")
            log.error("%s", self._broken)
            raise VolumeBroken(errno.EIO, self._broken) from exc


def _create_sparse(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, size)
    return fd


def _pwrite_pieces(fd: int, pieces: list[tuple[int, memoryview]]) -> None:
    for offset, view in pieces:
        write_at(fd, view, offset)
