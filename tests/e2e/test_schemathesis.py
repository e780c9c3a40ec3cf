"""Schemathesis: property-based requests from the OpenAPI document against a real server.

The document is read from Sources/SandpiperAPI/Resources/openapi.json on disk (the binary embeds it at
build time; `test_served_document_is_the_one_on_disk` checks the two agree). Every operation of the
document gets generated requests (explicit examples, the coverage phase's boundary cases and a bounded
number of fuzzed ones, derandomized) and every response must pass:

- not_a_server_error: no 5xx;
- status_code_conformance: the status is documented for the operation;
- content_type_conformance: the Content-Type is documented for that status;
- response_schema_conformance: the body matches the documented schema;
- response_headers_conformance: documented required headers (x-ms-error-code, operation-id, ...) are there.

The test runs its own server (pool `python`: ready 2, max 50, cooldown 300 s, uploads <= 1 MiB) so that
it neither eats into the session budget of the shared e2e server nor depends on its pools. Generated
requests are steered onto that pool and onto a fixed set of session identifiers (see `steer`), so the
run never comes near maxConcurrentSessions.

schemathesis is pinned in tests/requirements-schemathesis.txt. Without it the test skips with a reason,
or fails when SANDPIPER_REQUIRE_SCHEMATHESIS=1.
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
import zlib
from pathlib import Path

import pytest
import requests

from e2e_helpers import Server

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "Sources" / "SandpiperAPI" / "Resources" / "openapi.json"
DEFAULT_BIN = REPO / ".build" / "debug" / "sandpiper"
API_KEY = "st-" + uuid.uuid4().hex
POOL = {
    "name": "python",
    "readySessionInstances": 2,
    "maxConcurrentSessions": 50,
    "cooldownPeriodInSeconds": 300,
    "maxUploadSize": "1Mi",
}
# Valid generated identifiers are replaced by one of these (chosen by a hash of the generated one), so
# at most this many sessions are ever live from this test.
IDENTIFIERS = ("st-session-a", "st-session-b", "st-session+c/d%e")
IDENTIFIER_RE = re.compile(r"^[\x21-\x5B\x5D-\x7E]{4,128}$")
# Fuzzed cases per operation (the examples and coverage phases add their own, bounded, cases).
MAX_EXAMPLES = int(os.environ.get("SANDPIPER_SCHEMATHESIS_EXAMPLES", "12"))
REQUEST_TIMEOUT = 60

try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError as error:  # pragma: no cover - depends on the venv
    schemathesis = None
    IMPORT_ERROR = error


# --- the server ----------------------------------------------------------------------------------


def _our_processes(marker):
    """PIDs whose command line mentions `marker` (the bwrap of each of our sandboxes names our data dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def st_server():
    binary = os.environ.get("SANDPIPER_BIN") or str(DEFAULT_BIN)
    for _ in range(60):  # the lead rebuilds from time to time
        if os.path.exists(binary):
            break
        time.sleep(1)
    if not os.path.exists(binary):
        pytest.fail("sandpiper binary not found at %s (set SANDPIPER_BIN)" % binary)
    if os.geteuid() != 0:
        pytest.skip("the e2e tests run the server as root")

    tmp = tempfile.mkdtemp(prefix="sandpiper-st-")
    os.chmod(tmp, 0o711)  # sandbox uids traverse it to reach their bind-mounted data
    data_dir = os.path.join(tmp, "data")
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump({"pools": [POOL]}, f)
    port_file = os.path.join(tmp, "port")
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [binary, "serve", "--data-dir", data_dir, "--port", "0", "--port-file", port_file,
         "--config", config, "--log-level", "debug"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, SANDPIPER_API_KEY=API_KEY),
    )
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail("sandpiper exited with %s before listening:\n%s" % (proc.returncode, Path(log_path).read_text()))
            try:
                port = int(Path(port_file).read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.1)
        if port is None:
            pytest.fail("sandpiper did not write its port file within 120 s:\n" + Path(log_path).read_text())
        srv = Server("http://127.0.0.1:%d" % port, API_KEY, data_dir, log_path, proc)
        # Let the initial pool fill finish so the first operations do not time the cold start.
        deadline = time.monotonic() + 60
        while srv.log().count("sandbox ready") < POOL["readySessionInstances"] and time.monotonic() < deadline:
            time.sleep(0.2)
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
        deadline = time.monotonic() + 10
        leftover = _our_processes(data_dir)
        while leftover and time.monotonic() < deadline:
            time.sleep(0.2)
            leftover = _our_processes(data_dir)
        with open("/proc/self/mountinfo") as f:
            mounts = [line for line in f if " " + data_dir + "/" in line or " " + data_dir + " " in line]
        if not mounts:
            shutil.rmtree(tmp, ignore_errors=True)
        assert rc == 0, "sandpiper exited with %s after SIGTERM:\n%s" % (rc, text[-5000:])
        assert not mounts, "mounts left under %s: %s" % (data_dir, mounts)
        assert not leftover, "sandbox processes left after shutdown: %s" % leftover


@pytest.fixture(scope="module")
def http(st_server):
    with requests.Session() as session:
        yield session


def test_served_document_is_the_one_on_disk(st_server, http):
    """The binary serves the document this test checks (it embeds it at build time: rebuild after editing)."""
    r = http.get(st_server.base + "/openapi.json", timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads(SCHEMA_PATH.read_text()), "the binary serves a different openapi.json: rebuild it"


# --- the schemathesis run ------------------------------------------------------------------------


def steer(case):
    """Keeps generated requests on the configured pool and on a few sessions.

    Any pool name other than `python` is sent to `python`, except one in eight (by a stable hash), which
    still exercises the unknown-pool 404. A valid identifier becomes one of IDENTIFIERS; invalid ones
    (too short, a space, a backslash, not a string, missing) are sent as generated.
    """
    path_parameters = case.path_parameters or {}
    pool = path_parameters.get("pool")
    if isinstance(pool, str) and pool != POOL["name"] and zlib.crc32(pool.encode("utf-8", "replace")) % 8:
        path_parameters["pool"] = POOL["name"]
    query = case.query or {}
    identifier = query.get("identifier")
    if isinstance(identifier, str) and IDENTIFIER_RE.match(identifier):
        query["identifier"] = IDENTIFIERS[zlib.crc32(identifier.encode()) % len(IDENTIFIERS)]


if schemathesis is None:

    def test_openapi_conformance():
        message = "schemathesis is not installed (pip install -r tests/requirements-schemathesis.txt): %s" % IMPORT_ERROR
        if os.environ.get("SANDPIPER_REQUIRE_SCHEMATHESIS") == "1":
            pytest.fail(message)
        pytest.skip(message)

else:
    schema = schemathesis.openapi.from_path(SCHEMA_PATH)
    CHECKS = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_schema_conformance,
        schemathesis.checks.response_headers_conformance,
    ]

    @schema.parametrize()
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    def test_openapi_conformance(case, st_server, http):
        steer(case)
        case.call_and_validate(
            base_url=st_server.base,
            session=http,
            headers={"Authorization": "Bearer " + st_server.key},
            checks=CHECKS,
            timeout=REQUEST_TIMEOUT,
        )
