"""Abuse-suite fixtures: one real `sandpiper serve` for the whole run, a canary session, and the
containment check every attack ends with.

The server is started as in tests/e2e/conftest.py (same binary lookup, port file, teardown
checks: exit 0 on SIGTERM, no mounts left under the data dir, no process of one of this server's
sandbox uids left). Its uids start at 232000 so that other Sandpiper servers on this machine
(the lead's, the e2e run's at 237000) are never judged by this suite.

Pools (POOLS below):
  python         PythonLTS, small limits (256 MiB, 64 pids, 16 MiB /mnt/data and /tmp, 30 s); it
                 uses the pool's default launch (warm fork from a template since 0704958)
  node           NodeLTS, the same limits
  shell          Shell, the same limits
  python-gvisor  PythonLTS in gVisor (isolation "gvisor"), for the cases where the tier matters

Every test takes fresh identifiers from the `lab` fixture; the lab deletes them when the test
ends, so the pools never reach maxConcurrentSessions and a broken session never leaks into
another test. `lab.contained(...)` is the shared post-attack check (see Lab.contained).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from e2e_helpers import (  # noqa: E402
    Api, Server, error_code, mounts_under, sandbox_pids, sandpiper_binary, under_another_server,
    wait_for_port, wait_for_warm_pools,
)

API_KEY = "sec-" + uuid.uuid4().hex  # >= 16 characters
UID_BASE = 232000  # not 230000 (default) nor 237000 (e2e): never another server's uids
MODERN = "2025-02-02-preview"

LIMITS = {"memory": "256Mi", "cpus": 1, "pids": 64, "disk": "16Mi", "tmp": "16Mi"}
PIDS_LIMIT = LIMITS["pids"]
DISK_LIMIT = 16 << 20
MAX_SECONDS = 30

POOLS = [
    {"name": "python", "type": "PythonLTS", "readySessionInstances": 2, "maxConcurrentSessions": 12,
     "cooldownPeriodInSeconds": 600, "maxExecutionSeconds": MAX_SECONDS, "defaultExecutionSeconds": MAX_SECONDS,
     "limits": LIMITS},
    {"name": "node", "type": "NodeLTS", "readySessionInstances": 1, "maxConcurrentSessions": 6,
     "cooldownPeriodInSeconds": 600, "maxExecutionSeconds": MAX_SECONDS, "defaultExecutionSeconds": MAX_SECONDS,
     "limits": LIMITS},
    {"name": "shell", "type": "Shell", "readySessionInstances": 1, "maxConcurrentSessions": 6,
     "cooldownPeriodInSeconds": 600, "maxExecutionSeconds": MAX_SECONDS, "defaultExecutionSeconds": MAX_SECONDS,
     "limits": LIMITS},
    {"name": "python-gvisor", "type": "PythonLTS", "isolation": "gvisor", "readySessionInstances": 1,
     "maxConcurrentSessions": 3, "cooldownPeriodInSeconds": 600, "maxExecutionSeconds": MAX_SECONDS,
     "defaultExecutionSeconds": MAX_SECONDS,
     "limits": {"memory": "512Mi", "cpus": 1, "pids": PIDS_LIMIT, "disk": "16Mi", "tmp": "16Mi"}},
]

# Error codes that count as a "clear" answer to an attack that broke or overloaded a session.
CLEAR_ERRORS = {
    400: {"InvalidSessionIdentifier", "InvalidRequestBody", "SessionPropertiesMissing", "InvalidFilePath",
          "InvalidMultipartBody"},
    404: {"FileNotFound", "RouteNotFound", "SessionNotFound"},
    409: None,  # any code, as long as it is a JSON error
    413: {"FileTooLarge", "SessionDiskFull", "RequestBodyTooLarge"},
    502: {"SessionAgentTimeout", "SessionOutOfMemory", "SessionAgentFailure"},
}

# A trivial call per pool type, and the answer it must give: proves a session works.
PING = {
    "python": ("6 * 7", lambda p: p["result"] == 42 and p["status"] == "Success"),
    "node": ("6 * 7", lambda p: p["result"] == 42 and p["status"] == "Success"),
    "shell": ("echo $((6 * 7))", lambda p: p["stdout"] == "42\n" and p["status"] == "0"),
}
POOL_KIND = {"python": "python", "python-gvisor": "python", "node": "node", "shell": "shell"}


# ---------------------------------------------------------------------------------------------
# Server



@pytest.fixture(scope="session")
def server():
    binary = sandpiper_binary()  # skips unless root
    preexisting = set(sandbox_pids())
    tmp = tempfile.mkdtemp(prefix="sandpiper-sec-")
    os.chmod(tmp, 0o711)  # the sandbox uids traverse it to reach their bind-mounted data
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
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        port = wait_for_port(port_file, proc, log_path, timeout=120)
        srv = Server("http://127.0.0.1:%d" % port, API_KEY, data_dir, log_path, proc)
        srv.port = port
        srv.tmp = tmp
        wait_for_warm_pools(srv, want=sum(p["readySessionInstances"] for p in POOLS), timeout=90)
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
        # This server's uids: "uid=N" (each sandbox) and "uids=A...B" (a pool's fork template).
        ours = {int(u) for u in re.findall(r"\buid=(\d+)", text)}
        for first, last in re.findall(r"\buids=(\d+)\.\.\.(\d+)", text):
            ours |= set(range(int(first), int(last) + 1))
        ours = ours or set(range(UID_BASE, UID_BASE + 10000))
        deadline = time.monotonic() + 10

        def ours_left():
            return {p for p in set(sandbox_pids(ours)) - preexisting if not under_another_server(p)}

        leftover = ours_left()
        while leftover and time.monotonic() < deadline:
            time.sleep(0.2)
            leftover = ours_left()
        if not leftover_mounts and not os.environ.get("SANDPIPER_SEC_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        assert rc is not None, "sandpiper did not exit within 60 s of SIGTERM:\n" + text[-5000:]
        assert rc == 0, "sandpiper exited with %s after SIGTERM:\n%s" % (rc, text[-5000:])
        assert not leftover_mounts, "mounts left under %s: %s" % (data_dir, leftover_mounts)
        if leftover:
            listing = subprocess.run(["ps", "-o", "pid,ppid,uid,stat,etime,args", "-p",
                                      ",".join(map(str, sorted(leftover)))], capture_output=True, text=True).stdout
            pytest.fail("sandbox-uid processes left after shutdown:\n%s\nserver log tail:\n%s"
                        % (listing, text[-5000:]))


@pytest.fixture(scope="session")
def api(server):
    return Api(server)


# ---------------------------------------------------------------------------------------------
# Sessions


class Sess:
    """One identifier on one pool. `run` returns the raw response; `ok` asserts a 200 and returns
    `properties`; `probe` runs code whose last value is a JSON string and returns it decoded."""

    def __init__(self, api, pool, identifier):
        self.api = api
        self.pool = pool
        self.kind = POOL_KIND[pool]
        self.id = identifier

    def run(self, code, timeout=None, http_timeout=120):
        props = {"codeInputType": "inline", "executionType": "synchronous", "code": code}
        if timeout is not None:
            props["timeoutInSeconds"] = timeout
        return self.api.http.post(self.api.url("code/execute", self.id, self.pool), json={"properties": props},
                                  timeout=http_timeout)

    def ok(self, code, timeout=None):
        r = self.run(code, timeout=timeout)
        assert r.status_code == 200, (r.status_code, r.text[:2000])
        return r.json()["properties"]

    def probe(self, code, timeout=None):
        """Python/Node: the cell's last expression must be a JSON string (json.dumps / JSON.stringify)."""
        props = self.ok(code, timeout=timeout)
        assert props["status"] == "Success", props
        assert isinstance(props["result"], str), props
        return json.loads(props["result"])

    def sh(self, command, timeout=None):
        """Shell pool: runs a command, returns (exit status as str, stdout, stderr)."""
        props = self.ok(command, timeout=timeout)
        return props["status"], props["stdout"], props["stderr"]

    def upload(self, name, data, **kw):
        return self.api.upload(self.id, name, data, pool=self.pool, **kw)

    def download(self, name):
        return self.api.download(self.id, name, pool=self.pool)

    def host_uid(self):
        """The host uid the session's sandbox runs as, from the server's debug log ("session
        allocated" names the sandbox, "sandbox ready" its uid). The session must exist."""
        log = self.api.server.log()
        sandboxes = [m.group(1) for line in log.splitlines() if "session allocated" in line
                     and ("identifier=%s " % self.id) in line for m in [re.search(r"sandbox=(\S+)", line)] if m]
        assert sandboxes, "no 'session allocated' line for %s in the server log" % self.id
        for line in log.splitlines():
            if "sandbox=%s " % sandboxes[-1] in line and "uid=" in line:
                return int(re.search(r"uid=(\d+)", line).group(1))
        raise AssertionError("no uid logged for sandbox %s" % sandboxes[-1])

    def delete(self):
        return self.api.http.delete(
            "%s/session?api-version=%s&identifier=%s" % (self.api.server.pool_url(self.pool), MODERN,
                                                         requests.utils.quote(self.id, safe="")),
            timeout=60)


class Canary:
    """A session created at the start of the run holding a variable and a file; every containment
    check reads both back unchanged."""

    def __init__(self, api):
        self.sess = Sess(api, "python", "sec-canary-" + str(uuid.uuid4()))
        self.secret = "canary-" + uuid.uuid4().hex
        self.file_text = "file-" + uuid.uuid4().hex
        props = self.sess.ok("canary_secret = %r\nopen('/mnt/data/canary.txt', 'w').write(%r)\ncanary_secret"
                             % (self.secret, self.file_text))
        assert props["result"] == self.secret, props

    def check(self):
        props = self.sess.ok("canary_secret + '|' + open('/mnt/data/canary.txt').read()")
        assert props["status"] == "Success" and props["result"] == self.secret + "|" + self.file_text, \
            "the canary session lost its state: %r" % props
        r = self.sess.download("canary.txt")
        assert r.status_code == 200 and r.text == self.file_text, (r.status_code, r.text[:200])


@pytest.fixture(scope="session")
def canary(api):
    return Canary(api)


def assert_clear_error(response):
    """A non-200 answer to an attack must be a JSON error with x-ms-error-code, never a 500."""
    status = response.status_code
    assert status != 500 and status < 600, "server error %d: %s" % (status, response.text[:2000])
    code = error_code(response)
    allowed = CLEAR_ERRORS.get(status, ())
    assert allowed is None or code in allowed, "unexpected %d %s: %s" % (status, code, response.text[:500])
    return code


class Lab:
    """Per-test factory of fresh sessions plus the shared containment check."""

    def __init__(self, server, api, canary):
        self.server = server
        self.api = api
        self.canary = canary
        self.sessions = []

    def session(self, pool="python", tag="t"):
        sess = Sess(self.api, pool, "sec-%s-%s" % (tag, uuid.uuid4()))
        self.sessions.append(sess)
        return sess

    def server_alive(self):
        assert self.server.proc.poll() is None, \
            "sandpiper exited with %s:\n%s" % (self.server.proc.returncode, self.server.log()[-5000:])

    def contained(self, sess=None, response=None):
        """The check after every attack:
        (1) the server process lives and GET /healthz answers 200;
        (2) the canary session still has its variable and its /mnt/data file, unchanged;
        (3) the attacked call either worked or got a clear JSON error (x-ms-error-code, never 500),
            and the next call with the same identifier works (a fresh session after a 502)."""
        self.server_alive()
        r = requests.get(self.server.base + "/healthz", timeout=30)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        self.canary.check()
        responses = response if isinstance(response, (list, tuple)) else [response]
        for resp in responses:
            if resp is not None and resp.status_code != 200:
                assert_clear_error(resp)
        if sess is not None:
            code, good = PING[sess.kind]
            r = sess.run(code, timeout=20)
            if r.status_code == 502 and "next call gets a fresh one" in r.text:
                # Code that exhausted its own session's limits (threads, descriptors) ends that
                # session with a clear error; the next call must get a working fresh one.
                assert_clear_error(r)
                r = sess.run(code, timeout=20)
            assert r.status_code == 200, "the session does not work after the attack: %d %s" % (
                r.status_code, r.text[:2000])
            props = r.json()["properties"]
            assert good(props), "the session does not work after the attack: %r" % props
        self.server_alive()

    def cleanup(self):
        for sess in self.sessions:
            try:
                r = sess.delete()
                assert r.status_code in (200, 204, 404), (r.status_code, r.text[:500])
            except requests.RequestException:
                pass


@pytest.fixture
def lab(server, api, canary):
    lab = Lab(server, api, canary)
    yield lab
    lab.cleanup()
    lab.server_alive()
