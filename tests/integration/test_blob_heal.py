"""A stored blob whose bytes are gone or damaged heals from the artifact
mirrors (services/blobheal.py): real HTTP servers on loopback serving a
directory by digest, a real blob store and database."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.engine import make_engine, upgrade
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import DataLoss
from edgefleet.controlplane.server import create_server
from edgefleet.controlplane.services.blobs import BlobStore
from testkit.harness import ADMIN_TOKEN


class Mirror:
    """A static file server over a directory (`GET /<prefix>/<name>`), as
    nginx over `edgefleet artifacts export` would be, that records every
    request's headers. `stream` names files sent with no Content-Length
    (the body ends when the connection closes); `redirect` maps a name to a
    URL it answers 302 with; `delay_s` holds each answer back."""

    def __init__(self, root: Path, prefix: str = "blobs") -> None:
        self.root = root
        self.prefix = prefix
        root.mkdir(parents=True, exist_ok=True)
        self.requests: list[dict[str, str]] = []
        self.stream: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.delay_s = 0.0
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(dict(self.headers.items()))
                time.sleep(mirror.delay_s)
                head, _, name = self.path.lstrip("/").partition("/")
                if head != mirror.prefix or "/" in name or name.startswith("."):
                    self.send_error(404)
                    return
                if name in mirror.redirect:
                    self.send_response(302)
                    self.send_header("Location", mirror.redirect[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = mirror.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if name in mirror.stream:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # The control plane may refuse the rest: what is tested.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{self.prefix}"

    def serve(self, digest: str, data: bytes) -> None:
        (self.root / digest).write_bytes(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    engine = make_engine(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    upgrade(engine)
    database = Database(engine)
    yield database
    database.dispose()


@pytest.fixture
def mirrors(tmp_path: Path) -> Iterator[Callable[[str], Mirror]]:
    started: list[Mirror] = []

    def start(name: str) -> Mirror:
        mirror = Mirror(tmp_path / name)
        started.append(mirror)
        return mirror

    yield start
    for mirror in started:
        mirror.close()


def _publish(db: Database, store: BlobStore, tmp_path: Path, data: bytes) -> str:
    src = tmp_path / "src"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    with db.unit_of_work() as uow:
        store.add(uow.session, src, digest, "application/octet-stream")
        uow.commit()
    return digest


def _damage(store: BlobStore, digest: str) -> bytes:
    """Overwrite the stored file's bytes in place (same size, one bit off)."""
    path = store.store_path(digest)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    return bytes(damaged)


def _read_all(store: BlobStore, db: Database, digest: str) -> bytes:
    with store.open(db, digest) as blob:
        return blob.read(0, blob.size + 1)


def test_a_damaged_blob_heals_from_the_mirror_and_stays_quarantined(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror], caplog: pytest.LogCaptureFixture
) -> None:
    mirror = mirrors("mirror")
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base])
    data = os.urandom(300_000)
    digest = _publish(db, store, tmp_path, data)
    mirror.serve(digest, data)
    damaged = _damage(store, digest)
    with caplog.at_level(logging.WARNING):
        assert _read_all(store, db, digest) == data
    assert store.store_path(digest).read_bytes() == data
    # The damaged copy is kept for inspection, as without a mirror.
    assert (tmp_path / "blobs" / "quarantine" / digest).read_bytes() == damaged
    assert f"blob {digest} healed from the mirror {mirror.base}/{digest}" in caplog.text
    assert [h.get("Accept-Encoding") for h in mirror.requests] == ["identity"]
    assert not [p for p in store.tmp.iterdir() if p.name.startswith("heal-")]
    # Healed for good: the next open asks no mirror.
    assert _read_all(store, db, digest) == data
    assert len(mirror.requests) == 1


def test_a_missing_blob_heals_from_the_mirror(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror]
) -> None:
    mirror = mirrors("mirror")
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base])
    data = b"zero\none\ntwo\n" * 1000
    digest = _publish(db, store, tmp_path, data)
    mirror.serve(digest, data)
    store.store_path(digest).unlink()
    assert _read_all(store, db, digest) == data
    assert store.local_path(db, digest).read_bytes() == data


def test_wrong_bytes_on_the_mirror_do_not_heal_and_data_loss_names_it(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror], caplog: pytest.LogCaptureFixture
) -> None:
    mirror = mirrors("mirror")
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base])
    data = os.urandom(50_000)
    digest = _publish(db, store, tmp_path, data)
    stale = os.urandom(len(data))  # the right size, other bytes
    mirror.serve(digest, stale)
    store.store_path(digest).unlink()
    with caplog.at_level(logging.WARNING), pytest.raises(DataLoss) as info:
        store.open(db, digest)
    message = str(info.value)
    stale_digest = hashlib.sha256(stale).hexdigest()[:12]
    assert f"{mirror.base}/{digest}: its bytes hash to {stale_digest}" in message
    # The advice stays.
    assert "missing from the blob store" in message and "edgefleet builds run" in message
    assert not store.store_path(digest).exists()
    assert f"the mirror {mirror.base}/{digest} could not heal blob {digest}" in caplog.text
    assert not [p for p in store.tmp.iterdir() if p.name.startswith("heal-")]


def test_a_404_mirror_is_skipped_for_the_next_one(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror], caplog: pytest.LogCaptureFixture
) -> None:
    empty, good = mirrors("empty"), mirrors("good")
    # A scheme urllib3 cannot fetch fails as a mirror, not the heal.
    listed = ["ftp://mirror.invalid/blobs", empty.base, good.base]
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: listed)
    data = os.urandom(20_000)
    digest = _publish(db, store, tmp_path, data)
    good.serve(digest, data)
    _damage(store, digest)
    with caplog.at_level(logging.WARNING):
        assert _read_all(store, db, digest) == data
    assert len(empty.requests) == 1 and len(good.requests) == 1
    assert f"the mirror {empty.base}/{digest} could not heal blob {digest}: HTTP 404" in caplog.text
    assert "the mirror ftp://mirror.invalid/blobs/" in caplog.text


def test_a_mirror_sending_more_than_the_blob_is_refused(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror]
) -> None:
    mirror = mirrors("mirror")
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base])
    data = os.urandom(10_000)
    digest = _publish(db, store, tmp_path, data)
    # The blob's bytes, then more, with no Content-Length to say so first:
    # only counting what arrives refuses it.
    mirror.serve(digest, data + os.urandom(4 * 1024 * 1024))
    mirror.stream.add(digest)
    store.store_path(digest).unlink()
    with pytest.raises(DataLoss, match=r"sent more than the blob's 10000 bytes; refused"):
        store.open(db, digest)
    assert not store.store_path(digest).exists()
    assert not [p for p in store.tmp.iterdir() if p.name.startswith("heal-")]
    # With a Content-Length that says so, refused before any byte is read.
    mirror.stream.clear()
    other = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base])
    with pytest.raises(DataLoss, match=r"Content-Length 4204304, not the blob's 10000 bytes"):
        other.open(db, digest)


def test_a_failed_heal_is_not_tried_again_for_60_s(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror]
) -> None:
    mirror = mirrors("mirror")
    clock = Clock()
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base], clock=clock)
    data = os.urandom(5_000)
    digest = _publish(db, store, tmp_path, data)
    store.store_path(digest).unlink()
    with pytest.raises(DataLoss, match="HTTP 404"):
        store.open(db, digest)
    assert len(mirror.requests) == 1
    mirror.serve(digest, data)  # the mirror has it now, but is not asked yet
    clock.now += 59.0
    for _ in range(5):
        with pytest.raises(DataLoss, match=r"asked 59 s ago; asked again 60 s after that"):
            store.open(db, digest)
    assert len(mirror.requests) == 1
    clock.now += 1.0
    assert _read_all(store, db, digest) == data
    assert len(mirror.requests) == 2


def test_concurrent_openers_wait_for_one_heal(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror]
) -> None:
    mirror = mirrors("mirror")
    mirror.delay_s = 0.3
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [mirror.base])
    data = os.urandom(100_000)
    digest = _publish(db, store, tmp_path, data)
    mirror.serve(digest, data)
    _damage(store, digest)
    results: list[bytes | BaseException] = []

    def opener() -> None:
        try:
            results.append(_read_all(store, db, digest))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [data] * 6
    assert len(mirror.requests) == 1


def test_no_credential_reaches_a_mirror_even_across_a_redirect(
    db: Database, tmp_path: Path, mirrors: Callable[[str], Mirror], caplog: pytest.LogCaptureFixture
) -> None:
    front, bucket = mirrors("front"), mirrors("bucket")
    data = os.urandom(30_000)
    digest = hashlib.sha256(data).hexdigest()
    bucket.serve(digest, data)
    front.redirect[digest] = f"{bucket.base}/{digest}"
    # A user:password in a mirror's URL is not sent (nor logged).
    with_auth = front.base.replace("http://", "http://user:s3cret@")
    store = BlobStore(tmp_path / "blobs", mirrors=lambda: [with_auth])
    assert _publish(db, store, tmp_path, data) == digest
    store.store_path(digest).unlink()
    with caplog.at_level(logging.WARNING):
        assert _read_all(store, db, digest) == data
    assert len(front.requests) == 1 and len(bucket.requests) == 1
    credentials = {"authorization", "cookie", "proxy-authorization"}
    for headers in front.requests + bucket.requests:
        assert not {k.lower() for k in headers} & credentials
    assert "s3cret" not in caplog.text and "healed from the mirror" in caplog.text


def test_without_mirrors_the_data_loss_is_as_before(db: Database, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = os.urandom(1_000)
    digest = _publish(db, store, tmp_path, data)
    store.store_path(digest).unlink()
    with pytest.raises(DataLoss) as info:
        store.open(db, digest)
    assert "artifact mirrors" not in str(info.value)
    assert str(info.value).endswith("the same bytes pushed or built again put it back")


async def test_the_server_heals_from_its_artifact_mirrors(
    tmp_path: Path, mirrors: Callable[[str], Mirror]
) -> None:
    mirror = mirrors("mirror")
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
            build_workers=0, artifact_mirrors=(mirror.base,),
        )
    )  # fmt: skip
    try:
        data = os.urandom(40_000)
        digest = _publish(cp.db, cp.services.blobs, tmp_path, data)
        mirror.serve(digest, data)
        _damage(cp.services.blobs, digest)
        assert _read_all(cp.services.blobs, cp.db, digest) == data
        assert len(mirror.requests) == 1
    finally:
        await cp.stop()
