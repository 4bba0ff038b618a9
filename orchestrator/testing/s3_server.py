"""A moto S3 server on loopback, the real S3 endpoint of tests and benchmarks; the code under
test reaches it through s3fs, unchanged."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass

# moto accepts any key; these dummy values only satisfy botocore's credential lookup.
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    proc: subprocess.Popen[bytes]
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through s3fs (and pyarrow, botocore)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **TEST_CREDENTIALS}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_s3_server(timeout: float = 30) -> S3Server:
    """Start ``python -m moto.server`` on a free loopback port and wait until it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return S3Server(proc, f"http://127.0.0.1:{port}")
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto server did not start within {timeout:.0f} s") from None
            time.sleep(0.1)
