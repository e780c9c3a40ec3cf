#!/usr/bin/env python3
"""Sandpiper benchmark: starts the real server and prints a markdown table.

    python3 bench/bench.py [--quick] [--bin PATH] [--json out.json] [--no-jupyter] [--no-tiers]

Measures, against one pool (`bench`, readySessionInstances = --ready):
  1. warm `1+1` over HTTP on one existing session: p50/p90/p99, and throughput with 4
     concurrent sessions for --duration seconds;
  2. new identifier -> first result with a warm pool (sequential, waiting for a full pool
     before each call): p50/p99;
  3. refill rate: allocate --ready identifiers at once, then time the "sandbox ready" log lines
     (the server runs at log level debug; each line is timestamped on arrival here);
  4. memory per idle session: MemAvailable before/after --idle sessions that each ran `x=1`,
     with the pool full on both sides (and the PSS of sandbox-uid processes, for comparison).
Baselines in the same run:
  a. a fresh bubblewrap sandbox per request (`python -c 'print(1+1)'`, and with
     `import numpy, pandas, matplotlib` for what a cold start costs), as an unprivileged uid;
  b. Jupyter Kernel Gateway (a throwaway venv with jupyter_kernel_gateway + ipykernel +
     websocket-client, made on first use at --bench-venv), over its REST + websocket API, and
     jupyter_client's BlockingKernelClient straight over ZMQ. Those kernels are not sandboxed.

Isolation tiers (a second server, pools `ns` = namespaces and `gv` = gvisor, both PythonLTS with
readySessionInstances 0, so every new identifier launches its sandbox on the request path), per
tier, printed as a second table:
  1. sandbox start: new identifier -> first `1+1` result, p50 (and the server-side launch alone,
     from its "starting one on the request path" -> "sandbox ready" log lines);
  2. warm `1+1` on one existing session, p50 / p99;
  3. a syscall-heavy cell, --listdir-iters x os.listdir('/usr/bin'), executionTimeInMilliseconds p50
     (in the warm session), and importing sqlite3, json, csv, email, xml.dom.minidom, http.client in
     each fresh session of 1. (executionTimeInMilliseconds p50; the agent pre-imports numpy, pandas);
  4. memory per idle session: MemAvailable delta over the sessions of 1., and the PSS of each
     sandbox's processes: the launcher's process tree (its pid is on the "sandbox ready" line) plus
     everything in the sandbox's memory cgroup, since gVisor's sentry and gofer run as root.
Without /usr/bin/runsc the gvisor column says "n/a (runsc not installed)".

Stdlib only (http.client keep-alive connections, threading, statistics): runs with any python3.
Needs root, like the server. Cleans up (server SIGTERM, gateway, temp dirs) even on Ctrl-C.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_VERSION = "2024-02-02-preview"
UID_BASE = 238000  # not the default 230000, which other servers on the machine use
SANDBOX_UIDS = range(UID_BASE, UID_BASE + 10000)
DEFAULT_RUNTIME = "/var/lib/sandpiper/runtimes/python"
DEFAULT_BENCH_VENV = "/var/lib/sandpiper/bench-venv"
RUNSC = "/usr/bin/runsc"
TIERS = (("namespaces", "ns"), ("gvisor", "gv"))  # (isolation, pool name) of the tier server
TIER_UID_BASE = UID_BASE + 5000  # the tier server runs after the main one; its own range anyway
LISTDIR_CELL = "import os\nfor _ in range(%d): os.listdir('/usr/bin')"
IMPORT_MODULES = ["sqlite3", "json", "csv", "email", "xml.dom.minidom", "http.client"]
IMPORTS_CELL = "import importlib, sys; [importlib.import_module(m) for m in %r]" % IMPORT_MODULES
# key=value metadata of the server's log lines (swift-log StreamLogHandler: `... : k=v k=v [source] message`)
LOG_META = re.compile(rb"(?<![\w-])(pid|sandbox|uid|pool|identifier)=([^\s\]]+)")


def log(msg):
    print("[bench %6.1fs] %s" % (time.monotonic() - T0, msg), file=sys.stderr, flush=True)


T0 = time.monotonic()


def pct(values, p):
    """The p-th percentile (inclusive method; the max for tiny samples)."""
    values = sorted(values)
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def ms(seconds):
    return seconds * 1000.0


def summary(samples):
    return {
        "n": len(samples),
        "p50_ms": ms(pct(samples, 50)),
        "p90_ms": ms(pct(samples, 90)),
        "p99_ms": ms(pct(samples, 99)),
        "mean_ms": ms(statistics.fmean(samples)) if samples else float("nan"),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def descendants(root):
    """PIDs of every live descendant of `root`."""
    children = {}
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def sandbox_pss_kib(server_pid):
    """Sum of PSS over this server's sandbox processes (shared pages split between sharers);
    other servers' sandboxes on the machine are not counted."""
    total = 0
    for pid in descendants(server_pid):
        try:
            with open("/proc/%d/status" % pid) as f:
                uid = int(next(row for row in f if row.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if uid not in SANDBOX_UIDS:
            continue
        try:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for row in f:
                    if row.startswith("Pss:"):
                        total += int(row.split()[1])
                        break
        except OSError:
            pass
    return total


def process_children():
    """ppid -> [pid] over every live process, from /proc/<pid>/stat (the ppid of a thread's child
    is the thread group's pid; /proc/<pid>/task/*/children needs CONFIG_PROC_CHILDREN, which not
    every kernel has)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    return children


def process_tree(root, children):
    found, stack = [root], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for row in f:
                if row.startswith("Pss:"):
                    return int(row.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def cgroup_mounts():
    """v1 controller -> (mount point, mount root); "" -> the same for the v2 hierarchy."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            left, right = left.split(), right.split()
            if len(left) < 5 or len(right) < 3:
                continue
            if right[0] == "cgroup2":
                mounts.setdefault("", (left[4], left[3]))
            elif right[0] == "cgroup":
                for option in right[2].split(","):
                    mounts.setdefault(option, (left[4], left[3]))
    return mounts


def memory_cgroup(pid, mounts):
    """(directory, usage file) of pid's memory cgroup: the v1 memory controller when mounted,
    else the v2 group; None if unknown."""
    try:
        with open("/proc/%d/cgroup" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if "memory" in fields[1].split(",") and "memory" in mounts:
            v1 = (mounts["memory"], fields[2], "memory.usage_in_bytes")
        elif fields[0] == "0" and not fields[1] and "" in mounts:
            v2 = (mounts[""], fields[2], "memory.current")
    chosen = v1 or v2
    if chosen is None:
        return None
    (mount, root), path, usage = chosen
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return (mount.rstrip("/") + "/" + path.strip("/")).rstrip("/"), usage


def sandbox_footprint(launcher, children, mounts, server_cgroup):
    """PSS (KiB) of one sandbox's processes: the launcher's process tree plus every process of the
    memory cgroups they are in (gVisor's sentry, gofer and ptrace stubs run as root, and runsc
    puts them in a cgroup of its own, /<sandbox id>; a reparented process stays in its cgroup);
    the summed memory usage (bytes) of those cgroups, or None; and the number of processes. The
    server's own cgroup and its ancestors are never counted."""
    pids = set(process_tree(launcher, children))
    groups = {}
    for pid in list(pids):
        group = memory_cgroup(pid, mounts)
        if group is None or server_cgroup is None:
            continue
        if group[0] == server_cgroup[0] or server_cgroup[0].startswith(group[0] + "/"):
            continue
        groups[group[0]] = group[1]
    usage = None
    for directory, usage_file in groups.items():
        try:
            with open(directory + "/cgroup.procs") as f:
                pids.update(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
        if any(other.startswith(directory + "/") for other in groups):
            continue  # hierarchical usage: count the innermost groups only
        try:
            with open(directory + "/" + usage_file) as f:
                usage = (usage or 0) + int(f.read().strip())
        except (OSError, ValueError):
            pass
    return sum(pss_kib(pid) for pid in pids), usage, len(pids)


# -- the server ---------------------------------------------------------------------------------


class Server:
    """`sandpiper serve` on a free loopback port; its log is read line by line and every
    "sandbox ready" / "session allocated" line is timestamped on arrival."""

    def __init__(self, binary, runtime, ready, max_sessions, workdir, pools=None, uid_base=UID_BASE):
        self.workdir = workdir
        self.key = "bench-" + uuid.uuid4().hex
        if pools is None:
            pools = [{"name": "bench", "readySessionInstances": ready, "maxConcurrentSessions": max_sessions,
                      "cooldownPeriodInSeconds": 3600}]
        self.pool = pools[0]["name"]
        self.ready_target = ready
        self.ready_times = []
        self.allocated_times = []
        self.events = []  # (arrival, message, metadata) of ready / allocated / request-path lines
        self.sandbox_pid = {}  # sandbox id -> launcher pid, from "sandbox ready"
        self.session_sandbox = {}  # identifier -> sandbox id, from "session allocated"
        self.cond = threading.Condition()
        self.log_path = os.path.join(workdir, "server.log")
        config = os.path.join(workdir, "config.json")
        with open(config, "w") as f:
            json.dump(
                {"server": {"sandboxUidBase": uid_base}, "pools": pools},
                f,
            )
        port_file = os.path.join(workdir, "port")
        env = dict(os.environ, SANDPIPER_API_KEY=self.key, SANDPIPER_PYTHON_RUNTIME=runtime)
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", os.path.join(workdir, "data"), "--port", "0",
             "--port-file", port_file, "--config", config, "--log-level", "debug",
             "--python-runtime", runtime],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
        )
        self.reader = threading.Thread(target=self._read_log, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 120
        self.port = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sandpiper exited with %s:\n%s" % (self.proc.returncode, self.log_tail()))
            try:
                text = open(port_file).read().strip()
                if text:
                    self.port = int(text)
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        if self.port is None:
            raise RuntimeError("sandpiper did not listen within 120 s:\n" + self.log_tail())

    def _read_log(self):
        with open(self.log_path, "wb") as out:
            for line in self.proc.stderr:
                now = time.monotonic()
                out.write(line)
                out.flush()
                if b"sandbox ready" in line:
                    meta = self._meta(line)
                    with self.cond:
                        self.ready_times.append(now)
                        self.events.append((now, "ready", meta))
                        if "sandbox" in meta and "pid" in meta:
                            self.sandbox_pid[meta["sandbox"]] = int(meta["pid"])
                        self.cond.notify_all()
                elif b"session allocated" in line:
                    meta = self._meta(line)
                    with self.cond:
                        self.allocated_times.append(now)
                        self.events.append((now, "allocated", meta))
                        if "identifier" in meta and "sandbox" in meta:
                            self.session_sandbox[meta["identifier"]] = meta["sandbox"]
                        self.cond.notify_all()
                elif b"starting one on the request path" in line:
                    with self.cond:
                        self.events.append((now, "launch", self._meta(line)))

    @staticmethod
    def _meta(line):
        return {k.decode(): v.decode(errors="replace") for k, v in LOG_META.findall(line)}

    def session_sandbox_pid(self, identifier, timeout=10):
        """(sandbox id, launcher pid) of a session, once both log lines have arrived."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                sandbox = self.session_sandbox.get(identifier)
                if sandbox is not None and sandbox in self.sandbox_pid:
                    return sandbox, self.sandbox_pid[sandbox]
                left = deadline - time.monotonic()
                if left <= 0:
                    return sandbox, None
                self.cond.wait(min(left, 0.5))

    def launch_seconds(self, pool, sandbox):
        """Server-side launch time of a sandbox started on the request path: its pool's last
        "starting one on the request path" line -> its "sandbox ready" line (None if not found)."""
        with self.cond:
            events = list(self.events)
        ready = next((t for t, kind, m in events if kind == "ready" and m.get("sandbox") == sandbox), None)
        if ready is None:
            return None
        starts = [t for t, kind, m in events if kind == "launch" and m.get("pool") == pool and t <= ready]
        return ready - starts[-1] if starts else None

    def log_tail(self, n=4000):
        try:
            return open(self.log_path, errors="replace").read()[-n:]
        except OSError:
            return ""

    def ready_count(self):
        """Ready sandboxes = sandboxes that became ready - sessions allocated (every allocation
        consumes exactly one sandbox, warm or started on the request path)."""
        with self.cond:
            return len(self.ready_times) - len(self.allocated_times)

    def wait_pool_full(self, timeout=120):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.ready_times) - len(self.allocated_times) < self.ready_target:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError("pool not full after %d s:\n%s" % (timeout, self.log_tail()))
                self.cond.wait(min(left, 0.5))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                log("sandpiper did not exit 60 s after SIGTERM; killing it")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(5)


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, server, pool=None):
        self.server = server
        self.pool = pool or server.pool
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        self.headers = {"Authorization": "Bearer " + server.key, "Content-Type": "application/json"}

    def _path(self, op, identifier):
        return "/pools/%s/%s?api-version=%s&identifier=%s" % (self.pool, op, API_VERSION, identifier)

    def request(self, method, path, body=None, headers=None):
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers or self.headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # idle keep-alive closed by the server: reconnect once
                if attempt:
                    raise

    def execute(self, identifier, code):
        body = json.dumps({"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}})
        status, data = self.request("POST", self._path("code/execute", identifier), body.encode())
        if status != 200:
            raise RuntimeError("execute -> %s %s" % (status, data[:300]))
        props = json.loads(data)["properties"]
        if props["status"] != "Success":
            raise RuntimeError("execute failed: %s" % props)
        return props

    def upload(self, identifier, name, payload):
        boundary = uuid.uuid4().hex
        head = ('--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n" % (boundary, name)).encode()
        body = head + payload + ("\r\n--%s--\r\n" % boundary).encode()
        headers = {"Authorization": self.headers["Authorization"],
                   "Content-Type": "multipart/form-data; boundary=" + boundary}
        status, data = self.request("POST", self._path("files/upload", identifier), body, headers)
        if status != 200:
            raise RuntimeError("upload -> %s %s" % (status, data[:300]))

    def download(self, identifier, name):
        status, data = self.request("GET", self._path("files/content/" + name, identifier), None,
                                    {"Authorization": self.headers["Authorization"]})
        if status != 200:
            raise RuntimeError("download -> %s %s" % (status, data[:300]))
        return data

    def close(self):
        self.conn.close()


def new_id(tag):
    return "bench-%s-%s" % (tag, uuid.uuid4().hex)


# -- Sandpiper measurements ---------------------------------------------------------------------


def measure_warm(server, n, duration):
    client = Client(server)
    ident = new_id("warm")
    client.execute(ident, "x = 1")
    server.wait_pool_full()
    time.sleep(1.0)
    for _ in range(20):  # warm-up
        client.execute(ident, "1+1")
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        props = client.execute(ident, "1+1")
        samples.append(time.perf_counter() - t)
        assert props["result"] == 2, props
    client.close()

    # Throughput: 4 sessions, one connection and one thread each, for `duration` seconds.
    idents = [ident] + [new_id("tput") for _ in range(3)]
    clients = [Client(server) for _ in idents]
    for c, i in zip(clients, idents):
        c.execute(i, "x = 1")
    server.wait_pool_full()
    counts = [0] * len(idents)
    errors = []
    start_evt = threading.Event()
    stop_at = [0.0]

    def worker(k):
        start_evt.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                clients[k].execute(idents[k], "1+1")
                counts[k] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(idents))]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    start_evt.set()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError("throughput workers failed: %s" % errors[:3])
    return {"latency": summary(samples), "throughput_rps": sum(counts) / elapsed,
            "throughput_sessions": len(idents), "throughput_seconds": elapsed, "throughput_calls": sum(counts)}


def measure_new_identifier(server, n):
    client = Client(server)
    samples = []
    for _ in range(n):
        server.wait_pool_full()  # a warm pool, and no launch competing for the CPU
        time.sleep(0.2)
        t = time.perf_counter()
        props = client.execute(new_id("new"), "1+1")
        samples.append(time.perf_counter() - t)
        assert props["result"] == 2
    client.close()
    return summary(samples)


def measure_refill(server):
    server.wait_pool_full()
    time.sleep(0.5)
    burst = server.ready_target
    with server.cond:
        before = len(server.ready_times)
    t0 = time.monotonic()
    errors = []

    def allocate():
        c = Client(server)
        try:
            c.execute(new_id("drain"), "1+1")
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=allocate) for _ in range(burst)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    drained = time.monotonic() - t0
    if errors:
        raise RuntimeError("drain failed: %s" % errors[:3])
    server.wait_pool_full(timeout=180)
    with server.cond:
        times = server.ready_times[before:before + burst]
    full = times[-1] - t0
    first = times[0] - t0
    rate = burst / full
    return {"burst": burst, "drain_seconds": drained, "first_ready_seconds": first,
            "full_seconds": full, "sandboxes_per_second": rate}


def measure_memory(server, n):
    server.wait_pool_full()
    time.sleep(1.5)
    before = statistics.fmean(mem_available_kib() for _ in range(3))
    pss_before = sandbox_pss_kib(server.proc.pid)
    client = Client(server)
    for _ in range(n):
        client.execute(new_id("idle"), "x = 1")
    client.close()
    server.wait_pool_full(timeout=240)
    time.sleep(2.0)
    after = statistics.fmean(mem_available_kib() for _ in range(3))
    pss_after = sandbox_pss_kib(server.proc.pid)
    return {"sessions": n, "mem_available_delta_mib": (before - after) / 1024.0,
            "per_session_mib": (before - after) / 1024.0 / n, "pss_per_session_mib": (pss_after - pss_before) / 1024.0 / n}


def measure_files(server, size, rounds):
    client = Client(server)
    ident = new_id("files")
    client.execute(ident, "x = 1")
    payload = os.urandom(size)
    up, down = [], []
    for k in range(rounds):
        t = time.perf_counter()
        client.upload(ident, "blob%d.bin" % k, payload)
        up.append(time.perf_counter() - t)
        t = time.perf_counter()
        data = client.download(ident, "blob%d.bin" % k)
        down.append(time.perf_counter() - t)
        assert data == payload
    client.close()
    mib = size / 1048576.0
    return {"size_bytes": size, "upload_p50_ms": ms(pct(up, 50)), "download_p50_ms": ms(pct(down, 50)),
            "upload_mib_s": mib / pct(up, 50), "download_mib_s": mib / pct(down, 50)}


# -- isolation tiers: namespaces vs gVisor, on a second server ----------------------------------


def gvisor_unavailable_reason():
    if not os.access(RUNSC, os.X_OK):
        return "runsc not installed"
    return None


def settle_mem_available(timeout):
    """Waits (up to `timeout` s) until MemAvailable moves less than 2 MiB in a second (memory freed by
    the sandboxes of the previous server or tier is still coming back at first); returns its mean."""
    deadline = time.monotonic() + timeout
    last = mem_available_kib()
    while True:
        time.sleep(1.0)
        now = mem_available_kib()
        if abs(now - last) < 2048 or time.monotonic() > deadline:
            return statistics.fmean([now] + [mem_available_kib() for _ in range(2)])
        last = now


def measure_tier(server, pool, args):
    """Every isolation-tier number for one pool (readySessionInstances 0). Order: warm session,
    then new identifiers (start time and, kept idle, memory; then the imports cell in each), then
    the syscall-heavy cell in the warm session."""
    out = {}
    client = Client(server, pool)

    # 2. warm `1+1` on one existing session.
    warm_id = new_id(pool + "-warm")
    client.execute(warm_id, "x = 1")
    for _ in range(20):
        client.execute(warm_id, "1+1")
    samples = []
    for _ in range(args.n):
        t = time.perf_counter()
        props = client.execute(warm_id, "1+1")
        samples.append(time.perf_counter() - t)
        assert props["result"] == 2, props
    out["warm"] = summary(samples)

    # 1. + 4. new identifiers, each launching its sandbox on the request path; they stay idle.
    mem_before = settle_mem_available(5 if args.quick else 15)
    starts, idents = [], []
    for _ in range(args.tier_n):
        time.sleep(0.3)
        ident = new_id(pool + "-start")
        t = time.perf_counter()
        props = client.execute(ident, "1+1")
        starts.append(time.perf_counter() - t)
        assert props["result"] == 2, props
        idents.append(ident)
    mem_after = settle_mem_available(5 if args.quick else 10)
    out["start"] = summary(starts)
    launches, pss, usage, nprocs, missing = [], [], [], [], 0
    children, mounts = process_children(), cgroup_mounts()
    server_cgroup = memory_cgroup(server.proc.pid, mounts)
    for ident in idents:
        sandbox, pid = server.session_sandbox_pid(ident)
        if pid is None:
            missing += 1
            continue
        launch = server.launch_seconds(pool, sandbox)
        if launch is not None:
            launches.append(launch)
        kib, used, count = sandbox_footprint(pid, children, mounts, server_cgroup)
        pss.append(kib)
        nprocs.append(count)
        if used is not None:
            usage.append(used)
    out["launch"] = summary(launches) if launches else None
    out["memory"] = {
        "sessions": len(idents),
        "per_session_mib": (mem_before - mem_after) / 1024.0 / len(idents),
        "pss_per_session_mib": statistics.fmean(pss) / 1024.0 if pss else None,
        "cgroup_usage_per_session_mib": statistics.fmean(usage) / 1048576.0 if usage else None,
        "processes_per_session": statistics.fmean(nprocs) if nprocs else None,
        "sessions_without_pid": missing,
    }

    # 3a. the syscall-heavy cell, in the warm session; stops early past --listdir-budget seconds.
    cell = LISTDIR_CELL % args.listdir_iters
    exec_ms, walls = [], []
    budget_end = time.monotonic() + args.listdir_budget
    for _ in range(args.listdir_n):
        t = time.perf_counter()
        props = client.execute(warm_id, cell)
        walls.append(time.perf_counter() - t)
        exec_ms.append(float(props["executionTimeInMilliseconds"]))
        if time.monotonic() > budget_end:
            break
    out["listdir"] = {"iterations": args.listdir_iters, "n": len(exec_ms), "exec_p50_ms": pct(exec_ms, 50),
                      "exec_ms": exec_ms, "wall_p50_ms": ms(pct(walls, 50))}

    # 3b. stdlib imports in fresh sessions: those of the start row, which ran `1+1` only (so
    # IPython's first-cell work is not in it).
    imports = []
    for ident in idents:
        props = client.execute(ident, IMPORTS_CELL)
        imports.append(float(props["executionTimeInMilliseconds"]))
    out["imports"] = {"n": len(imports), "exec_p50_ms": pct(imports, 50), "exec_ms": imports}
    client.close()
    return out


LANGUAGES = [("python", "PythonLTS", "1+1"), ("node", "NodeLTS", "1+1"), ("shell", "Shell", "echo 2")]


def measure_languages(binary, runtime, n, workdir):
    """Warm execution and new-identifier latency on one pool of each type, same server."""
    pools = [{"name": name, "type": kind, "readySessionInstances": 2, "maxConcurrentSessions": 20,
              "cooldownPeriodInSeconds": 3600} for name, kind, _ in LANGUAGES]
    sub = os.path.join(workdir, "languages")
    os.makedirs(sub, exist_ok=True)
    server = Server(binary, runtime, 2, 20, sub, pools=pools, uid_base=UID_BASE + 20000)
    results = {}
    try:
        server.wait_pool_full()
        time.sleep(2)  # let every pool finish its initial fill
        for name, _, code in LANGUAGES:
            client = Client(server, name)
            body = json.dumps({"properties": {"code": code}}).encode()
            first = []
            for _ in range(5):
                ident = new_id(name)
                t0 = time.perf_counter()
                status, data = client.request("POST", client._path("code/execute", ident), body)
                first.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError("%s -> %s %s" % (name, status, data[:200]))
                time.sleep(1.5)  # refill
            ident = new_id(name)
            client.request("POST", client._path("code/execute", ident), body)
            warm = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, data = client.request("POST", client._path("code/execute", ident), body)
                warm.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError("%s -> %s %s" % (name, status, data[:200]))
            results[name] = {"warm": summary(warm), "new_identifier": summary(first)}
            client.close()
    finally:
        server.stop()
    return results


def language_table(results):
    rows = ["| pool | warm execution p50 / p99 | new identifier → first result p50 (warm pool) |", "| --- | --- | --- |"]
    for name, kind, code in LANGUAGES:
        r = results.get(name)
        if not r:
            continue
        rows.append("| %s (`%s`) | %.1f / %.1f ms | %.1f ms |" % (
            kind, code, r["warm"]["p50_ms"], r["warm"]["p99_ms"], r["new_identifier"]["p50_ms"]))
    return "\n".join(rows)


def measure_tiers(binary, runtime, args, workdir):
    """Starts a second server with one pool per tier and measures each; returns
    {isolation: results or {"error": why}}."""
    results = {}
    tiers = list(TIERS)
    reason = gvisor_unavailable_reason()
    if reason:
        results["gvisor"] = {"error": reason}
        tiers = [t for t in tiers if t[0] != "gvisor"]
    max_sessions = 1 + args.tier_n + 4

    def pools(chosen):
        return [{"name": name, "type": "PythonLTS", "isolation": isolation, "readySessionInstances": 0,
                 "maxConcurrentSessions": max_sessions, "cooldownPeriodInSeconds": 3600}
                for isolation, name in chosen]

    tier_dir = os.path.join(workdir, "tiers")
    os.mkdir(tier_dir)
    os.chmod(tier_dir, 0o711)
    try:
        server = Server(binary, runtime, 0, max_sessions, tier_dir, pools(tiers), uid_base=TIER_UID_BASE)
    except RuntimeError as e:
        if len(tiers) < 2:
            raise
        # The server refuses pools it cannot run: retry without gVisor and say why.
        said = [line for line in str(e).splitlines() if "gvisor" in line.lower()]
        results["gvisor"] = {"error": "server refused the gvisor pool: %s" % (said[-1] if said else str(e)[-200:])}
        tiers = [t for t in tiers if t[0] != "gvisor"]
        tier_dir = os.path.join(workdir, "tiers-ns")
        os.mkdir(tier_dir)
        os.chmod(tier_dir, 0o711)
        server = Server(binary, runtime, 0, max_sessions, tier_dir, pools(tiers), uid_base=TIER_UID_BASE)
    try:
        for isolation, name in tiers:
            log("tiers: %s (pool %s)" % (isolation, name))
            t = time.monotonic()
            try:
                results[isolation] = measure_tier(server, name, args)
                results[isolation]["seconds"] = time.monotonic() - t
            except Exception as e:  # noqa: BLE001 - one tier failing still reports the other
                log("tier %s failed: %r" % (isolation, e))
                results[isolation] = {"error": "%s: %s" % (type(e).__name__, str(e)[:200])}
    finally:
        server.stop()
    return results


# -- baseline a: a fresh bubblewrap sandbox per request -------------------------------------------


def bwrap_command(runtime, code):
    return [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "bwrap", "--unshare-all", "--die-with-parent",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--ro-bind", runtime, runtime,
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--setenv", "HOME", "/tmp", "--setenv", "MPLBACKEND", "Agg", "--setenv", "MPLCONFIGDIR", "/tmp/mpl",
        runtime + "/bin/python", "-c", code,
    ]


def measure_bwrap(runtime, code, n, expect):
    cmd = bwrap_command(runtime, code)
    for tool in ("setpriv", "bwrap"):
        if not shutil.which(tool):
            return {"error": "%s not found" % tool}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if first.returncode != 0 or first.stdout.strip() != expect:
        return {"error": "bwrap run failed (rc %s): %s" % (first.returncode, (first.stderr or first.stdout)[-300:])}
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        samples.append(time.perf_counter() - t)
        assert out.stdout.strip() == expect, out
    return summary(samples)


# -- baseline b: Jupyter Kernel Gateway / jupyter_client ------------------------------------------

JUPYTER_HELPER = r'''
import json, sys, time, uuid, statistics
mode, n = sys.argv[1], int(sys.argv[2])

def run_jkg(port, token, n, cold):
    import urllib.request
    import websocket
    base = "http://127.0.0.1:%d" % port
    hdrs = {"Authorization": "token " + token, "Content-Type": "application/json"}

    def start_kernel():
        req = urllib.request.Request(base + "/api/kernels", data=b'{"name":"python3"}', headers=hdrs, method="POST")
        return json.load(urllib.request.urlopen(req, timeout=120))["id"]

    def delete_kernel(kid):
        req = urllib.request.Request(base + "/api/kernels/" + kid, headers=hdrs, method="DELETE")
        urllib.request.urlopen(req, timeout=60).read()

    def connect(kid):
        return websocket.create_connection(
            "ws://127.0.0.1:%d/api/kernels/%s/channels" % (port, kid), header=["Authorization: token " + token], timeout=120)

    session = uuid.uuid4().hex

    def execute(ws, code):
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "bench", "session": session, "msg_type": "execute_request",
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        result, replied, idle = None, False, False
        while not (replied and idle):
            m = json.loads(ws.recv())
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            t = m["header"]["msg_type"]
            if t == "execute_result":
                result = m["content"]["data"]["text/plain"]
            elif t == "execute_reply":
                replied = True
                if m["content"]["status"] != "ok":
                    raise RuntimeError(m["content"])
            elif t == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        return result

    out = {}
    colds = []
    for _ in range(cold):
        t = time.perf_counter()
        kid = start_kernel()
        ws = connect(kid)
        assert execute(ws, "1+1") == "2"
        colds.append(time.perf_counter() - t)
        ws.close()
        delete_kernel(kid)
    out["cold"] = colds
    kid = start_kernel()
    ws = connect(kid)
    for _ in range(10):
        execute(ws, "1+1")
    warm = []
    for _ in range(n):
        t = time.perf_counter()
        assert execute(ws, "1+1") == "2"
        warm.append(time.perf_counter() - t)
    ws.close()
    delete_kernel(kid)
    out["warm"] = warm
    return out

def run_client(n):
    from jupyter_client.manager import start_new_kernel
    t = time.perf_counter()
    km, kc = start_new_kernel(kernel_name="python3")
    startup = time.perf_counter() - t
    try:
        def execute(code):
            got = {}
            def hook(msg):
                if msg["header"]["msg_type"] == "execute_result":
                    got["r"] = msg["content"]["data"]["text/plain"]
            reply = kc.execute_interactive(code, timeout=60, output_hook=hook)
            assert reply["content"]["status"] == "ok"
            return got.get("r")
        for _ in range(10):
            execute("1+1")
        warm = []
        for _ in range(n):
            t = time.perf_counter()
            assert execute("1+1") == "2"
            warm.append(time.perf_counter() - t)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {"warm": warm, "startup": startup}

if mode == "jkg":
    print(json.dumps(run_jkg(int(sys.argv[3]), sys.argv[4], n, int(sys.argv[5]))))
else:
    print(json.dumps(run_client(n)))
'''


def ensure_bench_venv(path):
    """The throwaway venv with the gateway; made with pip on first use. Returns (python, reason)."""
    python = os.path.join(path, "bin", "python")
    gateway = os.path.join(path, "bin", "jupyter-kernelgateway")
    if os.path.exists(gateway):
        return python, None
    log("creating %s with jupyter_kernel_gateway, ipykernel, websocket-client (first run only)" % path)
    try:
        subprocess.run([sys.executable, "-m", "venv", path], check=True, capture_output=True, timeout=300)
        subprocess.run([python, "-m", "pip", "install", "-q", "jupyter_kernel_gateway", "ipykernel", "websocket-client"],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", b"") or b""
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        shutil.rmtree(path, ignore_errors=True)
        return None, "could not install jupyter_kernel_gateway: %s %s" % (type(e).__name__, detail.strip()[-200:])
    return python, None


def measure_jupyter(venv, n, cold, workdir, procs):
    python, reason = ensure_bench_venv(venv)
    if python is None:
        return {"error": reason}
    helper = os.path.join(workdir, "jupyter_helper.py")
    with open(helper, "w") as f:
        f.write(JUPYTER_HELPER)
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=os.path.join(workdir, "jupyter-runtime"),
               JUPYTER_DATA_DIR=os.path.join(workdir, "jupyter-data"), IPYTHONDIR=os.path.join(workdir, "ipython"),
               JUPYTER_PLATFORM_DIRS="1")
    env.pop("PYTHONPATH", None)
    out = {}
    port, token = free_port(), uuid.uuid4().hex
    gw_log = open(os.path.join(workdir, "gateway.log"), "wb")
    gw = subprocess.Popen(
        [os.path.join(venv, "bin", "jupyter-kernelgateway"), "--KernelGatewayApp.ip=127.0.0.1",
         "--KernelGatewayApp.port=%d" % port, "--KernelGatewayApp.auth_token=" + token],
        stdin=subprocess.DEVNULL, stdout=gw_log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        start_new_session=True,
    )
    procs.append(gw)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if gw.poll() is not None or time.monotonic() > deadline:
                    gw_log.flush()
                    tail = open(gw_log.name, errors="replace").read()[-300:]
                    return {"error": "kernel gateway did not start: " + tail}
                time.sleep(0.1)
        res = subprocess.run([python, helper, "jkg", str(n), str(port), token, str(cold)],
                             capture_output=True, text=True, timeout=300, env=env, cwd=workdir)
        if res.returncode != 0:
            out["jkg_error"] = "gateway client failed: " + res.stderr.strip()[-300:]
        else:
            data = json.loads(res.stdout)
            out["jkg_warm"] = summary(data["warm"])
            out["jkg_cold"] = summary(data["cold"])
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)
            gw.wait()
        gw_log.close()
    res = subprocess.run([python, helper, "client", str(n)], capture_output=True, text=True, timeout=300,
                         env=env, cwd=workdir)
    if res.returncode != 0:
        out["client_error"] = "jupyter_client failed: " + res.stderr.strip()[-300:]
    else:
        data = json.loads(res.stdout)
        out["client_warm"] = summary(data["warm"])
        out["client_startup_ms"] = ms(data["startup"])
    return out


# -- the table ----------------------------------------------------------------------------------


def fmt(s, keys=("p50_ms", "p90_ms", "p99_ms")):
    if not s or "error" in s:
        return "n/a"
    return " / ".join("%.1f" % s[k] for k in keys) + " ms"


def table(r, args):
    rows = []
    w, j = r.get("warm"), r.get("jupyter", {})
    b1, b2 = r.get("bwrap_plain", {}), r.get("bwrap_imports", {})

    def jup(key, keys=("p50_ms", "p99_ms")):
        if "error" in j:
            return "n/a (%s)" % j["error"]
        return fmt(j.get(key), keys) if key in j else "n/a (%s)" % j.get(key.split("_")[0] + "_error", "not run")

    bw = lambda s: ("n/a (%s)" % s["error"]) if "error" in s else fmt(s, ("p50_ms", "p99_ms"))  # noqa: E731
    rows.append(("warm `1+1`, one session, p50 / p90 / p99", fmt(w["latency"]),
                 "bwrap+python per request (p50 / p99): %s; Jupyter Kernel Gateway ws: %s; jupyter_client ZMQ: %s"
                 % (bw(b1), jup("jkg_warm"), jup("client_warm")),
                 "HTTP keep-alive, n=%d" % w["latency"]["n"]))
    rows.append(("throughput, %d sessions in parallel" % w["throughput_sessions"], "%.0f req/s" % w["throughput_rps"],
                 "bwrap+python per request, serial: %s"
                 % ("%.0f req/s" % (1000.0 / b1["p50_ms"]) if "p50_ms" in b1 else "n/a"),
                 "%d calls in %.1f s, %d cores" % (w["throughput_calls"], w["throughput_seconds"], os.cpu_count())))
    n = r["new_identifier"]
    rows.append(("new identifier -> first result, warm pool, p50 / p99", fmt(n, ("p50_ms", "p99_ms")),
                 "cold bwrap + `import numpy, pandas, matplotlib`: %s; new JKG kernel -> first result: %s"
                 % (bw(b2), jup("jkg_cold")),
                 "n=%d, sequential, pool full before each" % n["n"]))
    f = r["refill"]
    rows.append(("refill rate after draining %d ready" % f["burst"], "%.2f sandboxes/s" % f["sandboxes_per_second"],
                 "jupyter_client kernel start: %s" % ("%.0f ms" % j["client_startup_ms"] if "client_startup_ms" in j else "n/a"),
                 "first back after %.1f s, all %d after %.1f s (server refills 2 at a time)"
                 % (f["first_ready_seconds"], f["burst"], f["full_seconds"])))
    m = r["memory"]
    rows.append(("memory per idle session", "%.0f MiB" % m["per_session_mib"], "-",
                 "MemAvailable delta / %d sessions (x=1 each); PSS of sandbox processes: %.0f MiB/session"
                 % (m["sessions"], m["pss_per_session_mib"])))
    fl = r.get("files")
    if fl:
        rows.append(("upload / download %.0f MiB file, p50" % (fl["size_bytes"] / 1048576.0),
                     "%.0f / %.0f ms" % (fl["upload_p50_ms"], fl["download_p50_ms"]), "-",
                     "%.0f / %.0f MiB/s" % (fl["upload_mib_s"], fl["download_mib_s"])))
    lines = ["| metric | Sandpiper | baseline | notes |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def tier_table(t, args):
    order = [iso for iso, _ in TIERS]

    def cells(render):
        out = []
        for iso in order:
            r = t.get(iso, {"error": "not run"})
            if "error" in r:
                out.append("n/a (%s)" % r["error"])
                continue
            try:
                out.append(render(r))
            except (KeyError, TypeError):
                out.append("n/a")
        return out

    def each(render):
        """`ns / gv` of a number for the notes, where both exist."""
        vals = []
        for iso in order:
            r = t.get(iso, {})
            try:
                vals.append(render(r) if "error" not in r else "n/a")
            except (KeyError, TypeError):
                vals.append("n/a")
        return " / ".join(vals)

    mib = lambda v: "n/a" if v is None else "%.0f MiB" % v  # noqa: E731
    msf = lambda v: "n/a" if v is None else "%.0f ms" % v  # noqa: E731
    ok = [t[iso] for iso in order if iso in t and "error" not in t[iso]]
    tier_n = ok[0]["start"]["n"] if ok else args.tier_n
    rows = [
        ("sandbox start: new identifier -> first `1+1`, 0 ready, p50",
         *cells(lambda r: "%.0f ms" % r["start"]["p50_ms"]),
         "n=%d sequential (launch on the request path); server-side launch alone, p50 (ns / gv): %s"
         % (tier_n, each(lambda r: msf(r["launch"]["p50_ms"] if r["launch"] else None)))),
        ("warm `1+1`, one session, p50 / p99", *cells(lambda r: fmt(r["warm"], ("p50_ms", "p99_ms"))),
         "HTTP keep-alive, n=%d" % args.n),
        ("%d x os.listdir('/usr/bin'), executionTime p50" % args.listdir_iters,
         *cells(lambda r: "%.0f ms" % r["listdir"]["exec_p50_ms"]),
         "%d entries; n (ns / gv): %s; per listdir: %s; in the warm session"
         % (len(os.listdir("/usr/bin")), each(lambda r: "%d" % r["listdir"]["n"]),
            each(lambda r: "%.0f us" % (1000.0 * r["listdir"]["exec_p50_ms"] / r["listdir"]["iterations"])))),
        ("import sqlite3, json, csv, email, xml.dom.minidom, http.client, fresh session, executionTime p50",
         *cells(lambda r: "%.0f ms" % r["imports"]["exec_p50_ms"]),
         "the sessions of the start row (after their `1+1`); the agent pre-imports numpy and pandas (so json, csv already are)"),
        ("memory per idle session, MemAvailable delta", *cells(lambda r: mib(r["memory"]["per_session_mib"])),
         "over the %d sessions of the start row (`1+1` each); file pages already cached (python, numpy) are not "
         "in it, while PSS splits them between sharers" % tier_n),
        ("memory per idle session, PSS of its processes", *cells(lambda r: mib(r["memory"]["pss_per_session_mib"])),
         "launcher tree + the memory cgroups it is in; processes (ns / gv): %s; cgroup memory usage (ns / gv): %s"
         % (each(lambda r: "%.0f" % r["memory"]["processes_per_session"]),
            each(lambda r: mib(r["memory"]["cgroup_usage_per_session_mib"])))),
    ]
    lines = ["| metric | namespaces | gvisor | notes |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def pick_binary(arg):
    if arg:
        return arg
    env = os.environ.get("SANDPIPER_BIN")
    if env and os.path.exists(env):
        return env
    for kind in ("release", "debug"):
        path = os.path.join(REPO, ".build", kind, "sandpiper")
        if os.path.exists(path):
            return path
    sys.exit("no sandpiper binary: build it (make build) or pass --bin")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="sandpiper binary (default: $SANDPIPER_BIN, else .build/release, else .build/debug)")
    ap.add_argument("--runtime", default=os.environ.get("SANDPIPER_PYTHON_RUNTIME", DEFAULT_RUNTIME))
    ap.add_argument("--quick", action="store_true", help="small N everywhere: checks that it runs")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("-n", type=int, help="warm 1+1 calls (default 200)")
    ap.add_argument("--duration", type=float, help="throughput seconds (default 5)")
    ap.add_argument("--new", type=int, help="new-identifier samples (default 20)")
    ap.add_argument("--ready", type=int, help="readySessionInstances of the bench pool (default 4)")
    ap.add_argument("--idle", type=int, help="idle sessions for the memory measurement (default 10)")
    ap.add_argument("--bwrap-n", type=int, help="bubblewrap baseline runs (default 30; 5 with imports)")
    ap.add_argument("--no-jupyter", action="store_true", help="skip the Jupyter baselines")
    ap.add_argument("--bench-venv", default=DEFAULT_BENCH_VENV, help="venv for the Jupyter baselines")
    ap.add_argument("--no-tiers", action="store_true", help="skip the isolation-tier comparison (namespaces vs gvisor)")
    ap.add_argument("--tier-n", type=int, help="new identifiers (start time, idle memory) per tier (default 5)")
    ap.add_argument("--listdir-iters", type=int, help="os.listdir calls in the syscall-heavy cell (default 1000: under "
                    "gVisor/ptrace one listdir of /usr/bin costs ~5 ms, so 5 runs of 10000 would take ~4 min)")
    ap.add_argument("--listdir-n", type=int, help="runs of the syscall-heavy cell per tier (default 5)")
    ap.add_argument("--listdir-budget", type=float, help="stop those runs after this many seconds per tier (default 30)")
    args = ap.parse_args()
    q = args.quick
    args.n = args.n or (20 if q else 200)
    args.duration = args.duration or (1.0 if q else 5.0)
    args.new = args.new or (3 if q else 20)
    args.ready = args.ready or (2 if q else 4)
    args.idle = args.idle or (3 if q else 10)
    args.bwrap_n = args.bwrap_n or (5 if q else 30)
    args.tier_n = args.tier_n or (2 if q else 5)
    args.listdir_iters = args.listdir_iters or (300 if q else 1000)
    args.listdir_n = args.listdir_n or (2 if q else 5)
    args.listdir_budget = args.listdir_budget or (10.0 if q else 30.0)
    if os.geteuid() != 0:
        sys.exit("bench.py runs the server, which needs root")
    binary = pick_binary(args.bin)
    if not os.path.exists(os.path.join(args.runtime, "bin", "python")):
        sys.exit("no Python runtime at %s (make setup, or --runtime)" % args.runtime)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    workdir = tempfile.mkdtemp(prefix="sandpiper-bench-")
    os.chmod(workdir, 0o711)  # the sandbox uids traverse it to reach their data mounts
    server, procs, results = None, [], {}
    results["config"] = {"binary": binary, "runtime": args.runtime, "cpus": os.cpu_count(), "quick": q,
                         "ready": args.ready}
    ok = False
    try:
        log("binary %s" % binary)
        max_sessions = 1 + 3 + args.new + args.ready + args.idle + 1 + 4
        server = Server(binary, args.runtime, args.ready, max_sessions, workdir)
        log("listening on %d; waiting for %d ready sandboxes" % (server.port, args.ready))
        t = time.monotonic()
        server.wait_pool_full()
        results["initial_fill_seconds"] = time.monotonic() - t
        log("1/4 warm 1+1 (n=%d) and throughput (%.0f s)" % (args.n, args.duration))
        results["warm"] = measure_warm(server, args.n, args.duration)
        log("2/4 new identifier (n=%d)" % args.new)
        results["new_identifier"] = measure_new_identifier(server, args.new)
        log("3/4 refill after draining %d" % args.ready)
        results["refill"] = measure_refill(server)
        log("4/4 memory per idle session (n=%d)" % args.idle)
        results["memory"] = measure_memory(server, args.idle)
        log("file transfer")
        results["files"] = measure_files(server, (1 if q else 5) * 1048576, 2 if q else 3)
        server.stop()
        server = None
        if args.no_tiers:
            results["tiers"] = None
        else:
            log("isolation tiers: namespaces vs gvisor, on a second server")
            try:
                results["tiers"] = measure_tiers(binary, args.runtime, args, workdir)
            except Exception as e:  # noqa: BLE001 - keep the rest of the run
                log("isolation tiers failed: %r" % (e,))
                why = "%s: %s" % (type(e).__name__, str(e)[:200])
                results["tiers"] = {iso: {"error": why} for iso, _ in TIERS}
        log("languages: warm execution on Python, Node and Shell pools")
        try:
            results["languages"] = measure_languages(binary, args.runtime, 30 if q else 200, workdir)
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            log("languages failed: %r" % (e,))
            results["languages"] = {"error": "%s: %s" % (type(e).__name__, str(e)[:200])}
        log("baseline: bwrap per request")
        results["bwrap_plain"] = measure_bwrap(args.runtime, "print(1+1)", args.bwrap_n, "2")
        results["bwrap_imports"] = measure_bwrap(
            args.runtime, "import numpy, pandas, matplotlib; print(1+1)", max(3, args.bwrap_n // 6), "2")
        if args.no_jupyter:
            results["jupyter"] = {"error": "skipped (--no-jupyter)"}
        else:
            log("baseline: Jupyter Kernel Gateway and jupyter_client")
            results["jupyter"] = measure_jupyter(args.bench_venv, args.n, 2 if q else 3, workdir, procs)
        ok = True
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
    finally:
        if server is not None:
            server.stop()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(20)
        leftover = [line for line in open("/proc/self/mountinfo") if workdir in line]
        if leftover:
            log("mounts left under %s (not removing it): %s" % (workdir, leftover))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        sys.exit(130)
    results["wall_seconds"] = time.monotonic() - T0
    print(table(results, args))
    if results.get("languages") and "error" not in results["languages"]:
        print("\nlanguages (namespaces tier)\n")
        print(language_table(results["languages"]))
    if results.get("tiers"):
        print("\nisolation tiers\n")
        print(tier_table(results["tiers"], args))
    print("\n(%s; %d cores; wall time %.0f s)" % (os.path.relpath(binary, REPO) if binary.startswith(REPO) else binary,
                                                   os.cpu_count(), results["wall_seconds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
