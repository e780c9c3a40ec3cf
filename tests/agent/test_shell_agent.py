"""End-to-end tests for the shell guest agent (real bash, no mocks).

    SANDPIPER_PYTHON=/var/lib/sandpiper/runtimes/python/bin/python pytest -q tests/agent/test_shell_agent.py
"""

import os
import subprocess
import time

import pytest

from agent_support import AgentProcess, shell_agent_argv

RESULT_KEYS = {"id", "type", "status", "stdout", "stderr", "result", "jupyterResult",
               "timedOut", "durationMs", "stdoutTruncated", "stderrTruncated", "exitCode"}
TIMEOUT_LINE = "TimeoutError: command exceeded 1 seconds and was killed\n"


def run(agent, code, stdin=None, timeout_seconds=30.0, output_limit=1048576, wait=60):
    req = {"type": "execute", "code": code, "timeoutSeconds": timeout_seconds,
           "outputLimit": output_limit}
    if stdin is not None:
        req["stdin"] = stdin
    reply = agent.request(req, timeout=wait)
    assert reply["type"] == "result", reply
    assert set(reply) == RESULT_KEYS, reply
    assert reply["result"] == "" and reply["jupyterResult"] == ""
    assert reply["status"] == ("Success" if reply["exitCode"] == 0 else "Failure"), reply
    return reply


def ok(reply):
    assert reply["exitCode"] == 0 and reply["status"] == "Success", reply
    return reply


@pytest.fixture(scope="module")
def tmpdir_env(tmp_path_factory):
    return {"TMPDIR": str(tmp_path_factory.mktemp("shell-tmp"))}


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
    return tmp_path_factory.mktemp("shell-cwd")


@pytest.fixture(scope="module")
def sh(cwd, tmpdir_env):
    proc = AgentProcess(cwd, extra_env=tmpdir_env, argv=shell_agent_argv())
    yield proc
    graceful_close(proc)


@pytest.fixture
def fresh_sh(tmp_path):
    procs = []

    def start():
        p = AgentProcess(tmp_path, argv=shell_agent_argv())
        procs.append(p)
        return p

    yield start
    for p in procs:
        graceful_close(p)


# ---------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------

def test_ready_and_packages(sh):
    ready = sh.ready
    assert ready["type"] == "ready" and ready["protocol"] == 1
    assert ready["language"] == "shell" and ready["pid"] == sh.proc.pid
    bash_version = subprocess.run(["bash", "-c", "echo ${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}"],
                                  capture_output=True, text=True).stdout.strip()
    assert ready["version"].startswith(bash_version + ".")
    reply = sh.request({"id": 5, "type": "packages"})
    assert reply["id"] == 5 and reply["type"] == "packages"
    assert reply["runtime"] == {"name": "bash", "version": ready["version"]}
    for tool in reply["packages"]:
        assert isinstance(tool["name"], str) and isinstance(tool["version"], str)


def test_ping_and_errors(sh):
    assert sh.request({"id": 1, "type": "ping"}) == {"id": 1, "type": "pong"}
    sh.send_raw(b"not json")
    assert sh.recv()["type"] == "error"
    reply = sh.request({"id": 2, "type": "execute", "code": "echo", "stdin": 5})
    assert reply["type"] == "error" and reply["id"] == 2
    reply = sh.request({"id": 3, "type": "nope"})
    assert reply["type"] == "error" and reply["id"] == 3


# ---------------------------------------------------------------------------
# State and basics
# ---------------------------------------------------------------------------

def test_cwd_variables_functions_aliases_persist(sh, cwd):
    r = ok(run(sh, "pwd"))
    assert r["stdout"] == "%s\n" % cwd
    ok(run(sh, "mkdir -p sub && cd sub && export EXPORTED=yes && PLAIN=1\n"
               "greet() { echo \"hello $1\"; }\nalias ll='echo aliased'"))
    r = ok(run(sh, "pwd; echo $EXPORTED $PLAIN; bash -c 'echo child:$EXPORTED:$PLAIN'; greet you; ll"))
    assert r["stdout"] == "%s/sub\nyes 1\nchild:yes:\nhello you\naliased\n" % cwd
    ok(run(sh, "cd .."))


def test_exit_codes_and_streams(sh):
    r = run(sh, "echo out; echo err >&2; false")
    assert r["exitCode"] == 1 and r["status"] == "Failure"
    assert r["stdout"] == "out\n" and r["stderr"] == "err\n"
    r = run(sh, "(exit 7)")
    assert r["exitCode"] == 7
    r = run(sh, "if then fi")
    assert r["exitCode"] == 2 and "syntax error" in r["stderr"]
    r = run(sh, "definitely-not-a-command-xyz")
    assert r["exitCode"] == 127


def test_stdin(sh):
    r = ok(run(sh, "cat; echo; wc -l", stdin="line one\nline two\n"))
    assert r["stdout"] == "line one\nline two\n\n0\n"
    r = ok(run(sh, "read -r first; echo \"got:$first\"", stdin="abc\n"))
    assert r["stdout"] == "got:abc\n"
    start = time.monotonic()
    r = ok(run(sh, "cat; echo end"))  # no stdin: /dev/null
    assert r["stdout"] == "end\n" and time.monotonic() - start < 2


def test_multi_line_scripts(sh):
    script = ("total=0\n"
              "for i in 1 2 3; do\n"
              "  total=$((total + i))\n"
              "done\n"
              "if [ $total -eq 6 ]; then\n"
              "  echo \"sum $total\"\n"
              "fi\n"
              "cat <<EOF\n"
              "heredoc $total\n"
              "EOF\n")
    r = ok(run(sh, script))
    assert r["stdout"] == "sum 6\nheredoc 6\n"
    assert ok(run(sh, "echo $total"))["stdout"] == "6\n"


def test_protocol_fds_not_visible(sh):
    r = ok(run(sh, "ls /proc/self/fd"))
    # ls opens fd 3 for the directory itself; nothing else is inherited.
    assert r["stdout"].split() == ["0", "1", "2", "3"]
    r = run(sh, "echo hi >&200")
    assert r["exitCode"] != 0
    assert ok(run(sh, "echo still fine"))["stdout"] == "still fine\n"


# ---------------------------------------------------------------------------
# Output limits
# ---------------------------------------------------------------------------

def test_cap_is_exact(sh):
    r = ok(run(sh, "yes | head -c 10000; yes e | head -c 5000 >&2", output_limit=4096))
    assert r["stdout"] == "y\n" * 2048 and r["stdoutTruncated"] is True
    assert len(r["stderr"]) == 4096 and r["stderrTruncated"] is True
    r = ok(run(sh, "head -c 4096 /dev/zero | tr '\\0' a", output_limit=4096))
    assert r["stdout"] == "a" * 4096 and r["stdoutTruncated"] is False


def test_flood_is_bounded(sh):
    start = time.monotonic()
    r = ok(run(sh, "yes | head -c 500000000; echo done >&2", output_limit=4096))
    assert time.monotonic() - start < 20
    assert len(r["stdout"]) == 4096 and r["stdoutTruncated"] is True
    assert r["stderr"] == "done\n"
    assert sh.rss_kb() < 100 * 1024


# ---------------------------------------------------------------------------
# Background jobs and timeouts
# ---------------------------------------------------------------------------

def test_background_jobs_do_not_block(sh):
    start = time.monotonic()
    r = ok(run(sh, "sleep 1000 & nohup sleep 1000 >/dev/null 2>&1 & echo started"))
    assert time.monotonic() - start < 2
    assert r["stdout"] == "started\n"
    # A background job that keeps writing does not leak into later commands.
    ok(run(sh, "(for i in $(seq 40); do echo noise; echo noise >&2; sleep 0.05; done) & echo bg"))
    for _ in range(3):
        r = ok(run(sh, "echo clean"))
        assert r["stdout"] == "clean\n" and r["stderr"] == ""
        time.sleep(0.1)


def test_timeout_kills_command_but_keeps_shell(sh):
    ok(run(sh, "KEEP_ME=kept; cd /"))
    start = time.monotonic()
    r = run(sh, "echo begin; sleep 100", timeout_seconds=1)
    assert time.monotonic() - start < 4
    assert r["exitCode"] == 124 and r["timedOut"] is True and r["status"] == "Failure"
    assert r["stdout"] == "begin\n"
    assert r["stderr"].endswith(TIMEOUT_LINE)
    r = ok(run(sh, "echo $KEEP_ME; pwd"))
    assert r["stdout"] == "kept\n/\n"


def test_exit_then_next_command_works(sh, cwd):
    ok(run(sh, "cd %s" % cwd))
    r = run(sh, "echo bye; exit 3")
    assert r["exitCode"] == 3 and r["stdout"] == "bye\n"
    assert "new shell" in r["stderr"]
    r = ok(run(sh, "echo back; pwd"))
    assert r["stdout"] == "back\n%s\n" % cwd  # the working directory is kept


def test_workdir_removed_by_user_is_recreated(sh, tmpdir_env):
    ok(run(sh, "rm -rf \"$TMPDIR\"/.sandpiper-shell-*"))
    assert ok(run(sh, "echo recovered"))["stdout"] == "recovered\n"


def test_busy_shell_is_restarted_at_timeout(fresh_sh):
    agent = fresh_sh()
    ok(run(agent, "cd /tmp; LOST=1"))
    start = time.monotonic()
    r = run(agent, "while :; do :; done", timeout_seconds=1)
    assert time.monotonic() - start < 6
    assert r["exitCode"] == 124 and r["timedOut"] is True
    assert "restarted" in r["stderr"] and r["stderr"].endswith(TIMEOUT_LINE)
    r = ok(run(agent, "echo \"[$LOST]\"; pwd"))
    assert r["stdout"] == "[]\n/tmp\n"
