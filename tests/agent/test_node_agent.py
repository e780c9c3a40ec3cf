"""End-to-end tests for the Node.js guest agent (real node processes, no mocks).

    SANDPIPER_NODE=/usr/bin/node pytest -q tests/agent/test_node_agent.py
"""

import os
import subprocess
import time

import pytest

from agent_support import AgentProcess, agent_node, node_agent_argv

RESULT_KEYS = {"id", "type", "status", "stdout", "stderr", "result", "jupyterResult",
               "timedOut", "durationMs", "stdoutTruncated", "stderrTruncated"}


def ok(reply):
    assert reply["type"] == "result", reply
    assert set(reply) == RESULT_KEYS, reply
    assert reply["status"] == "Success", reply
    return reply


def failed(reply):
    assert reply["type"] == "result", reply
    assert set(reply) == RESULT_KEYS, reply
    assert reply["status"] == "Failure", reply
    assert reply["result"] == "" and reply["jupyterResult"] == "", reply
    return reply


def tree_rss_kb(pid):
    """RSS of pid and all its descendants."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    children = {}
    rss = {}
    for p, pp, r in rows:
        children.setdefault(pp, []).append(p)
        rss[p] = r
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def graceful_close(proc):
    """EOF on fd 3 first, so the agent can end what it started, then close."""
    try:
        os.close(proc.wfd)
        proc.proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass
    proc.close()


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return tmp_path_factory.mktemp("node-cwd")


@pytest.fixture(scope="module")
def node(cwd):
    proc = AgentProcess(cwd, argv=node_agent_argv())
    yield proc
    graceful_close(proc)


@pytest.fixture
def fresh_node(tmp_path):
    procs = []

    def start():
        p = AgentProcess(tmp_path, argv=node_agent_argv())
        procs.append(p)
        return p

    yield start
    for p in procs:
        graceful_close(p)


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------

def test_ready_message(node):
    ready = node.ready
    assert ready["type"] == "ready" and ready["protocol"] == 1
    assert ready["language"] == "javascript"
    assert ready["pid"] == node.proc.pid
    expected = subprocess.run([agent_node(), "--version"], capture_output=True, text=True).stdout
    assert "v" + ready["version"] == expected.strip()


def test_ping_and_errors(node):
    assert node.request({"id": 41, "type": "ping"}) == {"id": 41, "type": "pong"}
    node.send_raw(b"{nope")
    reply = node.recv()
    assert reply["type"] == "error" and reply["id"] is None
    node.send_raw(b"[1]")
    assert node.recv()["type"] == "error"
    reply = node.request({"id": 42, "type": "frobnicate"})
    assert reply["type"] == "error" and reply["id"] == 42
    reply = node.request({"id": 43, "type": "execute", "code": 7})
    assert reply["type"] == "error" and reply["id"] == 43
    assert node.request({"id": 44, "type": "ping"}) == {"id": 44, "type": "pong"}


def test_packages(node):
    reply = node.request({"id": 9, "type": "packages"})
    assert reply["type"] == "packages" and reply["id"] == 9
    assert reply["runtime"]["name"] == "node"
    assert reply["runtime"]["version"] == node.ready["version"]
    assert isinstance(reply["packages"], list)
    for pkg in reply["packages"]:
        assert isinstance(pkg["name"], str) and isinstance(pkg["version"], str)
    names = [p["name"].lower() for p in reply["packages"]]
    assert names == sorted(names)


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

def test_declarations_persist_across_cells(node):
    ok(node.execute("let counter = 40; const step = 2;\n"
                    "function bump(n) { return n + step }\nclass Box { constructor(v) { this.v = v } }"))
    r = ok(node.execute("counter = bump(counter); new Box(counter).v"))
    assert r["result"] == 42
    r = ok(node.execute("var later = counter * 2; later"))
    assert r["result"] == 84


def test_top_level_await(node):
    r = ok(node.execute("const awaited = await new Promise(r => setTimeout(() => r(21), 20));\nawaited * 2"))
    assert r["result"] == 42 and r["jupyterResult"] == "42"
    r = ok(node.execute("awaited + 1"))  # declared in an await cell, still there
    assert r["result"] == 22
    r = ok(node.execute("await Promise.resolve('done')"))
    assert r["result"] == "done" and r["jupyterResult"] == "'done'"


def test_require_builtins_and_files_in_cwd(node, cwd):
    (cwd / "input.txt").write_text("uploaded data")
    r = ok(node.execute("const fs = require('fs'); const path = require('path');\n"
                        "fs.readFileSync(path.join(process.cwd(), 'input.txt'), 'utf8')"))
    assert r["result"] == "uploaded data"
    r = ok(node.execute("process.cwd()"))
    assert r["result"] == str(cwd)
    ok(node.execute("fs.writeFileSync('out.txt', 'from node')"))
    assert (cwd / "out.txt").read_text() == "from node"
    r = ok(node.execute("typeof require('util').inspect + typeof require('child_process').spawn"))
    assert r["result"] == "functionfunction"


def test_static_import_and_dynamic_import(node):
    r = ok(node.execute("import os from 'os'\nimport { join } from 'path'\ntypeof os.cpus + join('a', 'b')"))
    assert r["result"] == "functiona/b"
    r = ok(node.execute("(await import('node:path')).basename('/x/y.txt')"))
    assert r["result"] == "y.txt"


# ---------------------------------------------------------------------------
# Output capture
# ---------------------------------------------------------------------------

def test_console_capture(node):
    r = ok(node.execute("console.log('log', 1); console.info('info'); console.debug('debug');\n"
                        "console.error('error'); console.warn('warn');\n"
                        "process.stdout.write('raw-out'); process.stderr.write('raw-err')"))
    assert r["stdout"] == "log 1\ninfo\ndebug\nraw-out"
    assert r["stderr"] == "error\nwarn\nraw-err"
    assert r["result"] is True


def test_child_process_output_captured(node):
    r = ok(node.execute("require('child_process').execSync('echo from-child; echo child-err >&2',"
                        " {stdio: 'inherit'}); 'ok'"))
    assert r["stdout"] == "from-child\n" and r["stderr"] == "child-err\n"
    r = ok(node.execute("require('child_process').execSync('echo piped').toString()"))
    assert r["result"] == "piped\n" and r["stdout"] == ""


def test_protocol_fds_not_inherited_and_stdin_is_empty(node):
    r = ok(node.execute("require('child_process').execSync('ls /proc/self/fd').toString()"))
    # ls itself opens fd 3 for the directory; nothing else may be inherited.
    assert r["result"].split() == ["0", "1", "2", "3"]
    r = ok(node.execute("require('fs').readFileSync(0, 'utf8')"))
    assert r["result"] == ""


def test_late_output_does_not_leak_into_next_cell(node):
    ok(node.execute("setTimeout(() => console.log('late'), 100); 1"))
    time.sleep(0.4)
    r = ok(node.execute("'next'"))
    assert r["stdout"] == "" and r["result"] == "next"


def test_output_limit_cuts_on_utf8_boundary(node):
    r = ok(node.execute("process.stdout.write('é'.repeat(3000)); process.stderr.write('abc')",
                        output_limit=4097))
    assert r["stdoutTruncated"] is True and r["stderrTruncated"] is False
    assert len(r["stdout"].encode()) == 4096 and set(r["stdout"]) == {"é"}


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("code,result,jupyter", [
    ("6 * 7", 42, "42"),
    ("1.5", 1.5, "1.5"),
    ("NaN", None, "NaN"),
    ("-Infinity", None, "-Infinity"),
    ("true", True, "true"),
    ("'abc'", "abc", "'abc'"),
    ("undefined", "", ""),
    ("null", "", "null"),
    ("let noValue = 1", "", ""),
    ("[1, 'a']", "[ 1, 'a' ]", "[ 1, 'a' ]"),
    ("({a: 1, b: {c: 2}})", "{ a: 1, b: { c: 2 } }", "{ a: 1, b: { c: 2 } }"),
    ("{a: 1}", "{ a: 1 }", "{ a: 1 }"),
    ("function named() {}; named", "[Function: named]", "[Function: named]"),
    ("2n ** 64n", "18446744073709551616", "18446744073709551616n"),
    ("Promise.resolve(5)", 5, "5"),
])
def test_result_typing(node, code, result, jupyter):
    r = ok(node.execute(code))
    assert r["result"] == result and r["jupyterResult"] == jupyter
    assert type(r["result"]) is type(result)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

def test_thrown_error_has_stack(node):
    r = failed(node.execute("console.log('before');\nfunction explode() { throw new RangeError('boom') }\nexplode()"))
    assert r["stdout"] == "before\n"
    assert r["stderr"].startswith("RangeError: boom\n")
    assert "at explode (<cell-" in r["stderr"]
    assert "agent.js" not in r["stderr"] and "node:vm" not in r["stderr"]
    assert r["timedOut"] is False


def test_rejected_promise_and_non_error_throw(node):
    r = failed(node.execute("await Promise.reject(new TypeError('nope'))"))
    assert "TypeError: nope" in r["stderr"]
    r = failed(node.execute("throw 42"))
    assert r["stderr"] == "Uncaught 42\n"


def test_syntax_error(node):
    r = failed(node.execute("let = ;"))
    assert "SyntaxError" in r["stderr"]
    assert ok(node.execute("1 + 1"))["result"] == 2


def test_uncaught_async_errors_between_cells(node):
    ok(node.execute("var survivor = 'alive';\n"
                    "setTimeout(() => { throw new Error('late boom') }, 20);\n"
                    "Promise.reject(new Error('nobody awaits'));\n1"))
    time.sleep(0.3)
    assert node.proc.poll() is None
    r = ok(node.execute("survivor"))
    assert r["result"] == "alive"
    assert "late boom" in r["stderr"] and "nobody awaits" in r["stderr"]
    assert ok(node.execute("2"))["stderr"] == ""  # reported once


def test_process_exit_is_intercepted(node):
    ok(node.execute("var keep = 'kept'"))
    r = failed(node.execute("process.exit(3)"))
    assert "process.exit(3)" in r["stderr"]
    assert ok(node.execute("keep"))["result"] == "kept"


# ---------------------------------------------------------------------------
# Timeouts and floods
# ---------------------------------------------------------------------------

TIMEOUT_LINE = "TimeoutError: execution exceeded 1 seconds and was interrupted\n"


def test_infinite_loop_times_out_and_state_survives(node):
    ok(node.execute("let beforeLoop = 'still here'"))
    start = time.monotonic()
    r = failed(node.execute("console.log('spinning'); while (true) {}", timeout_seconds=1))
    assert time.monotonic() - start < 4
    assert r["timedOut"] is True and r["stdout"] == "spinning\n"
    assert r["stderr"].endswith(TIMEOUT_LINE)
    assert ok(node.execute("beforeLoop"))["result"] == "still here"


def test_pending_await_times_out(node):
    start = time.monotonic()
    r = failed(node.execute("await new Promise(() => {})", timeout_seconds=1))
    assert time.monotonic() - start < 3
    assert r["timedOut"] is True and r["stderr"].endswith(TIMEOUT_LINE)
    assert ok(node.execute("beforeLoop"))["result"] == "still here"


def test_blocking_child_process_times_out(node):
    start = time.monotonic()
    r = failed(node.execute("require('child_process').execSync('sleep 100')", timeout_seconds=1))
    assert time.monotonic() - start < 5
    assert r["timedOut"] is True and r["stderr"].endswith(TIMEOUT_LINE)
    assert ok(node.execute("beforeLoop"))["result"] == "still here"


def test_output_flood_is_capped_and_memory_bounded(node):
    pid = node.proc.pid
    base = tree_rss_kb(pid)
    r = failed(node.execute("for (;;) console.log('x'.repeat(1e6))", timeout_seconds=2,
                            output_limit=4096))
    assert r["timedOut"] is True
    assert r["stdout"] == "x" * 4096 and r["stdoutTruncated"] is True
    assert tree_rss_kb(pid) < base + 300 * 1024
    r = ok(node.execute("'fine'"))
    assert r["stdout"] == "" and r["result"] == "fine"


def test_uninterruptible_code_restarts_the_runtime(fresh_node):
    agent = fresh_node()
    ok(agent.execute("var lost = 1"))
    start = time.monotonic()
    r = failed(agent.execute("await null; while (true) {}", timeout_seconds=1, wait=30))
    assert time.monotonic() - start < 9  # within the host's 10 s grace
    assert r["timedOut"] is True and r["stderr"].endswith(TIMEOUT_LINE)
    assert "restarted" in r["stderr"]
    r = ok(agent.execute("typeof lost"))
    assert r["result"] == "undefined"
    # A runtime that dies is replaced too.
    r = failed(agent.execute("process.kill(process.pid, 'SIGKILL')"))
    assert "exited" in r["stderr"]
    assert ok(agent.execute("1 + 1"))["result"] == 2
