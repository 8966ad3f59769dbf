"""Storage: local and S3 alike, the commit protocol, hostile names, multipart, retries."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cafe_core.commit import MANIFEST, OutputWriter, read_manifest, verify_output
from cafe_core.ports import free_port
from cafe_core.storage import (
    ChecksumError,
    NoCredentials,
    NotCommittedError,
    ObjectNotFound,
    PreconditionFailed,
    Storage,
    StorageError,
    StorageUnavailable,
)
from cafe_core.uris import check_relative, join, safe_name

HOSTILE = [
    "../../x",
    "/etc/passwd",
    "..",
    ".",
    "a/../../b",
    "C:\\Windows\\x",
    "x" * 5000,
    "\u202eevil\u202d",  # bidi override
    "caf\u0065\u0301",  # combining accent
    "ﬁle",  # ligature, changes under NFKC
    "zero\u200bwidth",
    "nul\x00byte",
    "new\nline",
    "🙂/🙃",
    "",
]


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, bucket):
    """The same tests run on a local folder and on the real S3 server."""
    if request.param == "local":
        return Storage(), str(tmp_path / "out")
    request.getfixturevalue("s3_env")
    return Storage(multipart_threshold_mb=5, multipart_chunk_mb=5), f"{bucket}/out"


def test_roundtrip_and_listing(where):
    store, base = where
    store.write_bytes(join(base, "a/b.bin"), b"123")
    store.write_text(join(base, "c.txt"), "hé")
    assert store.read_bytes(join(base, "a/b.bin")) == b"123"
    assert store.read_text(join(base, "c.txt")) == "hé"
    assert [(o.uri, o.size) for o in store.list(base)] == [(join(base, "a/b.bin"), 3), (join(base, "c.txt"), 3)]
    assert store.exists(join(base, "c.txt")) and not store.exists(join(base, "nope"))
    with pytest.raises(StorageError, match="does not exist"):
        store.read_bytes(join(base, "nope"))


def test_local_listing_sees_objects_only_while_others_write(tmp_path, monkeypatch):
    """A local folder lists as S3 does: a writer's temp file and a conditional write's lock are not objects,
    and a file removed between the walk and its stat is skipped (it raced a concurrent promotion in CI)."""
    store, base = Storage(), tmp_path / "out"
    store.write_bytes(str(base / "a.json"), b"{}")
    store.write_bytes_if(str(base / "b.json"), b"1", if_none_match=True)  # leaves .b.json.lock
    (base / ".a.json.tmp-0123abcd").write_bytes(b"half")
    (base / ".hidden").write_bytes(b"x")  # a dot-file that is not scratch is an object
    real_walk = os.walk

    def walk_then_vanish(top, *args, **kwargs):
        for folder, dirs, names in real_walk(top, *args, **kwargs):
            yield folder, dirs, [*names, "gone.json"]  # seen by the walk, deleted before the stat

    monkeypatch.setattr(os, "walk", walk_then_vanish)
    assert [Path(o.uri).name for o in store.list(str(base))] == [".hidden", "a.json", "b.json"]


def test_commit_protocol(where):
    store, base = where
    out = OutputWriter(store, base, kind="t")
    out.put_bytes("part-0", b"a" * 10)
    out.put_json("stats.json", {"n": 1})
    # Parts are there but nothing is committed: a reader refuses the output.
    with pytest.raises(NotCommittedError, match="not a committed output"):
        read_manifest(store, base)
    manifest = out.commit(meta={"n": 1})
    assert read_manifest(store, base).names() == ["part-0", "stats.json"]
    assert verify_output(store, base).meta == {"n": 1} == manifest.meta
    # Rewriting the prefix un-commits first, and stale parts go after the new commit.
    out2 = OutputWriter(store, base, kind="t")
    with pytest.raises(NotCommittedError):
        read_manifest(store, base)
    out2.put_bytes("part-1", b"b")
    out2.commit()
    assert read_manifest(store, base).names() == ["part-1"]
    assert sorted(o.uri.rsplit("/", 1)[1] for o in store.list(base)) == [MANIFEST, "part-1"]


def test_verify_detects_tampering(where):
    store, base = where
    out = OutputWriter(store, base, kind="t")
    out.put_bytes("x", b"hello")
    out.put_bytes("y", b"world")
    out.commit()
    store.write_bytes(join(base, "x"), b"HELLO")  # same size, other content
    store.delete(join(base, "y"))
    with pytest.raises(ChecksumError) as err:
        verify_output(store, base)
    assert "x: sha256 differs" in str(err.value) and "y: missing" in str(err.value)


def test_killed_writer_leaves_no_readable_output(tmp_path):
    """A writer process killed between its parts and its commit: the output stays unreadable."""
    base = tmp_path / "out"
    code = (
        "import os, signal\n"
        "from cafe_core.commit import OutputWriter\n"
        "from cafe_core.storage import Storage\n"
        f"out = OutputWriter(Storage(), {str(base)!r}, kind='t')\n"
        "out.put_bytes('part-0', b'x' * 1000)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
        "out.commit()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert (base / "part-0").exists()
    with pytest.raises(NotCommittedError):
        read_manifest(Storage(), str(base))


def test_local_writes_leave_no_temp_files(tmp_path):
    store = Storage()
    store.write_bytes(str(tmp_path / "f"), b"x")
    assert os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_safe_name_cannot_escape(hostile, tmp_path):
    name = safe_name(hostile)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,79}", name), name
    assert ".." not in name.split("/") and "/" not in name
    target = join(str(tmp_path), name)
    Storage().write_bytes(target, b"x")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_name_keeps_distinct_ids_distinct():
    names = [safe_name(h) for h in HOSTILE]
    assert len(set(names)) == len(names)
    assert safe_name("plain-id_1.png") == "plain-id_1.png"


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../b", "a\\b", "", "./a", "a/\x00"])
def test_relative_names_refused(bad):
    with pytest.raises(StorageError):
        check_relative(bad)
    with pytest.raises(StorageError):
        join("s3://b/prefix", bad)


def test_output_writer_refuses_escaping_names(tmp_path):
    out = OutputWriter(Storage(), str(tmp_path / "o"), kind="t")
    with pytest.raises(StorageError):
        out.put_bytes("../escape", b"x")
    with pytest.raises(StorageError):
        out.put_bytes(MANIFEST, b"{}")
    assert not (tmp_path / "escape").exists()


@pytest.mark.s3
def test_large_objects_go_multipart(s3_store, bucket, tmp_path):
    data = os.urandom(12 << 20)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    out = OutputWriter(s3_store, f"{bucket}/big", kind="t")
    out.put_file("big.bin", path)
    out.commit()
    head = s3_store.client.head_object(Bucket=bucket[5:], Key="big/big.bin")
    assert re.search(r"-\d+\"?$", head["ETag"]), f"expected a multipart ETag, got {head['ETag']}"
    verify_output(s3_store, f"{bucket}/big")
    assert s3_store.read_bytes(f"{bucket}/big/big.bin") == data


class _Flaky(BaseHTTPRequestHandler):
    """An S3 endpoint that answers 503 SlowDown a set number of times, then the object."""

    failures = 0
    calls = 0

    def do_GET(self):  # noqa: N802
        type(self).calls += 1
        if type(self).calls <= type(self).failures:
            body = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
            self.send_response(503)
        else:
            body = b"hello"
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_transient_errors_are_retried(flaky_endpoint):
    _Flaky.failures, _Flaky.calls = 2, 0
    store = Storage(endpoint_url=flaky_endpoint, region="us-east-1", max_attempts=4)
    assert store.read_bytes("s3://b/k") == b"hello"
    assert _Flaky.calls == 3


def test_retries_are_bounded(flaky_endpoint):
    _Flaky.failures, _Flaky.calls = 10, 0
    store = Storage(endpoint_url=flaky_endpoint, region="us-east-1", max_attempts=2)
    with pytest.raises(StorageError, match="SlowDown"):
        store.read_bytes("s3://b/k")
    assert _Flaky.calls == 2


@pytest.fixture
def dead_endpoint(monkeypatch):
    """An endpoint where nothing listens (connection refused), with credentials so boto3 gets that far."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    return f"http://127.0.0.1:{free_port()}"


def test_unreachable_endpoint_is_one_clear_error(dead_endpoint):
    store = Storage(endpoint_url=dead_endpoint, region="us-east-1", max_attempts=2)
    with pytest.raises(StorageUnavailable) as err:
        store.write_bytes("s3://b/k", b"x")
    msg = str(err.value)
    assert msg == (f"S3 endpoint {dead_endpoint} did not answer: put s3://b/k failed after 2 attempts "
                   "(EndpointConnectionError)")
    assert "\n" not in msg and err.value.__cause__ is None and err.value.__suppress_context__
    assert not isinstance(err.value, StorageError)  # an outage is not a missing or damaged object


@pytest.mark.parametrize("op, call", [
    ("get", lambda s, tmp: s.read_bytes("s3://b/k")),
    ("get", lambda s, tmp: s.sha256("s3://b/k")),
    ("head", lambda s, tmp: s.exists("s3://b/k")),
    ("list", lambda s, tmp: s.list("s3://b/k")),
    ("get", lambda s, tmp: s.read_with_etag("s3://b/k")),
    ("conditional put", lambda s, tmp: s.write_bytes_if("s3://b/k", b"x", if_none_match=True)),
    ("upload", lambda s, tmp: s.upload(__file__, "s3://b/k")),
    ("delete", lambda s, tmp: s.delete("s3://b/k")),
    ("download", lambda s, tmp: s.download("s3://b/k", tmp / "x")),
    ("copy", lambda s, tmp: s.copy("s3://b/k", "s3://b/k2")),
])
def test_every_s3_operation_reports_an_unreachable_endpoint(dead_endpoint, op, call, tmp_path):
    store = Storage(endpoint_url=dead_endpoint, region="us-east-1", max_attempts=1)
    with pytest.raises(StorageUnavailable, match=rf"^S3 endpoint {dead_endpoint} did not answer: {op} s3://b/k"
                                                 r"( to s3://b/k2)? failed after 1 attempt \(EndpointConnectionError\)$"):
        call(store, tmp_path)


def test_dropped_connection_is_unavailable(monkeypatch):
    """A server that accepts and hangs up without answering: the connection drops, retries included."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def hang_up():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(StorageUnavailable, match=r"get s3://b/k failed after 2 attempts \(ConnectionClosedError\)"):
            Storage(endpoint_url=endpoint, region="us-east-1", max_attempts=2).read_bytes("s3://b/k")
    finally:
        listener.close()
    assert len(accepted) == 2


def test_no_credentials_anywhere_is_one_clear_error(monkeypatch):
    """Nothing in boto3's chain: one line naming every way to give credentials, raised before any request, and
    not a StorageError (a missing object): like an outage, nothing can be read."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = Storage(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    with pytest.raises(NoCredentials, match=r"^S3 get s3://b/k: no usable credentials \(Unable to locate "
                                            r"credentials\); give static keys .*AWS_WEB_IDENTITY_TOKEN_FILE.*"
                                            r"AWS_CONTAINER_CREDENTIALS_FULL_URI") as err:
        store.read_bytes("s3://b/k")
    assert not isinstance(err.value, StorageError) and isinstance(err.value, StorageUnavailable)


def test_secrets_never_reach_artifacts(s3_env, bucket, monkeypatch):
    """The resolved config written next to outputs holds no credential."""
    from cafe_core.config import load_config

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    cfg = load_config(None, [f"root={bucket}"])
    assert "very-secret-value" not in cfg.to_yaml()
    with pytest.raises(Exception, match="endpoint_url"):
        load_config(None, ["s3.endpoint_url=http://user:pass@127.0.0.1:9000"])


# --- conditional writes and copies (the registry's building blocks) -----------------------------------


def test_conditional_writes(where):
    store, base = where
    uri = join(base, "aliases.json")
    with pytest.raises(ObjectNotFound):
        store.read_with_etag(uri)
    with pytest.raises(PreconditionFailed):  # if_match on a missing object: there is nothing to match
        store.write_bytes_if(uri, b"x", if_match="anything")
    etag = store.write_bytes_if(uri, b"one", if_none_match=True)
    assert store.read_with_etag(uri) == (b"one", etag)
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.write_bytes_if(uri, b"two", if_none_match=True)
    etag2 = store.write_bytes_if(uri, b"two", if_match=etag)
    assert etag2 != etag and store.read_with_etag(uri) == (b"two", etag2)
    with pytest.raises(PreconditionFailed, match="no longer"):
        store.write_bytes_if(uri, b"three", if_match=etag)  # stale etag: someone wrote in between
    assert store.read_bytes(uri) == b"two"
    with pytest.raises(StorageError, match="exactly one"):
        store.write_bytes_if(uri, b"x")
    with pytest.raises(StorageError, match="exactly one"):
        store.write_bytes_if(uri, b"x", if_match=etag2, if_none_match=True)


def test_compare_and_swap_loses_no_update(where):
    """Threads incrementing one counter by read-etag / write-if-match: every increment lands once."""
    store, base = where
    uri = join(base, "counter")
    store.write_bytes_if(uri, b"0", if_none_match=True)
    threads, per_thread = 4, 5
    barrier = threading.Barrier(threads)

    def bump():
        own = Storage(multipart_threshold_mb=5, multipart_chunk_mb=5)  # a client per thread, as processes would
        barrier.wait()
        done = 0
        while done < per_thread:
            data, etag = own.read_with_etag(uri)
            try:
                own.write_bytes_if(uri, str(int(data) + 1).encode(), if_match=etag)
                done += 1
            except PreconditionFailed:
                pass

    workers = [threading.Thread(target=bump) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert store.read_bytes(uri) == str(threads * per_thread).encode()


def test_copy(where, tmp_path):
    store, base = where
    src, dst = join(base, "a/src.bin"), join(base, "b/dst.bin")
    store.write_bytes(src, b"payload")
    store.copy(src, dst)
    assert store.read_bytes(dst) == b"payload" and store.read_bytes(src) == b"payload"
    local = str(tmp_path / "elsewhere" / "x.bin")  # across local and S3 (or local to local)
    store.copy(dst, local)
    store.copy(local, join(base, "c/back.bin"))
    assert store.read_bytes(join(base, "c/back.bin")) == b"payload"
    with pytest.raises(StorageError, match="does not exist"):
        store.copy(join(base, "nope"), join(base, "d"))
    assert not store.exists(join(base, "d"))


@pytest.mark.s3
def test_large_copy_is_server_side_multipart(s3_store, bucket):
    data = os.urandom(12 << 20)
    s3_store.write_bytes(f"{bucket}/big/src.bin", data)
    s3_store.copy(f"{bucket}/big/src.bin", f"{bucket}/big/dst.bin")
    head = s3_store.client.head_object(Bucket=bucket[5:], Key="big/dst.bin")
    assert re.search(r"-\d+\"?$", head["ETag"]), f"expected a multipart copy, got ETag {head['ETag']}"
    assert s3_store.sha256(f"{bucket}/big/dst.bin") == s3_store.sha256(f"{bucket}/big/src.bin")
