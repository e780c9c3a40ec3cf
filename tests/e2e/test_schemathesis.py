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

The module runs its own server (pool `python`: ready 2, max 50, cooldown 300 s, uploads <= 1 MiB) so
that it neither eats into the session budget of the shared e2e server nor depends on its pools.
Generated requests are steered onto that pool and onto a fixed set of session identifiers (see `steer`;
invalid generated values are sent as they are), so the run never comes near maxConcurrentSessions; the
session or file that an operation's success path needs is made to exist first (see `seed_file`). A
server that dies is restarted for the operations after it, and the module fails with the crash report.
The run takes about a minute; SANDPIPER_SCHEMATHESIS_EXAMPLES, _SEED and _TRACE tune and trace it.

Two plain regression tests at the end pin documented answers that generated requests cannot reach
reliably (a part-header byte >= 0x80 in a multipart body; a JSON body over 16 MiB).

schemathesis is pinned in tests/requirements.txt. Without it the test skips with a reason,
or fails when SANDPIPER_REQUIRE_SCHEMATHESIS=1.
"""

import collections
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
from urllib.parse import quote

import pytest
import requests
from e2e_helpers import sandpiper_binary

from e2e_helpers import Server

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "Sources" / "SandpiperAPI" / "Resources" / "openapi.json"
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
# DELETE session gets one that is never allocated (a 204 all the same); stopSession one that is seeded
# (allocated) for only its first STOP_SEEDS calls per operation, so that a few stops find a live session.
DELETED_IDENTIFIER = "st-never-allocated"
STOPPED_IDENTIFIER = "st-to-be-stopped"
STOP_SEEDS = 3
IDENTIFIER_RE = re.compile(r"^[\x21-\x5B\x5D-\x7E]{4,128}$")
# Fuzzed cases per operation (the examples and coverage phases add their own, bounded, cases).
MAX_EXAMPLES = int(os.environ.get("SANDPIPER_SCHEMATHESIS_EXAMPLES", "20"))
# A fixed seed makes the run reproducible (schemathesis derives one per operation from it).
SEED = int(os.environ.get("SANDPIPER_SCHEMATHESIS_SEED", "20241002"))
REQUEST_TIMEOUT = 60
# SANDPIPER_SCHEMATHESIS_TRACE=<file>: append one line per generated request (operation, phase, status).
TRACE = os.environ.get("SANDPIPER_SCHEMATHESIS_TRACE")
# The document's example file name (parameters `name`, `filename`): made to exist before each call.
SEED_FILE = "report.csv"

try:
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings
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


def _crash_excerpt(text):
    """The fatal error line and the crashed thread's first frames of a Swift crash report."""
    lines = text.splitlines()
    out = [line for line in lines if "Fatal error" in line or "Program crashed" in line]
    for index, line in enumerate(lines):
        if line.endswith("crashed:"):
            out += [frame[:220] for frame in lines[index:index + 16]]
            break
    return "\n".join(out) or text[-3000:]


class StServer:
    """One `sandpiper serve` on a private data directory. If it dies (a crash), `ensure_running` records
    the crash and starts a new one on the same data directory (which also removes what the dead one
    left), so one crash does not turn every later operation into a connection error."""

    def __init__(self, binary, tmp):
        self.binary = binary
        self.tmp = tmp
        self.data_dir = os.path.join(tmp, "data")
        self.config = os.path.join(tmp, "config.json")
        with open(self.config, "w") as f:
            json.dump({"pools": [POOL]}, f)
        self.key = API_KEY
        self.crashes = []
        self.starts = 0
        self.proc = None
        self.srv = None

    @property
    def base(self):
        return self.srv.base

    def start(self):
        self.starts += 1
        port_file = os.path.join(self.tmp, "port")
        if os.path.exists(port_file):
            os.unlink(port_file)
        self.log_path = os.path.join(self.tmp, "server-%d.log" % self.starts)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--data-dir", self.data_dir, "--port", "0", "--port-file", port_file,
             "--config", self.config, "--log-level", "debug"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, SANDPIPER_API_KEY=API_KEY),
        )
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail("sandpiper exited with %s before listening:\n%s" % (self.proc.returncode, self.log_text()))
            try:
                port = int(Path(port_file).read_text().strip())
            except (OSError, ValueError):
                time.sleep(0.1)
        if port is None:
            pytest.fail("sandpiper did not write its port file within 120 s:\n" + self.log_text())
        self.srv = Server("http://127.0.0.1:%d" % port, API_KEY, self.data_dir, self.log_path, self.proc)
        # Let the initial pool fill finish so the first operations do not time the cold start.
        deadline = time.monotonic() + 60
        while self.srv.log().count("sandbox ready") < POOL["readySessionInstances"] and time.monotonic() < deadline:
            time.sleep(0.2)

    def log_text(self):
        return Path(self.log_path).read_text(errors="replace")

    def record_if_dead(self):
        """Notes a server that exited on its own (a crash); True if it did."""
        if self.proc.poll() is None:
            return False
        self.log.close()
        self.crashes.append("exit status %s (log %s):\n%s" % (self.proc.returncode, self.log_path, _crash_excerpt(self.log_text())))
        return True

    def ensure_running(self):
        if self.record_if_dead():
            self.start()

    def stop(self):
        """SIGTERM; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self.log.close()
        return rc


@pytest.fixture(scope="module")
def st_server():
    binary = sandpiper_binary()

    tmp = tempfile.mkdtemp(prefix="sandpiper-st-")
    os.chmod(tmp, 0o711)  # sandbox uids traverse it to reach their bind-mounted data
    server = StServer(binary, tmp)
    try:
        server.start()
        yield server
    finally:
        rc = 0
        if server.proc is not None:
            if server.record_if_dead():
                server.start()  # on the same data directory: removes what the dead server left behind
            rc = server.stop()
        deadline = time.monotonic() + 10
        leftover = _our_processes(server.data_dir)
        while leftover and time.monotonic() < deadline:
            time.sleep(0.2)
            leftover = _our_processes(server.data_dir)
        with open("/proc/self/mountinfo") as f:
            mounts = [line for line in f if " " + server.data_dir + "/" in line or " " + server.data_dir + " " in line]
        if rc == 0 and not mounts and not leftover and not server.crashes:
            shutil.rmtree(tmp, ignore_errors=True)
        if server.crashes:
            pytest.fail("sandpiper crashed %d time(s):\n\n%s" % (len(server.crashes), "\n\n".join(server.crashes)), pytrace=False)
        assert rc == 0, "sandpiper exited with %s after SIGTERM (log %s):\n%s" % (rc, server.log_path, server.log_text()[-5000:])
        assert not mounts, "mounts left under %s: %s" % (server.data_dir, mounts)
        assert not leftover, "sandbox processes left after shutdown: %s" % leftover


@pytest.fixture
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
        ender = _ends_sessions(case)
        query["identifier"] = ender or IDENTIFIERS[zlib.crc32(identifier.encode()) % len(IDENTIFIERS)]


def _ends_sessions(case):
    """DELETE session and stopSession get identifiers of their own: ending the shared sessions would make
    every later call allocate (and the pool start) a new sandbox, which is what makes such a run slow."""
    method, path = case.operation.method.upper(), case.operation.path
    if method == "DELETE" and path.endswith("/session"):
        return DELETED_IDENTIFIER
    if method == "POST" and path.endswith("/.management/stopSession"):
        return STOPPED_IDENTIFIER
    return None


# Operations whose success path needs an existing session, or an existing file in it.
NEEDS_SEEDING = ("{name}", "/downloadFile", "/session", "/.management/getSession", "/.management/stopSession")


_stop_seeds = collections.Counter()


def seed_file(case, st_server, http):
    """(Re)uploads SEED_FILE into the case's session before operations on a file or a live session, so
    that the documented example name and the fixed identifiers reach the success path (and its response
    shapes) too, even after generated DELETE session / stopSession calls ended those sessions."""
    identifier = (case.query or {}).get("identifier")
    path = case.operation.path
    if identifier == STOPPED_IDENTIFIER:
        _stop_seeds[case.operation.label] += 1
        if _stop_seeds[case.operation.label] > STOP_SEEDS:
            return
    elif identifier not in IDENTIFIERS or not any(marker in path for marker in NEEDS_SEEDING):
        return
    r = http.post(
        "%s/pools/%s/files?identifier=%s" % (st_server.base, POOL["name"], quote(identifier, safe="")),
        files={"file": (SEED_FILE, b"a,b\n1,2\n", "text/csv")},
        headers={"Authorization": "Bearer " + st_server.key},
        timeout=REQUEST_TIMEOUT,
    )
    assert r.status_code == 200, "seeding %s failed: %s %s" % (SEED_FILE, r.status_code, r.text)


if schemathesis is None:

    def test_openapi_conformance():
        message = "schemathesis is not installed (pip install -r tests/requirements.txt): %s" % IMPORT_ERROR
        if os.environ.get("SANDPIPER_REQUIRE_SCHEMATHESIS") == "1":
            pytest.fail(message)
        pytest.skip(message)

else:
    schema = schemathesis.openapi.from_path(SCHEMA_PATH, config=schemathesis.config.SchemathesisConfig.from_dict({"seed": SEED}))
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
        # No shrinking: every failing request is a real one against the live server, and shrinking a
        # crash would restart the server over and over. The reported example is the one that failed.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    )
    def test_openapi_conformance(case, st_server, http):
        st_server.ensure_running()
        steer(case)
        seed_file(case, st_server, http)
        outcome = "error"
        try:
            response = case.call_and_validate(
                base_url=st_server.base,
                session=http,
                headers={"Authorization": "Bearer " + st_server.key},
                checks=CHECKS,
                timeout=REQUEST_TIMEOUT,
            )
            outcome = str(response.status_code)
        finally:
            if TRACE:  # one line per request: operation, phase, status (or "error": a failed check or no answer)
                with open(TRACE, "a") as f:
                    f.write("%s\t%s\t%s\n" % (case.operation.label, case.meta.phase.name if case.meta else "?", outcome))


def test_multipart_header_with_non_ascii_byte_is_a_400(st_server, http):
    """A multipart part header whose name holds a byte >= 0x80 is a malformed body (400), not a crash.

    MultipartKit 4.7.1's `isAllowedHeaderFieldNameCharacter` indexes a 128-entry table with the byte, so
    such a body (schemathesis's negative multipart cases produce them) traps the whole server."""
    st_server.ensure_running()
    body = b"--XyZ\r\n\xc3\xa9: x\r\n\r\nhello\r\n--XyZ--\r\n"
    try:
        r = http.post(
            "%s/pools/%s/files?identifier=%s" % (st_server.base, POOL["name"], IDENTIFIERS[0]),
            data=body,
            headers={"Authorization": "Bearer " + st_server.key, "Content-Type": "multipart/form-data; boundary=XyZ"},
            timeout=REQUEST_TIMEOUT,
        )
    except requests.ConnectionError as error:
        time.sleep(1)
        alive = st_server.proc.poll() is None
        pytest.fail("the server %s on a multipart header name with a non-ASCII byte: %s"
                    % ("dropped the connection" if alive else "died", error))
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "InvalidMultipartBody"


@pytest.mark.parametrize("op", ["code/execute", "executions"])
def test_json_body_over_16_mib_is_a_413(st_server, http, op):
    """The documented answer to a JSON body over 16 MiB is 413 RequestBodyTooLarge (not a 500)."""
    st_server.ensure_running()
    body = b'{"code": "1", "padding": "' + b"x" * (17 << 20) + b'"}'
    r = http.post(
        "%s/pools/%s/%s?identifier=%s" % (st_server.base, POOL["name"], op, IDENTIFIERS[0]),
        data=body,
        headers={"Authorization": "Bearer " + st_server.key, "Content-Type": "application/json"},
        timeout=REQUEST_TIMEOUT,
    )
    assert r.status_code == 413, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "RequestBodyTooLarge"
    assert r.headers["x-ms-error-code"] == "RequestBodyTooLarge"
