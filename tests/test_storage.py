"""One contract suite for both stores (local folder and S3 on a real moto server), plus
backend-specific checks: key safety and multi-process CAS locally, fault handling on S3."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from tasks.errors import ConfigurationError
from tasks.storage import (
    InvalidKey,
    LocalStore,
    ObjectNotFound,
    PreconditionFailed,
    S3Store,
    StorageError,
    Store,
    StoredObject,
    etag_of,
    open_store,
)

REGION = "us-east-1"


def s3_store(bucket: str, endpoint: str, **kwargs) -> S3Store:
    return S3Store(
        bucket, kwargs.pop("prefix", "root/"), endpoint_url=endpoint, region_name=REGION, **kwargs
    )


async def cas_increment(store: Store, key: str, *, max_tries: int = 500) -> int:
    """Read, +1, conditional put; on a lost race re-read and retry with jittered backoff."""
    for attempt in range(max_tries):
        try:
            current = await store.get(key)
        except ObjectNotFound:
            value, etag = 0, None
        else:
            value, etag = int(current.data), current.etag
        try:
            if etag is None:
                await store.put(key, str(value + 1).encode(), if_none_match=True)
            else:
                await store.put(key, str(value + 1).encode(), if_match=etag)
            return value + 1
        except PreconditionFailed:
            await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
    raise AssertionError(f"no successful CAS on {key!r} in {max_tries} tries")


# --------------------------------------------------------------------------- contract


async def test_put_get_round_trip(store):
    key = "folder a/ü ñ/inv 1.pdf"  # spaces, unicode, intermediate folders
    data = b"%PDF-1.7 fake\x00\xff"
    etag = await store.put(key, data, content_type="application/pdf")
    got = await store.get(key)
    assert got.data == data
    assert got.etag == etag == '"' + hashlib.md5(data).hexdigest() + '"'


async def test_unconditional_put_overwrites(store):
    first = await store.put("k.json", b"1")
    second = await store.put("k.json", b"22")
    assert first != second
    assert (await store.get("k.json")).data == b"22"
    assert [(i.key, i.size, i.etag) for i in await store.list()] == [("k.json", 2, second)]


async def test_same_bytes_same_etag_on_both_backends(tmp_path, moto_endpoint, s3_bucket):
    data = os.urandom(4096)
    async with LocalStore(tmp_path) as local, s3_store(s3_bucket, moto_endpoint) as s3:
        local_etag = await local.put("x.bin", data)
        s3_etag = await s3.put("x.bin", data)
        assert local_etag == s3_etag == etag_of(data)
        assert (await local.get("x.bin")).etag == (await s3.get("x.bin")).etag
        assert [i.etag for i in await local.list()] == [i.etag for i in await s3.list()]


async def test_list_prefix_suffix_sorted_nested(store):
    keys = [
        "b.pdf",
        "a.PDF",
        "inv/2024/x.pdf",
        "inv/2024/y.txt",
        "inv/z.pdf",
        "invoices.pdf",
        "other/q.pdf",
        "spaced name/ü.pdf",
    ]
    for key in keys:
        await store.put(key, key.encode())

    listed = await store.list()
    assert [i.key for i in listed] == sorted(keys)
    assert all(i.size == len(i.key.encode()) and i.etag == etag_of(i.key.encode()) for i in listed)

    # Plain string prefix, as on S3: "inv" also matches "invoices.pdf".
    assert [i.key for i in await store.list("inv")] == [
        "inv/2024/x.pdf",
        "inv/2024/y.txt",
        "inv/z.pdf",
        "invoices.pdf",
    ]
    assert [i.key for i in await store.list("inv/", suffix=".pdf")] == [
        "inv/2024/x.pdf",
        "inv/z.pdf",
    ]
    assert [i.key for i in await store.list("inv/2024/x")] == ["inv/2024/x.pdf"]
    # Suffix filter is case-insensitive.
    assert [i.key for i in await store.list(suffix=".pdf")] == sorted(
        k for k in keys if k.lower().endswith(".pdf")
    )
    assert [i.key for i in await store.list(suffix=".TXT")] == ["inv/2024/y.txt"]
    assert await store.list("nothing/here/") == []


async def test_list_on_empty_store(store):
    assert await store.list() == []


async def test_get_missing_key(store):
    with pytest.raises(ObjectNotFound) as info:
        await store.get("nope/missing.json")
    assert info.value.key == "nope/missing.json"
    assert isinstance(info.value, StorageError)


async def test_if_none_match(store):
    etag = await store.put("manifest.json", b"v1", if_none_match=True)
    assert etag == etag_of(b"v1")
    with pytest.raises(PreconditionFailed) as info:
        await store.put("manifest.json", b"v2", if_none_match=True)
    assert info.value.status == 412
    assert info.value.key == "manifest.json"
    assert (await store.get("manifest.json")).data == b"v1"


async def test_if_match(store):
    e1 = await store.put("manifest.json", b"v1")
    e2 = await store.put("manifest.json", b"v2", if_match=e1)
    assert e2 != e1
    assert await store.get("manifest.json") == StoredObject(b"v2", e2)

    with pytest.raises(PreconditionFailed) as info:
        await store.put("manifest.json", b"v3", if_match=e1)  # stale
    assert info.value.status == 412
    assert (await store.get("manifest.json")).data == b"v2"


async def test_if_match_on_missing_key_is_precondition_failed(store):
    with pytest.raises(PreconditionFailed) as info:
        await store.put("absent.json", b"x", if_match=etag_of(b"whatever"))
    assert info.value.status == 412
    with pytest.raises(ObjectNotFound):
        await store.get("absent.json")


async def test_if_match_and_if_none_match_exclude_each_other(store):
    with pytest.raises(ValueError):
        await store.put("k", b"x", if_match=etag_of(b"x"), if_none_match=True)


async def test_concurrent_cas_counter_loses_nothing(store):
    # The key does not exist yet: the first round also races on the if_none_match create.
    results = await asyncio.gather(*(cas_increment(store, "counter.txt") for _ in range(30)))
    assert sorted(results) == list(range(1, 31))
    assert (await store.get("counter.txt")).data == b"30"


async def test_use_outside_async_with_is_a_clear_error(tmp_path, moto_endpoint, s3_bucket):
    for unopened in (LocalStore(tmp_path), s3_store(s3_bucket, moto_endpoint)):
        with pytest.raises(RuntimeError, match="async with"):
            await unopened.get("k")
        with pytest.raises(RuntimeError, match="async with"):
            await unopened.put("k", b"x")
        with pytest.raises(RuntimeError, match="async with"):
            await unopened.list()


def test_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(PreconditionFailed("lost", key="m.json", status=409)))
    assert (type(error), str(error), error.key, error.status) == (
        PreconditionFailed,
        "lost",
        "m.json",
        409,
    )
    error = pickle.loads(pickle.dumps(InvalidKey("bad", key="../x")))
    assert isinstance(error, ValueError) and error.key == "../x"


# --------------------------------------------------------------------------- local folder


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "",
        "a\\b",
        "a\0b",
        "a//b",
        "./a",
        "a/",
        ".~locks/x",
        "d/.~tmp.x",
    ],
)
async def test_local_rejects_unsafe_keys(tmp_path, key):
    async with LocalStore(tmp_path / "root") as local:
        with pytest.raises(InvalidKey):
            await local.get(key)
        with pytest.raises(InvalidKey):
            await local.put(key, b"x")
    assert not (tmp_path / "x").exists()


async def test_local_rejects_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    async with LocalStore(root) as local:
        with pytest.raises(InvalidKey):
            await local.get("link/secret.txt")
        with pytest.raises(InvalidKey):
            await local.put("link/new.txt", b"x")
        assert await local.list() == []
    assert not (outside / "new.txt").exists()


async def test_local_resolves_key_paths_off_the_event_loop(tmp_path, monkeypatch):
    # Resolving a path is an lstat per component (~1 ms a key, measured in the flow's
    # profile); on the event loop it delayed every other invoice.
    loop_thread = threading.get_ident()
    on_loop: list[Path] = []
    real_resolve = Path.resolve

    def spy(self: Path, *args, **kwargs) -> Path:
        if threading.get_ident() == loop_thread:
            on_loop.append(self)
        return real_resolve(self, *args, **kwargs)

    async with LocalStore(tmp_path) as local:  # the root itself is resolved once, here
        monkeypatch.setattr(Path, "resolve", spy)
        await local.put("a/b.json", b"1")
        assert (await local.get("a/b.json")).data == b"1"
        assert [o.key for o in await local.list("a/")] == ["a/b.json"]
    assert on_loop == []


async def test_local_list_hides_lock_and_temp_files(tmp_path):
    async with LocalStore(tmp_path) as local:
        e = await local.put("a/m.json", b"1", if_none_match=True)
        await local.put("a/m.json", b"2", if_match=e)
        await local.put("b.json", b"3")
        with pytest.raises(PreconditionFailed):
            await local.put("b.json", b"4", if_match=e)
        (tmp_path / "a" / ".~tmp.m.json.deadbeef").write_bytes(b"left by a crash")
        assert any((tmp_path / ".~locks").iterdir())  # the lock files exist ...
        assert [i.key for i in await local.list()] == ["a/m.json", "b.json"]  # ... but never show
        assert [i.key for i in await local.list(".~")] == []


async def test_local_creates_root_at_its_first_write(tmp_path):
    root = tmp_path / "new" / "root"
    async with LocalStore(root) as local:
        assert local.url == str(root.resolve())
        assert not root.exists()  # nothing is created by a run that writes nothing
        await local.put("a.json", b"{}")
        assert root.is_dir()


async def test_local_put_with_a_file_in_the_way_is_a_storage_error(tmp_path):
    async with LocalStore(tmp_path) as local:
        await local.put("a", b"file")
        with pytest.raises(StorageError):
            await local.put("a/b", b"x")


def _cas_worker(root: str, increments: int, barrier) -> None:
    async def run() -> None:
        async with LocalStore(root) as local:
            # Three coroutines per process: contention within and across processes.
            await asyncio.gather(*(_increment_n(local, increments // 3) for _ in range(3)))

    barrier.wait(60)
    asyncio.run(run())


async def _increment_n(store: Store, n: int) -> None:
    for _ in range(n):
        await cas_increment(store, "counter.txt")


def test_local_cas_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_cas_worker, args=(str(tmp_path), 30, barrier)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "counter.txt").read_bytes() == b"90"


# --------------------------------------------------------------------------- S3


async def test_s3_list_paginates_and_stays_under_prefix(proxy, s3_bucket):
    async with s3_store(s3_bucket, proxy.endpoint, prefix="") as outside:
        await outside.put("rootless.pdf", b"x")  # outside the store's prefix
    async with s3_store(s3_bucket, proxy.endpoint, page_size=2) as s3:
        keys = [f"inv/{i:02d}.pdf" for i in range(7)]
        for key in keys:
            await s3.put(key, b"x")
        proxy.requests.clear()
        assert [i.key for i in await s3.list()] == keys
        list_calls = [r for r in proxy.requests if r == ("GET", f"/{s3_bucket}")]
        assert len(list_calls) == 4  # 2 + 2 + 2 + 1


async def test_s3_folder_markers_are_not_listed(moto_endpoint, s3_bucket):
    async with s3_store(s3_bucket, moto_endpoint) as s3:
        await s3.put("inv/", b"")
        await s3.put("inv/a.pdf", b"x")
        assert [i.key for i in await s3.list()] == ["inv/a.pdf"]


@pytest.mark.parametrize(
    ("status", "code"), [(409, "ConditionalRequestConflict"), (412, "PreconditionFailed")]
)
async def test_s3_conditional_conflicts_surface_without_retry(proxy, s3_bucket, status, code):
    async with s3_store(s3_bucket, proxy.endpoint) as s3:
        etag = await s3.put("manifest.json", b"v1")
        rule = proxy.inject(method="PUT", key_contains="manifest.json", status=status, code=code)
        proxy.requests.clear()
        with pytest.raises(PreconditionFailed) as info:
            await s3.put("manifest.json", b"v2", if_match=etag)
        assert info.value.status == status
        assert rule.hits == 1
        assert proxy.requests == [
            ("PUT", f"/{s3_bucket}/root/manifest.json")
        ]  # botocore did not retry
        # The caller's retry goes through.
        new_etag = await s3.put("manifest.json", b"v2", if_match=etag)
        assert (await s3.get("manifest.json")).etag == new_etag


async def test_s3_cas_loop_rides_over_injected_409s(proxy, s3_bucket):
    async with s3_store(s3_bucket, proxy.endpoint) as s3:
        proxy.inject(
            method="PUT",
            status=409,
            code="ConditionalRequestConflict",
            times=None,
            probability=0.3,
            seed=7,
        )
        results = await asyncio.gather(*(cas_increment(s3, "counter.txt") for _ in range(10)))
        assert sorted(results) == list(range(1, 11))
        assert (await s3.get("counter.txt")).data == b"10"


async def test_s3_slowdown_on_get_is_retried(proxy, s3_bucket):
    async with s3_store(s3_bucket, proxy.endpoint) as s3:
        await s3.put("a.pdf", b"data")
        rule = proxy.inject(method="GET", key_contains="a.pdf", status=503, code="SlowDown")
        proxy.requests.clear()
        assert (await s3.get("a.pdf")).data == b"data"
        assert rule.hits == 1
        assert proxy.requests.count(("GET", f"/{s3_bucket}/root/a.pdf")) == 2


async def test_s3_connection_reset_is_retried(proxy, s3_bucket):
    async with s3_store(s3_bucket, proxy.endpoint) as s3:
        await s3.put("a.pdf", b"data")
        rule = proxy.inject(method="GET", key_contains="a.pdf", reset=True)
        assert (await s3.get("a.pdf")).data == b"data"
        assert rule.hits == 1


async def test_s3_retries_are_bounded(proxy, s3_bucket):
    async with s3_store(s3_bucket, proxy.endpoint, max_attempts=2) as s3:
        rule = proxy.inject(method="GET", status=503, code="SlowDown", times=None)
        with pytest.raises(StorageError) as info:
            await s3.get("a.pdf")
        assert not isinstance(info.value, ObjectNotFound)
        assert "503" in str(info.value) and info.value.key == "a.pdf"
        assert rule.hits == 2


async def test_s3_read_timeout_is_a_storage_error(proxy, s3_bucket):
    async with s3_store(s3_bucket, proxy.endpoint, read_timeout=0.2, max_attempts=1) as s3:
        proxy.inject(method="GET", delay=1.0, times=None)
        started = time.monotonic()
        with pytest.raises(StorageError, match="get 'slow.pdf'"):
            await s3.get("slow.pdf")
        assert time.monotonic() - started < 0.9


async def test_s3_missing_bucket_is_not_object_not_found(moto_endpoint):
    async with s3_store("no-such-bucket-here", moto_endpoint) as s3:
        with pytest.raises(StorageError) as info:
            await s3.get("k")
        assert not isinstance(info.value, ObjectNotFound)
        assert isinstance(info.value, ConfigurationError)  # a user mistake: one line, exit 2
        assert "'no-such-bucket-here' does not exist" in str(info.value)


async def test_s3_with_prefect_aws_credentials_block(moto_endpoint, s3_bucket):
    from prefect_aws import AwsCredentials

    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="not-a-real-secret",
        region_name=REGION,
        aws_client_parameters={"endpoint_url": moto_endpoint},
    )
    store = open_store(f"s3://{s3_bucket}/viablock", credentials=credentials)
    async with store:
        await store.put("k.json", b"{}")
        assert [i.key for i in await store.list()] == ["k.json"]
    assert "not-a-real-secret" not in repr(store) + store.url


# --------------------------------------------------------------------------- routing


def test_open_store_routing(tmp_path):
    s3 = open_store(
        "s3://my-bucket/some/prefix", endpoint_url="http://127.0.0.1:9", region_name=REGION
    )
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == (
        "my-bucket",
        "some/prefix/",
        "s3://my-bucket/some/prefix/",
    )

    bare = open_store("s3://my-bucket")
    assert isinstance(bare, S3Store) and bare.prefix == "" and bare.url == "s3://my-bucket/"

    local = open_store(str(tmp_path / "invoices"))
    assert isinstance(local, LocalStore)
    assert isinstance(s3, Store) and isinstance(local, Store)
    assert local.url == str((tmp_path / "invoices").resolve())

    with pytest.raises(ConfigurationError, match="s3://bucket/prefix or a folder"):
        open_store("gs://bucket/x")


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_a_plain_http_endpoint_from_the_environment_loads_no_ca_bundle(
    moto_endpoint, s3_bucket, variable
):
    # In a child interpreter: its environment holds only the endpoint under test, and the
    # count sees every CA-bundle load (botocore loads it at a client's first request).
    check = (
        "import asyncio, ssl\n"
        "loads = []\n"
        "original = ssl.SSLContext.load_verify_locations\n"
        "def counted(self, *args, **kwargs):\n"
        "    loads.append(args)\n"
        "    return original(self, *args, **kwargs)\n"
        "ssl.SSLContext.load_verify_locations = counted\n"
        "from tasks.storage import open_store\n"
        "async def main():\n"
        f"    async with open_store('s3://{s3_bucket}/env-endpoint') as store:\n"
        "        await store.put('k.txt', b'hello')\n"
        "        assert (await store.get('k.txt')).data == b'hello'\n"
        "asyncio.run(main())\n"
        "assert loads == [], loads\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env.update(
        {
            variable: moto_endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
        }
    )
    subprocess.run(
        [sys.executable, "-c", check], check=True, cwd=Path(__file__).parents[1], env=env
    )


# --------------------------------------------------------------------------- sources and outputs


def test_a_missing_source_folder_is_refused_and_nothing_is_created(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(ConfigurationError, match="the source folder .* does not exist"):
        open_store(str(missing), create=False, role="source")
    assert not missing.exists()


def test_a_file_is_neither_a_source_nor_an_output(tmp_path):
    file = tmp_path / "invoice.pdf"
    file.write_bytes(b"%PDF-1.7")
    for create, role in ((False, "source"), (True, "output")):
        with pytest.raises(ConfigurationError, match=f"the {role} .* is a file, not a folder"):
            open_store(str(file), create=create, role=role)
    with pytest.raises(ConfigurationError, match="is a file, not a folder"):
        open_store(str(file / "out"), role="output")


async def test_an_output_folder_is_created_by_its_first_write_not_before(tmp_path):
    out = tmp_path / "new" / "out"
    async with open_store(str(out), role="output") as store:
        assert not out.exists() and await store.list() == []
        with pytest.raises(ObjectNotFound):
            await store.get("manifest.json")
        await store.put("manifest.json", b"{}", if_none_match=True)
    assert (out / "manifest.json").read_bytes() == b"{}"


async def test_exists_tells_an_empty_or_misspelt_s3_prefix_from_one_with_objects(
    moto_endpoint, s3_bucket
):
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION).put_object(
        Bucket=s3_bucket, Key="incoming/2026-11/a.pdf", Body=b"x"
    )
    for prefix, there in (
        ("incoming/", True),
        ("incoming/2026-11", True),
        ("", True),
        ("incomming/", False),
        ("incoming/2026-12/", False),
    ):
        async with s3_store(s3_bucket, moto_endpoint, prefix=prefix) as store:
            assert await store.exists() is there, prefix
    async with s3_store("no-such-bucket-here", moto_endpoint) as store:
        with pytest.raises(ConfigurationError, match="does not exist"):
            await store.exists()
