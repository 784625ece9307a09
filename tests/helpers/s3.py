"""moto's S3 server on loopback for tests: a real boto3 client talks HTTP to it, nothing is patched in-process."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator

# Credentials moto accepts; they reach it only through the clients and configs the tests build.
KEYS = {"access_key": "testing-key", "secret_key": "testing-secret", "region": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """Run moto's threaded S3 server on a free loopback port; yields its URL and stops it afterwards."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    """A boto3 S3 client for the moto server at ``endpoint``, with KEYS."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=KEYS["region"],
                        aws_access_key_id=KEYS["access_key"], aws_secret_access_key=KEYS["secret_key"])
