"""Helpers for the reliability tests: a `sandpiper serve` that a test can start, SIGKILL and
restart on the same data directory, and host-side probes of what one server owns (sandbox-uid
processes, mounts under its data directory, its cgroups, fds, RSS, session directories and the
rows of its sqlite state).

Every server here has its own data directory and its own explicit `server.sandboxUidBase` in
233000-233999 (other servers on the machine use 230000, 232000, 237000, ...). A server hands out
uids from its base upwards, one per live sandbox, so the processes of uids [base, base + SPAN)
belong to that server, even after it was SIGKILLed and they were reparented to init.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid

import requests

from e2e_helpers import mounts_under, sandpiper_binary, wait_for_port

UID_BASE = 233000
UID_SPAN = 150  # uids one test server may use; servers get bases 150 apart (233000..233899)
LEGACY_API = "2024-02-02-preview"
MODERN_API = "2025-02-02-preview"
CGROUP_ROOT = "/sys/fs/cgroup"


# -- the server ----------------------------------------------------------------------------------


def fnv1a64(text):
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def cgroup_group_name(data_dir):
    """The parent cgroup a server makes for a data directory (CgroupSetup.groupName): FNV-1a 64
    of the path as given, in hex without padding, first 12 characters."""
    return "sandpiper-" + format(fnv1a64(data_dir), "x")[:12]


class Server:
    """One `sandpiper serve` on a free 127.0.0.1 port at log level debug; the log goes to a file
    in `workdir` (appended across restarts, each run's part starting at `log_offset`)."""

    def __init__(self, workdir, pools, uid_base, server_extra=None, key=None, data_dir=None, name="server"):
        self.workdir = workdir
        self.pools = pools
        self.uid_base = uid_base
        self.uids = range(uid_base, uid_base + UID_SPAN)
        self.key = key or "rel-" + uuid.uuid4().hex
        self.data_dir = data_dir or os.path.join(workdir, "data")
        self.config_path = os.path.join(workdir, name + "-config.json")
        self.port_file = os.path.join(workdir, name + ".port")
        self.log_path = os.path.join(workdir, name + ".log")
        server = {"sandboxUidBase": uid_base}
        server.update(server_extra or {})
        with open(self.config_path, "w") as f:
            json.dump({"server": server, "pools": pools}, f)
        self.proc = None
        self.port = None
        self.log_offset = 0
        self.ready_target = sum(p.get("readySessionInstances", 2) for p in pools)
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer " + self.key
        self.cgroup_bases = []

    # lifecycle

    def start(self, wait_ready=True, timeout=120):
        binary = sandpiper_binary()
        try:
            os.unlink(self.port_file)
        except FileNotFoundError:
            pass
        self.log_offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        env = dict(os.environ, SANDPIPER_API_KEY=self.key)
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", self.data_dir, "--port", "0", "--port-file", self.port_file,
             "--config", self.config_path, "--log-level", "debug"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        log.close()
        self.port = wait_for_port(self.port_file, self.proc, self.log_path, timeout=timeout)
        self.base = "http://127.0.0.1:%d" % self.port
        self.cgroup_bases = server_cgroup_bases(self.proc.pid, self.data_dir)
        if wait_ready:
            self.wait_pool_full(timeout=timeout)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=60):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    # log

    def log(self, whole=False):
        try:
            with open(self.log_path, "rb") as f:
                if not whole:
                    f.seek(self.log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n=4000):
        return self.log()[-n:]

    def ready_count(self):
        """Ready sandboxes now: "sandbox ready" lines minus "session allocated" lines of this run
        (every allocation consumes one sandbox, warm or started on the request path)."""
        text = self.log()
        return text.count("sandbox ready") - text.count("session allocated")

    def wait_pool_full(self, timeout=120, target=None):
        target = self.ready_target if target is None else target
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError("sandpiper exited with %s:\n%s" % (self.proc.returncode, self.log_tail()))
            if self.ready_count() >= target:
                return
            time.sleep(0.1)
        raise AssertionError("pools not refilled to %d ready within %d s (ready %d):\n%s"
                             % (target, timeout, self.ready_count(), self.log_tail()))

    # HTTP

    def url(self, pool, op, identifier=None, api=LEGACY_API):
        query = "api-version=" + api
        if identifier is not None:
            query += "&identifier=" + requests.utils.quote(identifier, safe="")
        return "%s/pools/%s/%s?%s" % (self.base, pool, op, query)

    def execute(self, pool, identifier, code, timeout=120, http=None):
        body = {"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}
        return (http or self.http).post(self.url(pool, "code/execute", identifier), json=body, timeout=timeout)

    def shell(self, pool, identifier, command, timeout=120, http=None):
        """The modern executions API of a Shell pool."""
        return (http or self.http).post(self.url(pool, "executions", identifier, api=MODERN_API),
                                        json={"shellCommand": command}, timeout=timeout)

    def delete_session(self, pool, identifier, http=None):
        return (http or self.http).delete(self.url(pool, "session", identifier, api=MODERN_API), timeout=60)

    def stop_session(self, pool, identifier, http=None):
        return (http or self.http).post(self.url(pool, ".management/stopSession", identifier, api=MODERN_API),
                                        timeout=60)

    def upload(self, pool, identifier, name, data, http=None):
        return (http or self.http).post(self.url(pool, "files/upload", identifier),
                                        files={"file": (name, data, "application/octet-stream")}, timeout=120)

    def healthz(self, timeout=10):
        return requests.get(self.base + "/healthz", timeout=timeout)


def server_cgroup_bases(pid, data_dir):
    """The parent cgroup directories a server makes for its sandboxes: <mount>/<its own group>/
    sandpiper-<hash> for the v1 memory, cpu and pids controllers (or the v2 hierarchy)."""
    name = cgroup_group_name(data_dir)
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            left, right = left.split(), right.split()
            if len(left) < 5 or len(right) < 3:
                continue
            if right[0] == "cgroup2":
                mounts.setdefault("", left[4])
            elif right[0] == "cgroup":
                for option in right[2].split(","):
                    mounts.setdefault(option, left[4])
    own = {}
    with open("/proc/%d/cgroup" % pid) as f:
        for line in f:
            hid, controllers, path = line.rstrip("\n").split(":", 2)
            if hid == "0" and not controllers:
                own[""] = path
            for c in controllers.split(","):
                own[c] = path
    bases = []
    if all(c in mounts for c in ("memory", "cpu", "pids")):
        for c in ("memory", "cpu", "pids"):
            bases.append(os.path.join(mounts[c], own.get(c, "/").lstrip("/"), name).replace("//", "/"))
    elif "" in mounts:
        bases.append(os.path.join(mounts[""], own.get("", "/").lstrip("/"), name))
    return bases


def find_group_dirs(name, max_depth=4):
    """Every directory called `name` under /sys/fs/cgroup/*/ (bounded depth): where a server's
    parent groups are, whatever cgroup it ran in."""
    found = []
    try:
        controllers = os.listdir(CGROUP_ROOT)
    except OSError:
        return found
    for controller in controllers:
        top = os.path.join(CGROUP_ROOT, controller)
        stack = [(top, 0)]
        while stack:
            path, depth = stack.pop()
            try:
                entries = os.scandir(path)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    if entry.name == name:
                        found.append(entry.path)
                    elif depth < max_depth and not entry.name.startswith("sandpiper-"):
                        stack.append((entry.path, depth + 1))
    return sorted(found)


def sandbox_cgroups(data_dir):
    """(parent group dirs, sandbox group dirs under them) of the server of `data_dir`."""
    parents = find_group_dirs(cgroup_group_name(data_dir))
    children = []
    for parent in parents:
        try:
            children += [e.path for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
        except OSError:
            pass
    return parents, sorted(children)


# -- host probes ---------------------------------------------------------------------------------


def proc_uid(pid):
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def proc_state(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def uid_pids(uids, include_zombies=False):
    """{pid: uid} of live processes whose real uid is in `uids`."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        uid = proc_uid(name)
        if uid is None or uid not in uids:
            continue
        if not include_zombies and proc_state(name) in ("Z", "X", None):
            continue
        out[int(name)] = uid
    return out


def describe_pids(pids):
    if not pids:
        return ""
    return subprocess.run(["ps", "-o", "pid,ppid,uid,stat,etime,args", "-p", ",".join(map(str, sorted(pids)))],
                          capture_output=True, text=True).stdout


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for row in f:
                if row.startswith("Pss:"):
                    return int(row.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return -1


def session_dirs(data_dir):
    try:
        return sorted(os.listdir(os.path.join(data_dir, "sessions")))
    except OSError:
        return []


def sandbox_rows(data_dir):
    """Rows of the `sandbox` table, read through a read-only connection (the server holds the
    database in WAL mode; a read-only reader sees committed rows)."""
    path = os.path.join(data_dir, "sandpiper.sqlite")
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        return conn.execute("SELECT COUNT(*) FROM sandbox").fetchone()[0]
    finally:
        conn.close()


def integrity_check(data_dir):
    path = os.path.join(data_dir, "sandpiper.sqlite")
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
    finally:
        conn.close()


def namespace_mounts(uids):
    """Mounts summed over the distinct mount namespaces of the processes of `uids`: sandboxes
    forked from a template mount their /mnt/data inside namespaces the host does not see."""
    host = os.readlink("/proc/self/ns/mnt")  # counted by mounts_under; other servers change it
    seen = {host: 0}
    for pid in uid_pids(uids):
        try:
            ns = os.readlink("/proc/%d/ns/mnt" % pid)
            if ns in seen:
                continue
            with open("/proc/%d/mountinfo" % pid) as f:
                seen[ns] = sum(1 for _ in f)
        except OSError:
            continue
    return sum(seen.values())


def snapshot(server):
    """What the server owns right now."""
    parents, groups = sandbox_cgroups(server.data_dir)
    return {
        "sandbox processes": len(uid_pids(server.uids)),
        "mounts under data dir": len(mounts_under(server.data_dir)),
        "mounts in sandbox namespaces": namespace_mounts(server.uids),
        "sandbox cgroups": len(groups),
        "server open fds": fd_count(server.pid),
        "session dirs": len(session_dirs(server.data_dir)),
        "sqlite sandbox rows": sandbox_rows(server.data_dir),
        "server VmRSS KiB": rss_kib(server.pid),
    }


def wait_until(predicate, timeout, interval=0.2):
    """Polls `predicate` until it returns a truthy value or `timeout` passes; returns the last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def error_body(response):
    """(code, message) of a JSON error answer; asserts its shape (the x-ms-error-code header too)."""
    assert response.headers.get("Content-Type", "").startswith("application/json"), (
        response.status_code, response.headers, response.text[:500])
    body = response.json()
    assert isinstance(body, dict) and "error" in body, (response.status_code, response.text[:500])
    code, message = body["error"].get("code"), body["error"].get("message")
    assert isinstance(code, str) and code, body
    assert isinstance(message, str) and message, body
    assert response.headers.get("x-ms-error-code") == code, (response.headers, body)
    return code, message


def make_workdir(prefix):
    tmp = tempfile.mkdtemp(prefix=prefix)
    os.chmod(tmp, 0o711)  # sandbox uids must traverse it to reach their bind-mounted data
    return tmp


def in_thread(fn, *args):
    """Runs fn(*args) in a daemon thread; returns (thread, result dict with 'value' or 'error')."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def sandbox_ids_in_db(data_dir):
    path = os.path.join(data_dir, "sandpiper.sqlite")
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        return sorted(row[0] for row in conn.execute("SELECT id FROM sandbox"))
    finally:
        conn.close()


LOG_META = re.compile(r"(?<![\w-])(pid|sandbox|uid|pool|identifier)=([^\s\]]+)")


def log_events(text, message):
    """Metadata dicts of the log lines containing `message` (swift-log: `... k=v k=v [module] message`)."""
    return [dict(LOG_META.findall(line)) for line in text.splitlines() if line.endswith(message)]


def session_sandbox(srv, identifier, timeout=30):
    """(sandbox id, uid) of a session, from its "session allocated" and "sandbox ready" lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = srv.log()
        allocated = [m for m in log_events(text, "session allocated") if m.get("identifier") == identifier]
        if allocated:
            sandbox = allocated[-1]["sandbox"]
            ready = [m for m in log_events(text, "sandbox ready") if m.get("sandbox") == sandbox]
            if ready:
                return sandbox, int(ready[-1]["uid"])
        time.sleep(0.1)
    raise AssertionError("no allocation of %s in the log:\n%s" % (identifier, srv.log_tail()))


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent_pid(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descends_from(pid, ancestor):
    seen = set()
    while pid > 1 and pid not in seen:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = parent_pid(pid)
    return False


def agent_pids(uid):
    """The guest agent process(es) of the sandbox running as `uid` (not bubblewrap, not bash)."""
    return [pid for pid in uid_pids(range(uid, uid + 1))
            if "/opt/sandpiper/agents/" in cmdline(pid) and not cmdline(pid).startswith("/usr/bin/bwrap")]
