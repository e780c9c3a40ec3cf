"""Helpers shared by the e2e tests (imported by conftest.py and the test modules)."""

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / ".build" / "debug" / "sandpiper"

API_VERSION = "2024-02-02-preview"
SANDBOX_UIDS = range(230000, 240000)
TINY_COOLDOWN = 3
TINY_UPLOAD_LIMIT = 1 << 20  # "1Mi"


def sandpiper_binary():
    """The server binary (SANDPIPER_BIN or the debug build); skips unless root, as the server needs."""
    binary = os.environ.get("SANDPIPER_BIN") or str(DEFAULT_BIN)
    for _ in range(60):  # a rebuild may briefly remove it
        if os.path.exists(binary):
            break
        time.sleep(1)
    if not os.path.exists(binary):
        pytest.fail("sandpiper binary not found at %s (set SANDPIPER_BIN)" % binary)
    if os.geteuid() != 0:
        pytest.skip("the e2e tests run the server as root")
    return binary


def wait_for_port(port_file, proc, log_path, timeout):
    """The port the server wrote to --port-file; fails with its log if it exits or never listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("sandpiper exited with %s before listening:\n%s" % (proc.returncode, Path(log_path).read_text()))
        try:
            text = Path(port_file).read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    pytest.fail("sandpiper did not write its port file within %d s:\n%s" % (timeout, Path(log_path).read_text()))


def mounts_under(directory):
    """Lines of /proc/self/mountinfo for mounts at or below `directory`."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if (" %s/" % directory) in line or (" %s " % directory) in line]



def sandbox_pids(uids=SANDBOX_UIDS):
    """PIDs of processes running as a sandbox uid (230000-239999, or the given ones)."""
    out = subprocess.run(["ps", "-eo", "pid=,uid="], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in out.splitlines():
        pid, uid = line.split()
        if int(uid) in SANDBOX_UIDS and int(uid) in uids:
            pids.append(int(pid))
    return pids

def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0

def under_another_server(pid):
    """True when a live `sandpiper` process is an ancestor of pid: a sandbox of another server
    on this machine (the lead's, another test run's), not one this server left behind."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        pid = _ppid(pid)
        try:
            # "sandpiper (deleted)" when the binary was rebuilt under a running server
            if os.path.basename(os.readlink("/proc/%d/exe" % pid)).startswith("sandpiper"):
                return True
        except OSError:
            pass
    return False

def wait_for_warm_pools(server, want, timeout):
    """Waits until `want` sandboxes have logged "sandbox ready" (the initial pool fill, logged at
    debug level), so the first tests measure the server and not the cold start of 3 sandboxes on
    2 cores. Only an optimisation: if the line never shows up the tests start anyway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.log().count("sandbox ready") >= want:
            return
        if server.proc.poll() is not None:
            pytest.fail("sandpiper exited with %s:\n%s" % (server.proc.returncode, server.log()))
        time.sleep(0.2)


class Server:
    def __init__(self, base, key, data_dir, log_path, proc):
        self.base = base
        self.key = key
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc = proc

    def log(self):
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def pool_url(self, pool="python"):
        return "%s/pools/%s" % (self.base, pool)

    def arm_url(self, pool="python"):
        return "%s/subscriptions/s/resourceGroups/g/sessionPools/%s" % (self.base, pool)


class Api:
    """A thin requests wrapper for the legacy data plane (one keep-alive connection pool)."""

    def __init__(self, server):
        self.server = server
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer " + server.key

    def url(self, op, identifier=None, pool="python", base=None, extra=""):
        root = base or self.server.pool_url(pool)
        query = "api-version=" + API_VERSION
        if identifier is not None:
            query += "&identifier=" + requests.utils.quote(identifier, safe="")
        return "%s/%s?%s%s" % (root, op, query, extra)

    def execute_raw(self, identifier, code, pool="python", timeout=None, flat=False, op="code/execute", **kw):
        props = {"codeInputType": "inline", "executionType": "synchronous", "code": code}
        if timeout is not None:
            props["timeoutInSeconds"] = timeout
        body = props if flat else {"properties": props}
        return self.http.post(self.url(op, identifier, pool), json=body, timeout=120, **kw)

    def execute(self, identifier, code, pool="python", **kw):
        """Runs code; asserts a 200 with the legacy envelope and returns `properties`."""
        r = self.execute_raw(identifier, code, pool=pool, **kw)
        assert r.status_code == 200, (r.status_code, r.text)
        body = r.json()
        assert body["$id"] == "1"
        return body["properties"]

    def upload(self, identifier, name, data, pool="python", op="files/upload", **kw):
        return self.http.post(
            self.url(op, identifier, pool),
            files={"file": (name, data, "application/octet-stream")},
            timeout=120,
            **kw,
        )

    def list_files(self, identifier, pool="python"):
        r = self.http.get(self.url("files", identifier, pool), timeout=60)
        assert r.status_code == 200, (r.status_code, r.text)
        return {v["properties"]["filename"]: v["properties"] for v in r.json()["value"]}

    def download(self, identifier, name, pool="python"):
        quoted = requests.utils.quote(name, safe="/")
        return self.http.get(self.url("files/content/" + quoted, identifier, pool), timeout=120)


def new_id(tag="t"):
    return "e2e-%s-%s" % (tag, uuid.uuid4())


def png_size(data):
    """(width, height) from a PNG's IHDR chunk; asserts the signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def error_code(response):
    """Asserts a JSON error body with x-ms-error-code and returns the code."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = response.json()
    code = body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers.get("x-ms-error-code") == code
    return code
