#!/usr/bin/env python3
"""Sandpiper benchmark: starts the real server and prints a markdown table.

    python3 bench/bench.py [--quick] [--bin PATH] [--json out.json] [--no-jupyter] [--no-tiers]
                           [--no-fork] [--capacity N] (more: --help)

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

Warm fork vs exec (issue 7's targets; skip with --no-fork), printed as its own table beside the
Jupyter baselines. Servers one after the other, each with one PythonLTS pool (uids from --uid-base,
moved past ranges other servers hold):
  fork (launch fork, readySessionInstances --fork-ready, maxConcurrentSessions --capacity + 20):
  1. refill: drain the pool (--drain-threads clients) and time the "sandbox ready" lines until it
     is full again: sessions made ready per second (target >= 100/s);
  2. new identifier -> first `1+1`, pool full before each: p50/p99 (target p50 <= 5 ms);
  4. --fork-idle sessions that ran `import pandas`: USS (Private_Clean + Private_Dirty) and PSS of
     each session's processes (by its sandbox uid, from the "sandbox ready" line), MemAvailable
     delta (target USS <= 10 MB); then more such sessions up to --capacity while MemAvailable is
     sampled (stops under --capacity-floor-mib, on a failed call or after --capacity-budget s);
  5. warm `1+1` on one session: p50/p99 (target p50 <= 2 ms);
  6. new identifier -> a cell that builds a DataFrame and returns a plot (PNG): p50/p99;
  fork burst (launch fork, readySessionInstances --burst-ready):
  3. --burst new identifiers at once from --burst-threads clients: errors, p50/p99 (target: all
     served, p99 <= 1 s);
  exec (launch exec, readySessionInstances --exec-ready; skip with --no-exec): 1-6 with smaller
     counts (--exec-n, --exec-idle, --exec-burst; no capacity run: extrapolated from its memory).
Baselines beside them: jupyter_client kernel start (refill), a new JKG kernel -> first result and
-> the plot cell, the jupyter_client kernel's USS after `import pandas`, JKG/ZMQ warm `1+1`.
The load average is printed with the results (other jobs on the machine skew every figure).

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
UID_WIDTH = 10000  # every server claims this many uids from its base (UIDRangeLock.width)
FORK_UID_BASE = 240000  # the launch-mode servers (fork, then exec), one after the other
DEFAULT_RUNTIME = "/var/lib/sandpiper/runtimes/python"
DEFAULT_BENCH_VENV = "/var/lib/sandpiper/bench-venv"
RUNSC = "/usr/bin/runsc"
TIERS = (("namespaces", "ns"), ("gvisor", "gv"))  # (isolation, pool name) of the tier server
TIER_UID_BASE = UID_BASE + 5000  # the tier server runs after the main one; its own range anyway
LISTDIR_CELL = "import os\nfor _ in range(%d): os.listdir('/usr/bin')"
IMPORT_MODULES = ["sqlite3", "json", "csv", "email", "xml.dom.minidom", "http.client"]
IMPORTS_CELL = "import importlib, sys; [importlib.import_module(m) for m in %r]" % IMPORT_MODULES
# key=value metadata of the server's log lines (swift-log StreamLogHandler: `... : k=v k=v [source] message`)
LOG_META = re.compile(rb"(?<![\w-])(pid|sandbox|uid|pool|identifier|forked|count)=([^\s\]]+)")
# The cell of the "time to first result" row: a DataFrame and a plot (answers a PNG image).
PLOT_CELL = ("import pandas as pd, matplotlib.pyplot as plt\n"
             "df = pd.DataFrame({'x': range(100), 'y': [i*i for i in range(100)]})\n"
             "df.plot(x='x', y='y')\n"
             "plt.show()")


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


def sandbox_pss_kib(server_pid, uids):
    """Sum of PSS over this server's sandbox processes (shared pages split between sharers);
    other servers' sandboxes on the machine are not counted."""
    total = 0
    for pid in descendants(server_pid):
        try:
            with open("/proc/%d/status" % pid) as f:
                uid = int(next(row for row in f if row.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if uid not in uids:
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


def held_uid_bases():
    """Bases of the uid ranges other Sandpiper servers hold now: the /run/sandpiper/uids-<base>.lock
    files with an flock on them (from /proc/locks; nothing is locked or unlocked here)."""
    directory = "/run/sandpiper"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    held_inodes = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK":
                    held_inodes.add(int(fields[5].rsplit(":", 1)[1]))
    except (OSError, ValueError, IndexError):
        return []
    bases = []
    for name in names:
        m = re.fullmatch(r"uids-(\d+)\.lock", name)
        if not m:
            continue
        try:
            if os.stat(os.path.join(directory, name)).st_ino in held_inodes:
                bases.append(int(m.group(1)))
        except OSError:
            pass
    return bases


def pick_uid_base(preferred):
    """`preferred`, or the next base (in steps of 1000) whose 10,000 uids overlap no range another
    server holds: the server's lock guards its exact base only, so an overlapping range would hand
    the same uids to two servers' sandboxes."""
    held = held_uid_bases()
    base, first = preferred, None
    for _ in range(400):
        clash = [b for b in held if b < base + UID_WIDTH and base < b + UID_WIDTH]
        if not clash:
            if base != preferred:
                log("uids %d-%d overlap a running server's (base %s); using %d" % (
                    preferred, preferred + UID_WIDTH - 1, first, base))
            return base
        first = first if first is not None else min(clash)
        base = max(clash) + UID_WIDTH
    return preferred


def memory_by_uid(uids):
    """uid -> {"uss", "pss", "rss" (KiB), "procs"} over every live process of those uids, from
    /proc/<pid>/smaps_rollup. USS = Private_Clean + Private_Dirty (pages no other process maps)."""
    uids = set(uids)
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/status" % name) as f:
                uid = int(next(row for row in f if row.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if uid not in uids:
            continue
        fields = {}
        try:
            with open("/proc/%s/smaps_rollup" % name) as f:
                for row in f:
                    parts = row.split()
                    if len(parts) >= 2 and parts[0].endswith(":"):
                        try:
                            fields[parts[0][:-1]] = int(parts[1])
                        except ValueError:
                            pass
        except OSError:
            continue
        m = out.setdefault(uid, {"uss": 0, "pss": 0, "rss": 0, "procs": 0})
        m["uss"] += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        m["pss"] += fields.get("Pss", 0)
        m["rss"] += fields.get("Rss", 0)
        m["procs"] += 1
    return out


def proc_stat_cpu():
    """The machine's CPU times so far (/proc/stat's first line, in clock ticks): user, nice,
    system, idle, iowait, irq, softirq, steal, ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def machine_cpu_ms():
    """(busy, steal) CPU time of the whole machine so far, in ms: busy is user, nice, system, irq
    and softirq; steal is time the hypervisor gave this VM's CPUs to others."""
    v = proc_stat_cpu()
    tick = 1000.0 / os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2] + v[5] + v[6]) * tick, v[7] * tick


def wait_cpu_idle(threshold=0.15, window=0.3, timeout=30.0):
    """Waits until the machine's CPUs are busy less than `threshold` over `window` seconds
    (background work of the server, e.g. a forked pool prewarming its ready sessions, is done),
    at most `timeout`. Returns the busy fraction last seen."""
    def sample():
        v = proc_stat_cpu()
        return sum(v) - v[3] - v[4], sum(v)
    deadline = time.monotonic() + timeout
    busy = 1.0
    while time.monotonic() < deadline:
        a = sample()
        time.sleep(window)
        b = sample()
        busy = (b[0] - a[0]) / max(1, b[1] - a[1])
        if busy < threshold:
            break
    return busy


def loadavg():
    return tuple(round(x, 2) for x in os.getloadavg())


def fmt_load(load):
    """A load average triple as `1.0/2.0/3.0` (1, 5, 15 minutes)."""
    return "/".join("%.1f" % x for x in load) if load else "?"


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
        uid_base = pick_uid_base(uid_base)
        self.uid_base = uid_base
        self.uids = range(uid_base, uid_base + UID_WIDTH)
        self.ready_target = ready
        self.sandbox_uid = {}  # sandbox id -> host uid, from "sandbox ready"
        self.forked = 0  # "sandbox ready" lines with forked=true
        self.ready_times = []
        self.allocated_times = []
        self.prewarm_events = []  # (time, count) from "ready sandboxes prewarmed" (forked pools)
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
                        if "sandbox" in meta and "uid" in meta:
                            self.sandbox_uid[meta["sandbox"]] = int(meta["uid"])
                        if meta.get("forked") == "true":
                            self.forked += 1
                        self.cond.notify_all()
                elif b"session allocated" in line:
                    meta = self._meta(line)
                    with self.cond:
                        self.allocated_times.append(now)
                        self.events.append((now, "allocated", meta))
                        if "identifier" in meta and "sandbox" in meta:
                            self.session_sandbox[meta["identifier"]] = meta["sandbox"]
                        self.cond.notify_all()
                elif b"ready sandboxes prewarmed" in line:
                    meta = self._meta(line)
                    with self.cond:
                        self.prewarm_events.append((now, int(meta.get("count", "0"))))
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

    def session_uids(self, identifiers, timeout=10):
        """identifier -> host uid of its sandbox, for those whose log lines arrived in time."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = {}
                for ident in identifiers:
                    sandbox = self.session_sandbox.get(ident)
                    if sandbox is not None and sandbox in self.sandbox_uid:
                        found[ident] = self.sandbox_uid[sandbox]
                left = deadline - time.monotonic()
                if len(found) == len(identifiers) or left <= 0:
                    return found
                self.cond.wait(min(left, 0.5))

    def launch_events(self):
        """How many "starting one on the request path" lines arrived so far."""
        with self.cond:
            return sum(1 for _, kind, _ in self.events if kind == "launch")

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

    def crash_reason(self):
        """The line of the server's log that says why it died (Swift runtime failures, fatal errors)."""
        try:
            text = open(self.log_path, errors="replace").read()
        except OSError:
            return ""
        for line in text.splitlines():
            if re.search(r"Fatal error|runtime failure|escaped|precondition|Illegal instruction|Segmentation", line):
                return line.strip()[:300]
        return ""

    def wait_pool_full(self, timeout=120):
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.ready_times) - len(self.allocated_times) < self.ready_target:
                if self.proc.poll() is not None:
                    raise RuntimeError("sandpiper exited (status %s) while the pool refilled: %s" % (
                        self.proc.returncode, self.crash_reason() or self.log_tail(600)))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("pool not full after %d s:\n%s" % (timeout, self.log_tail()))
                self.cond.wait(min(left, 0.5))

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("sandpiper did not exit %d s after SIGTERM; killing it" % timeout)
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

    def delete_session(self, identifier):
        status, data = self.request("DELETE", self._path("session", identifier), None,
                                    {"Authorization": self.headers["Authorization"]})
        return status

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
    pss_before = sandbox_pss_kib(server.proc.pid, server.uids)
    client = Client(server)
    for _ in range(n):
        client.execute(new_id("idle"), "x = 1")
    client.close()
    server.wait_pool_full(timeout=240)
    time.sleep(2.0)
    after = statistics.fmean(mem_available_kib() for _ in range(3))
    pss_after = sandbox_pss_kib(server.proc.pid, server.uids)
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


# -- warm fork vs exec: one server per launch mode ------------------------------------------------


def guarded(name, fn, *a, **kw):
    """fn(*a, **kw), or {"error": ...} when it fails: one failed figure keeps the others."""
    t = time.monotonic()
    try:
        out = fn(*a, **kw)
        log("  %s done in %.1f s" % (name, time.monotonic() - t))
        return out
    except Exception as e:  # noqa: BLE001 - reported in the table
        log("  %s failed: %r" % (name, e))
        return {"error": "%s: %s" % (type(e).__name__, str(e)[:300])}


def delete_sessions(server, identifiers, threads=4):
    """DELETE session for each identifier (keeps the pool's session count and memory low between
    measurements); returns how many were not answered 204."""
    identifiers = list(identifiers)
    failed = [0]
    lock = threading.Lock()

    def worker():
        c = Client(server)
        try:
            while True:
                with lock:
                    if not identifiers:
                        return
                    ident = identifiers.pop()
                try:
                    ok = c.delete_session(ident) in (200, 204)
                except Exception:  # noqa: BLE001
                    ok = False
                if not ok:
                    with lock:
                        failed[0] += 1
        finally:
            c.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    return failed[0]


def timed_new_sessions(server, identifiers, threads, code="1+1", deadline=None, check=None):
    """Runs `code` once for each new identifier from `threads` client threads started together.
    Returns (latencies of the successes, errors as (identifier, what), wall seconds, why it stopped
    early or None, identifiers served). Stops taking new identifiers past `deadline` (monotonic) or
    once `check(successes, errors)` returns a reason."""
    todo = list(reversed(identifiers))
    lock = threading.Lock()
    latencies, errors, served = [], [], []
    stop = []
    go = threading.Event()

    def worker():
        c = Client(server)
        go.wait()
        try:
            while True:
                with lock:
                    if not todo or stop:
                        return
                    ident = todo.pop()
                t = time.perf_counter()
                try:
                    status, data = c.request("POST", c._path("code/execute", ident), json.dumps(
                        {"properties": {"codeInputType": "inline", "executionType": "synchronous",
                                        "code": code}}).encode())
                    took = time.perf_counter() - t
                    what = None
                    if status != 200:
                        what = "HTTP %s %s" % (status, data[:160].decode(errors="replace"))
                    elif json.loads(data)["properties"]["status"] != "Success":
                        what = "Failure %s" % data[:160].decode(errors="replace")
                except Exception as e:  # noqa: BLE001 - counted
                    took, what = time.perf_counter() - t, repr(e)[:200]
                    c.close()
                    c = Client(server)
                with lock:
                    if what is None:
                        latencies.append(took)
                        served.append(ident)
                    else:
                        errors.append((ident, what))
                    if deadline is not None and time.monotonic() > deadline and not stop:
                        stop.append("time budget")
                    if check is not None and not stop:
                        reason = check(len(latencies), len(errors))
                        if reason:
                            stop.append(reason)
        finally:
            c.close()

    pool = [threading.Thread(target=worker) for _ in range(max(1, threads))]
    for th in pool:
        th.start()
    t0 = time.perf_counter()
    go.set()
    for th in pool:
        th.join()
    return latencies, errors, time.perf_counter() - t0, (stop[0] if stop else None), served


def mode_warm(server, n):
    """Warm `1+1` over HTTP keep-alive on one session of the pool."""
    client = Client(server)
    ident = new_id("warm")
    client.execute(ident, "x = 1")
    server.wait_pool_full(timeout=600)
    time.sleep(0.5)
    wait_cpu_idle()  # a forked pool prewarms its ready sessions once full: not during the samples
    for _ in range(20):
        client.execute(ident, "1+1")
    samples, agent = [], []
    for _ in range(n):
        t = time.perf_counter()
        props = client.execute(ident, "1+1")
        samples.append(time.perf_counter() - t)
        assert props["result"] == 2, props
        agent.append(float(props.get("executionTimeInMilliseconds", "nan")))
    client.delete_session(ident)
    client.close()
    out = summary(samples)
    out["agent_p50_ms"] = pct(agent, 50)  # the agent's own executionTimeInMilliseconds (whole ms)
    return out


def mode_new_identifier(server, n, code, expect_image=False):
    """New identifier -> first result, the pool full before each call (sequential)."""
    client = Client(server)
    samples, idents, agent = [], [], []
    for _ in range(n):
        server.wait_pool_full(timeout=600)
        time.sleep(0.2)
        ident = new_id("new")
        t = time.perf_counter()
        props = client.execute(ident, code)
        samples.append(time.perf_counter() - t)
        idents.append(ident)
        agent.append(float(props.get("executionTimeInMilliseconds", "nan")))
        if expect_image:
            result = props.get("result")
            assert isinstance(result, dict) and result.get("type") == "image" and result.get("base64_data"), \
                "no image: %s" % str(props)[:300]
        else:
            assert props["result"] == 2, props
    client.close()
    delete_sessions(server, idents)
    out = summary(samples)
    out["samples_ms"] = [ms(x) for x in samples]
    out["agent_p50_ms"] = pct(agent, 50)  # of it, the cell itself in the agent (whole ms)
    return out


def mode_refill(server, threads):
    """Drains the full pool (readySessionInstances new identifiers from `threads` clients) and
    times the server's "sandbox ready" lines until the pool is full again."""
    server.wait_pool_full(timeout=600)
    time.sleep(1.0)
    burst = server.ready_target
    with server.cond:
        before_ready = len(server.ready_times)
        before_alloc = len(server.allocated_times)
    launches_before = server.launch_events()
    idents = [new_id("drain") for _ in range(burst)]
    busy0, steal0 = machine_cpu_ms()
    t0 = time.monotonic()
    lat, errors, wall, _, _ = timed_new_sessions(server, idents, threads)
    if errors:
        raise RuntimeError("drain failed (%d errors): %s" % (len(errors), errors[:2]))
    server.wait_pool_full(timeout=900)
    busy1, steal1 = machine_cpu_ms()
    with server.cond:
        times = server.ready_times[before_ready:before_ready + burst]
        first_alloc = server.allocated_times[before_alloc] if len(server.allocated_times) > before_alloc else t0
    request_path = server.launch_events() - launches_before
    # Forked sessions are ready before their rehearsal cell; the pool prewarms them once full.
    prewarmed_at = None
    if server.forked:
        deadline = time.monotonic() + 120
        with server.cond:
            while time.monotonic() < deadline:
                done = sum(n for t, n in server.prewarm_events if t >= t0)
                if done >= burst:
                    prewarmed_at = [t for t, n in server.prewarm_events if t >= t0][-1]
                    break
                server.cond.wait(1)
    delete_sessions(server, idents)
    gaps = [b - a for a, b in zip(times, times[1:])]
    full = times[-1] - t0
    return {"burst": burst, "threads": threads, "drain_seconds": wall, "first_ready_seconds": times[0] - t0,
            "full_seconds": full, "sessions_per_second": burst / full,
            "from_first_allocation_per_second": burst / max(1e-9, times[-1] - first_alloc),
            "steady_per_second": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan"),
            "gap_p50_ms": ms(pct(gaps, 50)) if gaps else float("nan"), "request_path_launches": request_path,
            "prewarmed_all_seconds": (prewarmed_at - t0) if prewarmed_at else None,
            "drain_latency": summary(lat),
            # Everything the machine ran from the drain to the full pool (server, sandboxes, this
            # client, kernel threads), per session refilled; and the hypervisor's steal meanwhile.
            "machine_cpu_ms_per_session": (busy1 - busy0) / burst, "steal_ms": steal1 - steal0}


def mode_refill_rounds(server, threads, rounds):
    """`mode_refill` `rounds` times (the CPU idle before each): the median round, with every
    round's rate beside it. One round moves by ±15 % from one to the next on this kind of VM."""
    results = []
    for _ in range(max(1, rounds)):
        wait_cpu_idle()
        results.append(mode_refill(server, threads))
    ordered = sorted(results, key=lambda r: r["sessions_per_second"])
    out = dict(ordered[len(ordered) // 2])
    out["rounds"] = [r["sessions_per_second"] for r in results]
    out["steady_rounds"] = [r["steady_per_second"] for r in results]
    out["machine_cpu_ms_per_session_rounds"] = [r["machine_cpu_ms_per_session"] for r in results]
    out["steal_ms_rounds"] = [r["steal_ms"] for r in results]
    return out


def mode_burst(server, n, threads):
    """`n` new identifiers at once from `threads` clients against a full pool of
    readySessionInstances: every one must be served."""
    server.wait_pool_full(timeout=900)
    time.sleep(1.0)
    launches_before = server.launch_events()
    idents = [new_id("burst") for _ in range(n)]
    lat, errors, wall, _, _ = timed_new_sessions(server, idents, threads)
    request_path = server.launch_events() - launches_before
    out = summary(lat) if lat else {"n": 0}
    out.update({"requests": n, "threads": threads, "ready": server.ready_target, "errors": len(errors),
                "error_samples": [what for _, what in errors[:5]], "wall_seconds": wall,
                "max_ms": ms(max(lat)) if lat else float("nan"), "request_path_launches": request_path})
    try:
        server.wait_pool_full(timeout=300)
    except RuntimeError:
        pass
    delete_sessions(server, idents)
    return out


def session_memory(server, identifiers):
    """Per-session USS / PSS / RSS (KiB) of the given sessions, by their sandbox uid."""
    uids = server.session_uids(identifiers)
    mem = memory_by_uid(uids.values())
    rows = [mem[u] for u in uids.values() if u in mem]
    return rows, len(identifiers) - len(rows)


def mode_memory(server, n, settle):
    """`n` new sessions that each ran `import pandas`, kept idle: USS and PSS of each session's
    processes, and MemAvailable before/after (the pool full both times). Returns the results and
    the identifiers (still alive, for the capacity run)."""
    server.wait_pool_full(timeout=600)
    time.sleep(1.0)
    before = settle_mem_available(settle)
    client = Client(server)
    idents = []
    for _ in range(n):
        ident = new_id("idle")
        client.execute(ident, "import pandas")
        idents.append(ident)
    client.close()
    server.wait_pool_full(timeout=600)
    after = settle_mem_available(settle)
    rows, missing = session_memory(server, idents)
    out = {"sessions": n, "mem_available_before_kib": before, "mem_available_after_kib": after,
           "mem_available_per_session_mib": (before - after) / 1024.0 / n,
           "uss_per_session_mib": statistics.fmean(r["uss"] for r in rows) / 1024.0 if rows else None,
           "uss_max_mib": max(r["uss"] for r in rows) / 1024.0 if rows else None,
           "pss_per_session_mib": statistics.fmean(r["pss"] for r in rows) / 1024.0 if rows else None,
           "rss_per_session_mib": statistics.fmean(r["rss"] for r in rows) / 1024.0 if rows else None,
           "processes_per_session": statistics.fmean(r["procs"] for r in rows) if rows else None,
           "sessions_not_found": missing}
    return out, idents, before


def mode_capacity(server, target, idents, mem_before, floor_mib, budget, threads, settle):
    """Keeps creating idle sessions (`import pandas` each) until `target` are alive, MemAvailable
    drops under `floor_mib`, a call fails, or `budget` seconds pass; MemAvailable is sampled on
    the way. `idents` (alive already) count towards the target."""
    alive = list(idents)
    samples = [(len(alive), mem_available_kib(), 0.0)]
    t0 = time.monotonic()
    deadline = t0 + budget
    stop_reason = None
    errors = []
    step = 25 if target >= 100 else 5
    while len(alive) < target and stop_reason is None:
        chunk = [new_id("cap") for _ in range(min(step, target - len(alive)))]

        def check(ok, failed):
            if mem_available_kib() < floor_mib * 1024:
                return "MemAvailable under %d MiB" % floor_mib
            return None

        lat, errs, _, why, ok_idents = timed_new_sessions(server, chunk, threads, code="import pandas",
                                                          deadline=deadline, check=check)
        alive += ok_idents
        samples.append((len(alive), mem_available_kib(), time.monotonic() - t0))
        if errs:
            errors += [what for _, what in errs]
            stop_reason = "a call failed: %s" % errs[0][1]
        elif why:
            stop_reason = why
    created_seconds = time.monotonic() - t0
    try:
        server.wait_pool_full(timeout=300)
    except RuntimeError:
        pass
    after = settle_mem_available(settle)
    rows, missing = session_memory(server, alive)
    uss = sorted(r["uss"] for r in rows)
    return {"target": target, "sessions": len(alive), "stop_reason": stop_reason or "reached the target",
            "errors": len(errors), "error_samples": errors[:3], "seconds": created_seconds,
            "mem_available_before_mib": mem_before / 1024.0, "mem_available_after_mib": after / 1024.0,
            "mem_available_per_session_mib": (mem_before - after) / 1024.0 / max(1, len(alive)),
            "uss_p50_mib": pct(uss, 50) / 1024.0 if uss else None,
            "uss_mean_mib": statistics.fmean(uss) / 1024.0 if uss else None,
            "pss_mean_mib": statistics.fmean(r["pss"] for r in rows) / 1024.0 if rows else None,
            "sessions_not_found": missing,
            "samples": [{"sessions": c, "mem_available_mib": m / 1024.0, "seconds": s} for c, m, s in samples]}


def run_mode_server(binary, runtime, workdir, name, launch, ready, max_sessions, uid_base, steps, stop_timeout=120):
    """Starts a server with one PythonLTS pool `name` (launch mode, readySessionInstances), runs
    `steps(server, out)` and stops it. Returns out (with the initial fill and the forked count)."""
    sub = os.path.join(workdir, name)
    os.makedirs(sub, exist_ok=True)
    os.chmod(sub, 0o711)
    pools = [{"name": name, "type": "PythonLTS", "launch": launch, "readySessionInstances": ready,
              "maxConcurrentSessions": max_sessions, "cooldownPeriodInSeconds": 3600}]
    out = {"launch": launch, "ready": ready, "max_sessions": max_sessions, "load_start": loadavg()}
    server = Server(binary, runtime, ready, max_sessions, sub, pools=pools, uid_base=uid_base)
    out["uid_base"] = server.uid_base
    try:
        t = time.monotonic()
        server.wait_pool_full(timeout=900)
        out["initial_fill_seconds"] = time.monotonic() - t
        log("  pool %s (%s): %d ready after %.1f s" % (name, launch, ready, out["initial_fill_seconds"]))
        steps(server, out)
    finally:
        with server.cond:
            out["sandboxes_ready"] = len(server.ready_times)
            out["sandboxes_forked"] = server.forked
        out["load_end"] = loadavg()
        t = time.monotonic()
        server.stop(stop_timeout)
        out["stop_seconds"] = time.monotonic() - t
    return out


def measure_launch_modes(binary, runtime, args, workdir):
    """The "warm fork vs exec" section: a fork server (refill, new identifier, plot, warm 1+1,
    memory, capacity), a fork server with a small pool (drained burst), an exec server (the same
    figures, smaller counts)."""
    results = {"load_start": loadavg()}
    cap = max(args.capacity, args.fork_idle)

    def fork_steps(server, out):
        out["warm"] = guarded("fork warm 1+1", mode_warm, server, args.n)
        out["new_identifier"] = guarded("fork new identifier", mode_new_identifier, server, args.fork_n, "1+1")
        out["plot"] = guarded("fork plot", mode_new_identifier, server, args.plot_n, PLOT_CELL, True)
        out["refill"] = guarded("fork refill", mode_refill_rounds, server, args.drain_threads, args.refill_rounds)
        got = guarded("fork memory", mode_memory, server, args.fork_idle, args.settle)
        if isinstance(got, dict):
            out["memory"] = got
            return
        out["memory"], idents, before = got
        if args.capacity > 0:
            log("  capacity: up to %d idle sessions (floor %d MiB, %d s budget)"
                % (args.capacity, args.capacity_floor_mib, args.capacity_budget))
            out["capacity"] = guarded("fork capacity", mode_capacity, server, args.capacity, idents, before,
                                      args.capacity_floor_mib, args.capacity_budget, args.capacity_threads,
                                      args.settle)

    def burst_steps(server, out):
        out["burst"] = guarded("fork burst", mode_burst, server, args.burst, args.burst_threads)

    def exec_steps(server, out):
        out["warm"] = guarded("exec warm 1+1", mode_warm, server, args.n)
        out["new_identifier"] = guarded("exec new identifier", mode_new_identifier, server, args.exec_n, "1+1")
        out["plot"] = guarded("exec plot", mode_new_identifier, server, args.plot_n, PLOT_CELL, True)
        out["refill"] = guarded("exec refill", mode_refill_rounds, server, args.drain_threads, args.refill_rounds)
        got = guarded("exec memory", mode_memory, server, args.exec_idle, args.settle)
        out["memory"] = got if isinstance(got, dict) else got[0]
        if not isinstance(got, dict):
            delete_sessions(server, got[1])
        out["burst"] = guarded("exec burst", mode_burst, server, args.exec_burst, args.burst_threads)

    uid_base = args.uid_base
    log("launch modes: fork server (pool fork, %d ready, max %d sessions)" % (args.fork_ready, cap + 20))
    results["fork"] = guarded("fork server", run_mode_server, binary, runtime, workdir, "fork", "fork",
                              args.fork_ready, max(cap, args.fork_ready) + 20, uid_base, fork_steps, stop_timeout=300)
    log("launch modes: fork server for the drained burst (%d ready, %d new identifiers)" % (args.burst_ready, args.burst))
    results["fork_burst"] = guarded("fork burst server", run_mode_server, binary, runtime, workdir, "forkburst",
                                    "fork", args.burst_ready, args.burst + 20, uid_base, burst_steps)
    if args.no_exec:
        results["exec"] = {"error": "skipped (--no-exec)"}
    else:
        log("launch modes: exec server (pool exec, %d ready)" % args.exec_ready)
        results["exec"] = guarded("exec server", run_mode_server, binary, runtime, workdir, "exec", "exec",
                                  args.exec_ready, max(args.exec_burst, args.exec_idle) + 20, uid_base, exec_steps,
                                  stop_timeout=180)
    results["load_end"] = loadavg()
    return results


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
PLOT_CELL = %r

def run_jkg(port, token, n, cold, plot):
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

    def execute(ws, code, want_image=False):
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "bench", "session": session, "msg_type": "execute_request",
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        result, replied, idle, image = None, False, False, False
        while not (replied and idle):
            m = json.loads(ws.recv())
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            t = m["header"]["msg_type"]
            if t == "execute_result":
                result = m["content"]["data"]["text/plain"]
            elif t == "display_data" and "image/png" in m["content"].get("data", {}):
                image = True
            elif t == "execute_reply":
                replied = True
                if m["content"]["status"] != "ok":
                    raise RuntimeError(m["content"])
            elif t == "status" and m["content"]["execution_state"] == "idle":
                idle = True
        if want_image and not image:
            raise RuntimeError("no image/png from the plot cell")
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
    plots = []
    for _ in range(plot):  # a new kernel -> the DataFrame + plot cell's image
        t = time.perf_counter()
        kid = start_kernel()
        ws = connect(kid)
        execute(ws, PLOT_CELL, want_image=True)
        plots.append(time.perf_counter() - t)
        ws.close()
        delete_kernel(kid)
    out["plot"] = plots
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
        # An idle kernel that imported pandas, like the sessions of the memory row.
        execute("import pandas")
        time.sleep(1.0)
        proc = getattr(getattr(km, "provisioner", None), "process", None)
        pid = proc.pid if proc is not None else getattr(getattr(km, "kernel", None), "pid", None)
        memory = {}
        if pid:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for row in f:
                    parts = row.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        memory[parts[0].rstrip(":")] = int(parts[1])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {"warm": warm, "startup": startup,
            "kernel_uss_kib": memory.get("Private_Clean", 0) + memory.get("Private_Dirty", 0) if memory else None,
            "kernel_pss_kib": memory.get("Pss") if memory else None}

if mode == "jkg":
    print(json.dumps(run_jkg(int(sys.argv[3]), sys.argv[4], n, int(sys.argv[5]), int(sys.argv[6]))))
else:
    print(json.dumps(run_client(n)))
'''


BENCH_VENV_PACKAGES = ["jupyter_kernel_gateway", "ipykernel", "websocket-client", "pandas", "matplotlib"]


def ensure_bench_venv(path):
    """The throwaway venv with the gateway (and pandas + matplotlib for the plot cell); made, or
    completed, with pip on first use. Returns (python, reason)."""
    python = os.path.join(path, "bin", "python")
    gateway = os.path.join(path, "bin", "jupyter-kernelgateway")
    if os.path.exists(gateway) and subprocess.run([python, "-c", "import pandas, matplotlib"],
                                                  capture_output=True, timeout=120).returncode == 0:
        return python, None
    fresh = not os.path.exists(gateway)
    log("%s %s with %s (first run only)" % ("creating" if fresh else "completing", path, ", ".join(BENCH_VENV_PACKAGES)))
    try:
        if fresh:
            subprocess.run([sys.executable, "-m", "venv", path], check=True, capture_output=True, timeout=300)
        subprocess.run([python, "-m", "pip", "install", "-q"] + BENCH_VENV_PACKAGES,
                       check=True, capture_output=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", b"") or b""
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
            return None, "could not install jupyter_kernel_gateway: %s %s" % (type(e).__name__, detail.strip()[-200:])
        log("could not add pandas/matplotlib to %s (the plot baseline will fail): %s" % (path, detail.strip()[-200:]))
    return python, None


def measure_jupyter(venv, n, cold, workdir, procs, plot=0):
    python, reason = ensure_bench_venv(venv)
    if python is None:
        return {"error": reason}
    helper = os.path.join(workdir, "jupyter_helper.py")
    with open(helper, "w") as f:
        f.write(JUPYTER_HELPER.replace("PLOT_CELL = %r", "PLOT_CELL = %r" % PLOT_CELL, 1))
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=os.path.join(workdir, "jupyter-runtime"),
               JUPYTER_DATA_DIR=os.path.join(workdir, "jupyter-data"), IPYTHONDIR=os.path.join(workdir, "ipython"),
               JUPYTER_PLATFORM_DIRS="1")
    env.pop("PYTHONPATH", None)
    env.pop("MPLBACKEND", None)  # the kernels' inline backend sends the plot as image/png
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
        res = subprocess.run([python, helper, "jkg", str(n), str(port), token, str(cold), str(plot)],
                             capture_output=True, text=True, timeout=300, env=env, cwd=workdir)
        if res.returncode != 0:
            out["jkg_error"] = "gateway client failed: " + res.stderr.strip()[-300:]
        else:
            data = json.loads(res.stdout)
            out["jkg_warm"] = summary(data["warm"])
            out["jkg_cold"] = summary(data["cold"])
            if data.get("plot"):
                out["jkg_plot"] = summary(data["plot"])
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
        out["client_kernel_uss_kib"] = data.get("kernel_uss_kib")
        out["client_kernel_pss_kib"] = data.get("kernel_pss_kib")
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
    if fl and "error" in fl:
        rows.append(("upload / download file, p50", "n/a (%s)" % fl["error"][:200], "-", "-"))
    elif fl:
        rows.append(("upload / download %.0f MiB file, p50" % (fl["size_bytes"] / 1048576.0),
                     "%.0f / %.0f ms" % (fl["upload_p50_ms"], fl["download_p50_ms"]), "-",
                     "%.0f / %.0f MiB/s" % (fl["upload_mib_s"], fl["download_mib_s"])))
    lines = ["| metric | Sandpiper | baseline | notes |", "| --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def fork_table(lm, r, args):
    """The "warm fork vs exec" table: each figure for both launch modes, the fork target, and the
    baselines measured in the same run."""
    fork, burst, ex = lm.get("fork") or {}, lm.get("fork_burst") or {}, lm.get("exec") or {}
    j, b2 = r.get("jupyter") or {}, r.get("bwrap_imports") or {}
    MB = 1e6 / 1048576.0  # 10 MB in MiB

    def part(server, key):
        if "error" in server:
            return {"error": "server failed, see below"}
        return server.get(key) or {"error": "not run"}

    def each(objs, render):
        """`fork / exec` of a figure for the notes; "n/a" where missing."""
        out = []
        for x in objs:
            try:
                out.append("n/a" if "error" in x else render(x))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                out.append("n/a")
        return " / ".join(out)

    def cell(obj, render):
        if "error" in obj:
            return "n/a (%s)" % obj["error"][:160]
        try:
            return render(obj)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            return "n/a (%s)" % type(e).__name__

    def mark(ok):
        return " ✓" if ok else " ✗"

    def p5099(s):
        return "%.1f / %.1f ms" % (s["p50_ms"], s["p99_ms"])

    def jup(key, render):
        if "error" in j:
            return "n/a (%s)" % j["error"][:80]
        if j.get(key) is None:
            return "n/a (%s)" % j.get(key.split("_")[0] + "_error", "not run")[:120]
        return render(j[key])

    bw = ("n/a (%s)" % b2["error"][:80]) if "error" in b2 else (p5099(b2) if b2 else "n/a")
    rows = []

    def rounds(x):
        return " / ".join("%.1f" % r for r in x.get("rounds", [x["sessions_per_second"]]))

    f, e = part(fork, "refill"), part(ex, "refill")
    rows.append((
        "refill: sessions made ready per second after draining the pool",
        cell(f, lambda x: "%.1f /s (%d in %.2f s; rounds %s)%s" % (
            x["sessions_per_second"], x["burst"], x["full_seconds"], rounds(x), mark(x["sessions_per_second"] >= 100))),
        cell(e, lambda x: "%.2f /s (%d in %.1f s; rounds %s)" % (
            x["sessions_per_second"], x["burst"], x["full_seconds"], rounds(x))),
        "≥ 100 /s",
        jup("client_startup_ms", lambda v: "jupyter_client kernel start: %.0f ms (%.1f kernels/s, one at a time)"
            % (v, 1000.0 / v)),
        "all readySessionInstances drained by %d client threads; rate = drained count / (drain start → last "
        "\"sandbox ready\"), the median of the rounds; from the first allocation: %s /s; steady ready-line rate: "
        "%s /s, gap p50 %s ms; "
        "request-path launches during the drain: %s (fork / exec); forked sessions all prewarmed (rehearsal "
        "cell, run once the pool is full) %s s after the drain started; the machine's CPU per refilled "
        "session, fork rounds: %s ms (steal %s ms)" % (
            args.drain_threads,
            each((f, e), lambda y: "%.1f" % y["from_first_allocation_per_second"]),
            each((f, e), lambda y: "%.1f" % y["steady_per_second"]),
            each((f, e), lambda y: "%.1f" % y["gap_p50_ms"]),
            each((f, e), lambda y: "%d" % y["request_path_launches"]),
            "%.2f" % f["prewarmed_all_seconds"] if isinstance(f, dict) and f.get("prewarmed_all_seconds") else "n/a",
            " / ".join("%.1f" % v for v in f.get("machine_cpu_ms_per_session_rounds", [])) if isinstance(f, dict)
            else "n/a",
            " / ".join("%.0f" % v for v in f.get("steal_ms_rounds", [])) if isinstance(f, dict) else "n/a")))

    f, e = part(fork, "new_identifier"), part(ex, "new_identifier")
    rows.append((
        "new identifier → first `1+1`, warm pool, p50 / p99",
        cell(f, lambda x: p5099(x) + mark(x["p50_ms"] <= 5)), cell(e, p5099), "p50 ≤ 5 ms",
        "new JKG kernel → first result: %s; cold bwrap + `import numpy, pandas, matplotlib`: %s"
        % (jup("jkg_cold", p5099), bw),
        "n = %s (fork / exec), sequential, pool full before each; of it, the first cell in the agent "
        "(executionTimeInMilliseconds) p50: %s ms" % (each((f, e), lambda y: "%d" % y["n"]),
                                                      each((f, e), lambda y: "%.0f" % y["agent_p50_ms"]))))

    f, e = part(burst, "burst"), part(ex, "burst")

    def burst_cell(x, judge):
        text = "%s, %d/%d served, %d errors" % (p5099(x) if x["n"] else "-", x["n"], x["requests"], x["errors"])
        if judge:
            text += mark(x["errors"] == 0 and x["n"] and x["p99_ms"] <= 1000)
        return text

    rows.append((
        "drained burst: new identifiers at once against a pool of few ready, p50 / p99",
        cell(f, lambda x: burst_cell(x, True)), cell(e, lambda x: burst_cell(x, False)), "all served, p99 ≤ 1 s",
        "cold bwrap + imports, one at a time: %s" % bw,
        "requests / threads / ready (fork; exec): %s; %s. max %s ms; wall %s s; request-path launches %s; "
        "first errors: %s" % (
            each((f,), lambda x: "%d / %d / %d" % (x["requests"], x["threads"], x["ready"])),
            each((e,), lambda x: "%d / %d / %d" % (x["requests"], x["threads"], x["ready"])),
            each((f, e), lambda y: "%.0f" % y["max_ms"]),
            each((f, e), lambda y: "%.1f" % y["wall_seconds"]),
            each((f, e), lambda y: "%d" % y["request_path_launches"]),
            "; ".join(s for x in (f, e) if "error" not in x for s in x.get("error_samples", [])[:1]) or "none")))

    f, e = part(fork, "memory"), part(ex, "memory")
    rows.append((
        "private memory (USS) per idle session, `import pandas` run once",
        cell(f, lambda x: "%.1f MiB (PSS %.1f)%s" % (x["uss_per_session_mib"], x["pss_per_session_mib"],
                                                     mark(x["uss_per_session_mib"] <= 10 * MB))),
        cell(e, lambda x: "%.1f MiB (PSS %.1f)" % (x["uss_per_session_mib"], x["pss_per_session_mib"])),
        "≤ 10 MB (9.5 MiB)",
        jup("client_kernel_uss_kib", lambda v: "jupyter_client kernel after `import pandas`: USS %.1f MiB, PSS %.1f MiB"
            % (v / 1024.0, (j.get("client_kernel_pss_kib") or 0) / 1024.0)),
        "sessions (fork / exec): %s; USS = Private_Clean + Private_Dirty (smaps_rollup) summed over the processes of "
        "the session's uid (%s per session); max USS %s MiB; RSS %s MiB" % (
            each((f, e), lambda y: "%d" % y["sessions"]),
            each((f, e), lambda y: "%.0f" % y["processes_per_session"]),
            each((f, e), lambda y: "%.1f" % y["uss_max_mib"]),
            each((f, e), lambda y: "%.0f" % y["rss_per_session_mib"]))))
    rows.append((
        "MemAvailable per idle session (same sessions)",
        cell(f, lambda x: "%.1f MiB" % x["mem_available_per_session_mib"]),
        cell(e, lambda x: "%.1f MiB" % x["mem_available_per_session_mib"]), "-", "-",
        "MemAvailable before/after, pool full both times; other jobs on the machine move it too"))

    c, e = part(fork, "capacity"), part(ex, "memory")

    def cap_cell(x):
        fit = "all %d fit" % x["target"] if x["sessions"] >= x["target"] else "stopped at %d of %d (%s)" % (
            x["sessions"], x["target"], x["stop_reason"])
        return "%s: %.1f MiB MemAvailable/session, USS p50 %.1f MiB, %.1f GiB still available%s" % (
            fit, x["mem_available_per_session_mib"], x["uss_p50_mib"] or float("nan"),
            x["mem_available_after_mib"] / 1024.0, mark(x["sessions"] >= x["target"]))

    def exec_cap(x):
        avail = x["mem_available_after_kib"] / 1024.0
        per = max(x["mem_available_per_session_mib"], x["pss_per_session_mib"] or 0)
        return "not run; at %.0f MiB/session (the larger of MemAvailable delta and PSS) ≈ %d more in the %.1f GiB " \
            "available" % (per, avail / per, avail / 1024.0)

    rows.append((
        "capacity: idle Python sessions (pandas imported) created while watching MemAvailable",
        cell(c, cap_cell) if args.capacity else "skipped (--capacity 0)", cell(e, exec_cap), "%d fit" % args.capacity,
        "-",
        cell(c, lambda x: "%d alive after %.1f s of creating them with %d threads; stops at MemAvailable < %d MiB, a failed call or %d s; "
             "MemAvailable %.1f → %.1f GiB; maxConcurrentSessions %d" % (
                 x["sessions"], x["seconds"], args.capacity_threads, args.capacity_floor_mib, args.capacity_budget,
                 x["mem_available_before_mib"] / 1024.0, x["mem_available_after_mib"] / 1024.0,
                 fork.get("max_sessions", 0)))))

    f, e = part(fork, "warm"), part(ex, "warm")
    kind = "release" if "/release/" in r["config"]["binary"] else "debug"
    rows.append((
        "warm `1+1` over HTTP, one session, p50 / p99",
        cell(f, lambda x: p5099(x) + mark(x["p50_ms"] <= 2)), cell(e, p5099), "p50 ≤ 2 ms",
        "JKG websocket: %s; jupyter_client ZMQ: %s" % (jup("jkg_warm", p5099), jup("client_warm", p5099)),
        "n=%d, HTTP keep-alive, %s binary; of it, the agent's executionTimeInMilliseconds p50: %s ms (fork / exec)"
        % (args.n, kind, each((f, e), lambda y: "%.0f" % y["agent_p50_ms"]))))

    f, e = part(fork, "plot"), part(ex, "plot")
    rows.append((
        "time to first result: new identifier → DataFrame + plot (PNG), p50 / p99",
        cell(f, p5099), cell(e, p5099), "-",
        "new JKG kernel → the same cell (inline PNG): %s" % jup("jkg_plot", p5099),
        "n = %s (fork / exec), pool full before each; agent-side p50 %s ms; `%s`" % (
            each((f, e), lambda y: "%d" % y["n"]),
            each((f, e), lambda y: "%.0f" % y["agent_p50_ms"]), PLOT_CELL.replace("\n", "; "))))

    lines = ["| metric | fork | exec | target (fork) | baseline | notes |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |")
    notes = []
    for label, server in (("fork", fork), ("fork burst", burst), ("exec", ex)):
        if "error" in server:
            notes.append("%s server failed: %s" % (label, server["error"][:400].replace("\n", " ")))
        elif server:
            notes.append("%s server: %d of %d sandboxes forked=true, initial fill of %d in %.1f s, load %s → %s" % (
                label, server.get("sandboxes_forked", 0), server.get("sandboxes_ready", 0), server.get("ready", 0),
                server.get("initial_fill_seconds", float("nan")), fmt_load(server.get("load_start")),
                fmt_load(server.get("load_end"))))
    lines.append("")
    lines += ["- " + n for n in notes]
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


def newest_source_mtime():
    newest = 0.0
    for top in ("Sources", "Package.swift", "Package.resolved"):
        path = os.path.join(REPO, top)
        if os.path.isfile(path):
            newest = max(newest, os.path.getmtime(path))
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    newest = max(newest, os.path.getmtime(os.path.join(root, name)))
                except OSError:
                    pass
    return newest


def pick_binary(arg):
    """--bin, else $SANDPIPER_BIN, else .build/release/sandpiper when it is newer than the sources,
    else .build/debug/sandpiper (else whichever exists, with a warning that it is older)."""
    if arg:
        return arg
    env = os.environ.get("SANDPIPER_BIN")
    if env and os.path.exists(env):
        return env
    sources = newest_source_mtime()
    found = [os.path.join(REPO, ".build", kind, "sandpiper") for kind in ("release", "debug")]
    found = [path for path in found if os.path.exists(path)]
    for path in found:
        if os.path.getmtime(path) >= sources:
            return path
    if found:
        newest = max(found, key=os.path.getmtime)
        log("warning: %s is older than the sources (build it first)" % newest)
        return newest
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
    ap.add_argument("--no-fork", action="store_true", help="skip the warm fork vs exec section")
    ap.add_argument("--no-exec", action="store_true", help="in that section, skip the exec server")
    ap.add_argument("--fork-ready", type=int, help="readySessionInstances of the fork pool (default 100; refill drains it)")
    ap.add_argument("--fork-n", type=int, help="new-identifier samples on the fork pool (default 50)")
    ap.add_argument("--exec-ready", type=int, help="readySessionInstances of the exec pool (default 10)")
    ap.add_argument("--exec-n", type=int, help="new-identifier samples on the exec pool (default 10)")
    ap.add_argument("--plot-n", type=int, help="DataFrame + plot cells in new identifiers, per mode and on JKG (default 5)")
    ap.add_argument("--drain-threads", type=int, help="client threads draining the pool for the refill rate (default 16)")
    ap.add_argument("--refill-rounds", type=int, default=3, help="drain-and-refill rounds; the median is reported (default 3)")
    ap.add_argument("--burst", type=int, help="new identifiers at once in the drained burst on fork (default 100)")
    ap.add_argument("--burst-ready", type=int, help="readySessionInstances of the fork burst pool (default 10)")
    ap.add_argument("--burst-threads", type=int, help="client threads of the drained bursts (default 24)")
    ap.add_argument("--exec-burst", type=int, help="new identifiers at once in the exec burst (default 30: each exec "
                    "launch costs ~1.4 s of CPU)")
    ap.add_argument("--fork-idle", type=int, help="idle sessions for USS/PSS on fork (default 20)")
    ap.add_argument("--exec-idle", type=int, help="idle sessions for USS/PSS on exec (default 5)")
    ap.add_argument("--capacity", type=int, help="idle fork sessions to create while watching MemAvailable (default "
                    "500; 0 skips)")
    ap.add_argument("--capacity-floor-mib", type=int, default=2048, help="stop the capacity run under this MemAvailable")
    ap.add_argument("--capacity-budget", type=float, help="stop the capacity run after this many seconds (default 600)")
    ap.add_argument("--capacity-threads", type=int, default=4, help="client threads of the capacity run")
    ap.add_argument("--settle", type=float, help="seconds to wait for MemAvailable to settle (default 15)")
    ap.add_argument("--uid-base", type=int, default=FORK_UID_BASE,
                    help="server.sandboxUidBase of the launch-mode servers (moved up past ranges other servers hold)")
    args = ap.parse_args()
    q = args.quick
    args.fork_ready = args.fork_ready or (10 if q else 100)
    args.fork_n = args.fork_n or (5 if q else 50)
    args.exec_ready = args.exec_ready or (2 if q else 10)
    args.exec_n = args.exec_n or (3 if q else 10)
    args.plot_n = args.plot_n or (2 if q else 5)
    args.drain_threads = args.drain_threads or (4 if q else 16)
    args.burst = args.burst or (20 if q else 100)
    args.burst_ready = args.burst_ready or (5 if q else 10)
    args.burst_threads = args.burst_threads or (8 if q else 24)
    args.exec_burst = args.exec_burst or (4 if q else 30)
    args.fork_idle = args.fork_idle or (3 if q else 20)
    args.exec_idle = args.exec_idle or (2 if q else 5)
    args.capacity = (20 if q else 500) if args.capacity is None else args.capacity
    args.capacity_budget = args.capacity_budget or (60.0 if q else 600.0)
    args.settle = args.settle or (5.0 if q else 15.0)
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
                         "ready": args.ready, "load_start": loadavg()}
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
        results["files"] = guarded("file transfer", measure_files, server, (1 if q else 5) * 1048576, 2 if q else 3)
        with server.cond:
            results["bench_pool_forked"] = [server.forked, len(server.ready_times)]
        server.stop()
        server = None
        if args.no_fork:
            results["launch_modes"] = None
        else:
            log("warm fork vs exec (load average %s)" % fmt_load(loadavg()))
            try:
                results["launch_modes"] = measure_launch_modes(binary, args.runtime, args, workdir)
            except Exception as e:  # noqa: BLE001 - keep the rest of the run
                log("launch modes failed: %r" % (e,))
                results["launch_modes"] = {"error": "%s: %s" % (type(e).__name__, str(e)[:200])}
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
            results["jupyter"] = measure_jupyter(args.bench_venv, args.n, 2 if q else 3, workdir, procs,
                                                 0 if args.no_fork else args.plot_n)
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
    forked = results.get("bench_pool_forked")
    if forked:
        print("\n(pool `bench` uses the default launch mode: %d of %d sandboxes forked)" % tuple(forked))
    lm = results.get("launch_modes")
    if lm is not None:
        print("\nwarm fork vs exec\n")
        if "error" in lm:
            print("n/a (%s)" % lm["error"])
        else:
            print(fork_table(lm, results, args))
    if results.get("languages") and "error" not in results["languages"]:
        print("\nlanguages (namespaces tier)\n")
        print(language_table(results["languages"]))
    if results.get("tiers"):
        print("\nisolation tiers\n")
        print(tier_table(results["tiers"], args))
    results["load_end"] = loadavg()
    print("\n(%s; %d cores; wall time %.0f s; load average (1/5/15 min) %s at the start, %s at the end)" % (
        os.path.relpath(binary, REPO) if binary.startswith(REPO) else binary, os.cpu_count(), results["wall_seconds"],
        fmt_load(results["config"]["load_start"]), fmt_load(results["load_end"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
