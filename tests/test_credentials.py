"""S3 without static keys: boto3's chain (web identity / IRSA, EKS pod identity) against moto's STS and S3
with moto's IAM enforcement on, so a request passes only when signed with credentials STS issued for a role
that may use S3; s3.region reaching the STS client; the credential check failing clearly."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import botocore.exceptions
import botocore.httpsession
import pytest
from moto import settings as moto_settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer
from moto.sts.models import sts_backends

from cafe_core.config import S3Config
from cafe_core.connect import check_pod_credentials, connect
from cafe_core.ports import free_port
from cafe_core.storage import NoCredentials, Storage, StorageError

ACCOUNT = "123456789012"  # moto's default account
ADMIN = {"aws_access_key_id": "AKIAADMINSETUP000000", "aws_secret_access_key": "setup"}
S3_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Federated": "oidc"},
                                                 "Action": "sts:AssumeRoleWithWebIdentity"}]}


@pytest.fixture(scope="module")
def moto_endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def role(moto_endpoint) -> str:
    """A role whose policy allows S3, made with setup keys before IAM enforcement is switched on."""
    name = f"cafe-pipeline-{uuid.uuid4().hex[:8]}"
    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1", **ADMIN)
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST))
    iam.put_role_policy(RoleName=name, PolicyName="s3", PolicyDocument=json.dumps(S3_POLICY))
    return f"arn:aws:iam::{ACCOUNT}:role/{name}"


@pytest.fixture
def enforce_iam(monkeypatch):
    """moto checks every request's signature and the caller's policies from now on (this test only). The
    web-identity exchange stays open, as in AWS: that call is unsigned, the token is the credential."""
    real = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def check(self, iam_request_cls, resource="*"):
        if self._get_action() == "AssumeRoleWithWebIdentity":
            return None
        return real(self, iam_request_cls, resource)

    monkeypatch.setattr(ActionAuthenticatorMixin, "_authenticate_and_authorize_action", check)
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)


def access_key(store: Storage) -> str:
    return store.client._request_signer._credentials.get_frozen_credentials().access_key


def assumed_keys(role_arn: str) -> set[str]:
    return {r.access_key_id for r in sts_backends[ACCOUNT]["aws"].assumed_roles if r.role_arn == role_arn}


def test_web_identity_alone_reads_and_writes(moto_endpoint, role, enforce_iam, monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Y2FmZSJ9.c2ln")
    monkeypatch.setenv("AWS_ROLE_ARN", role)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto_endpoint)
    monkeypatch.setenv("KFP_POD_NAME", "cafe-run-gate-1")  # a pipeline step: the credential check runs
    cfg = S3Config(endpoint_url=moto_endpoint, region="eu-west-1", embedded="never")
    bucket = f"s3://cafe-irsa-{uuid.uuid4().hex[:8]}"

    assert check_pod_credentials(cfg) == "web identity (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE)"
    with connect(cfg, [bucket]) as store:
        store.write_bytes(f"{bucket}/runs/r1/x.json", b'{"ok": true}')
        assert store.read_bytes(f"{bucket}/runs/r1/x.json") == b'{"ok": true}'
        used = access_key(store)
        # created in s3.region: outside us-east-1 AWS wants the region named when a bucket is made
        assert store.client.get_bucket_location(Bucket=bucket[5:])["LocationConstraint"] == "eu-west-1"
    # Signed with keys STS issued for this role (temporary: ASIA...), not with anything static.
    assert used.startswith("ASIA") and used in assumed_keys(role)
    # ... and the enforcement is real: keys STS never issued are refused.
    stranger = Storage(endpoint_url=moto_endpoint, region="eu-west-1",
                       credentials={"aws_access_key_id": "AKIANOTISSUEDBYSTS00", "aws_secret_access_key": "x"})
    with pytest.raises(StorageError, match="access denied"):
        stranger.read_bytes(f"{bucket}/runs/r1/x.json")


class _PodIdentityAgent(BaseHTTPRequestHandler):
    """The EKS Pod Identity Agent: hands out the role's credentials to a caller holding the pod's token."""

    token = ""
    credentials: dict = {}
    calls: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).calls.append(self.headers.get("Authorization"))
        if self.headers.get("Authorization") != self.token:
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps(self.credentials).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_pod_identity_alone_reads_and_writes(moto_endpoint, role, monkeypatch, tmp_path):
    sts = boto3.client("sts", endpoint_url=moto_endpoint, region_name="us-east-1", **ADMIN)
    issued = sts.assume_role(RoleArn=role, RoleSessionName="pod")["Credentials"]
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    handler = type("Agent", (_PodIdentityAgent,), {
        "token": "pod-token-123", "calls": [],
        "credentials": {"AccessKeyId": issued["AccessKeyId"], "SecretAccessKey": issued["SecretAccessKey"],
                        "Token": issued["SessionToken"], "Expiration": expires.isoformat()}})
    agent = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    try:
        (tmp_path / "eks-pod-identity-token").write_text("pod-token-123")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{agent.server_port}/v1/credentials")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(tmp_path / "eks-pod-identity-token"))
        monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks signatures from here
        cfg = S3Config(endpoint_url=moto_endpoint, region="us-east-1", embedded="never")
        assert check_pod_credentials(cfg) == "container credentials (EKS pod identity / ECS)"
        store = Storage.from_config(cfg)
        bucket = f"s3://cafe-pod-{uuid.uuid4().hex[:8]}"
        store.write_bytes(f"{bucket}/a", b"1")
        assert store.read_bytes(f"{bucket}/a") == b"1"
        assert access_key(store) == issued["AccessKeyId"]
        assert handler.calls and set(handler.calls) == {"pod-token-123"}  # the token file's content was sent
    finally:
        agent.shutdown()


def test_s3_region_reaches_the_sts_client(monkeypatch, tmp_path):
    """No endpoint override: the web-identity exchange goes to STS in s3.region (a private cluster reaches
    STS only through its regional VPC endpoint), for the credential check and for Storage's own client."""
    sent: list[str] = []

    def no_network(self, request):
        sent.append(request.url)
        raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url)

    monkeypatch.setattr(botocore.httpsession.URLLib3Session, "send", no_network)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    (tmp_path / "token").write_text("header.payload.signature")
    monkeypatch.setenv("AWS_ROLE_ARN", f"arn:aws:iam::{ACCOUNT}:role/cafe")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    cfg = S3Config(region="eu-central-1", embedded="never")
    with pytest.raises(StorageError, match=r"credentials \(web identity .*\) could not be resolved"):
        check_pod_credentials(cfg)
    assert sent and sent[0].startswith("https://sts.eu-central-1.amazonaws.com")
    sent.clear()
    with pytest.raises(NoCredentials, match=r"^S3 head s3://cafe/x: its credentials could not be fetched: "
                                            r"https://sts.eu-central-1.amazonaws.com/ did not answer"):
        Storage.from_config(cfg).exists("s3://cafe/x")
    assert sent and sent[0].startswith("https://sts.eu-central-1.amazonaws.com")


@pytest.mark.parametrize("url, s3_endpoint, credentials", [
    ("https://sts.eu-central-1.amazonaws.com/", "https://s3.eu-central-1.amazonaws.com", True),
    ("https://sts.amazonaws.com/", None, True),
    ("http://169.254.170.23/v1/credentials", "https://s3.us-east-1.amazonaws.com", True),  # EKS pod identity
    ("http://169.254.169.254/latest/api/token", "https://s3.us-east-1.amazonaws.com", True),  # instance role
    ("http://sts-proxy.internal:8080/", "http://minio:9000", True),  # AWS_ENDPOINT_URL_STS below
    ("https://cafe.s3.eu-west-1.amazonaws.com/k", "https://s3.eu-central-1.amazonaws.com", False),  # a redirect
    ("http://minio:9000/b/k", "http://minio:9000", False),
    ("http://sts-proxy.internal:8080/b/k", "http://sts-proxy.internal:8080", False),  # one host serving both
])
def test_which_failed_request_was_the_credential_exchange(url, s3_endpoint, credentials, monkeypatch):
    from cafe_core.storage import _credential_source

    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", "http://sts-proxy.internal:8080")
    assert _credential_source(url, s3_endpoint) is credentials


def test_aws_region_is_read_when_boto3_has_none(monkeypatch):
    from cafe_core.storage import aws_session

    assert aws_session().region_name is None
    monkeypatch.setenv("AWS_REGION", "ap-south-1")  # what the other SDKs read; boto3 reads AWS_DEFAULT_REGION
    assert aws_session().region_name == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert aws_session().region_name == "eu-west-3"
    assert aws_session("us-west-2").region_name == "us-west-2"


@pytest.fixture
def no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask for here


def test_no_source_at_all_names_every_way(no_credentials):
    with pytest.raises(StorageError) as err:
        check_pod_credentials(S3Config(embedded="never"))
    text = str(err.value)
    assert "this pod has no credentials" in text and "cafe-s3 Secret" in text
    for way in ("AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "instance role"):
        assert way in text


def test_half_a_web_identity_is_named(no_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ROLE_ARN", f"arn:aws:iam::{ACCOUNT}:role/cafe")
    with pytest.raises(StorageError, match="AWS_ROLE_ARN is set but AWS_WEB_IDENTITY_TOKEN_FILE is not"):
        check_pod_credentials(S3Config(embedded="never"))


def test_unreadable_token_file_fails_at_the_check(no_credentials, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ROLE_ARN", f"arn:aws:iam::{ACCOUNT}:role/cafe")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "missing-token"))
    with pytest.raises(StorageError, match=r"\(web identity .*\) could not be resolved: .*missing-token"):
        check_pod_credentials(S3Config(region="us-east-1", embedded="never"))


def test_pod_identity_agent_refusing_fails_at_the_check(no_credentials, monkeypatch, tmp_path):
    handler = type("Agent", (_PodIdentityAgent,), {"token": "right", "calls": [], "credentials": {}})
    agent = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=agent.serve_forever, daemon=True).start()
    try:
        (tmp_path / "tok").write_text("wrong")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{agent.server_port}/v1/credentials")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(tmp_path / "tok"))
        with pytest.raises(StorageError, match=r"\(boto3's credential chain\) could not be resolved: "
                                               r"CredentialRetrievalError"):
            check_pod_credentials(S3Config(region="us-east-1", embedded="never"))
    finally:
        agent.shutdown()
