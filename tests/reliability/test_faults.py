"""Faults: a sandbox's agent SIGKILLed from the host, the server SIGKILLed with live sessions
and restarted on the same data directory, and a full disk (the data directory on a small tmpfs,
and a session's own /mnt/data).

Every call here must end with a JSON answer (a result, or `{"error":{"code","message"}}` with an
x-ms-error-code header) within a bounded time: never a hang, never a bodyless 500.
"""

import errno
import os
import shutil
import signal
import time
import uuid

import pytest
import requests

import rel_helpers as rh
from e2e_helpers import mounts_under

ANSWER_WITHIN = 30  # s: any call during a fault must be answered by then

PY_SLEEP = "import time\nprint('started', flush=True)\ntime.sleep(60)\n'finished'"
SH_SLEEP = "echo started; sleep 60; echo finished"


def new_id(tag):
    return "rel-%s-%s" % (tag, uuid.uuid4().hex[:12])


def json_or_error(response):
    """A successful JSON body, or an error body of the documented shape: returns (status, code)."""
    if 200 <= response.status_code < 300:
        if response.status_code != 204:
            response.json()
        return response.status_code, None
    code, _ = rh.error_body(response)
    assert response.status_code != 500 or code != "InternalServerError", (response.status_code, response.text)
    return response.status_code, code


def execute(srv, pool, ident, code, **kw):
    return srv.shell(pool, ident, code, **kw) if pool == "shell" else srv.execute(pool, ident, code, **kw)


def result_text(pool, response):
    body = response.json()
    if pool == "shell":
        return body["result"]["stdout"]
    return str(body["properties"]["result"]) + body["properties"]["stdout"]


# -- 1. the agent SIGKILLed ----------------------------------------------------------------------

AGENT_POOLS = [
    {"name": "python", "readySessionInstances": 1, "maxConcurrentSessions": 4},
    {"name": "shell", "type": "Shell", "readySessionInstances": 1, "maxConcurrentSessions": 4},
]


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory):
    wd = rh.make_workdir("sandpiper-rel-agent-")
    srv = rh.Server(wd, AGENT_POOLS, rh.UID_BASE + 150, name="agent")
    srv.start(timeout=120)
    yield srv
    srv.stop()
    rh.wait_until(lambda: not rh.uid_pids(srv.uids), timeout=10)
    left = rh.uid_pids(srv.uids)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "sandbox processes left after shutdown:\n" + rh.describe_pids(left)
    assert not mounts_under(srv.data_dir), mounts_under(srv.data_dir)
    shutil.rmtree(wd, ignore_errors=True)


def kill_agent(uid):
    pids = rh.wait_until(lambda: rh.agent_pids(uid), timeout=10)
    assert pids, "no agent process of uid %d:\n%s" % (uid, rh.describe_pids(rh.uid_pids(range(uid, uid + 1))))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def sandbox_gone(srv, sandbox):
    parents, groups = rh.sandbox_cgroups(srv.data_dir)
    return (not any(g.endswith("/" + sandbox) for g in groups)
            and sandbox not in rh.session_dirs(srv.data_dir)
            and sandbox not in rh.sandbox_ids_in_db(srv.data_dir)
            and not any(sandbox in m for m in mounts_under(srv.data_dir)))


@pytest.mark.parametrize("pool", ["python", "shell"])
def test_agent_killed_mid_execution(agent_server, pool, report):
    srv = agent_server
    ident = new_id("agentkill")
    warm = execute(srv, pool, ident, "echo ready" if pool == "shell" else "x = 41\nx + 1")
    assert warm.status_code == 200, warm.text
    sandbox, uid = rh.session_sandbox(srv, ident)

    thread, box = rh.in_thread(lambda: execute(srv, pool, ident, SH_SLEEP if pool == "shell" else PY_SLEEP,
                                               timeout=120))
    time.sleep(1.0)  # the execution is running in the agent
    assert thread.is_alive(), box
    t0 = time.monotonic()
    kill_agent(uid)
    thread.join(ANSWER_WITHIN)
    waited = time.monotonic() - t0
    assert not thread.is_alive(), "no answer %d s after the agent was killed" % ANSWER_WITHIN
    assert "error" not in box, box
    response = box["value"]
    status, code = json_or_error(response)
    assert status >= 400, "a killed agent answered %s: %s" % (status, response.text[:500])
    assert status in (502, 503), (status, response.text)
    assert waited < 15, "the answer took %.1f s" % waited
    report("agent SIGKILLed mid-execution (%s pool)" % pool, "answer after %.2f s: %s %s: %s" % (
        waited, status, code, response.json()["error"]["message"][:200]))

    # The dead sandbox is cleaned up, and the identifier gets a working (fresh) session.
    assert rh.wait_until(lambda: sandbox_gone(srv, sandbox), timeout=15), "sandbox %s left traces" % sandbox
    again = execute(srv, pool, ident, "echo alive" if pool == "shell" else "'alive'")
    assert again.status_code == 200, again.text
    assert "alive" in result_text(pool, again)
    new_sandbox, _ = rh.session_sandbox(srv, ident)
    assert new_sandbox != sandbox
    assert srv.delete_session(pool, ident).status_code == 204


@pytest.mark.parametrize("pool", ["python", "shell"])
def test_agent_killed_while_idle(agent_server, pool):
    srv = agent_server
    ident = new_id("idlekill")
    assert execute(srv, pool, ident, "echo one" if pool == "shell" else "1").status_code == 200
    sandbox, uid = rh.session_sandbox(srv, ident)
    kill_agent(uid)
    time.sleep(0.5)
    t0 = time.monotonic()
    again = execute(srv, pool, ident, "echo two" if pool == "shell" else "'two'", timeout=60)
    assert time.monotonic() - t0 < ANSWER_WITHIN
    assert again.status_code == 200, again.text
    assert "two" in result_text(pool, again)
    assert rh.wait_until(lambda: sandbox_gone(srv, sandbox), timeout=15), "sandbox %s left traces" % sandbox
    assert srv.delete_session(pool, ident).status_code == 204


# -- 2. the server SIGKILLed and restarted -------------------------------------------------------

RESTART_POOLS = [
    {"name": "shell", "type": "Shell", "readySessionInstances": 2, "maxConcurrentSessions": 8},
    {"name": "python", "readySessionInstances": 1, "maxConcurrentSessions": 4},
]


def test_server_sigkill_then_restart_cleans_up(servers, report):
    srv = servers(RESTART_POOLS, uid_offset=300, name="restart").start()
    idents = {"shell": [new_id("sk-sh") for _ in range(2)], "python": [new_id("sk-py")]}
    for ident in idents["shell"]:
        r = srv.shell("shell", ident, "echo x > /mnt/data/keep.txt; (sleep 600 >/dev/null 2>&1 &); echo ok")
        assert r.status_code == 200, r.text
    r = srv.execute("python", idents["python"][0], "import subprocess\n"
                    "p = subprocess.Popen(['sleep', '600'])\nstate = 7\nstate")
    assert r.status_code == 200 and r.json()["properties"]["result"] == 7, r.text
    # One execution in flight when the server dies.
    busy = new_id("sk-busy")
    thread, box = rh.in_thread(lambda: srv.shell("shell", busy, "sleep 60", timeout=60))
    rh.session_sandbox(srv, busy)
    time.sleep(0.5)

    first_log = srv.log()
    first_sandboxes = {m["sandbox"] for m in rh.log_events(first_log, "sandbox ready")}
    first_pids = set(rh.uid_pids(srv.uids))
    assert first_sandboxes and first_pids
    old_pid = srv.pid
    srv.kill()
    thread.join(ANSWER_WITHIN)
    assert not thread.is_alive(), "the in-flight call hung after the server died"

    # What the dead server left (for the report): the restart must clear all of it.
    time.sleep(2.0)
    parents, groups = rh.sandbox_cgroups(srv.data_dir)
    left = {"processes": len(rh.uid_pids(srv.uids)), "mounts": len(mounts_under(srv.data_dir)),
            "cgroups": len(groups), "session dirs": len(rh.session_dirs(srv.data_dir)),
            "sqlite rows": len(rh.sandbox_ids_in_db(srv.data_dir))}

    srv.start(timeout=120)
    assert srv.pid != old_pid
    assert "removed sandboxes left by an earlier run" in srv.log(), srv.log_tail()

    def orphans():
        return {pid: uid for pid, uid in rh.uid_pids(srv.uids).items() if not rh.descends_from(pid, srv.pid)}

    rh.wait_until(lambda: not orphans(), timeout=15)
    assert not orphans(), "sandbox processes of the first run survive the restart:\n" + rh.describe_pids(orphans())
    assert not (first_pids & set(rh.uid_pids(srv.uids))), "first-run pids still alive"
    parents, groups = rh.sandbox_cgroups(srv.data_dir)
    stale = {
        "cgroups": [g for g in groups if g.rsplit("/", 1)[-1] in first_sandboxes],
        "session dirs": [d for d in rh.session_dirs(srv.data_dir) if d in first_sandboxes],
        "mounts": [m for m in mounts_under(srv.data_dir) if any(s in m for s in first_sandboxes)],
        "sqlite rows": [i for i in rh.sandbox_ids_in_db(srv.data_dir) if i in first_sandboxes],
    }
    assert not any(stale.values()), "first-run traces after the restart: %s" % stale

    # The pools refilled (start() waited for it), and what exists is consistent: every sandbox
    # record has its cgroups and every sandbox cgroup its record.
    recorded = set(rh.sandbox_ids_in_db(srv.data_dir))
    grouped = {g.rsplit("/", 1)[-1] for g in rh.sandbox_cgroups(srv.data_dir)[1]}
    assert recorded == grouped, (sorted(recorded), sorted(grouped))

    # Calls work: the old identifiers get fresh sessions, new ones too.
    for ident in idents["shell"] + [busy]:
        r = srv.shell("shell", ident, "ls /mnt/data; echo fresh")
        assert r.status_code == 200 and r.json()["result"]["stdout"] == "fresh\n", r.text
    r = srv.execute("python", idents["python"][0], "'state' in globals()")
    assert r.status_code == 200 and r.json()["properties"]["result"] is False, r.text
    r = srv.execute("python", new_id("sk-new"), "6*7")
    assert r.status_code == 200 and r.json()["properties"]["result"] == 42, r.text
    report("server SIGKILL: left behind by the killed server, all removed by the restart",
           ", ".join("%s %d" % kv for kv in left.items()))


# -- 3. a full disk ------------------------------------------------------------------------------

DISK_POOLS = [{"name": "shell", "type": "Shell", "readySessionInstances": 1, "maxConcurrentSessions": 8,
               "limits": {"disk": "4Mi"}}]


def fill(path, limit_mib=256):
    """Writes `path` until the filesystem is full (ENOSPC); returns the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        for _ in range(limit_mib):
            try:
                written += f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        else:
            raise AssertionError("%s never filled up" % path)
        for _ in range(4096):  # the last partial pages
            try:
                written += f.write(b"\0" * 512)
            except OSError:
                break
    return written


def call(fn, *args, **kw):
    t0 = time.monotonic()
    try:
        response = fn(*args, **kw)
    except requests.Timeout:
        raise AssertionError("no answer within %d s" % ANSWER_WITHIN)
    took = time.monotonic() - t0
    assert took < ANSWER_WITHIN, took
    return response


def test_full_data_disk(small_tmpfs, servers, report):
    base, point = small_tmpfs("64m")
    srv = servers(DISK_POOLS, uid_offset=450, data_dir=os.path.join(point, "data"), workdir=base,
                  name="disk").start()
    live = new_id("disk-live")
    assert srv.shell("shell", live, "echo hi > /mnt/data/a.txt; echo ok").status_code == 200
    srv.wait_pool_full()  # one ready sandbox, started before the disk fills

    filler = os.path.join(point, "filler")
    fill(filler)
    outcomes = []

    def record(what, response):
        status, code = json_or_error(response)
        message = response.json()["error"]["message"][:160] if code else ""
        outcomes.append("%s -> %s%s" % (what, status, " %s: %s" % (code, message) if code else ""))
        return status, code

    # Calls on the live session, and new sessions (the first may get the ready sandbox; the
    # next ones must start a sandbox while the state database cannot grow).
    record("execute (live session)", call(srv.shell, "shell", live, "cat /mnt/data/a.txt", timeout=ANSWER_WITHIN))
    record("upload (live session)", call(srv.upload, "shell", live, "b.bin", os.urandom(1 << 20)))
    record("list files (live session)", call(srv.http.get, srv.url("shell", "files", live), timeout=ANSWER_WITHIN))
    for k in range(4):
        record("new session %d" % k, call(srv.shell, "shell", new_id("disk-new"), "echo new", timeout=ANSWER_WITHIN))
    record("delete session", call(srv.delete_session, "shell", live))
    for line in outcomes:
        if " 503 " in line + " ":
            assert "full" in line, "a full-disk error that does not say so: " + line
    assert srv.alive(), "the server died on a full disk:\n" + srv.log_tail()
    assert srv.healthz().status_code == 200
    assert rh.integrity_check(srv.data_dir) == ["ok"]

    # Space back: new sessions, uploads and the ready pool work again.
    os.unlink(filler)
    ident = new_id("disk-after")
    r = call(srv.shell, "shell", ident, "echo back > /mnt/data/c.txt; cat /mnt/data/c.txt", timeout=ANSWER_WITHIN)
    assert r.status_code == 200 and r.json()["result"]["stdout"] == "back\n", r.text
    r = call(srv.upload, "shell", ident, "d.bin", os.urandom(1 << 20))
    assert r.status_code == 200, r.text
    srv.wait_pool_full(timeout=90)  # the refiller recovers from its failures (backoff up to 30 s)
    assert rh.integrity_check(srv.data_dir) == ["ok"]
    report("full data disk (64 MiB tmpfs): outcomes while full", "\n".join(outcomes))


def test_full_session_disk(servers):
    """The session's own /mnt/data (limits.disk 4 MiB) full: uploads get 413 SessionDiskFull,
    writes from code fail with ENOSPC inside the execution, and the session keeps working."""
    srv = servers(DISK_POOLS, uid_offset=600, name="sessdisk").start()
    ident = new_id("sessdisk")
    r = srv.shell("shell", ident, "dd if=/dev/zero of=/mnt/data/big bs=1M count=8 2>&1; echo rc=$?")
    assert r.status_code == 200, r.text
    out = r.json()["result"]["stdout"]
    assert "No space left on device" in out and "rc=1" in out, out
    r = call(srv.upload, "shell", ident, "more.bin", os.urandom(1 << 20))
    code, message = rh.error_body(r)
    assert (r.status_code, code) == (413, "SessionDiskFull"), (r.status_code, r.text)
    r = srv.shell("shell", ident, "rm /mnt/data/big; echo freed")
    assert r.status_code == 200 and r.json()["result"]["stdout"] == "freed\n", r.text
    r = call(srv.upload, "shell", ident, "more.bin", os.urandom(1 << 20))
    assert r.status_code == 200, r.text
    assert srv.alive()
