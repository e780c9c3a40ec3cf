"""Resource exhaustion and the agent channel (Python pool: 256 MiB, 64 pids, 16 MiB /mnt/data and
/tmp, 30 s per execution).

Every attack must stay inside its own session: the limits hold (measured on the host where
possible), the caller gets a result or a clear JSON error in bounded time and size, the server's
memory does not balloon, and the session (or a fresh one under the same identifier) works next.
"""

import os
import time

from conftest import DISK_LIMIT, MODERN, PIDS_LIMIT
from security_helpers import UidSampler, host_pids_of_uid, host_process_count, vm_rss_kib

# Slack over pids.max for the host-side count: processes of the session uid outside its pid
# namespace (the outer bwrap) are counted by the host scan but not inside.
PIDS_SLACK = 2
RSS_GROWTH_KIB = 96 << 10   # what the server may grow by after a flood (96 MiB)


def test_fork_bomb_is_held_by_the_pids_limit(lab):
    """A classic fork bomb (every process forks forever) never has more than pids.max processes
    on the host, the call ends by its timeout with a result or a clear error, and the identifier
    works again afterwards."""
    sess = lab.session()
    sess.ok("1")
    uid = sess.host_uid()
    baseline = host_process_count()
    sampler = UidSampler(uid)
    started = time.monotonic()
    r = sess.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", timeout=3)
    elapsed = time.monotonic() - started
    peak = sampler.stop()
    assert r.status_code in (200, 502), (r.status_code, r.text[:500])
    if r.status_code == 200:
        assert r.json()["properties"]["status"] == "Failure"
    assert peak <= PIDS_LIMIT + PIDS_SLACK, "the session uid had %d processes on the host (pids.max %d)" % (
        peak, PIDS_LIMIT)
    assert sampler.host_peak - baseline < 1000, (baseline, sampler.host_peak)
    assert elapsed < 3 + 10 + 15, elapsed
    lab.contained(sess, r)


def test_lingering_children_at_the_pids_limit_leave_the_session_usable(lab):
    """Filling pids.max with long-lived children (fork until EAGAIN, each child sleeps) is
    contained by the limit, and the next call with the same identifier still works (or the
    session is replaced): the user is not locked out of their identifier."""
    sess = lab.session()
    sess.ok("1")
    uid = sess.host_uid()
    seen = sess.probe(r'''
import errno, json, os, time
kids, err = [], None
for i in range(1000):
    try:
        pid = os.fork()
    except OSError as e:
        err = errno.errorcode[e.errno]
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    kids.append(pid)
json.dumps({"forked": len(kids), "error": err})
''')
    assert seen["error"] == "EAGAIN" and seen["forked"] < PIDS_LIMIT, seen
    count = len(host_pids_of_uid(uid))
    assert count <= PIDS_LIMIT + PIDS_SLACK, "the session uid has %d processes on the host" % count
    lab.contained(sess)


def test_memory_bomb_gets_a_clear_error(lab, server):
    """Allocating far past the memory limit ends in 502 SessionOutOfMemory (or a MemoryError
    result), quickly; the server's own memory is untouched and the identifier works again."""
    sess = lab.session()
    sess.ok("1")
    rss = vm_rss_kib(server.proc.pid)
    started = time.monotonic()
    r = sess.run("chunks = []\nfor i in range(64):\n    chunks.append(b'x' * (32 << 20))\nlen(chunks)", timeout=20)
    assert time.monotonic() - started < 25
    if r.status_code == 200:
        props = r.json()["properties"]
        assert props["status"] == "Failure" and "MemoryError" in props["stderr"], props
    else:
        assert r.status_code == 502 and r.headers.get("x-ms-error-code") == "SessionOutOfMemory", (
            r.status_code, r.text[:500])
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB
    lab.contained(sess, r)


def test_filling_mnt_data_gives_enospc_and_uploads_get_413(lab):
    """Writing past the 16 MiB /mnt/data limit fails with ENOSPC inside; uploads into the full
    session get 413 SessionDiskFull; after freeing space uploads work again."""
    sess = lab.session()
    seen = sess.probe(r'''
import errno, json
n, err = 0, None
try:
    with open("/mnt/data/fill.bin", "wb") as f:
        for i in range(64):
            f.write(b"\0" * (1 << 20))
            f.flush()
            n += 1
except OSError as e:
    err = errno.errorcode[e.errno]
json.dumps({"mib": n, "error": err})
''')
    assert seen["error"] == "ENOSPC" and seen["mib"] <= DISK_LIMIT >> 20, seen
    responses = [sess.upload("more.bin", b"x" * 65536), sess.upload("big.bin", b"x" * (DISK_LIMIT + (1 << 20)))]
    for r in responses:
        assert r.status_code == 413 and r.headers.get("x-ms-error-code") == "SessionDiskFull", (
            r.status_code, r.text[:300])
    assert "more.bin" not in lab.api.list_files(sess.id)
    sess.ok("import os\nos.remove('/mnt/data/fill.bin')")
    r = sess.upload("after.bin", b"y" * 4096)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    lab.contained(sess, responses)


def test_filling_tmp_and_dev_shm_is_bounded(lab, server):
    """/tmp stops at its 16 MiB limit with ENOSPC; /dev/shm is bounded by ENOSPC or the memory
    limit (then 502 SessionOutOfMemory); the host is unaffected either way."""
    sess = lab.session()
    seen = sess.probe(r'''
import errno, json
n, err = 0, None
try:
    with open("/tmp/fill.bin", "wb") as f:
        for i in range(64):
            f.write(b"\0" * (1 << 20))
            f.flush()
            n += 1
except OSError as e:
    err = errno.errorcode[e.errno]
json.dumps({"mib": n, "error": err})
''')
    assert seen["error"] == "ENOSPC" and seen["mib"] <= 16, seen
    rss = vm_rss_kib(server.proc.pid)
    r = sess.run(r'''
import errno
n = 0
try:
    with open("/dev/shm/fill.bin", "wb") as f:
        for i in range(1024):
            f.write(b"\1" * (1 << 20))
            n += 1
    res = "no limit after %d MiB" % n
except OSError as e:
    res = errno.errorcode[e.errno]
res
''', timeout=20)
    if r.status_code == 200:
        assert r.json()["properties"]["result"] in ("ENOSPC", "EFBIG", "ENOMEM"), r.json()["properties"]
    else:
        assert r.status_code == 502 and r.headers.get("x-ms-error-code") == "SessionOutOfMemory", (
            r.status_code, r.text[:300])
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB
    lab.contained(sess, r)


def test_fd_exhaustion_is_contained(lab, server):
    """Opening files until EMFILE (after raising the soft limit to the hard one) stops at the
    sandbox's own cap, does not touch the server's descriptors, and the identifier works next
    (or gets a fresh session)."""
    server_fds = len(os.listdir("/proc/%d/fd" % server.proc.pid))
    sess = lab.session()
    seen = sess.probe(r'''
import errno, json, os, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
except (ValueError, OSError):
    pass
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    raised = True
except (ValueError, OSError):
    raised = False
held, err = [], None
while len(held) < 1 << 20:
    try:
        held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        err = errno.errorcode[e.errno]
        break
json.dumps({"hard": hard, "opened": len(held), "error": err, "raised": raised})
''')
    assert seen["error"] == "EMFILE" and not seen["raised"] and seen["opened"] <= seen["hard"] <= 65536, seen
    assert len(os.listdir("/proc/%d/fd" % server.proc.pid)) < server_fds + 64
    lab.contained(sess)


def test_output_flood_is_bounded_in_size_time_and_server_memory(lab, server):
    """2 GiB written to stdout (and 256 MiB to stderr) come back as a bounded response (about
    1 MiB per stream), well within the timeout, and the server's RSS does not grow."""
    sess = lab.session()
    sess.ok("1")
    rss = vm_rss_kib(server.proc.pid)
    started = time.monotonic()
    r = sess.run("import os, sys\nb = b'x' * (1 << 20)\nfor i in range(2048):\n    os.write(1, b)\n"
                 "for i in range(256):\n    os.write(2, b)\nfor i in range(1024):\n    sys.stdout.write('y' * 65536)\n",
                 timeout=30)
    elapsed = time.monotonic() - started
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert len(r.content) < 8 << 20, "the response is %d bytes" % len(r.content)
    props = r.json()["properties"]
    assert props["status"] == "Success" and 0 < len(props["stdout"]) <= 2 << 20, len(props["stdout"])
    assert elapsed < 60, elapsed
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB, (rss, vm_rss_kib(server.proc.pid))
    lab.contained(sess, r)


def test_huge_results_are_bounded(lab, server):
    """A 40 MiB string or a huge list as the cell's value comes back capped, not whole."""
    sess = lab.session()
    rss = vm_rss_kib(server.proc.pid)
    responses = [sess.run("'y' * (40 << 20)"), sess.run("['z' * 1000] * 100000")]
    for r in responses:
        assert r.status_code == 200 and len(r.content) < 8 << 20, (r.status_code, len(r.content))
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB
    lab.contained(sess, responses)


def test_a_cell_that_never_returns_times_out_and_keeps_state(lab):
    """`while True: pass` is interrupted at its timeout: status Failure with a TimeoutError,
    and the variables defined before survive."""
    sess = lab.session()
    sess.ok("kept = 'still here'")
    started = time.monotonic()
    props = sess.ok("while True:\n    pass\n", timeout=2)
    assert time.monotonic() - started < 2 + 10
    assert props["status"] == "Failure" and "TimeoutError" in props["stderr"], props
    assert sess.ok("kept")["result"] == "still here"
    lab.contained(sess)


def test_a_cell_that_swallows_interrupts_is_killed(lab):
    """Code that catches every interrupt is killed by the host after the grace period: 502
    SessionAgentTimeout in bounded time, then a fresh session under the same identifier."""
    sess = lab.session()
    sess.ok("1")
    started = time.monotonic()
    r = sess.run("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n"
                 "    try:\n        time.sleep(100)\n    except BaseException:\n        pass\n", timeout=2)
    elapsed = time.monotonic() - started
    assert r.status_code == 502 and r.headers.get("x-ms-error-code") == "SessionAgentTimeout", (
        r.status_code, r.text[:300])
    assert elapsed < 2 + 10 + 10, elapsed
    lab.contained(sess, r)


def test_cpu_hog_does_not_starve_other_sessions(lab, canary):
    """Four busy threads and a busy child process in one session (run asynchronously) leave the
    canary answering quickly: the session is held to its CPU quota."""
    sess = lab.session()
    sess.ok("1")
    base = lab.server.pool_url("python")
    url = "%s/executions?api-version=%s&identifier=%s" % (base, MODERN, sess.id)
    code = ("import threading, subprocess, time\nend = time.time() + 5\n"
            "p = subprocess.Popen(['python3', '-c', 'while True: pass'])\n"
            "def spin():\n    while time.time() < end:\n        pass\n"
            "ts = [threading.Thread(target=spin) for i in range(4)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n"
            "p.kill()\n'done'")
    r = lab.api.http.post(url, json={"code": code, "executionType": "Asynchronous", "timeoutInSeconds": 20}, timeout=30)
    assert r.status_code == 202, (r.status_code, r.text[:300])
    op = r.headers["operation-id"]
    time.sleep(0.5)
    worst = 0.0
    for _ in range(5):
        started = time.monotonic()
        canary.check()
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.3)
    assert worst < 5.0, "the canary took %.1f s to answer during a CPU hog" % worst
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        status = lab.api.http.get("%s/executions/%s?api-version=%s&identifier=%s" % (base, op, MODERN, sess.id),
                                  timeout=30).json()
        if status.get("status") != "Running":
            break
        time.sleep(0.5)
    assert status and status.get("status") == "Succeeded", status
    lab.contained(sess)


# Finds the agent's own channel pipes (fd 3/4 are moved to high descriptors at start-up).
CHANNEL_FDS = r'''
import json, os, struct
def channel_fds(write):
    fds = []
    for f in os.listdir("/proc/self/fd"):
        fd = int(f)
        if fd <= 2:
            continue
        try:
            target = os.readlink("/proc/self/fd/%d" % fd)
            flags = int(open("/proc/self/fdinfo/%d" % fd).read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith("pipe:") and (flags & 3 == 1) == write:
            fds.append(fd)
    return fds
'''


def channel_attack(lab, server, code):
    sess = lab.session()
    sess.ok("1")
    rss = vm_rss_kib(server.proc.pid)
    started = time.monotonic()
    r = sess.run(code, timeout=10)
    assert time.monotonic() - started < 10 + 10 + 5
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB
    lab.contained(sess, r)
    return r


def test_closing_the_agent_channel(lab, server):
    """Closing fds 3 and 4 and then every pipe the agent holds (its real request and reply
    channel) ends the session with a clear error; the identifier gets a fresh session."""
    channel_attack(lab, server, CHANNEL_FDS + r'''
for fd in (3, 4):
    try:
        os.close(fd)
    except OSError:
        pass
for fd in channel_fds(True) + channel_fds(False):
    os.close(fd)
"closed"
''')


def test_garbage_on_the_agent_channel(lab, server):
    """Writing garbage to fd 4 and to every pipe the agent writes to (its reply channel and its
    log) is a clear error at worst, never a server failure."""
    channel_attack(lab, server, CHANNEL_FDS + r'''
try:
    os.write(4, b"garbage")
except OSError:
    pass
for fd in channel_fds(True):
    os.write(fd, b"garbage, not a frame\n" * 10)
"written"
''')


def test_an_oversized_frame_on_the_agent_channel(lab, server):
    """A frame header announcing ~4 GiB is refused by the host's frame cap without allocating it
    (the server's RSS stays flat)."""
    channel_attack(lab, server, CHANNEL_FDS + r'''
for fd in channel_fds(True):
    os.write(fd, struct.pack(">I", 0xFFFFFFF0) + b"{" * 65536)
"written"
''')


def test_forged_frames_only_affect_their_own_session(lab, server):
    """Well-formed but forged reply frames (any id) at most change their own session's answers."""
    r = channel_attack(lab, server, CHANNEL_FDS + r'''
for fd in channel_fds(True):
    for i in range(1, 40):
        body = json.dumps({"id": i, "type": "result", "status": "Success", "stdout": "FORGED", "stderr": "",
                           "result": "FORGED", "jupyterResult": "", "timedOut": False, "durationMs": 1.0,
                           "stdoutTruncated": False, "stderrTruncated": False}).encode()
        os.write(fd, struct.pack(">I", len(body)) + body)
"written"
''')
    assert r.status_code in (200, 502)
