"""Slow and hostile HTTP clients, over raw sockets to 127.0.0.1.

The server runs with small limits (server.requestHeadTimeoutSeconds 2, requestBodyTimeoutSeconds
2, maxConnectionsPerClient 100, maxConnections 300): a request head not complete within the head
timeout, or a body with no bytes for the body timeout, closes the connection; one remote address
holds at most 100 connections, and all together at most 300 (more wait in the listen backlog). The attackers bind 127.0.0.1 as their source address; the well-behaved client binds
127.0.0.2 (Linux routes all of 127/8 to lo), so per-client limits must not starve it.
"""

import http.client
import json
import os
import select
import shutil
import socket
import time
import uuid

import pytest

import rel_helpers as rh
from e2e_helpers import mounts_under

HEAD_TIMEOUT = 2
BODY_TIMEOUT = 2
PER_CLIENT = 100
MARGIN = 3  # s past a timeout within which the close must be seen
ATTACKERS = 1500
ATTACKER_SOURCE = "127.0.0.1"
GOOD_SOURCE = "127.0.0.2"
TOTAL = 300  # server.maxConnections
SERVER_SETTINGS = {
    "requestHeadTimeoutSeconds": HEAD_TIMEOUT,
    "requestBodyTimeoutSeconds": BODY_TIMEOUT,
    "maxConnections": TOTAL,
    "maxConnectionsPerClient": PER_CLIENT,
}
POOLS = [{"name": "shell", "type": "Shell", "readySessionInstances": 2, "maxConcurrentSessions": 8}]


@pytest.fixture(scope="module")
def server():
    wd = rh.make_workdir("sandpiper-rel-http-")
    srv = rh.Server(wd, POOLS, rh.UID_BASE + 750, server_extra=SERVER_SETTINGS, name="http")
    try:
        srv.start(timeout=120)
        yield srv
    finally:
        srv.stop()
        rh.wait_until(lambda: not rh.uid_pids(srv.uids), timeout=10)
        for pid in rh.uid_pids(srv.uids):
            os.kill(pid, 9)
        if not mounts_under(srv.data_dir):
            shutil.rmtree(wd, ignore_errors=True)


def connect(srv, source=ATTACKER_SOURCE, timeout=5):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", srv.port))
    return s


def _readable(s):
    poller = select.poll()
    poller.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def closed_by_peer(s):
    """True once the server closed the connection (EOF or reset); never blocks. A response the
    server sent before closing (e.g. 408) is consumed on the way."""
    for _ in range(64):
        if not _readable(s):
            return False
        try:
            data = s.recv(65536)
        except OSError:
            return True
        if data == b"":
            return True
    return False


def wait_closed(s, timeout):
    """Seconds until the server closed `s`, or None if it stayed open for `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if closed_by_peer(s):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def good_client(srv, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout, source_address=(GOOD_SOURCE, 0))
    return conn


def good_healthz(srv):
    conn = good_client(srv)
    try:
        t0 = time.monotonic()
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, time.monotonic() - t0
    finally:
        conn.close()


def good_execute(srv):
    conn = good_client(srv, timeout=30)
    try:
        ident = "rel-http-%s" % uuid.uuid4().hex[:12]
        body = json.dumps({"shellCommand": "echo served"}).encode()
        t0 = time.monotonic()
        conn.request("POST", "/pools/shell/executions?api-version=%s&identifier=%s" % (rh.MODERN_API, ident),
                     body=body, headers={"Authorization": "Bearer " + srv.key, "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.monotonic() - t0
    finally:
        conn.close()


def assert_server_fine(srv):
    assert srv.alive(), "the server died:\n" + srv.log_tail()
    status, body, took = good_healthz(srv)
    assert status == 200 and body == b"ok\n", (status, body)


def test_slowloris_head_is_cut_at_the_head_timeout(server):
    s = connect(server)
    try:
        t0 = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickle = b"X-Slow: " + b"a" * 64
        closed_at = None
        for i in range(int((HEAD_TIMEOUT + MARGIN) / 0.25) + 1):  # one byte a second, never finishing
            if i % 4 == 0:
                try:
                    s.send(trickle[i // 4:i // 4 + 1])
                except OSError:
                    closed_at = time.monotonic() - t0
                    break
            if closed_by_peer(s):
                closed_at = time.monotonic() - t0
                break
            time.sleep(0.25)
        assert closed_at is not None, "a head sent one byte a second was still open after %d s" % (
            HEAD_TIMEOUT + MARGIN)
        assert closed_at >= HEAD_TIMEOUT - 0.5, "closed after %.1f s, before the head timeout" % closed_at
    finally:
        s.close()
    assert_server_fine(server)


def test_silent_connection_is_cut_at_the_head_timeout(server):
    s = connect(server)
    try:
        waited = wait_closed(s, HEAD_TIMEOUT + MARGIN)
        assert waited is not None, "a connection that sent nothing was still open after %d s" % (
            HEAD_TIMEOUT + MARGIN)
        assert waited >= HEAD_TIMEOUT - 0.5, "closed after %.1f s, before the head timeout" % waited
    finally:
        s.close()


def test_idle_keep_alive_is_cut_at_the_head_timeout(server):
    """After a response, the next head must come within the head timeout too."""
    s = connect(server)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"ok\n" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data
        waited = wait_closed(s, HEAD_TIMEOUT + MARGIN)
        assert waited is not None, "an idle keep-alive connection was still open after %d s" % (
            HEAD_TIMEOUT + MARGIN)
    finally:
        s.close()


def test_stalled_body_is_cut_at_the_body_timeout(server):
    s = connect(server)
    try:
        head = ("POST /pools/shell/executions?api-version=%s&identifier=rel-stall-%s HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n" % (rh.MODERN_API, uuid.uuid4().hex[:8], server.key))
        s.sendall(head.encode() + b'{"shellCommand": "echo ')
        waited = wait_closed(s, BODY_TIMEOUT + MARGIN)
        assert waited is not None, "a stalled body was still open after %d s" % (BODY_TIMEOUT + MARGIN)
        assert waited >= BODY_TIMEOUT - 0.5, "closed after %.1f s, before the body timeout" % waited
    finally:
        s.close()
    assert_server_fine(server)


def test_slow_but_steady_body_is_served(server):
    """The body timeout is about silence: a body arriving in pieces less than the timeout apart
    (longer in total than the timeout) is served."""
    body = json.dumps({"shellCommand": "echo steady"}).encode()
    s = connect(server, timeout=30)
    try:
        head = ("POST /pools/shell/executions?api-version=%s&identifier=rel-steady-%s HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (rh.MODERN_API, uuid.uuid4().hex[:8], server.key, len(body)))
        s.sendall(head.encode())
        pieces = [body[i:i + 8] for i in range(0, len(body), 8)][:6]
        pieces[-1] = body[8 * (len(pieces) - 1):]
        for piece in pieces:
            time.sleep(BODY_TIMEOUT / 2)
            s.sendall(piece)
        data = b""
        while len(data) < 1 << 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:300]
    assert b"steady" in data


def test_oversized_header_is_refused(server):
    s = connect(server, timeout=10)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
        try:
            s.sendall(request)
        except OSError:
            pass  # the server may close while we still send: that is a refusal
        data = b""
        try:
            while len(data) < 1 << 16:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pytest.fail("no answer and no close 10 s after a 1 MiB header")
        except OSError:
            pass
        if data:  # an answer, then the close (docs: 431 or 400 for a head over maxHeaderBytes)
            status = int(data.split(b" ", 2)[1])
            assert status in (400, 413, 431), data[:300]
    finally:
        s.close()
    assert_server_fine(server)


def test_many_slow_connections_from_one_client_do_not_starve_another(server, report):
    base_fds = rh.fd_count(server.pid)
    attackers = []
    failed = 0
    most_open = 0  # attacker connections the server kept open, sampled during the burst
    most_fds = 0
    t0 = time.monotonic()
    try:
        for k in range(ATTACKERS):
            if time.monotonic() - t0 > 60:
                break
            try:
                s = connect(server, timeout=2)
                s.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                attackers.append(s)
            except OSError:
                failed += 1
            if k % 100 == 99:
                time.sleep(0.2)  # let the server accept (or refuse) the newest ones
                most_open = max(most_open, sum(not closed_by_peer(s) for s in attackers))
                most_fds = max(most_fds, rh.fd_count(server.pid))
        opened = time.monotonic() - t0
        server_fds = rh.fd_count(server.pid)
        open_now = sum(not closed_by_peer(s) for s in attackers)
        most_open = max(most_open, open_now)
        most_fds = max(most_fds, server_fds)

        # The other client is served promptly while the attack holds.
        status, body, healthz_s = good_healthz(server)
        assert status == 200, (status, body)
        assert healthz_s < 2, "healthz took %.1f s" % healthz_s
        status, data, execute_s = good_execute(server)
        assert status == 200, (status, data[:300])
        assert json.loads(data)["result"]["stdout"] == "served\n"
        assert execute_s < 5, "an execution took %.1f s" % execute_s

        # The per-client cap holds (server side: the client side also counts connections still in
        # the listen backlog), and the slow heads are all cut by the head timeout.
        assert most_fds - base_fds <= PER_CLIENT + 20, "server fds %d -> %d with maxConnectionsPerClient %d" % (
            base_fds, most_fds, PER_CLIENT)
        deadline = time.monotonic() + HEAD_TIMEOUT + MARGIN
        while time.monotonic() < deadline and any(not closed_by_peer(s) for s in attackers):
            time.sleep(0.2)
        still_open = sum(not closed_by_peer(s) for s in attackers)
        assert still_open == 0, "%d slow heads still open past the head timeout" % still_open
        report("hostile HTTP: %d slow connections from %s" % (ATTACKERS, ATTACKER_SOURCE),
               "opened %d (connect failures %d) in %.1f s; most seen open by the client %d (cap %d); "
               "server fds %d -> at most %d; healthz from %s %.0f ms, execution %.0f ms"
               % (len(attackers), failed, opened, most_open, PER_CLIENT, base_fds, most_fds, GOOD_SOURCE,
                  healthz_s * 1000, execute_s * 1000))
    finally:
        for s in attackers:
            s.close()
    assert_server_fine(server)


def test_total_connection_cap_holds_and_the_backlog_drains(server, report):
    """Slow heads from five addresses, each under the per-client cap, 500 in all: the server holds
    at most maxConnections (300) at once; a new client waits in the backlog only until the head
    timeout frees slots, then is served."""
    base_fds = rh.fd_count(server.pid)
    attackers, failed, most_fds = [], 0, 0
    t0 = time.monotonic()
    try:
        for k in range(5 * PER_CLIENT):
            source = "127.0.0.%d" % (3 + k // PER_CLIENT)
            try:
                s = connect(server, source=source, timeout=2)
                s.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                attackers.append(s)
            except OSError:
                failed += 1
            if k % 50 == 49:
                most_fds = max(most_fds, rh.fd_count(server.pid))
            if time.monotonic() - t0 > 30:
                break
        time.sleep(0.3)
        most_fds = max(most_fds, rh.fd_count(server.pid))
        status, body, healthz_s = good_healthz(server)
        assert status == 200, (status, body)
        assert healthz_s < HEAD_TIMEOUT + MARGIN, "healthz waited %.1f s behind the cap" % healthz_s
        assert most_fds - base_fds <= TOTAL + 20, "server fds %d -> %d with maxConnections %d" % (
            base_fds, most_fds, TOTAL)
        report("hostile HTTP: %d slow connections from 5 addresses, maxConnections %d" % (5 * PER_CLIENT, TOTAL),
               "opened %d (connect failures %d); server fds %d -> at most %d; healthz from %s after %.0f ms"
               % (len(attackers), failed, base_fds, most_fds, GOOD_SOURCE, healthz_s * 1000))
    finally:
        for s in attackers:
            s.close()
    assert_server_fine(server)
