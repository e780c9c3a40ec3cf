"""Processes: what a sandbox can see and signal.

Each sandbox has its own pid namespace and its own host uid, so `ps` shows only its own
processes, and signals to the host's processes (the server, the test runner, the host's init)
or to another session's processes cannot be delivered.
"""

import os
import time
import uuid

from security_helpers import host_pids_of_uid, with_values

LIST_AND_SIGNAL = r'''
import errno, json, os, signal
out = {"procs": {}}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            out["procs"][p] = open("/proc/%s/cmdline" % p, "rb").read().replace(b"\0", b" ").decode()[:300]
        except OSError as e:
            out["procs"][p] = "ERR " + errno.errorcode[e.errno]
def kill(pid, sig):
    try:
        os.kill(pid, sig)
        return "SENT"
    except OSError as e:
        return errno.errorcode[e.errno]
for name, pid in TARGETS.items():
    out["kill " + name] = kill(pid, signal.SIGKILL)
out["kill -1"] = kill(-1, signal.SIGKILL)
json.dumps(out)
'''

HOST_ONLY = ("sandpiper serve", "pytest", "sshd", "systemd", "process_api", "cron", "dockerd", "containerd")


def host_namespaces(pid):
    return {n: os.readlink("/proc/%d/ns/%s" % (pid, n)) for n in ("pid", "net", "mnt", "user", "uts", "ipc", "cgroup")}


def test_ps_shows_only_the_sandboxs_own_processes(lab):
    """/proc (and ps) inside a sandbox lists only the sandbox's own handful of processes: never
    the server, the test runner or any other host process."""
    sess = lab.session()
    seen = sess.probe(r'''
import json, os, subprocess
procs = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            procs[p] = open("/proc/%s/cmdline" % p, "rb").read().replace(b"\0", b" ").decode()[:300]
        except OSError:
            procs[p] = "?"
ps = subprocess.run(["ps", "-e", "-o", "pid=,uid=,args="], capture_output=True, text=True).stdout
json.dumps({"procs": procs, "ps": ps, "uid": os.getuid()})
''')
    procs = seen["procs"]
    assert 1 <= len(procs) <= 8, "the sandbox sees %d processes: %r" % (len(procs), procs)
    for pid, cmd in procs.items():
        assert not any(h in cmd for h in HOST_ONLY), "a host process is visible: %s %s" % (pid, cmd)
    ps_lines = [line for line in seen["ps"].splitlines() if line.strip()]
    assert 1 <= len(ps_lines) <= 8, seen["ps"]
    assert seen["uid"] != 0
    for line in ps_lines:
        pid, uid, args = line.split(None, 2)
        if pid == "1" and "sandpiper-init" in args:
            # A forked session's pid 1 runs as its template's init uid: neither root nor the
            # session's (it is spawned before the session is known); the user cannot signal it.
            assert int(uid) not in (0, seen["uid"]), seen["ps"]
        else:
            assert int(uid) == seen["uid"], seen["ps"]
    lab.contained(sess)


def test_signals_to_host_processes_fail(lab, server):
    """kill -9 of the server's pid, the test runner's pid (and its parent) and pid 1, as numbered
    on the host, does not reach them; kill(-1) only touches the sandbox; the server keeps
    serving."""
    sess = lab.session()
    targets = {"server": server.proc.pid, "runner": os.getpid(), "host init": 1, "runner parent": os.getppid()}
    seen = sess.probe(with_values(LIST_AND_SIGNAL, TARGETS=targets))
    assert seen["kill server"] in ("ESRCH", "EPERM"), seen
    assert seen["kill runner"] in ("ESRCH", "EPERM"), seen
    assert server.proc.poll() is None
    os.kill(server.proc.pid, 0)
    lab.contained(sess)


def test_sessions_cannot_see_or_signal_each_other(lab):
    """Two sessions run as different host uids in different pid namespaces: one cannot see the
    other's processes in /proc, signal them by their host pid, or reach its files through
    /proc/<pid>/root; the victim's process and files survive."""
    victim, attacker = lab.session(tag="victim"), lab.session(tag="attacker")
    marker = "sec-marker-" + uuid.uuid4().hex
    secret = "s3cret-" + uuid.uuid4().hex
    victim.ok(with_values(r'''
import subprocess
open("/mnt/data/secret.txt", "w").write(SECRET)
sleeper = subprocess.Popen(["python3", "-c", "import time; time.sleep(600)", MARKER])
sleeper.pid
''', SECRET=secret, MARKER=marker))
    attacker.ok("1")
    victim_uid, attacker_uid = victim.host_uid(), attacker.host_uid()
    assert victim_uid != attacker_uid
    host_pid = None
    for pid in host_pids_of_uid(victim_uid):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if marker.encode() in f.read():
                    host_pid = pid
        except OSError:
            pass
    assert host_pid, "the victim's marker process is not visible on the host (test setup)"
    seen = attacker.probe(with_values(r'''
import errno, json, os, signal
out = {"visible": [], "reads": {}}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            if MARKER.encode() in open("/proc/%s/cmdline" % p, "rb").read():
                out["visible"].append(p)
        except OSError:
            pass
for path in ["/proc/%d/root/mnt/data/secret.txt" % HOST_PID, "/proc/%d/cwd/secret.txt" % HOST_PID,
             "/proc/%d/environ" % HOST_PID]:
    try:
        out["reads"][path] = open(path).read()
    except OSError as e:
        out["reads"][path] = errno.errorcode[e.errno]
for sig, name in [(signal.SIGKILL, "kill"), (signal.SIGSTOP, "stop")]:
    try:
        os.kill(HOST_PID, sig)
        out[name] = "SENT"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
try:
    os.killpg(HOST_PID, signal.SIGKILL)
    out["killpg"] = "SENT"
except OSError as e:
    out["killpg"] = errno.errorcode[e.errno]
json.dumps(out)
''', MARKER=marker, HOST_PID=host_pid))
    assert seen["visible"] == [], "the victim's process is visible to another session: %r" % seen
    assert not any(secret in v for v in seen["reads"].values()), seen["reads"]
    assert seen["kill"] == "ESRCH" and seen["stop"] == "ESRCH" and seen["killpg"] == "ESRCH", seen
    time.sleep(0.2)
    with open("/proc/%d/status" % host_pid) as f:
        state = [line for line in f if line.startswith("State:")][0]
    assert "T (stopped)" not in state and "Z" not in state.split()[1], state
    assert victim.ok("sleeper.poll() is None and open('/mnt/data/secret.txt').read() == %r" % secret)["result"] is True
    lab.contained(attacker)
    lab.contained(victim)


def test_sessions_share_no_ipc_sockets_or_tmp(lab):
    """Two sessions of one pool share nothing to talk over: not a SysV shared-memory key, not
    /dev/shm or /tmp, not an abstract unix socket, not a TCP port on 127.0.0.1."""
    owner, other = lab.session(tag="owner"), lab.session(tag="other")
    tag = uuid.uuid4().hex
    key = int(tag[:6], 16) | 0x10000000
    made = owner.probe(with_values(r'''
import ctypes, errno, json, socket
libc = ctypes.CDLL(None, use_errno=True)
shm_id = libc.shmget(KEY, 4096, 0o1666)                   # IPC_CREAT | 0666
open("/dev/shm/" + TAG, "w").write("shm")
open("/tmp/" + TAG, "w").write("tmp")
held_unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
held_unix.bind("\0" + TAG)
held_unix.listen(5)
held_tcp = socket.socket()
held_tcp.bind(("127.0.0.1", 0))
held_tcp.listen(5)
json.dumps({"shm": shm_id, "port": held_tcp.getsockname()[1]})
''', KEY=key, TAG=tag))
    assert made["shm"] >= 0, made
    seen = other.probe(with_values(r'''
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
out = {"shm": libc.shmget(KEY, 0, 0), "shm_errno": errno.errorcode.get(ctypes.get_errno()),
       "dev_shm": os.path.exists("/dev/shm/" + TAG), "tmp": os.path.exists("/tmp/" + TAG)}
for name, family, address in [("unix", socket.AF_UNIX, "\0" + TAG), ("tcp", socket.AF_INET, ("127.0.0.1", PORT))]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(address)
        out[name] = "CONNECTED"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e))
    s.close()
json.dumps(out)
''', KEY=key, TAG=tag, PORT=made["port"]))
    assert seen["shm"] == -1 and seen["shm_errno"] == "ENOENT", seen
    assert not seen["dev_shm"] and not seen["tmp"], seen
    assert seen["unix"] == "ECONNREFUSED" and seen["tcp"] == "ECONNREFUSED", seen
    lab.contained(other)
    lab.contained(owner)


def test_detached_daemons_die_with_their_session(lab):
    """A daemon that double-forks and calls setsid to escape its session is killed when the
    session is deleted: nothing of it survives on the host, and the identifier starts afresh."""
    sess = lab.session()
    marker = "sec-daemon-" + uuid.uuid4().hex
    sess.ok(with_values(r'''
import subprocess
subprocess.Popen(["python3", "-c", "import os, time\nif os.fork(): os._exit(0)\nos.setsid()\n"
                  "if os.fork(): os._exit(0)\ntime.sleep(600)", MARKER], start_new_session=True).wait()
''', MARKER=marker))

    def daemons():
        found = []
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
        return found
    deadline = time.monotonic() + 5
    while not daemons() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemons(), "the daemon did not start (test setup)"
    r = sess.delete()
    assert r.status_code in (200, 204), (r.status_code, r.text[:300])
    deadline = time.monotonic() + 10
    while daemons() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not daemons(), "a detached daemon outlived its deleted session: %r" % daemons()
    lab.contained(sess)


def test_namespaces_differ_from_the_hosts(lab, server):
    """Every namespace of a sandbox (pid, net, mnt, user, uts, ipc, cgroup) differs from the
    server's and the test runner's (the host's), and its hostname is its own."""
    sess = lab.session()
    seen = sess.probe(r'''
import json, os, socket
json.dumps({"ns": {n: os.readlink("/proc/self/ns/" + n) for n in ("pid", "net", "mnt", "user", "uts", "ipc", "cgroup")},
            "hostname": socket.gethostname()})
''')
    for host_pid in (os.getpid(), server.proc.pid):
        host = host_namespaces(host_pid)
        for name, inside in seen["ns"].items():
            assert inside != host[name], "the sandbox shares the host's %s namespace (%s)" % (name, inside)
    assert seen["hostname"] != os.uname().nodename
    lab.contained(sess)


def test_gvisor_processes_are_isolated(lab, server):
    """In a gVisor sandbox, /proc shows only the sandbox's processes and signals to the server's
    and the test runner's pids do not arrive."""
    sess = lab.session("python-gvisor")
    targets = {"server": server.proc.pid, "runner": os.getpid()}
    seen = sess.probe(with_values(LIST_AND_SIGNAL.replace('out["kill -1"] = kill(-1, signal.SIGKILL)\n', ""),
                                  TARGETS=targets))
    procs = seen["procs"]
    assert 1 <= len(procs) <= 8, procs
    for pid, cmd in procs.items():
        assert not any(h in cmd for h in HOST_ONLY), "a host process is visible: %s %s" % (pid, cmd)
    assert seen["kill server"] in ("ESRCH", "EPERM") and seen["kill runner"] in ("ESRCH", "EPERM"), seen
    assert server.proc.poll() is None
    lab.contained(sess)

