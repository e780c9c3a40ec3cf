#!/usr/bin/env python3
"""Sandpiper load test: many concurrent sessions across pools, a mixed workload, a bounded time.

    python3 bench/load.py [--sessions 200] [--duration 120] [--think 1.0] [--bin PATH] [--json out.json]

Starts its own server (data directory in a temp dir, sandbox uids from 234000) with three pools,
PythonLTS `python`, NodeLTS `node` and Shell `shell`, then:
  1. warm-up: opens --sessions sessions (40% Python, 20% Node, 20% Shell, 10% + 10% file sessions
     on the Python and Shell pools) a few at a time, printing progress. A Python sandbox launched
     from scratch costs ~1.4 s of CPU (it imports numpy, pandas and matplotlib) and ~90 MiB (less
     when forked from the pool's warm template), so the Python pool keeps only a small ready queue
     and sessions are opened --warmup-parallel at a time: 120 Python sessions fit in ~11 GiB even
     without forking, and take 1-3 minutes on 2 cores;
  2. load: one client thread and one keep-alive connection per session for --duration seconds,
     each call followed by a think time (uniform 0.5-1.5 x --think):
       python sessions: numpy + pure-Python compute (3 of 4 calls) or a small matplotlib plot (PNG);
       node sessions:   a compute loop in the persistent context;
       shell sessions:  commands through the modern executions API (state kept in the shell);
       file sessions:   upload (32 KiB) -> list -> download (compared byte for byte);
     every answer is checked (status, result value, PNG signature, file bytes);
  3. after: every session must still be alive (listsessions per pool).
Prints a table: requests, errors, p50/p95/p99 per kind, throughput, sessions alive, server RSS and
host MemAvailable before / after warm-up / during (worst) / after the load / after deleting the
sessions, and per-session memory (PSS from /proc/<pid>/smaps_rollup of the sandbox processes,
summed per sandbox uid, by pool). Exits 1 on any error or lost session.

Stdlib only; needs root, like the server. Cleans up (SIGTERM to the server, temp dir) on Ctrl-C too.
"""

import argparse
import base64
import http.client
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_API = "2024-02-02-preview"
MODERN_API = "2025-02-02-preview"
UID_BASE = 234000  # not the default 230000 (other servers), nor the tests' 233000 / 237000 / 238000
UID_SPAN = 2000  # uids this server may hand out (one per live sandbox), from --uid-base
DEFAULT_RUNTIME = "/var/lib/sandpiper/runtimes/python"
MIX = (("python", 0.4), ("node", 0.2), ("shell", 0.2), ("files-py", 0.1), ("files-sh", 0.1))
POOL_OF = {"python": "python", "node": "node", "shell": "shell", "files-py": "python", "files-sh": "shell"}
# Rough per-session footprint (MiB) for the pre-flight memory check.
FOOTPRINT_MIB = {"python": 100, "node": 50, "shell": 20, "files-py": 100, "files-sh": 25}
LOG_META = re.compile(rb"(?<![\w-])(pid|sandbox|uid|pool|identifier)=([^\s\]]+)")
T0 = time.monotonic()


def log(msg):
    print("[load %6.1fs] %s" % (time.monotonic() - T0, msg), file=sys.stderr, flush=True)


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# -- host probes ---------------------------------------------------------------------------------


def meminfo_kib(field="MemAvailable"):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
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


def uid_processes(uids):
    """{pid: uid} of live processes whose real uid is in `uids`."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/status" % name) as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                        if uid in uids:
                            out[int(name)] = uid
                        break
        except (OSError, ValueError):
            continue
    return out


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for row in f:
                if row.startswith("Pss:"):
                    return int(row.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_by_uid(uids):
    totals = {}
    for pid, uid in uid_processes(uids).items():
        totals[uid] = totals.get(uid, 0) + pss_kib(pid)
    return totals


# -- the server ----------------------------------------------------------------------------------


class Server:
    """`sandpiper serve` on a free 127.0.0.1 port; its log is kept and scanned for "sandbox ready"
    (uid of each sandbox) and "session allocated" (pool of each sandbox) lines."""

    def __init__(self, binary, runtime, workdir, pools, uid_base):
        self.workdir = workdir
        self.uids = range(uid_base, uid_base + UID_SPAN)
        self.key = "load-" + uuid.uuid4().hex
        self.pools = pools
        self.ready_target = {p["name"]: p["readySessionInstances"] for p in pools}
        self.cond = threading.Condition()
        self.ready = 0
        self.allocated = 0
        self.sandbox_uid = {}
        self.sandbox_pool = {}
        self.log_path = os.path.join(workdir, "server.log")
        config = os.path.join(workdir, "config.json")
        with open(config, "w") as f:
            json.dump({"server": {"sandboxUidBase": uid_base}, "pools": pools}, f)
        port_file = os.path.join(workdir, "port")
        env = dict(os.environ, SANDPIPER_API_KEY=self.key, SANDPIPER_PYTHON_RUNTIME=runtime)
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", os.path.join(workdir, "data"), "--port", "0",
             "--port-file", port_file, "--config", config, "--log-level", "debug", "--python-runtime", runtime],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
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
                out.write(line)
                if b"sandbox ready" in line:
                    meta = dict((k.decode(), v.decode()) for k, v in LOG_META.findall(line))
                    with self.cond:
                        self.ready += 1
                        if "sandbox" in meta and "uid" in meta:
                            self.sandbox_uid[meta["sandbox"]] = int(meta["uid"])
                        self.cond.notify_all()
                elif b"session allocated" in line:
                    meta = dict((k.decode(), v.decode()) for k, v in LOG_META.findall(line))
                    with self.cond:
                        self.allocated += 1
                        if "sandbox" in meta and "pool" in meta:
                            self.sandbox_pool[meta["sandbox"]] = meta["pool"]
                        self.cond.notify_all()

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout=300):
        """Until the initial ready queues are full (sandboxes ready - sessions allocated)."""
        want = sum(self.ready_target.values())
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.ready - self.allocated < want:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("pools not ready after %d s:\n%s" % (timeout, self.log_tail()))
                self.cond.wait(0.5)

    def uid_pools(self):
        """uid -> pool of every sandbox seen allocated (uids are reused only after a session ends)."""
        with self.cond:
            return {uid: self.sandbox_pool[sandbox] for sandbox, uid in self.sandbox_uid.items()
                    if sandbox in self.sandbox_pool}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                log("sandpiper did not exit 120 s after SIGTERM; killing it")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(5)


class CallError(Exception):
    pass


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, server, timeout=300):
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.auth = {"Authorization": "Bearer " + server.key}

    def request(self, method, path, body=None, headers=None):
        headers = dict(self.auth, **(headers or {}))
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # a keep-alive connection the server closed while idle: reconnect once
                if attempt:
                    raise

    @staticmethod
    def path(pool, op, identifier, api=LEGACY_API):
        return "/pools/%s/%s?api-version=%s&identifier=%s" % (pool, op, api, identifier)

    def json_call(self, method, path, body=None):
        status, data = self.request(method, path, json.dumps(body).encode() if body is not None else None,
                                    {"Content-Type": "application/json"} if body is not None else None)
        if status != 200:
            raise CallError("%s %s -> %s %s" % (method, path.split("?")[0], status, data[:300]))
        return json.loads(data)

    def execute(self, pool, identifier, code):
        body = {"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": code}}
        props = self.json_call("POST", self.path(pool, "code/execute", identifier), body)["properties"]
        if props.get("status") != "Success":
            last = [line for line in str(props.get("stderr", "")).splitlines() if line.strip()][-1:] or [""]
            raise CallError("execution failed after %s ms: %s" % (props.get("executionTimeInMilliseconds"), last[0][:300]))
        return props

    def shell(self, identifier, command):
        out = self.json_call("POST", self.path("shell", "executions", identifier, MODERN_API), {"shellCommand": command})
        if out.get("status") != "0":
            raise CallError("shell command exited %s: %s" % (out.get("status"), json.dumps(out)[:400]))
        return out["result"]["stdout"]

    def upload(self, pool, identifier, name, payload):
        boundary = uuid.uuid4().hex
        head = ('--%s\r\nContent-Disposition: form-data; name="file"; filename="%s"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n" % (boundary, name)).encode()
        body = head + payload + ("\r\n--%s--\r\n" % boundary).encode()
        status, data = self.request("POST", self.path(pool, "files/upload", identifier), body,
                                    {"Content-Type": "multipart/form-data; boundary=" + boundary})
        if status != 200:
            raise CallError("upload -> %s %s" % (status, data[:300]))

    def list_files(self, pool, identifier):
        status, data = self.request("GET", self.path(pool, "files", identifier))
        if status != 200:
            raise CallError("list -> %s %s" % (status, data[:300]))
        return {v["properties"]["filename"]: v["properties"]["size"] for v in json.loads(data)["value"]}

    def download(self, pool, identifier, name):
        status, data = self.request("GET", self.path(pool, "files/content/" + name, identifier))
        if status != 200:
            raise CallError("download -> %s %s" % (status, data[:300]))
        return data

    def live_sessions(self, pool):
        idents, skip = set(), 0
        for _ in range(100):
            status, data = self.request("GET", "/pools/%s/listsessions?api-version=%s&skip=%d" % (pool, MODERN_API, skip))
            if status != 200:
                raise CallError("listsessions -> %s %s" % (status, data[:300]))
            page = json.loads(data)
            idents |= {s["identifier"] for s in page["sessions"]}
            if not page.get("nextLink"):
                break
            skip += len(page["sessions"])
        return idents

    def delete_session(self, pool, identifier):
        status, data = self.request("DELETE", self.path(pool, "session", identifier, MODERN_API))
        if status != 204:
            raise CallError("delete session -> %s %s" % (status, data[:300]))

    def close(self):
        self.conn.close()


# -- the workload --------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Session:
    def __init__(self, kind, index):
        self.kind = kind
        self.pool = POOL_OF[kind]
        self.identifier = "load-%s-%d-%s" % (kind, index, uuid.uuid4().hex[:10])
        self.calls = 0
        self.current = None  # the kind of the call in progress, for error accounting

    def open(self, client):
        """The first call: allocates the session (and checks the pool's runtime answers)."""
        if self.pool == "python":
            client.execute(self.pool, self.identifier, "import numpy as np\ncalls = 0\n1 + 1")
        elif self.kind == "node":
            assert client.execute(self.pool, self.identifier, "let calls = 0; 1 + 1")["result"] == 2
        else:
            out = client.shell(self.identifier, "cd /mnt/data && export CALLS=0 && echo ready")
            if out != "ready\n":
                raise CallError("shell warm-up said %r" % out)

    def step(self, client, rng):
        """One call of this session's mix: returns its kind."""
        self.calls += 1
        n = rng.randrange(1000, 20000)
        if self.kind == "python":
            if self.calls % 4 == 0:
                self.current = "py-plot"
                code = ("import matplotlib.pyplot as plt\n"
                        "fig, ax = plt.subplots(figsize=(3, 2), dpi=60)\n"
                        "ax.plot(np.sin(np.linspace(0, %d / 1000, 200)))\n"
                        "plt.show()\nplt.close('all')" % n)
                result = client.execute(self.pool, self.identifier, code)["result"]
                if not (isinstance(result, dict) and result.get("format") == "png"
                        and base64.b64decode(result.get("base64_data", ""))[:8] == PNG_SIGNATURE):
                    raise CallError("the plot is not a PNG image: %s" % str(result)[:200])
                return "py-plot"
            self.current = "py-compute"
            code = "calls += 1\nn = %d\nint(np.arange(n).sum()) + sum(i for i in range(n))" % n
            result = client.execute(self.pool, self.identifier, code)["result"]
            if result != n * (n - 1):
                raise CallError("python computed %r, expected %d" % (result, n * (n - 1)))
            return "py-compute"
        if self.kind == "node":
            self.current = "node"
            code = "calls++; { let s = 0; for (let i = 0; i < %d; i++) s += i; s }" % n
            result = client.execute(self.pool, self.identifier, code)["result"]
            if result != n * (n - 1) // 2:
                raise CallError("node computed %r, expected %d" % (result, n * (n - 1) // 2))
            return "node"
        if self.kind == "shell":
            self.current = "shell"
            out = client.shell(self.identifier, "CALLS=$((CALLS+1)); echo $((%d * 2)) $(pwd) $CALLS" % n)
            if out != "%d /mnt/data %d\n" % (2 * n, self.calls):
                raise CallError("shell said %r" % out)
            return "shell"
        # files: upload -> list -> download, rotating between the three
        step = self.calls % 3
        if not hasattr(self, "payload"):
            step = 1  # nothing uploaded yet
        self.current = "%s (%s)" % (("download", "upload", "list")[step], self.pool)
        if step == 1:
            payload, name = rng.randbytes(32 << 10), "data-%d.bin" % (self.calls // 3 % 4)
            client.upload(self.pool, self.identifier, name, payload)
            self.payload, self.name = payload, name
            return self.current
        if step == 2:
            files = client.list_files(self.pool, self.identifier)
            if files.get(self.name) != len(self.payload):
                raise CallError("list: %s has %r bytes, expected %d" % (self.name, files.get(self.name), len(self.payload)))
            return self.current
        data = client.download(self.pool, self.identifier, self.name)
        if data != self.payload:
            raise CallError("download of %s: %d bytes differ from the upload" % (self.name, len(data)))
        return self.current


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = {}
        self.errors = []
        self.error_count = 0
        self.errors_by_kind = {}
        self.distinct = {}  # message without identifiers and timings -> count

    def add(self, kind, seconds):
        with self.lock:
            self.latency.setdefault(kind, []).append(seconds)

    def error(self, what, kind="other"):
        with self.lock:
            self.error_count += 1
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
            shape = re.sub(r"load-[a-z-]+-\d+-[0-9a-f]+", "<session>", what)
            shape = re.sub(r"data-\d+\.bin", "data-N.bin", shape)
            shape = re.sub(r"after \d+ ms", "after N ms", shape)
            self.distinct[shape] = self.distinct.get(shape, 0) + 1
            if len(self.errors) < 20:
                self.errors.append(what)


def plan(total):
    counts = {kind: int(round(total * share)) for kind, share in MIX}
    counts["python"] += total - sum(counts.values())
    return counts


def pools_for(counts, args):
    shell_sessions = counts["shell"] + counts["files-sh"]
    python_sessions = counts["python"] + counts["files-py"]
    return [
        # Python sandboxes are costly (1.4 s CPU, ~90 MiB): a small ready queue; the sessions are
        # started on the request path, --warmup-parallel at a time.
        {"name": "python", "readySessionInstances": min(args.python_ready, max(1, python_sessions)),
         "maxConcurrentSessions": python_sessions + 8, "cooldownPeriodInSeconds": 3600},
        {"name": "node", "type": "NodeLTS", "readySessionInstances": 4,
         "maxConcurrentSessions": counts["node"] + 8, "cooldownPeriodInSeconds": 3600},
        {"name": "shell", "type": "Shell", "readySessionInstances": 4,
         "maxConcurrentSessions": shell_sessions + 8, "cooldownPeriodInSeconds": 3600},
    ]


def warm_up(server, sessions, parallel, stats):
    """Opens every session, `parallel` at a time, printing progress every few seconds."""
    queue = list(sessions)
    lock = threading.Lock()
    done = {kind: 0 for kind, _ in MIX}
    total = {kind: sum(1 for s in sessions if s.kind == kind) for kind, _ in MIX}

    def worker():
        client = Client(server)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    session = queue.pop(0)
                t = time.perf_counter()
                try:
                    session.open(client)
                    stats.add("open-" + session.kind, time.perf_counter() - t)
                    with lock:
                        done[session.kind] += 1
                except Exception as e:  # noqa: BLE001 - counted and reported
                    stats.error("open %s: %r" % (session.identifier, e), "open-" + session.kind)
                    client.close()
                    client = Client(server)
        finally:
            client.close()

    # Interleave kinds so that Python launches overlap with the cheap ones.
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    start = time.monotonic()
    for th in threads:
        th.start()
    last = 0.0
    while any(th.is_alive() for th in threads):
        time.sleep(0.5)
        if time.monotonic() - last >= 5:
            last = time.monotonic()
            with lock:
                progress = ", ".join("%s %d/%d" % (k, done[k], total[k]) for k, _ in MIX)
            log("warm-up %.0f s: %s; MemAvailable %.1f GiB" % (time.monotonic() - start, progress,
                                                                  meminfo_kib() / 1048576))
    for th in threads:
        th.join()
    log("warm-up done in %.1f s: %s" % (time.monotonic() - start,
                                        ", ".join("%s %d/%d" % (k, done[k], total[k]) for k, _ in MIX)))
    return time.monotonic() - start


def run_load(server, sessions, duration, think, stats, sampler):
    stop_at = [0.0]
    go = threading.Event()
    counts = [0]
    counts_lock = threading.Lock()

    def worker(session, seed):
        rng = random.Random(seed)
        client = Client(server)
        go.wait()
        try:
            time.sleep(rng.uniform(0, think))  # spread the first calls
            while time.monotonic() < stop_at[0]:
                t = time.perf_counter()
                try:
                    kind = session.step(client, rng)
                    stats.add(kind, time.perf_counter() - t)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    stats.error("%s %s: %r" % (session.current, session.identifier, e), session.current)
                    client.close()
                    client = Client(server)
                with counts_lock:
                    counts[0] += 1
                pause = rng.uniform(0.5 * think, 1.5 * think)
                time.sleep(max(0.0, min(pause, stop_at[0] - time.monotonic())))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(s, k), daemon=True) for k, s in enumerate(sessions)]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + duration
    go.set()
    last = t0
    while time.monotonic() < stop_at[0]:
        time.sleep(min(1.0, max(0.0, stop_at[0] - time.monotonic())))
        sampler()
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            with counts_lock:
                n = counts[0]
            log("load %.0f/%d s: %d requests, %d errors" % (last - t0, duration, n, stats.error_count))
    for th in threads:
        th.join(600)
    return time.monotonic() - t0


# -- report --------------------------------------------------------------------------------------


def memory_per_pool(server):
    uid_pool = server.uid_pools()
    by_uid = pss_by_uid(server.uids)
    per_pool = {}
    for uid, kib in by_uid.items():
        per_pool.setdefault(uid_pool.get(uid, "(ready, template: no session)"), []).append(kib / 1024.0)
    return {pool: {"sandboxes": len(v), "pss_mean_mib": statistics.fmean(v), "pss_p50_mib": pct(v, 50),
                   "pss_max_mib": max(v), "pss_total_mib": sum(v)} for pool, v in per_pool.items()}


def no_nan(value):
    """NaN (a percentile of no samples) as null, so that --json writes strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return value


def render(result):
    lines = []
    kinds = result["latency"]
    lines.append("| kind | requests | errors | p50 ms | p95 ms | p99 ms | max ms |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, s in kinds.items():
        lines.append("| %s | %d | %d | %.1f | %.1f | %.1f | %.1f |" % (
            kind, s["n"], s["errors"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"]))
    lines.append("")
    t = result["totals"]
    lines.append("| total | value |")
    lines.append("| --- | ---: |")
    lines.append("| requests (load phase) | %d |" % t["requests"])
    lines.append("| errors | %d |" % t["errors"])
    lines.append("| throughput | %.1f req/s over %.1f s |" % (t["throughput_rps"], t["seconds"]))
    lines.append("| sessions alive after the load | %d of %d |" % (t["sessions_alive"], t["sessions"]))
    lines.append("| warm-up (open all sessions) | %.1f s |" % t["warmup_seconds"])
    lines.append("")
    lines.append("| memory | server RSS MiB | host MemAvailable GiB |")
    lines.append("| --- | ---: | ---: |")
    for phase, m in result["memory"].items():
        lines.append("| %s | %.1f | %.2f |" % (phase, m["server_rss_mib"], m["mem_available_gib"]))
    lines.append("")
    lines.append("| pool | sandboxes | PSS per session mean / p50 / max MiB | PSS total MiB |")
    lines.append("| --- | ---: | ---: | ---: |")
    for pool, m in sorted(result["pss"].items()):
        lines.append("| %s | %d | %.1f / %.1f / %.1f | %.0f |" % (pool, m["sandboxes"], m["pss_mean_mib"],
                                                               m["pss_p50_mib"], m["pss_max_mib"], m["pss_total_mib"]))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200, help="concurrent sessions (default 200)")
    parser.add_argument("--duration", type=float, default=120, help="seconds of load (default 120)")
    parser.add_argument("--think", type=float, default=1.0,
                        help="mean pause between a session's calls, s (default 1.0; 0 = closed loop)")
    parser.add_argument("--warmup-parallel", type=int, default=3, help="sessions opened at once (default 3)")
    parser.add_argument("--python-ready", type=int, default=2, help="ready Python sandboxes (default 2)")
    parser.add_argument("--bin", default=os.environ.get("SANDPIPER_BIN") or os.path.join(REPO, ".build/debug/sandpiper"))
    parser.add_argument("--runtime", default=os.environ.get("SANDPIPER_PYTHON_RUNTIME") or DEFAULT_RUNTIME)
    parser.add_argument("--uid-base", type=int, default=UID_BASE,
                        help="server.sandboxUidBase (default %d); %d uids from there are judged ours" % (UID_BASE, UID_SPAN))
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON ('-' for stdout)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("load.py runs the server, which needs root")
    if not os.path.exists(args.bin):
        sys.exit("sandpiper binary not found at %s (--bin or SANDPIPER_BIN)" % args.bin)

    counts = plan(args.sessions)
    need_mib = sum(FOOTPRINT_MIB[k] * n for k, n in counts.items()) + 1024
    available_mib = meminfo_kib() / 1024
    log("binary %s; sessions %s; about %.1f GiB needed, %.1f GiB available"
        % (args.bin, counts, need_mib / 1024, available_mib / 1024))
    if need_mib > available_mib * 0.9:
        sys.exit("not enough memory for %d sessions: ~%.1f GiB needed, %.1f GiB available (use --sessions)"
                 % (args.sessions, need_mib / 1024, available_mib / 1024))

    workdir = tempfile.mkdtemp(prefix="sandpiper-load-")
    os.chmod(workdir, 0o711)  # sandbox uids traverse it to their bind-mounted data
    server = None
    stats = Stats()
    memory = {}
    worst = {"rss": 0, "avail": float("inf")}

    def mem_sample(phase=None):
        rss, avail = rss_kib(server.proc.pid), meminfo_kib()
        worst["rss"] = max(worst["rss"], rss)
        worst["avail"] = min(worst["avail"], avail)
        if phase:
            memory[phase] = {"server_rss_mib": rss / 1024, "mem_available_gib": avail / 1048576}

    interrupted = aborted = False
    try:
        before_kib = meminfo_kib()
        server = Server(args.bin, args.runtime, workdir, pools_for(counts, args), args.uid_base)
        log("server pid %d on port %d; filling the ready queues" % (server.proc.pid, server.port))
        server.wait_ready()
        memory["before (host, no server)"] = {"server_rss_mib": 0.0, "mem_available_gib": before_kib / 1048576}
        mem_sample("server up, pools ready")

        sessions = []
        index = 0
        # Round-robin over kinds so the warm-up interleaves costly and cheap launches.
        remaining = dict(counts)
        while any(remaining.values()):
            for kind, _ in MIX:
                if remaining[kind]:
                    sessions.append(Session(kind, index))
                    remaining[kind] -= 1
                    index += 1
        warmup_seconds = warm_up(server, sessions, args.warmup_parallel, stats)
        if stats.error_count:
            raise CallError("the warm-up failed: %s" % stats.errors[:5])
        time.sleep(2)
        mem_sample("%d sessions open, idle" % len(sessions))
        worst["rss"], worst["avail"] = 0, float("inf")

        log("load: %d sessions for %.0f s (think %.1f s)" % (len(sessions), args.duration, args.think))
        seconds = run_load(server, sessions, args.duration, args.think, stats, mem_sample)
        memory["during the load (worst)"] = {"server_rss_mib": worst["rss"] / 1024,
                                             "mem_available_gib": worst["avail"] / 1048576}
        mem_sample("after the load")
        pss = memory_per_pool(server)

        client = Client(server)
        alive = set()
        for pool in ("python", "node", "shell"):
            alive |= client.live_sessions(pool)
        wanted = {s.identifier for s in sessions}
        lost = wanted - alive
        if lost:
            stats.error("%d sessions lost during the load, e.g. %s" % (len(lost), sorted(lost)[:3]))
        for s in sessions:
            try:
                client.delete_session(s.pool, s.identifier)
            except Exception as e:  # noqa: BLE001
                stats.error("delete %s: %r" % (s.identifier, e))
                client.close()
                client = Client(server)
        client.close()
        time.sleep(3)
        mem_sample("sessions deleted")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping the server")
    except Exception as e:  # noqa: BLE001 - reported below, exit 1
        stats.error("the run stopped: %r" % e)
        log("the run stopped: %r" % e)
        aborted = True
    finally:
        if server is not None:
            server.stop()
            rc = server.proc.returncode
            if rc != 0 and not interrupted:
                stats.error("sandpiper exited with %s after SIGTERM" % rc)
            # Our uids are ours only once our server claimed them (it refuses a range in use).
            if server.port is not None:
                deadline = time.monotonic() + 10
                while uid_processes(server.uids) and time.monotonic() < deadline:
                    time.sleep(0.2)
                leftover = uid_processes(server.uids)
                if leftover:
                    stats.error("%d sandbox processes left after shutdown" % len(leftover))
        with open("/proc/self/mountinfo") as f:
            left_mounts = sum(1 for line in f if " %s/" % workdir in line)
        if left_mounts:
            # A server that did not exit cleanly: a server started on the same data directory
            # removes what it left (mounts, cgroups, records); keep it for that or for a look.
            stats.error("%d mounts left under %s (kept)" % (left_mounts, workdir))
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        sys.exit(130)
    if aborted:
        print("errors: %d" % stats.error_count)
        for shape, count in sorted(stats.distinct.items(), key=lambda kv: -kv[1])[:10]:
            print("  %5d x %s" % (count, shape[:1000]))
        if server is not None:
            print("server log tail:\n" + server.log_tail())
        sys.exit(1)

    latency = {}
    for kind in sorted(set(stats.latency) | set(stats.errors_by_kind), key=lambda k: (k.startswith("open-"), k)):
        v = stats.latency.get(kind, [])
        latency[kind] = {"n": len(v) + stats.errors_by_kind.get(kind, 0), "errors": stats.errors_by_kind.get(kind, 0),
                         "p50_ms": pct(v, 50) * 1000, "p95_ms": pct(v, 95) * 1000,
                         "p99_ms": pct(v, 99) * 1000, "max_ms": max(v, default=float("nan")) * 1000}
    requests = sum(v["n"] for k, v in latency.items() if not k.startswith("open-") and k != "other")
    result = {
        "sessions": counts,
        "latency": latency,
        "totals": {"requests": requests, "errors": stats.error_count, "seconds": seconds,
                   "throughput_rps": requests / seconds, "sessions": len(sessions),
                   "sessions_alive": len(wanted & alive), "warmup_seconds": warmup_seconds,
                   "think_seconds": args.think},
        "memory": memory,
        "pss": pss,
        "errors": [{"count": c, "error": e} for e, c in sorted(stats.distinct.items(), key=lambda kv: -kv[1])],
    }
    print(render(result))
    if stats.error_count:
        print("\nerrors: %d, by kind %s" % (stats.error_count, stats.errors_by_kind))
        for shape, count in sorted(stats.distinct.items(), key=lambda kv: -kv[1])[:10]:
            print("  %5d x %s" % (count, shape[:400]))
    if args.json:
        text = json.dumps(no_nan(result), indent=2, sort_keys=True)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    sys.exit(1 if stats.error_count else 0)


if __name__ == "__main__":
    main()
