"""End-to-end fixtures: one real `sandpiper serve` for the whole test session.

The server binary comes from SANDPIPER_BIN (default <repo>/.build/debug/sandpiper); it runs as
root (it needs to mount, make cgroups and switch uids), listens on 127.0.0.1 on a free port and
keeps its state in a temporary directory. On teardown the server gets SIGTERM and the fixture
checks that it exited, that none of its mounts are left and that no process of a sandbox uid
survived.

Pools (see POOLS below):
  python  ready 2, max 8, cooldown 300 s: the pool most tests use. With max 8 and no session
          delete, the whole suite must stay at <= 8 live identifiers on it; the tests share one
          session (`shared_id`) and use a fresh uuid only where a test needs a session of its own.
  tiny    ready 1, max 1, cooldown 3 s, uploads <= 1 MiB: cap, reap and upload-limit tests.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from e2e_helpers import (
    SANDBOX_UIDS, TINY_COOLDOWN, Api, Server, mounts_under, sandbox_pids, sandpiper_binary, under_another_server,
    wait_for_port, wait_for_warm_pools,
)

REPO = Path(__file__).resolve().parents[2]
API_KEY = "e2e-" + uuid.uuid4().hex  # >= 16 characters
# Not the default 230000: other Sandpiper servers on this machine (a developer's, another run)
# hand out 230000 and up, and two servers must not share sandbox uids. Still in 230000-239999.
UID_BASE = 237000

POOLS = [
    {"name": "python", "readySessionInstances": 2, "maxConcurrentSessions": 8, "cooldownPeriodInSeconds": 300},
    {
        "name": "tiny",
        "readySessionInstances": 1,
        "maxConcurrentSessions": 1,
        "cooldownPeriodInSeconds": TINY_COOLDOWN,
        "maxUploadSize": "1Mi",  # TINY_UPLOAD_LIMIT
    },
]








@pytest.fixture(scope="session")
def server():
    binary = sandpiper_binary()

    preexisting = set(sandbox_pids())  # another server on this machine is not ours to judge
    tmp = tempfile.mkdtemp(prefix="sandpiper-e2e-")
    # mkdtemp makes 0700; the sandbox uids must traverse it to reach their bind-mounted data.
    os.chmod(tmp, 0o711)
    data_dir = os.path.join(tmp, "data")
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"server": {"sandboxUidBase": UID_BASE}, "pools": POOLS}, f)
    port_file = os.path.join(tmp, "port")
    log_path = os.path.join(tmp, "server.log")
    env = dict(os.environ, SANDPIPER_API_KEY=API_KEY)
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [binary, "serve", "--data-dir", data_dir, "--port", "0", "--port-file", port_file,
         "--config", config, "--log-level", "debug"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    srv = None
    try:
        port = wait_for_port(port_file, proc, log_path, timeout=120)
        srv = Server("http://127.0.0.1:%d" % port, API_KEY, data_dir, log_path, proc)
        assert API_KEY in srv.log(), "the server does not print its API key"
        wait_for_warm_pools(srv, want=sum(p["readySessionInstances"] for p in POOLS), timeout=60)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        log.close()
        text = Path(log_path).read_text(errors="replace")
        leftover_mounts = mounts_under(data_dir)
        # Sandbox processes are killed by the server; give the kernel a moment to reap them. Only
        # the uids this server used count ("sandbox ready ... uid=N" at debug level), so that
        # another Sandpiper on the machine (a developer's, CI's) cannot fail this check; nor can
        # sandboxes whose parent is another live server.
        ours = {int(u) for u in re.findall(r"uid=(\d+)", text)} or SANDBOX_UIDS
        deadline = time.monotonic() + 10

        def ours_left():
            return {p for p in set(sandbox_pids(ours)) - preexisting if not under_another_server(p)}

        leftover = ours_left()
        while leftover and time.monotonic() < deadline:
            time.sleep(0.2)
            leftover = ours_left()
        if not leftover_mounts:
            shutil.rmtree(tmp, ignore_errors=True)
        assert rc is not None, "sandpiper did not exit within 60 s of SIGTERM:\n" + text[-5000:]
        assert rc == 0, "sandpiper exited with %s after SIGTERM:\n%s" % (rc, text[-5000:])
        assert not leftover_mounts, "mounts left under %s: %s" % (data_dir, leftover_mounts)
        if leftover:
            listing = subprocess.run(["ps", "-o", "pid,ppid,uid,stat,etime,args", "-p", ",".join(map(str, sorted(leftover)))],
                                     capture_output=True, text=True).stdout
            pytest.fail("sandbox-uid processes left after shutdown:\n%s\nserver log tail:\n%s" % (listing, text[-5000:]))


@pytest.fixture(scope="session")
def api(server):
    return Api(server)


@pytest.fixture(scope="session")
def shared_id(api):
    """One python-pool session shared by the tests that need no session of their own (the pool
    allows 8); tests use unique variable and file names in it."""
    identifier = "e2e-shared-" + str(uuid.uuid4())
    props = api.execute(identifier, "shared_marker = 1234\nshared_marker + 1")
    assert props["result"] == 1235
    return identifier
