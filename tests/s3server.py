"""A real S3-compatible server for tests: moto in server mode on a free loopback port.

The ``s3_server`` fixture (session scope) starts ``moto.server.ThreadedMotoServer`` on
127.0.0.1, creates a bucket and yields an :class:`S3Server` whose ``storage_options`` are
passed explicitly to s3fs. Nothing global is set: no ``AWS_*`` environment variables, no
moto mocks in this process, so other tests see the environment they had.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

# Fake credentials: moto accepts any; they are planted in tests to check they never print.
FAKE_KEY = "AKIAREPSCOPEFAKEKEY01"
FAKE_SECRET = "repscope-fake-secret-Xq7Zp2Lm9Vw4"


@dataclass
class S3Server:
    """Where the test S3 server listens and how to reach its bucket."""

    endpoint_url: str
    bucket: str
    storage_options: dict = field(default_factory=dict)

    def url(self, name: str | None = None) -> str:
        """A fresh ``s3://bucket/<name>`` URL (unique when no name is given)."""
        return f"s3://{self.bucket}/{name or uuid.uuid4().hex}"


def _options(endpoint_url: str) -> dict:
    return {
        "key": FAKE_KEY,
        "secret": FAKE_SECRET,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    # Plain imports: a missing test dependency must fail the run, not skip S3 tests.
    import boto3
    import moto.server as moto_server
    import s3fs  # noqa: F401  (the backend under test)

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        bucket = f"repscope-test-{uuid.uuid4().hex[:8]}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=FAKE_KEY,
            aws_secret_access_key=FAKE_SECRET,
        )
        client.create_bucket(Bucket=bucket)
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage_options=_options(endpoint))
    finally:
        server.stop()
