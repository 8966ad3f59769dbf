"""Read and write local paths and ``s3://bucket/key`` URIs alike: the Storage class and its errors.

Each write makes the object appear whole or not at all; conditional writes (etag compare-and-swap) and
copies serve the registry. The commit protocol built on this is in ``cafe_core.commit``, names and URIs in
``cafe_core.uris``. Endpoint, region and credentials come from boto3's standard settings; nothing here logs
or stores them. An S3 endpoint that cannot be reached raises StorageUnavailable, in one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from cafe_core.errors import BadInput
from cafe_core.uris import is_s3, sha256_bytes, sha256_file, split_s3

_CHUNK = 1 << 20  # streaming read/copy size


class StorageError(BadInput, RuntimeError):
    pass


class NotCommittedError(StorageError):
    """The output has no manifest: the stage that writes it never finished."""


class ChecksumError(StorageError):
    pass


class ObjectNotFound(StorageError):
    """The object does not exist (raised by the conditional-write helpers, which must tell it apart)."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed since it was read (if_match), or it already exists
    (if_none_match). The caller re-reads and decides again."""


class StorageUnavailable(BadInput, RuntimeError):
    """The S3 endpoint could not be reached, or the connection dropped, after the client's retries. Not a
    StorageError (nor an OSError) on purpose: code that handles a missing, damaged or unreadable object (a
    reject, a FAIL reason) must not take an outage for one; the stage reports it, and that nothing was
    committed."""


class NoCredentials(StorageUnavailable):
    """boto3's credential chain found nothing, or could not fetch what it found (a web-identity token STS
    would not exchange, a pod-identity agent that did not answer). Like an outage, nothing can be read or
    written: never taken for a missing object."""


# The credential chain's own failures (the STS exchange's refusal is a ClientError of the call instead).
_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)
CREDENTIAL_SOURCES = (
    "static keys (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, e.g. from the cafe-s3 Secret), a web identity "
    "(AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE: IRSA on the service account), EKS pod identity "
    "(AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE), a profile or an instance role"
)


# Refused or dropped connections and timeouts (botocore retries these itself), a body cut short, and the
# transfer manager's "download retries exhausted", which wraps one of them.
_NETWORK_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    boto3.exceptions.RetriesExceededError,
)
_ATTEMPTS = "_cafe_attempts"


def _note_attempts(attempts: int | None = None, caught_exception: Exception | None = None, **_: Any) -> None:
    """needs-retry hook: botocore calls it after every attempt, so the error it finally raises carries the
    number of attempts made."""
    if caught_exception is not None and attempts is not None:
        setattr(caught_exception, _ATTEMPTS, attempts)


def aws_session(region: str | None = None) -> boto3.session.Session:
    """A boto3 session whose region (s3.region when set) is the one every client it makes uses, the S3
    client and the STS client that boto3's credential chain creates to exchange a web-identity token (IRSA)
    alike. None leaves it to boto3's settings (AWS_DEFAULT_REGION, the profile), and then to AWS_REGION, which
    the other AWS SDKs read and boto3 does not."""
    session = boto3.session.Session(region_name=region)
    if session.region_name is None and os.environ.get("AWS_REGION"):
        session = boto3.session.Session(region_name=os.environ["AWS_REGION"])
    return session


# Where boto3's chain fetches credentials from: the instance metadata service, the ECS and EKS pod-identity agents.
_CREDENTIAL_HOSTS = {"169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23"}


def _credential_source(url: str, s3_endpoint: str | None) -> bool:
    """Whether a request that failed went to a credential source (STS, a metadata or pod-identity agent)
    rather than to S3 itself."""
    host = urlparse(url).hostname or ""
    if s3_endpoint and host == urlparse(s3_endpoint).hostname:
        return False
    configured = {urlparse(os.environ[v]).hostname
                  for v in ("AWS_ENDPOINT_URL_STS", "AWS_CONTAINER_CREDENTIALS_FULL_URI") if os.environ.get(v)}
    return host.startswith("sts.") or host in configured or host in _CREDENTIAL_HOSTS


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int


class Storage:
    """One interface over local files and S3. ``endpoint_url=None`` leaves the endpoint to boto3."""

    def __init__(
        self,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 6,
        multipart_threshold_mb: int = 16,
        multipart_chunk_mb: int = 16,
        credentials: dict[str, str] | None = None,
    ):
        self.endpoint_url = endpoint_url
        self.region = region
        self._max_attempts = max_attempts
        self._credentials = credentials or {}
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold_mb << 20, multipart_chunksize=multipart_chunk_mb << 20
        )
        self._client = None
        self._known_buckets: set[str] = set()

    @classmethod
    def from_config(cls, s3cfg: Any, endpoint_url: str | None = None, credentials: dict | None = None) -> "Storage":
        return cls(
            endpoint_url=endpoint_url or s3cfg.endpoint_url,
            region=s3cfg.region,
            max_attempts=s3cfg.max_attempts,
            multipart_threshold_mb=s3cfg.multipart_threshold_mb,
            multipart_chunk_mb=s3cfg.multipart_chunk_mb,
            credentials=credentials,
        )

    @property
    def credentials(self) -> dict[str, str]:
        """Keys given explicitly (the embedded server's placeholders); empty when boto3 finds its own."""
        return dict(self._credentials)

    def __getstate__(self) -> dict:  # picklable for worker processes: the client is rebuilt there
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            # Transient errors (throttling, 5xx, connection resets) are retried with exponential backoff.
            cfg = BotoConfig(
                retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
                connect_timeout=10,
                read_timeout=120,
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            client = aws_session(self.region).client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg, **self._credentials
            )
            client.meta.events.register("needs-retry.s3", _note_attempts)
            self._client = client
        return self._client

    # -- errors
    def _fail(self, uri: str, op: str, err: Exception) -> StorageError:
        if isinstance(err, ClientError):
            code = err.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{uri} does not exist")
            if code == "NoSuchBucket":
                return StorageError(f"{uri}: bucket does not exist (create it, or check the URI)")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"{uri}: access denied ({code}); check the S3 credentials in the environment")
            return StorageError(f"{uri}: S3 {op} failed: {code}")
        return StorageError(f"{uri}: {op} failed: {err}")

    @contextmanager
    def _network(self, op: str, uri: str) -> Iterator[None]:
        """Wraps the S3 side of every operation: a refused, timed-out or dropped connection to the endpoint
        becomes one line of StorageUnavailable naming the endpoint, the operation, the object and the
        attempts made (botocore's retries are spent by then)."""
        try:
            yield
        except _CREDENTIAL_ERRORS as e:
            raise NoCredentials(f"S3 {op} {uri}: no usable credentials ({e}); give {CREDENTIAL_SOURCES}") from None
        except _NETWORK_ERRORS as e:
            err, tries = e, 1
            if isinstance(e, boto3.exceptions.RetriesExceededError) and e.last_exception is not None:
                # download_file's transfer manager re-tried a GET whose body kept breaking off
                err, tries = e.last_exception, self._transfer.num_download_attempts
            attempts = getattr(err, _ATTEMPTS, 1) * tries
            where = (self._client.meta.endpoint_url if self._client is not None else None) or self.endpoint_url
            failed = getattr(err, "kwargs", {}).get("endpoint_url")
            if failed and _credential_source(failed, where):
                # Not S3 itself: the STS exchange (or another credential source) that S3's request waited on.
                raise NoCredentials(f"S3 {op} {uri}: its credentials could not be fetched: {failed} did not answer "
                                    f"({type(err).__name__}); check AWS_ENDPOINT_URL_STS / s3.region and the "
                                    "network path to STS") from None
            raise StorageUnavailable(
                f"S3 endpoint {where or 'the AWS default endpoint'} did not answer: {op} {uri} failed after "
                f"{attempts} attempt{'' if attempts == 1 else 's'} ({type(err).__name__})"
            ) from None

    def check_reachable(self, uri: str, timeout: float = 5.0) -> None:
        """Fail fast (one short try, no retries) when an S3 endpoint cannot be reached at all."""
        if not is_s3(uri):
            return
        bucket, _ = split_s3(uri)
        cfg = BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1})
        probe = aws_session(self.region).client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=cfg, **self._credentials
        )
        try:
            probe.head_bucket(Bucket=bucket)
        except ClientError:
            return  # the endpoint answered (a missing bucket or key is reported by the real call)
        except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts
            where = self.endpoint_url or "the AWS default endpoint"
            raise StorageUnavailable(f"S3 endpoint {where} is unreachable ({type(e).__name__}); check s3.endpoint_url / AWS_ENDPOINT_URL") from None

    def ensure_bucket(self, uri: str, op: str = "create bucket") -> None:
        """Create the URI's bucket unless it exists; ``op`` names the operation that needs it in errors."""
        bucket, _ = split_s3(uri)
        if bucket in self._known_buckets:
            return
        with self._network(op, uri):
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code not in ("404", "NoSuchBucket", "NotFound"):
                    raise self._fail(uri, "head_bucket", e) from None
                # Outside us-east-1, AWS creates a bucket only with its region named (else IllegalLocationConstraint).
                region = self.client.meta.region_name
                where = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region not in (
                    None, "us-east-1", "aws-global") else {}
                try:
                    self.client.create_bucket(Bucket=bucket, **where)
                except ClientError as e2:
                    if e2.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise self._fail(uri, "create_bucket", e2) from None
        self._known_buckets.add(bucket)

    # -- reads
    def read_bytes(self, uri: str) -> bytes:
        if not is_s3(uri):
            try:
                return Path(uri).read_bytes()
            except FileNotFoundError:
                raise StorageError(f"{uri} does not exist") from None
        bucket, key = split_s3(uri)
        with self._network("get", uri):
            try:
                return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError as e:
                raise self._fail(uri, "get", e) from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def download(self, uri: str, local_path: str | Path) -> Path:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        if not is_s3(uri):
            if not Path(uri).is_file():
                raise StorageError(f"{uri} does not exist")
            shutil.copyfile(uri, local_path)
            return local_path
        bucket, key = split_s3(uri)
        with self._network("download", uri):
            try:
                self.client.download_file(bucket, key, str(local_path), Config=self._transfer)
            except ClientError as e:
                raise self._fail(uri, "download", e) from None
        return local_path

    @contextmanager
    def local_copy(self, uri: str) -> Iterator[Path]:
        """A local path holding the object: the file itself when local, a temporary download otherwise."""
        if not is_s3(uri):
            if not Path(uri).exists():
                raise StorageError(f"{uri} does not exist")
            yield Path(uri)
            return
        with tempfile.TemporaryDirectory(prefix="cafe-") as tmp:
            yield self.download(uri, Path(tmp) / PurePosixPath(uri).name)

    def sha256(self, uri: str) -> str:
        """Streaming sha256 of an object (constant memory)."""
        if not is_s3(uri):
            return sha256_file(uri)
        bucket, key = split_s3(uri)
        h = hashlib.sha256()
        with self._network("get", uri):
            try:
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                for chunk in body.iter_chunks(_CHUNK):
                    h.update(chunk)
            except ClientError as e:
                raise self._fail(uri, "get", e) from None
        return h.hexdigest()

    def exists(self, uri: str) -> bool:
        if not is_s3(uri):
            return Path(uri).is_file()
        bucket, key = split_s3(uri)
        with self._network("head", uri):
            try:
                self.client.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                    return False
                raise self._fail(uri, "head", e) from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object below a folder/prefix (recursive), sorted by URI."""
        base = prefix.rstrip("/")
        if not is_s3(prefix):
            root = Path(base)
            if root.is_file():
                return [ObjectInfo(base, root.stat().st_size)]
            if not root.is_dir():
                return []
            out = []
            # os.walk skips a folder removed under it (rglob raises); each file is stat'ed once, after.
            for folder, _, names in os.walk(root):
                for name in names:
                    if _is_local_scratch(name):
                        continue  # another writer's temp file or lock: never an object, as on S3
                    path = Path(folder) / name
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue  # deleted or renamed away since the walk saw it
                    if stat.S_ISREG(st.st_mode):
                        out.append(ObjectInfo(str(path), st.st_size))
            return sorted(out, key=lambda o: o.uri)
        bucket, key = split_s3(base)
        key_prefix = f"{key}/" if key else ""
        out = []
        with self._network("list", prefix):
            try:
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
                    for obj in page.get("Contents", []):
                        if not obj["Key"].endswith("/"):
                            out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"]))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    return []
                raise self._fail(prefix, "list", e) from None
        return sorted(out, key=lambda o: o.uri)

    # -- writes (each object appears whole or not at all)
    def write_bytes(self, uri: str, data: bytes) -> None:
        if not is_s3(uri):
            _atomic_local_write(Path(uri), lambda f: f.write(data))
            return
        self.ensure_bucket(uri, "put")
        bucket, key = split_s3(uri)
        with self._network("put", uri):
            try:
                self.client.upload_fileobj(io.BytesIO(data), bucket, key, Config=self._transfer)
            except ClientError as e:
                raise self._fail(uri, "put", e) from None

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def upload(self, local_path: str | Path, uri: str) -> None:
        if not is_s3(uri):
            dest = Path(uri)
            if Path(local_path).resolve() == dest.resolve():
                return
            with open(local_path, "rb") as src:
                _atomic_local_write(dest, lambda f: shutil.copyfileobj(src, f, _CHUNK))
            return
        self.ensure_bucket(uri, "upload")
        bucket, key = split_s3(uri)
        with self._network("upload", uri):
            try:  # multipart above the threshold; S3 shows the object only once complete
                self.client.upload_file(str(local_path), bucket, key, Config=self._transfer)
            except ClientError as e:
                raise self._fail(uri, "upload", e) from None

    # -- conditional writes and copies (registry aliases, version claims)
    def read_with_etag(self, uri: str) -> tuple[bytes, str]:
        """The object's bytes and the etag to pass to ``write_bytes_if(if_match=...)``.

        S3: the server's ETag (quoted, as S3 returns it). Local: the sha256 of the content. Raises
        ObjectNotFound when there is no object."""
        if not is_s3(uri):
            try:
                data = Path(uri).read_bytes()  # local writes are atomic renames: never a torn read
            except FileNotFoundError:
                raise ObjectNotFound(f"{uri} does not exist") from None
            return data, sha256_bytes(data)
        bucket, key = split_s3(uri)
        with self._network("get", uri):
            try:
                resp = self.client.get_object(Bucket=bucket, Key=key)
                return resp["Body"].read(), resp["ETag"]
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code")
                if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                    where = " (nor does its bucket)" if code == "NoSuchBucket" else ""
                    raise ObjectNotFound(f"{uri} does not exist{where}") from None
                raise self._fail(uri, "get", e) from None

    def write_bytes_if(self, uri: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write only if the object still has etag ``if_match``, or (``if_none_match``) does not exist yet.

        Exactly one of the two conditions. Returns the new etag; raises PreconditionFailed when the
        condition does not hold (also for ``if_match`` on a missing object). S3 uses put_object's
        IfMatch / IfNoneMatch="*"; a local path takes an fcntl lock on ``.<name>.lock`` beside the target,
        checks, then renames the new content into place."""
        if (if_match is None) == (not if_none_match):
            raise StorageError(f"{uri}: write_bytes_if needs exactly one of if_match=ETAG or if_none_match=True")
        if not is_s3(uri):
            return _local_write_if(Path(uri), data, if_match, if_none_match)
        self.ensure_bucket(uri, "conditional put")
        bucket, key = split_s3(uri)
        cond = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
        with self._network("conditional put", uri):
            try:
                return self.client.put_object(Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 409 ConditionalRequestConflict: AWS's answer to two conditional writes in flight at once.
                lost = code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
                if lost or (if_match is not None and code in ("NoSuchKey", "404", "NotFound")):
                    what = f"its etag is no longer {if_match}" if if_match is not None else "it already exists"
                    raise PreconditionFailed(f"{uri}: conditional write refused ({what})") from None
                raise self._fail(uri, "conditional put", e) from None

    def copy(self, src_uri: str, dst_uri: str) -> None:
        """Copy one object. S3 to S3 is a server-side managed copy (multipart above the threshold, so
        objects over 5 GB work); local to local is a file copy; across the two it downloads/uploads.
        The destination appears whole or not at all."""
        if is_s3(src_uri) and is_s3(dst_uri):
            self.ensure_bucket(dst_uri, f"copy {src_uri} to")
            sb, sk = split_s3(src_uri)
            db, dk = split_s3(dst_uri)
            with self._network("copy", f"{src_uri} to {dst_uri}"):
                try:
                    self.client.copy({"Bucket": sb, "Key": sk}, db, dk, Config=self._transfer)
                except ClientError as e:
                    raise self._fail(src_uri, f"copy to {dst_uri}", e) from None
            return
        if not is_s3(src_uri) and not Path(src_uri).is_file():
            raise StorageError(f"{src_uri} does not exist")
        with self.local_copy(src_uri) as local:
            if not is_s3(dst_uri) and Path(local).resolve() == Path(dst_uri).resolve():
                return
            self.upload(local, dst_uri)

    def delete(self, uri: str) -> None:
        if not is_s3(uri):
            Path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        with self._network("delete", uri):
            try:
                self.client.delete_object(Bucket=bucket, Key=key)
            except ClientError as e:
                raise self._fail(uri, "delete", e) from None


_SCRATCH = re.compile(r"^\..+(\.tmp-[0-9a-f]{8}|\.lock)$")


def _is_local_scratch(name: str) -> bool:
    """The temp file of an atomic write in flight or the lock file of a conditional write."""
    return bool(_SCRATCH.match(name))


def _atomic_local_write(dest: Path, write) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _local_write_if(dest: Path, data: bytes, if_match: str | None, if_none_match: bool) -> str:
    """Local compare-and-swap: the lock file serialises writers (processes and threads alike, since each
    call opens its own descriptor); the content's sha256 stands in for S3's ETag."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.with_name(f".{dest.name}.lock")
    with open(lock, "a+b") as lf:
        fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        try:
            try:
                current: str | None = sha256_bytes(dest.read_bytes())
            except FileNotFoundError:
                current = None
            if if_none_match and current is not None:
                raise PreconditionFailed(f"{dest}: conditional write refused (it already exists)")
            if if_match is not None and current != if_match:
                raise PreconditionFailed(f"{dest}: conditional write refused (its etag is no longer {if_match})")
            _atomic_local_write(dest, lambda f: f.write(data))
        finally:
            fcntl.flock(lf.fileno(), fcntl.LOCK_UN)
    return sha256_bytes(data)
