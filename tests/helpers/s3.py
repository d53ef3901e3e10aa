"""A real S3 endpoint for the object-storage tests: moto's standalone server (ThreadedMotoServer, the
one s3fs's own tests use), started once per test session on a free local port, with a fresh bucket
per test.

The store reaches it the way it reaches AWS: s3fs and botocore read AWS_ENDPOINT_URL and the
credentials from the environment, so nothing in harvest knows it is talking to a test server.
"""

from __future__ import annotations

import atexit
import secrets
import socket
import subprocess
import sys
import time

import pytest

_ENDPOINT: str | None = None
ENV_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def endpoint() -> str:
    """The server's URL, starting it on first use (it lives until the test session ends). It runs in a
    child process: moto spends ~10 ms of CPU per request, which in this process would hold the GIL
    against the very client it answers."""
    global _ENDPOINT
    if _ENDPOINT is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)], stdin=subprocess.PIPE)
        atexit.register(_stop, server)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start (exit {server.poll()})") from None
                time.sleep(0.1)
        _ENDPOINT = f"http://127.0.0.1:{port}"
    return _ENDPOINT


# The child: moto's ThreadedMotoServer until its parent closes stdin (or dies, which closes it too).
_SERVE = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
sys.stdin.read()
server.stop()
"""


def _stop(server: subprocess.Popen) -> None:
    server.stdin.close()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


def use_moto(monkeypatch) -> str:
    """Point S3 clients (this process and its children) at the moto server. -> the endpoint."""
    url = endpoint()
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ENV_CLEARED:
        monkeypatch.delenv(k, raising=False)
    return url


def new_bucket() -> str:
    """A fresh, empty bucket. -> its name."""
    from harvest.store.location import URL
    from harvest.store.objectstore import files_for

    name = f"harvest-{secrets.token_hex(4)}"
    files_for(URL(f"s3://{name}")).fs.mkdir(name)
    return name


@pytest.fixture
def s3_bucket(monkeypatch) -> str:
    """s3://<a fresh bucket> on the moto server (tests import this fixture)."""
    use_moto(monkeypatch)
    return f"s3://{new_bucket()}"
