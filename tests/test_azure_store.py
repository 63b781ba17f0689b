"""The Azure Blob Storage cache store, against a real Azurite (no mocks).

Round trip with metadata, list order, idempotent re-puts, block uploads, auth by connection string /
account key / SAS / environment, secrets never printed, error classification, replication through a real
process server, replication through a fault-injecting proxy, and a blob altered in the account being
detected by the applier.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import random
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError
from azure.storage.blob import BlobType, ContainerSasPermissions, generate_container_sas
from azure.storage.blob.aio import BlobServiceClient
from azurite import ACCOUNT, ACCOUNT_KEY, Azurite
from faultproxy import FaultProxy
from support import agent_for, make_config, running_pipeline, sha, wait_for, write_random

from engine.config import AZURE_ENV, AzureStoreConfig, ConfigError, parse_config
from engine.keys import KeyRing
from engine.server import ProcessServer, build_applier, open_store
from engine.store import AzureBlobStore, StoreError
from engine.workload import ContentPool
from protocol import Write
from protocol.logblob import (
    BlobHeader,
    KeyLookup,
    Sealer,
    blob_name,
    iter_records,
    key_id_of,
    open_blob,
    parse_blob_name,
    write_record_header,
)

MiB = 1024 * 1024
BAD_KEY = base64.b64encode(hashlib.sha512(b"not the account key").digest()).decode()  # valid base64, wrong


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture
async def make_store(azurite: Azurite, admin: BlobServiceClient) -> AsyncIterator[Callable[..., AzureBlobStore]]:
    """Stores on fresh containers; closed, and their containers deleted, after the test."""
    stores: list[AzureBlobStore] = []

    def make(*, store_class: type[AzureBlobStore] = AzureBlobStore, keys: KeyLookup | None = None,
             **settings: object) -> AzureBlobStore:
        settings.setdefault("container", azurite.new_container())
        if not {"account_url", "connection_string"} & settings.keys():
            settings["connection_string"] = azurite.connection_string()
        store = store_class(AzureStoreConfig(**settings), keys=keys)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    for container in {s.container for s in stores}:
        with contextlib.suppress(ResourceNotFoundError):  # never created, or already gone: nothing to delete
            await admin.delete_container(container)


def seal_file(tmp_path: Path, sealer: Sealer, disk: str, first: int, last: int, *, disk_size: int = 1 * MiB,
              write_size: int = 4096, fill: Callable[[int], bytes] | None = None) -> tuple[str, Path, bytes]:
    """A sealed log blob of writes ``first..last`` (write n: ``write_size`` bytes at a slot of its own)."""
    slots = disk_size // write_size
    records = []
    for seq in range(first, last + 1):
        data = fill(seq) if fill else bytes([seq % 251]) * write_size
        records.append(write_record_header(seq, 1000 * seq, (seq % slots) * write_size, len(data)) + data)
    header = BlobHeader(disk, disk_size, first, last, last - first + 1, time.time_ns() // 1000, 1000 * last)
    sealed = bytes(sealer.seal(b"".join(records), header, os.urandom(12)))
    name = blob_name(disk, first, last)
    path = tmp_path / f"{disk}-{first}-{last}-{len(list(tmp_path.iterdir()))}.bflog"
    path.write_bytes(sealed)
    return name, path, sealed


async def replicate(agent, sizes: dict[str, int], total: int, *, seed: int, max_size: int = 256 * 1024) -> dict:
    """Random overlapping writes over freshly opened disks, flushed; returns the expected disk contents."""
    sources = {}
    for disk, size in sizes.items():
        await agent.open_disk(disk, size)
        sources[disk] = bytearray(size)
    await write_random(agent, sources, total, ContentPool(4 * MiB, seed=seed), seed=seed, max_size=max_size)
    await agent.flush()
    return sources


async def wait_applied(server: ProcessServer, timeout: float) -> None:
    """Until the embedded applier (whose run loop rides out store errors) caught up with every ack."""
    assert server.pipeline is not None and server.applier is not None
    targets = {disk: s.durable_seq for disk, s in server.pipeline.streams.items()}
    await wait_for(lambda: all(server.applier.applied_seq(d) >= seq or d in server.applier.failures
                               for d, seq in targets.items()), f"applier to catch up with {targets}", timeout)


# --------------------------------------------------------------------------------------------- the store


async def test_round_trip_with_metadata(tmp_path: Path, make_store, admin: BlobServiceClient) -> None:
    store = make_store(prefix="ps1")  # the container does not exist yet: the first put creates it
    sealer = Sealer(os.urandom(32))
    blobs = [seal_file(tmp_path, sealer, "disk-a", 1, 5), seal_file(tmp_path, sealer, "disk-a", 6, 6),
             seal_file(tmp_path, sealer, "disk.b", 1, 3, disk_size=2 * MiB)]
    assert await store.list_blobs() == []
    for name, path, _ in blobs:
        await store.put_file(name, path)
    assert await store.list_blobs() == sorted(name for name, _, _ in blobs)
    for name, _, sealed in blobs:
        assert await store.get(name) == sealed
    # in the account: block blobs under the prefix, the header fields as metadata
    container = admin.get_container_client(store.container)
    assert sorted([n async for n in container.list_blob_names()]) == sorted(f"ps1/{n}" for n, _, _ in blobs)
    props = await container.get_blob_client(f"ps1/{blobs[2][0]}").get_blob_properties()
    header = BlobHeader.unpack(blobs[2][2])
    assert props.blob_type == BlobType.BLOCKBLOB and props.size == len(blobs[2][2])
    assert props.metadata == {
        "disk": "disk.b", "disk_size": str(2 * MiB), "first_seq": "1", "last_seq": "3", "record_count": "3",
        "key_id": sealer.key_id.hex(), "last_source_us": "3000", "created_us": str(header.created_us),
        "format_version": "1"}
    assert await store.get_metadata(blobs[0][0]) == {**props.metadata, "disk": "disk-a", "disk_size": str(MiB),
                                                     "first_seq": "1", "last_seq": "5", "record_count": "5",
                                                     "last_source_us": "5000",
                                                     "created_us": str(BlobHeader.unpack(blobs[0][2]).created_us)}
    # another prefix in the same container is another store
    assert await make_store(container=store.container, prefix="ps2/").list_blobs() == []
    # delete; deleting a missing blob is fine
    await store.delete(blobs[0][0])
    await store.delete(blobs[0][0])
    assert await store.list_blobs() == sorted(name for name, _, _ in blobs[1:])
    with pytest.raises(StoreError) as exc:
        await store.get(blobs[0][0])
    assert exc.value.transient is False and "not found" in str(exc.value) and blobs[0][0] in str(exc.value)
    # a file that is not the log blob its name says is refused before anything is sent
    with pytest.raises(StoreError, match="does not match its name"):
        await store.put_file(blob_name("disk-a", 7, 7), blobs[1][1])
    with pytest.raises(ValueError, match="not a log-blob name"):
        await store.put_file("../escape", blobs[1][1])


async def test_list_order_is_sequence_order(tmp_path: Path, make_store) -> None:
    store = make_store()
    sealer = Sealer(os.urandom(32))
    ranges = [(1, 9), (10, 10), (11, 99), (100, 100), (101, 1_000), (1_001, 123_456_789),
              (123_456_790, 10**19)]
    expected = []
    for disk in ("d1", "d10", "d2"):
        expected += [(disk, first) for first, _ in ranges]
    uploads = [(disk, first, last) for disk in ("d1", "d10", "d2") for first, last in ranges]
    random.Random(3).shuffle(uploads)
    for disk, first, last in uploads:  # one record each: the store checks names against headers, nothing more
        records = write_record_header(first, 0, 0, 512) + bytes(512)
        sealed = sealer.seal(records, BlobHeader(disk, MiB, first, last, 1, 0, 0), os.urandom(12))
        path = tmp_path / f"{disk}-{first}.bflog"
        path.write_bytes(sealed)
        await store.put_file(blob_name(disk, first, last), path)
    parsed = [parse_blob_name(n) for n in await store.list_blobs()]
    assert [(d, first) for d, first, _ in parsed] == sorted(expected)
    for disk in ("d1", "d10", "d2"):  # per disk: sequence order, exactly
        firsts = [first for d, first, _ in parsed if d == disk]
        assert firsts == [first for first, _ in ranges]


async def test_reput_is_idempotent_and_a_lost_container_comes_back(tmp_path: Path, make_store,
                                                                   admin: BlobServiceClient) -> None:
    store = make_store()
    sealer = Sealer(os.urandom(32))
    name, path, sealed = seal_file(tmp_path, sealer, "d", 1, 8)
    await store.put_file(name, path)
    await store.put_file(name, path)  # a retry after a lost answer
    assert await store.list_blobs() == [name] and await store.get(name) == sealed
    # after a crash the same range may be sealed again (another nonce): same name, replaced whole
    name2, path2, resealed = seal_file(tmp_path, sealer, "d", 1, 8)
    assert name2 == name and resealed != sealed
    await store.put_file(name, path2)
    assert await store.list_blobs() == [name] and await store.get(name) == resealed
    # the container is deleted under the running store: the upload fails as transient, the retry recreates it
    await admin.delete_container(store.container)
    deadline = time.monotonic() + 20
    while True:
        try:
            await store.put_file(name, path)
            break
        except StoreError as exc:  # Azurite may answer ContainerBeingDeleted for a moment
            assert exc.transient, exc
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert await store.list_blobs() == [name] and await store.get(name) == sealed


async def test_large_blobs_go_up_as_blocks(tmp_path: Path, make_store, admin: BlobServiceClient) -> None:
    store = make_store(single_put_max_bytes="1MiB", block_bytes="256KiB", max_concurrency=4)
    sealer = Sealer(os.urandom(32))
    noise = os.urandom(2 * MiB + 100_000)  # incompressible: the blob stays this big
    big, big_path, big_sealed = seal_file(tmp_path, sealer, "d", 1, 1, disk_size=4 * MiB, write_size=len(noise),
                                          fill=lambda seq: noise)
    small, small_path, small_sealed = seal_file(tmp_path, sealer, "d", 2, 2)
    await store.put_file(big, big_path)
    await store.put_file(small, small_path)
    blobs = admin.get_container_client(store.container)
    committed, uncommitted = await blobs.get_blob_client(big).get_block_list("all")
    assert len(committed) == -(-len(big_sealed) // (256 * 1024)) and not uncommitted
    committed_small, _ = await blobs.get_blob_client(small).get_block_list("all")
    assert len(committed_small) <= 1  # one Put Blob
    assert await store.get(big) == big_sealed and await store.get(small) == small_sealed
    assert (await store.get_metadata(big))["first_seq"] == "1"


# --------------------------------------------------------------------------------------------- credentials


class HeldStore(AzureBlobStore):
    """Uploads wait until ``release`` is set."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.release = asyncio.Event()

    async def put_file(self, name: str, path: Path) -> None:
        await self.release.wait()
        await super().put_file(name, path)


@pytest.mark.parametrize("disk_holds", ["altered bytes", "the blob the reused file held before"])
async def test_a_spool_file_read_back_damaged_is_not_uploaded_and_the_log_brings_it_back(
        disk_holds: str, tmp_path: Path, make_store) -> None:
    """A spool file is not synced: after a failed writeback whose pages were evicted, reading it gives what the
    disk holds — stale bytes, or, for a reused file (engine/filepool.py), a whole older blob. Uploaded
    unchecked, that would count as stored and the log would let the writes go. The server's store checks
    what it read; the blob's disk stops and a restart replays it from the log."""
    key = bytes(range(32))
    keys = {key_id_of(key): key}.get
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 20})
    held = make_store(store_class=HeldStore, keys=keys)
    writes = [Write.make(1, seq, 4096 * seq, bytes([seq]) * 4096, 0) for seq in (1, 2, 3)]
    name = blob_name("d", 1, 3)
    async with running_pipeline(config, key=key, store=held) as pipeline:
        stream = pipeline.streams["d"]
        for write in writes:
            assert pipeline.accept_write(stream, write)
        await wait_for(lambda: stream.durable_seq == 3 and (config.spool_dir / name).exists(), "the spooled blob")
        damaged = bytearray((config.spool_dir / name).read_bytes())
        damaged[-40] ^= 0xFF  # header intact: only authentication can tell
        older = seal_file(tmp_path, Sealer(key), "d", 7, 9, write_size=len(writes[0].data))[2]
        (config.spool_dir / name).write_bytes(damaged if disk_holds == "altered bytes" else older)
        held.release.set()
        failure = await wait_for(lambda: stream.log_failure, "the disk to stop")
        assert name in failure and "could not be trusted" in failure
        assert ("authentication failed" if disk_holds == "altered bytes" else "holds blob") in failure
        assert await held.list_blobs() == [] and pipeline.watermarks.seqs.get("d", 0) == 0
    store = make_store(container=held.settings.container, keys=keys)
    async with running_pipeline(config, key=key, store=store) as pipeline:
        await pipeline.drain()
        assert await store.list_blobs() == [name]
        header, records = open_blob(await store.get(name), keys, name=name)
        assert {r.seq: bytes(r.data) for r in iter_records(records, header)} == {w.seq: w.data for w in writes}


def _sas(azurite_container: str, key: str = ACCOUNT_KEY) -> str:
    return generate_container_sas(ACCOUNT, azurite_container, account_key=key,
                                  permission=ContainerSasPermissions(read=True, add=True, create=True, write=True,
                                                                     delete=True, list=True),
                                  expiry=datetime.now(UTC) + timedelta(hours=1))


async def test_account_key_sas_and_environment_credentials(tmp_path: Path, azurite: Azurite, make_store,
                                                           admin: BlobServiceClient, monkeypatch) -> None:
    sealer = Sealer(os.urandom(32))
    name, path, sealed = seal_file(tmp_path, sealer, "d", 1, 2)
    # account URL + account key
    store = make_store(account_url=azurite.blob_endpoint, account_key=ACCOUNT_KEY)
    await store.put_file(name, path)
    assert await store.get(name) == sealed
    # account URL + a container SAS (which may not create the container: it exists already)
    sas_store = make_store(account_url=azurite.blob_endpoint, sas_token=_sas(store.container),
                           container=store.container)
    assert await sas_store.list_blobs() == [name]
    await sas_store.put_file(name, path)
    assert await sas_store.get(name) == sealed
    await sas_store.delete(name)
    assert await store.list_blobs() == []
    # everything from the environment; the config names only the container
    for var in AZURE_ENV.values():
        monkeypatch.delenv(var, raising=False)
    data = {"store": {"kind": "azure", "azure": {"container": store.container}}}
    with pytest.raises(ConfigError) as missing:
        parse_config(data)
    assert "store.azure.connection_string" in str(missing.value)
    assert "BLOCKFERRY_AZURE_CONNECTION_STRING" in str(missing.value)
    monkeypatch.setenv("BLOCKFERRY_AZURE_CONNECTION_STRING", azurite.connection_string())
    config = make_config(tmp_path / "data", **data)
    assert config.store.azure.credentials().source == "environment"
    env_store = open_store(config)
    try:
        assert isinstance(env_store, AzureBlobStore)
        await env_store.put_file(name, path)
        assert await env_store.list_blobs() == [name]
    finally:
        await env_store.close()
    monkeypatch.delenv("BLOCKFERRY_AZURE_CONNECTION_STRING")
    monkeypatch.setenv("BLOCKFERRY_AZURE_ACCOUNT_URL", azurite.blob_endpoint)
    monkeypatch.setenv("BLOCKFERRY_AZURE_SAS_TOKEN", _sas(store.container))
    creds = parse_config(data).store.azure.credentials()
    assert (creds.method, creds.account_url) == ("sas_token", azurite.blob_endpoint)


def test_config_errors_name_the_keys(monkeypatch) -> None:
    for var in AZURE_ENV.values():
        monkeypatch.delenv(var, raising=False)

    def error(azure: dict) -> str:
        with pytest.raises(ConfigError) as exc:
            parse_config({"store": {"kind": "azure", "azure": azure}}, "bf.toml")
        return str(exc.value)

    assert "store.azure.account_url" in error({"account_key": "k" * 20})
    assert "store.azure.account_key and store.azure.sas_token" in error(
        {"account_url": "https://a.blob.core.windows.net", "account_key": "k" * 20, "sas_token": "sv=1&sig=x"})
    assert "store.azure.container" in error({"connection_string": "x", "container": "No_Such--Name"})
    assert "store.azure.account_url" in error({"connection_string": "x", "account_url": "https://a.example"})
    assert "store.azure.sas_token" in error({"account_url": "https://a.example/?sv=1&sig=abc"})
    assert parse_config({"store": {"azure": {"prefix": "ps1"}}}).store.azure.prefix == "ps1/"
    assert parse_config({}).store.kind == "local"  # the default needs no credentials
    # a connection string the SDK cannot parse is refused without being echoed
    secret = "AccountKey=" + BAD_KEY
    with pytest.raises(StoreError) as exc:
        AzureBlobStore(AzureStoreConfig(connection_string=f"not a connection string {secret}"))
    assert exc.value.transient is False and "[store.azure]" in str(exc.value)
    assert BAD_KEY not in str(exc.value) and exc.value.__cause__ is None


SECRET_CASES = ["account_key", "sas_token", "connection_string"]


@pytest.mark.parametrize("method", SECRET_CASES)
async def test_secrets_are_never_printed(method: str, tmp_path: Path, azurite: Azurite, make_store, admin,
                                         caplog) -> None:
    container = azurite.new_container("secret")
    await admin.create_container(container)
    sas = _sas(container, key=BAD_KEY)
    settings: dict = {
        "account_key": {"account_url": azurite.blob_endpoint, "account_key": BAD_KEY},
        "sas_token": {"account_url": azurite.blob_endpoint, "sas_token": sas},
        "connection_string": {"connection_string": azurite.connection_string(key=BAD_KEY)},
    }[method]
    sig = sas.split("sig=")[1].split("&")[0]
    secrets = [BAD_KEY, sas, sig, urllib.parse.unquote(sig), settings.get("connection_string", BAD_KEY)]
    secrets += [s.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D") for s in secrets]
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="azure")
    caplog.set_level(logging.DEBUG, logger="azure.core.pipeline.policies.http_logging_policy")

    # configuration objects
    config = make_config(tmp_path / "data", store={"kind": "azure", "azure": {**settings, "container": container}})
    shown = [repr(config), str(config), repr(config.store), config.model_dump_json(), repr(config.model_dump()),
             repr(config.store.azure.credentials())]
    # the store, and its errors
    store = make_store(container=container, retry_total=0, **settings)
    shown.append(repr(store))
    name, path, _ = seal_file(tmp_path, Sealer(os.urandom(32)), "d", 1, 1)
    errors = []
    for attempt in (store.put_file(name, path), store.list_blobs(), store.get(name), store.delete(name)):
        with pytest.raises(StoreError) as exc:
            await attempt
        errors.append(exc.value)
    # whatever an exception's text holds (an aiohttp error can quote the request URL), the store scrubs it
    leaky = ServiceRequestError(f"Cannot connect to {azurite.blob_endpoint}/c/b?{sas} AccountKey={BAD_KEY};x")
    errors.append(store.error("upload", name, leaky))
    assert errors[-1].transient is True and "Cannot connect to" in str(errors[-1])
    for error in errors:
        if error is not errors[-1]:
            assert error.transient is False, error
        assert repr(container) in str(error) and repr(ACCOUNT) in str(error)
        assert error is errors[-1] or "not authorized" in str(error)
        assert error.__cause__ is None and (error is errors[-1] or error.__suppress_context__)
        shown += [str(error), repr(error), "".join(traceback.format_exception(error))]
    # and a process server with these credentials: its upload retries log the error, never the secret
    server_config = make_config(tmp_path / "srv", upload={"retry_initial_ms": 10, "retry_max_ms": 50},
                                store={"kind": "azure", "azure": {**settings, "container": container,
                                                                  "retry_total": 0}})
    async with ProcessServer(server_config) as server:
        async with agent_for(server_config.server.data_dir, server.connect_info.port) as agent:
            disk = await agent.open_disk("d", MiB)
            await (await disk.write(0, b"x" * 4096))  # acknowledged: durable in the spool
            await wait_for(lambda: server.pipeline.stats.upload_errors >= 2, "upload attempts", 10)
        assert server.pipeline.streams["d"].uploaded_seq == 0
    assert any(r.name.startswith("azure") for r in caplog.records), "the SDK's own logging was not captured"
    assert "not authorized to upload" in caplog.text
    assert "cannot list the cache store as the server starts" in caplog.text  # and it started all the same
    shown.append(caplog.text)
    for text in shown:
        for secret in secrets:
            assert secret not in text


async def test_failures_are_classified(tmp_path: Path, azurite: Azurite, make_store) -> None:
    name, path, _ = seal_file(tmp_path, Sealer(os.urandom(32)), "d", 1, 1)
    for fault, expect in (("busy", "HTTP 503 ServerBusy"), ("throttle", "HTTP 429"), ("reset_before", "reset")):
        async with FaultProxy(f"http://{azurite.host}:{azurite.port}", seed=1, max_fault_rate=1.0,
                              **{fault: 1.0}) as proxy:
            store = make_store(connection_string=azurite.connection_string(azurite.endpoint_via("127.0.0.1",
                                                                                                proxy.port)),
                               retry_total=1, retry_initial_ms=1)
            for attempt in (store.put_file(name, path), store.list_blobs()):
                with pytest.raises(StoreError) as exc:
                    await attempt
                assert exc.value.transient is True, exc.value
                assert expect.lower() in str(exc.value).lower(), exc.value
            assert proxy.stats[fault] >= 2  # the SDK retried once before giving up
    # nothing answers at all
    store = make_store(connection_string=azurite.connection_string("http://127.0.0.1:9/" + ACCOUNT),
                       retry_total=0, timeout_s=2)
    with pytest.raises(StoreError) as exc:
        await store.list_blobs()
    assert exc.value.transient is True


# --------------------------------------------------------------------------------------------- end to end


async def test_replication_through_a_process_server_on_azure(tmp_path: Path, azurite: Azurite,
                                                             admin: BlobServiceClient) -> None:
    data = tmp_path / "data"
    container = azurite.new_container("e2e")
    config = make_config(data, batch={"max_bytes": 1 * MiB, "linger_ms": 2},
                         store=azurite.store_section(container, prefix="ps1/"))
    try:
        async with ProcessServer(config) as server:
            assert isinstance(server.store, AzureBlobStore)
            async with agent_for(data, server.connect_info.port, max_unacked_bytes=8 * MiB) as agent:
                sources = await replicate(agent, {"sys": 16 * MiB, "data": 8 * MiB}, 24 * MiB, seed=11)
                await server.drain()
                for disk, source in sources.items():
                    assert server.applier.applied_seq(disk) == agent.disks[disk].acked_seq
                    assert sha((config.seed_dir / f"{disk}.img").read_bytes()) == sha(source), disk
            stats = server.pipeline.stats
            assert stats.stored_bytes > 0 and stats.upload_errors == 0
        # applied blobs were deleted from the account; nothing went to a local cache directory
        assert [n async for n in admin.get_container_client(container).list_blob_names()] == []
        assert not list(config.store_dir.glob("*/*.bflog"))
    finally:
        await admin.delete_container(container)


async def test_replication_through_faults_loses_nothing(tmp_path: Path, azurite: Azurite,
                                                        admin: BlobServiceClient, caplog) -> None:
    """503 ServerBusy, 429, connection resets before and after the request was carried out, slow answers
    and answers slower than the read timeout: every acknowledged write reaches the seed disk, once."""
    caplog.set_level(logging.WARNING)
    data = tmp_path / "data"
    container = azurite.new_container("faults")
    # A third of all uploads fail or dawdle, a twelfth of the applier's reads and deletes (one failed read
    # aborts an applier pass, so at the uploads' rate it would hardly progress); every kind of fault is
    # frequent enough to be hit many times in the few hundred requests of this workload.
    async with FaultProxy(f"http://{azurite.host}:{azurite.port}", seed=20240601, busy=0.08, throttle=0.04,
                          reset_before=0.05, reset_after=0.05, delay=0.08, stall=0.03, delay_s=0.15,
                          stall_s=0.6, method_factor={"GET": 0.25, "DELETE": 0.25, "HEAD": 0.25}) as proxy:
        endpoint = azurite.endpoint_via("127.0.0.1", proxy.port)
        config = make_config(
            data, batch={"max_bytes": 64 * 1024, "linger_ms": 2},
            upload={"concurrency": 4, "retry_initial_ms": 20, "retry_max_ms": 200},
            policy={"crash_point_interval_ms": 0}, applier={"group_max_bytes": "1MiB"},
            store=azurite.store_section(container, connection_string=azurite.connection_string(endpoint),
                                        retry_total=0, timeout_s=0.5))  # every fault reaches the pipeline
        try:
            async with ProcessServer(config) as server:
                async with agent_for(data, server.connect_info.port, max_unacked_bytes=8 * MiB) as agent:
                    sources = await replicate(agent, {"a": 8 * MiB, "b": 4 * MiB}, 16 * MiB, seed=5,
                                              max_size=64 * 1024)
                    await server.pipeline.drain()  # every blob uploaded, through the faults
                    await wait_applied(server, 40)
                    for disk, source in sources.items():
                        assert disk not in server.applier.failures, server.applier.failures[disk]
                        assert server.applier.applied_seq(disk) == agent.disks[disk].acked_seq
                        assert sha((config.seed_dir / f"{disk}.img").read_bytes()) == sha(source), disk
                stats = server.pipeline.stats
                print(f"faults: {dict(proxy.stats)}, pipeline upload errors: {stats.upload_errors}")
                assert stats.upload_errors > 0, f"no fault reached the pipeline: {proxy.stats}"
                for fault in ("busy", "throttle", "reset_before", "reset_after", "delay", "stall"):
                    assert proxy.stats[fault] > 0, f"{fault} was never injected: {proxy.stats}"
                # faults off: the applier finishes deleting what it applied (deletes failed too)
                proxy.enabled = False
                blobs = admin.get_container_client(container)

                async def left() -> list[str]:
                    return [n async for n in blobs.list_blob_names()]

                deadline = time.monotonic() + 15
                while await left():
                    assert time.monotonic() < deadline, await left()
                    await asyncio.sleep(0.1)
        finally:
            await admin.delete_container(container)
    assert "upload of" in caplog.text and "retrying" in caplog.text  # the pipeline's retry, logged


@pytest.mark.parametrize("where", ["payload", "header"])
async def test_blob_altered_in_the_account_is_detected_not_applied(where: str, tmp_path: Path, azurite: Azurite,
                                                                   make_store, admin: BlobServiceClient) -> None:
    store = make_store()
    key = os.urandom(32)
    sealer = Sealer(key)
    disk_size = 1 * MiB
    blobs = [seal_file(tmp_path, sealer, "vol", first, last, disk_size=disk_size)
             for first, last in ((1, 4), (5, 8), (9, 12))]
    for name, path, _ in blobs:
        await store.put_file(name, path)
    # someone with access to the account alters the second blob and puts it back, metadata and all
    victim = admin.get_container_client(store.container).get_blob_client(blobs[1][0])
    props = await victim.get_blob_properties()
    data = bytearray(await (await victim.download_blob()).readall())
    header = BlobHeader.unpack(data)
    # payload: one ciphertext byte; header: created_us (bytes 80..87), which only the GCM tag protects
    data[header.size + 10 if where == "payload" else 80] ^= 0x01
    altered = BlobHeader.unpack(data)  # still parses: only authentication can tell
    assert (altered.created_us != header.created_us) == (where == "header")
    await victim.upload_blob(bytes(data), overwrite=True, metadata=props.metadata)

    config = make_config(tmp_path / "data", policy={"crash_point_interval_ms": 0})
    applier = build_applier(config, store, KeyRing(key))
    try:
        for _ in range(3):
            await applier.apply_available(force=True)
        failure = applier.failures["vol"]
        assert failure.blob == blobs[1][0] and failure.disk == "vol"
        assert "authentication failed" in failure.reason
        # Nothing from the altered blob on was applied (the first blob may or may not have been: the applier
        # verifies a whole group of blobs before applying any of it), and nothing unapplied was deleted.
        applied = applier.applied_seq("vol")
        assert applied in (0, 4), applied
        assert await store.list_blobs() == [name for name, _, _ in blobs[(0 if applied == 0 else 1):]]
        seed_path = config.seed_dir / "vol.img"
        seed = seed_path.read_bytes() if seed_path.exists() else b""
        for seq in range(1, 13):
            slot = seq % (disk_size // 4096)
            chunk = seed[slot * 4096:(slot + 1) * 4096]
            assert chunk.strip(b"\0") == (bytes([seq]) * 4096 if seq <= applied else b""), seq
    finally:
        await applier.close()
