"""Session fixtures for the scale-out tests: one local S3-compatible server (moto) and one local Ray cluster
(`ray start --head`, 2 CPUs, loopback only) for the whole test session; both are stopped at the end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

RAY_START_TIMEOUT_S = 180
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps every address on 127.0.0.1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 (moto's server mode, as in s3fs's own tests); AWS_* point every process here."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "MRANTOOL_CACHE")}
    cache = tempfile.mkdtemp(prefix="mrantool-cache-")
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, MRANTOOL_CACHE=cache)
    yield endpoint
    server.stop()
    shutil.rmtree(cache, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[str]:
    """`ray start --head` with 2 CPUs on 127.0.0.1; yields its address. Started after the S3 server so that its
    workers inherit the endpoint; stopped by ending the process group it runs in."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = _free_port()
    log = open(temp / "head.log", "w")  # noqa: SIM115 - closed at teardown
    ray = Path(sys.executable).parent / "ray"
    os.environ[LOOPBACK_ONLY] = "0"  # Ray otherwise binds the machine's network address, not 127.0.0.1
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster needs no token (and no ~/.ray)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
                             f"--port={port}", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={temp}"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    deadline = time.time() + RAY_START_TIMEOUT_S
    while "Ray runtime started" not in (temp / "head.log").read_text():
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray start --head failed: {(temp / 'head.log').read_text()[-2000:]}")
        time.sleep(0.5)
    head = re.sub(r"\x1b\[[0-9;]*m", "", (temp / "head.log").read_text())
    if "Local node IP: 127.0.0.1" not in head:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"Ray did not bind 127.0.0.1 only: {head[-1000:]}")
    yield f"127.0.0.1:{port}"
    import ray as ray_module

    if ray_module.is_initialized():
        ray_module.shutdown()
    os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # raylet, GCS and workers share the group
    log.close()
    shutil.rmtree(temp, ignore_errors=True)
