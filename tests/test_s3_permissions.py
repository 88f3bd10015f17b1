"""S3 credentials that cannot write or delete: clear errors, and no probe object left behind.

A moto_server that enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT lets the set-up calls through),
with users whose policies allow reading only, or writing without deleting. No mocks: erstore
talks to the server through TensorStore's s3 driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import erstore
from erstore.location import Location
from tests.s3server import free_port, wait_for_http

pytestmark = pytest.mark.slow
BUCKET = "erstore-perm"
READ = ["s3:ListBucket", "s3:GetObject"]


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory):
    """(endpoint, {user: (key id, secret)}, admin boto3 client) of an IAM-enforcing server."""
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto-iam") / "moto.log", "wb")  # noqa: SIM115
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="10")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", proc)
        common = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **common)
        users = {}
        for name, actions in {"admin": "*", "reader": READ, "nodelete": [*READ, "s3:PutObject"]}.items():
            iam.create_user(UserName=name)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
            users[name] = (key["AccessKeyId"], key["SecretAccessKey"])
        admin = boto3.client("s3", aws_access_key_id=users["admin"][0], aws_secret_access_key=users["admin"][1],
                             **common)
        admin.create_bucket(Bucket=BUCKET)
        yield endpoint, users, admin
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def objects(admin) -> list[str]:
    return [o["Key"] for o in admin.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def as_user(monkeypatch, users, name):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", users[name][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", users[name][1])


@pytest.mark.parametrize("user, problem", [("reader", "may not delete objects"),
                                           ("nodelete", "may not delete objects")])
def test_preflight_without_write_or_delete_permission_is_clear_and_leaves_nothing(iam_s3, monkeypatch, user,
                                                                                   problem):
    endpoint, users, admin = iam_s3
    as_user(monkeypatch, users, user)
    location = Location.open(f"s3://{BUCKET}/store", endpoint=endpoint, retries=1)
    location.preflight(write=False)  # reading is allowed
    with pytest.raises(erstore.StorePermissionError, match=problem) as caught:
        location.preflight(write=True)
    assert "s3:DeleteObject" in str(caught.value) and "Nothing was written" in str(caught.value)
    assert objects(admin) == []


def test_preflight_with_full_permission_leaves_no_probe(iam_s3, monkeypatch):
    endpoint, users, admin = iam_s3
    as_user(monkeypatch, users, "admin")
    Location.open(f"s3://{BUCKET}/ok", endpoint=endpoint, retries=1).preflight(write=True)
    assert objects(admin) == []


def test_cli_build_without_delete_permission_exits_with_one_line(iam_s3, tiny_bert, corpus, tmp_path):
    endpoint, users, admin = iam_s3
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=users["nodelete"][0], AWS_SECRET_ACCESS_KEY=users["nodelete"][1],
               AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "erstore.cli", "build", "--model", str(tiny_bert), "--corpus",
                           str(corpus), "--store", f"s3://{BUCKET}/built", "--endpoint", endpoint, "--layer", "2",
                           "--max-length", "64", "--quiet"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "may not delete objects" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert objects(admin) == []
