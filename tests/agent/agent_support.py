"""Helpers for the guest agent tests (imported by conftest.py and the test modules).

Each agent runs as a real subprocess with two pipes mapped onto its fd 3
(requests) and fd 4 (responses):
- Python: the interpreter named by SANDPIPER_PYTHON (default: the Sandpiper
  Python runtime) runs Agents/python/agent.py;
- Node: SANDPIPER_NODE (default /usr/bin/node) runs Agents/node/agent.js;
- Shell: the SANDPIPER_PYTHON interpreter runs Agents/shell/agent.py.
"""

import json
import os
import select
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENTS = REPO / "Sources" / "SandpiperSandbox" / "Agents"
AGENT = AGENTS / "python" / "agent.py"
NODE_AGENT = AGENTS / "node" / "agent.js"
SHELL_AGENT = AGENTS / "shell" / "agent.py"
DEFAULT_PYTHON = "/var/lib/sandpiper/runtimes/python/bin/python"
DEFAULT_NODE = "/usr/bin/node"

FD_SHIM = """
import fcntl, os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
r2, w2 = fcntl.fcntl(r, fcntl.F_DUPFD, 10), fcntl.fcntl(w, fcntl.F_DUPFD, 10)
os.dup2(r2, 3)
os.dup2(w2, 4)
for fd in {r, w, r2, w2} - {3, 4}:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


def agent_python():
    return os.environ.get("SANDPIPER_PYTHON", DEFAULT_PYTHON)


def agent_node():
    return os.environ.get("SANDPIPER_NODE", DEFAULT_NODE)


def node_agent_argv():
    node = agent_node()
    if not os.path.exists(node):
        pytest.skip("node %s not found (set SANDPIPER_NODE)" % node)
    return [node, str(NODE_AGENT)]


def shell_agent_argv():
    python = agent_python()
    if not os.path.exists(python):
        pytest.skip("interpreter %s not found (set SANDPIPER_PYTHON)" % python)
    return [python, "-I", str(SHELL_AGENT)]


class AgentProcess:
    def __init__(self, cwd, extra_env=None, argv=None):
        python = agent_python()
        if not os.path.exists(python):
            pytest.skip("interpreter %s not found (set SANDPIPER_PYTHON)" % python)
        if argv is None:
            # Same interpreter flags as the host (NamespaceSandbox.swift).
            argv = [python, "-I", "-X", "frozen_modules=on", str(AGENT)]
        req_r, req_w = os.pipe()  # host -> agent (agent's fd 3)
        resp_r, resp_w = os.pipe()  # agent -> host (agent's fd 4)

        env = dict(os.environ)
        env["MPLBACKEND"] = "Agg"
        env.pop("PYTHONPATH", None)
        if extra_env:
            env.update(extra_env)
        self.stderr_file = tempfile.TemporaryFile()
        # A tiny exec shim (same interpreter) puts the pipe ends on fd 3/4.
        self.proc = subprocess.Popen(
            [python, "-c", FD_SHIM, str(req_r), str(resp_w)] + list(argv),
            cwd=str(cwd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr_file,
            pass_fds=(req_r, resp_w),
        )
        os.close(req_r)
        os.close(resp_w)
        self.wfd = req_w
        self.rfd = resp_r
        self.next_id = 1
        self.ready = self.recv(timeout=60)

    # -- framing --------------------------------------------------------------

    def send_raw(self, payload: bytes):
        data = struct.pack(">I", len(payload)) + payload
        view = memoryview(data)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]

    def send(self, obj):
        self.send_raw(json.dumps(obj).encode("utf-8"))

    def _read_exact(self, n, deadline):
        chunks = []
        while n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no response from agent")
            r, _, _ = select.select([self.rfd], [], [], remaining)
            if not r:
                continue
            chunk = os.read(self.rfd, min(n, 1 << 20))
            if not chunk:
                raise EOFError("agent closed fd 4")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def recv_frame(self, timeout=30):
        deadline = time.monotonic() + timeout
        (size,) = struct.unpack(">I", self._read_exact(4, deadline))
        return self._read_exact(size, deadline) if size else b""

    def recv(self, timeout=30):
        return json.loads(self.recv_frame(timeout).decode("utf-8"))

    def request(self, obj, timeout=30):
        if "id" not in obj:
            obj = dict(obj, id=self.next_id)
            self.next_id += 1
        self.send(obj)
        reply = self.recv(timeout=timeout)
        assert reply.get("id") == obj["id"], reply
        return reply

    def execute(self, code, timeout_seconds=30.0, output_limit=1048576, wait=30):
        return self.request({"type": "execute", "code": code,
                             "timeoutSeconds": timeout_seconds,
                             "outputLimit": output_limit}, timeout=wait)

    def rss_kb(self):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def close(self):
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr_file.close()

    def agent_stderr(self):
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")


