"""End-to-end tests for the Python guest agent (real interpreter, no mocks).

Run with any Python that has pytest:
    SANDPIPER_PYTHON=/var/lib/sandpiper/runtimes/python/bin/python pytest -q tests/agent
"""

import base64
import json
import os
import signal
import threading
import time

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A valid 1x1 PNG.
TINY_PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
                "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")

RESULT_KEYS = {"id", "type", "status", "stdout", "stderr", "result", "jupyterResult",
               "timedOut", "durationMs", "stdoutTruncated", "stderrTruncated"}


def ok(reply):
    assert reply["type"] == "result", reply
    assert set(reply) == RESULT_KEYS, reply
    assert reply["status"] == "Success", reply
    return reply


def failed(reply):
    assert reply["type"] == "result", reply
    assert reply["status"] == "Failure", reply
    assert reply["result"] == "", reply
    return reply


def has_module(agent, name):
    r = agent.execute("import importlib.util as _u\n_u.find_spec(%r) is not None" % name)
    return r["result"] is True


# ---------------------------------------------------------------------------
# Start-up and protocol
# ---------------------------------------------------------------------------

def test_ready_message(agent):
    ready = agent.ready
    assert ready["type"] == "ready"
    assert ready["protocol"] == 1
    assert ready["language"] == "python"
    assert ready["pid"] == agent.proc.pid
    assert isinstance(ready["version"], str) and ready["version"].startswith("3.")


def test_ping_pong(agent):
    assert agent.request({"id": 77, "type": "ping"}) == {"id": 77, "type": "pong"}


def test_malformed_frames_get_error_and_agent_continues(agent):
    agent.send_raw(b"{not json")
    reply = agent.recv()
    assert reply["type"] == "error" and reply["id"] is None and reply["message"]
    agent.send_raw(b"\xff\xfe\x00garbage")
    reply = agent.recv()
    assert reply["type"] == "error" and reply["id"] is None
    agent.send_raw(b"[1, 2, 3]")
    reply = agent.recv()
    assert reply["type"] == "error" and reply["id"] is None
    reply = agent.request({"id": 5, "type": "frobnicate"})
    assert reply == {"id": 5, "type": "error", "message": reply["message"]}
    reply = agent.request({"id": 6, "type": "execute", "code": 42})
    assert reply["type"] == "error" and reply["id"] == 6
    assert agent.request({"id": 7, "type": "ping"}) == {"id": 7, "type": "pong"}


def test_packages(agent):
    reply = agent.request({"id": 9, "type": "packages"})
    assert reply["type"] == "packages" and reply["id"] == 9
    assert reply["runtime"]["name"] == "python"
    assert reply["runtime"]["version"] == agent.ready["version"]
    pkgs = reply["packages"]
    names = [p["name"] for p in pkgs]
    assert names == sorted(names, key=lambda n: (n.lower(), n))
    lowered = [n.lower().replace("_", "-") for n in names]
    assert len(lowered) == len(set(lowered))
    assert all(isinstance(p["version"], str) for p in pkgs)
    assert "numpy" in lowered
    assert "ipython" in lowered


def test_eof_on_fd3_exits_zero(fresh_agent):
    a = fresh_agent()
    assert a.execute("y = 1")["status"] == "Success"
    os.close(a.wfd)
    start = time.monotonic()
    assert a.proc.wait(timeout=5) == 0
    assert time.monotonic() - start < 3


# ---------------------------------------------------------------------------
# Execution semantics
# ---------------------------------------------------------------------------

def test_state_persists(agent):
    r = ok(agent.execute("x = 41"))
    assert r["result"] == "" and r["jupyterResult"] == ""
    r = ok(agent.execute("x + 1"))
    assert r["result"] == 42 and r["jupyterResult"] == "42"
    ok(agent.execute("import math\ndef sq(v):\n    return v * v"))
    assert ok(agent.execute("sq(x) + math.floor(0.5)"))["result"] == 41 * 41


def test_print_and_expression(agent):
    r = ok(agent.execute("print('hello')\nprint('world')\n1 + 1"))
    assert r["stdout"] == "hello\nworld\n"
    assert r["stderr"] == ""
    assert r["result"] == 2
    assert r["timedOut"] is False
    assert r["stdoutTruncated"] is False and r["stderrTruncated"] is False
    assert isinstance(r["durationMs"], float) and r["durationMs"] >= 0


def test_no_expression_and_none(agent):
    assert ok(agent.execute("z = [1, 2]"))["result"] == ""
    r = ok(agent.execute("None"))
    assert r["result"] == "" and r["jupyterResult"] == ""
    r = ok(agent.execute("z;"))  # trailing semicolon suppresses output, like Jupyter
    assert r["result"] == ""


def test_plain_results_follow_registered_printers(agent):
    # int, bool and str results skip IPython's formatters, unless a printer is registered.
    assert ok(agent.execute("7"))["jupyterResult"] == "7"
    assert ok(agent.execute("'a\\nb'"))["jupyterResult"] == "'a\\nb'"
    ok(agent.execute("_fmt = get_ipython().display_formatter.formatters['text/plain']\n"
                     "_old = _fmt.for_type(int, lambda o, p, cycle: p.text('INT %d' % o))"))
    r = ok(agent.execute("7"))
    assert r["result"] == 7 and r["jupyterResult"] == "INT 7"
    assert ok(agent.execute("'s'"))["jupyterResult"] == "'s'"
    ok(agent.execute("_fmt.for_type(int, _old)"))
    assert ok(agent.execute("8"))["jupyterResult"] == "8"


def test_primitive_results(agent):
    r = ok(agent.execute("float('nan')"))
    assert r["result"] is None and r["jupyterResult"] == "nan"
    r = ok(agent.execute("float('inf')"))
    assert r["result"] is None and r["jupyterResult"] == "inf"
    r = ok(agent.execute("'nan'"))
    assert r["result"] == "nan" and r["jupyterResult"] == "'nan'"
    r = ok(agent.execute("True"))
    assert r["result"] is True and r["jupyterResult"] == "True"
    r = ok(agent.execute("2.5"))
    assert r["result"] == 2.5
    r = ok(agent.execute("2**53"))
    assert r["result"] == 2 ** 53
    r = ok(agent.execute("2**64"))
    assert r["result"] == str(2 ** 64) and r["jupyterResult"] == str(2 ** 64)
    r = ok(agent.execute("-(2**60)"))
    assert r["result"] == str(-(2 ** 60))
    r = ok(agent.execute("{'a': 1}"))
    assert r["result"] == "{'a': 1}"
    r = ok(agent.execute("'caf\\u00e9 \\u2603'"))
    assert r["result"] == "caf\u00e9 \u2603"


def test_long_list_is_pretty_printed_multiline(agent):
    r = ok(agent.execute("[f'item-{i}' for i in range(30)]"))
    assert r["result"].startswith("['item-0',\n 'item-1',\n")
    assert r["result"].endswith("'item-29']")
    assert r["jupyterResult"] == r["result"]


def test_dataframe_repr(agent):
    if not has_module(agent, "pandas"):
        pytest.skip("pandas not installed in the runtime")
    r = ok(agent.execute("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"))
    assert isinstance(r["result"], str)
    assert r["result"].splitlines() == ["   a  b", "0  1  x", "1  2  y"]


def test_exception_traceback(agent):
    r = failed(agent.execute("print('before')\ndef boom():\n    raise ValueError('bad value')\nboom()"))
    assert r["stdout"] == "before\n"
    assert "ValueError" in r["stderr"] and "bad value" in r["stderr"]
    assert "Traceback" in r["stderr"]
    assert "\x1b" not in r["stderr"]
    assert r["timedOut"] is False
    r = failed(agent.execute("undefined_name_123"))
    assert "NameError" in r["stderr"] and "\x1b" not in r["stderr"]


def test_deep_recursion_traceback_is_fast(agent):
    start = time.monotonic()
    r = failed(agent.execute("def rec(n):\n    return rec(n + 1)\nrec(0)", timeout_seconds=20))
    assert time.monotonic() - start < 5
    assert r["timedOut"] is False
    assert r["stderr"].rstrip().endswith("RecursionError: maximum recursion depth exceeded")
    assert "repeated" in r["stderr"]


def test_traceback_after_user_stderr(agent):
    r = failed(agent.execute("import sys\nsys.stderr.write('user-err\\n')\n1/0"))
    assert r["stderr"].startswith("user-err\n")
    assert r["stderr"].rstrip().endswith("ZeroDivisionError: division by zero")


def test_syntax_error(agent):
    r = failed(agent.execute("def f(:\n    pass"))
    assert "SyntaxError" in r["stderr"]
    assert "\x1b" not in r["stderr"]
    ok(agent.execute("after_syntax_error = 5"))
    assert ok(agent.execute("after_syntax_error"))["result"] == 5


def test_stderr_capture(agent):
    r = ok(agent.execute(
        "import sys, os, warnings\n"
        "print('one', file=sys.stderr)\n"
        "sys.stderr.write('two\\n')\n"
        "os.system('echo three >&2')\n"
        "print('out')"))
    assert r["stderr"] == "one\ntwo\nthree\n"
    assert r["stdout"] == "out\n"


def test_subprocess_output_captured(agent):
    r = ok(agent.execute("import os\nrc = os.system('echo from-shell')"))
    assert r["stdout"] == "from-shell\n"
    r = ok(agent.execute(
        "import subprocess, sys\n"
        "print('a')\n"
        "subprocess.run(['echo', 'b'])\n"
        "subprocess.run([sys.executable, '-c', 'import sys; sys.stderr.write(\"c\\\\n\")'])\n"
        "print('d')"))
    assert r["stdout"] == "a\nb\nd\n"
    assert r["stderr"] == "c\n"


def test_stdin_is_eof(agent):
    r = failed(agent.execute("input()"))
    assert "EOFError" in r["stderr"]


def test_pkg_resources_import(agent):
    if not has_module(agent, "pkg_resources"):
        pytest.skip("setuptools/pkg_resources not installed in the runtime")
    r = ok(agent.execute("import pkg_resources\n'ok'"))
    assert r["result"] == "ok"


def test_cwd_is_sandbox_cwd(agent):
    r = ok(agent.execute("import os\nos.getcwd()"))
    assert os.path.basename(r["result"]).startswith("agent-cwd")


def test_user_namespace_starts_clean(fresh_agent):
    a = fresh_agent()
    r = ok(a.execute("sorted(k for k in globals() if not k.startswith('_'))"))
    names = set(json.loads(r["result"].replace("'", '"')))
    assert names <= {"In", "Out", "exit", "quit", "get_ipython", "open", "display"}, names


def test_children_inherit_only_stdio(agent):
    # Children inherit only fd 0/1/2 (fd 3 is ls's own directory handle).
    r = ok(agent.execute("import os\nrc = os.system('ls /proc/self/fd')"))
    fds = {int(t) for t in r["stdout"].split()}
    assert fds <= {0, 1, 2, 3}, r["stdout"]


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _png(result):
    assert isinstance(result, dict), result
    assert result["type"] == "image" and result["format"] == "png"
    data = base64.b64decode(result["base64_data"], validate=True)
    assert data.startswith(PNG_MAGIC)
    return data


def test_matplotlib_figure_becomes_image(agent):
    if not has_module(agent, "matplotlib"):
        pytest.skip("matplotlib not installed in the runtime")
    r = ok(agent.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])"))
    _png(r["result"])
    assert r["jupyterResult"].startswith("[<matplotlib.lines.Line2D")
    # The figure was closed: the next cell returns no image.
    r = ok(agent.execute("1 + 1"))
    assert r["result"] == 2
    r = ok(agent.execute("len(plt.get_fignums())"))
    assert r["result"] == 0


def test_plt_show_and_figure_expression(agent):
    if not has_module(agent, "matplotlib"):
        pytest.skip("matplotlib not installed in the runtime")
    r = ok(agent.execute(
        "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 4])\nplt.show()\nprint('shown')"))
    assert r["stdout"] == "shown\n"
    assert r["stderr"] == ""
    _png(r["result"])
    r = ok(agent.execute("fig, ax = plt.subplots()\nax.plot([3, 1, 2])\nfig"))
    _png(r["result"])
    assert r["jupyterResult"].startswith("<Figure size")
    assert ok(agent.execute("'no image'"))["result"] == "no image"


def test_display_image_object(agent):
    r = ok(agent.execute(
        "from IPython.display import Image, display\nimport base64\n"
        "display(Image(data=base64.b64decode(%r)))\n'text'" % TINY_PNG_B64))
    assert base64.b64decode(r["result"]["base64_data"]) == base64.b64decode(TINY_PNG_B64)
    assert r["jupyterResult"] == "'text'"
    r = ok(agent.execute(
        "class P:\n    def _repr_png_(self):\n        return base64.b64decode(%r)\nP()" % TINY_PNG_B64))
    _png(r["result"])


def test_failed_cell_does_not_leak_figure(agent):
    if not has_module(agent, "matplotlib"):
        pytest.skip("matplotlib not installed in the runtime")
    failed(agent.execute("import matplotlib.pyplot as plt\nplt.plot([1])\n1/0"))
    assert ok(agent.execute("3"))["result"] == 3


# ---------------------------------------------------------------------------
# Output limits
# ---------------------------------------------------------------------------

def test_output_flood_is_capped(agent):
    baseline = agent.rss_kb()
    peak = [baseline]
    stop = threading.Event()

    def monitor():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], agent.rss_kb())
            except OSError:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=monitor, daemon=True)
    t.start()
    try:
        start = time.monotonic()
        r = ok(agent.execute("print('x' * 50_000_000)", output_limit=4096, wait=60))
        assert len(r["stdout"].encode()) <= 4096 and r["stdout"] == "x" * 4096
        assert r["stdoutTruncated"] is True and r["stderrTruncated"] is False
        r = ok(agent.execute(
            "import sys\nfor _ in range(200):\n    sys.stdout.write('y' * 1_000_000)\n"
            "for _ in range(50):\n    sys.stderr.write('z' * 1_000_000)\n'done'",
            output_limit=4096, wait=60))
        assert r["result"] == "done"
        assert len(r["stdout"].encode()) <= 4096 and r["stdoutTruncated"] is True
        assert len(r["stderr"].encode()) <= 4096 and r["stderrTruncated"] is True
        r = ok(agent.execute(
            "import os\nrc = os.system('head -c 200000000 /dev/zero | tr \"\\\\0\" q')",
            output_limit=4096, wait=60))
        assert r["stdout"] == "q" * 4096 and r["stdoutTruncated"] is True
        assert time.monotonic() - start < 30
    finally:
        stop.set()
        t.join()
    assert peak[0] - baseline < 200 * 1024, (baseline, peak[0])
    assert ok(agent.execute("'alive'"))["result"] == "alive"


def test_truncation_on_character_boundary(agent):
    r = ok(agent.execute("print('\\u00e9' * 5000, end='')", output_limit=4095))
    data = r["stdout"].encode("utf-8")
    assert len(data) <= 4095 and r["stdout"] == "\u00e9" * 2047
    assert r["stdoutTruncated"] is True


def test_traceback_survives_stderr_flood(agent):
    r = failed(agent.execute(
        "import sys\nsys.stderr.write('e' * 100000)\nraise RuntimeError('the end')",
        output_limit=2048))
    assert len(r["stderr"].encode()) <= 2048
    assert r["stderr"].rstrip().endswith("RuntimeError: the end")
    assert r["stderrTruncated"] is True


def test_response_frame_never_exceeds_16_mib(agent):
    agent.send({"id": 4242, "type": "execute",
                "code": "print('a' * 20_000_000)\n'b' * 20_000_000",
                "timeoutSeconds": 30, "outputLimit": 100 * 1024 * 1024})
    frame = agent.recv_frame(timeout=60)
    assert len(frame) <= 16 * 1024 * 1024
    r = json.loads(frame)
    assert r["id"] == 4242 and r["status"] == "Success"
    assert r["stdoutTruncated"] is True


# ---------------------------------------------------------------------------
# Timeouts, interrupts and exits
# ---------------------------------------------------------------------------

def test_timeout_interrupts_and_session_survives(agent):
    ok(agent.execute("survivor = 'still here'"))
    start = time.monotonic()
    r = failed(agent.execute("print('started')\nimport time\ntime.sleep(100)", timeout_seconds=1))
    elapsed = time.monotonic() - start
    assert elapsed < 5
    assert r["timedOut"] is True
    assert r["stdout"] == "started\n"
    assert r["stderr"].rstrip("\n").splitlines()[-1] == \
        "TimeoutError: execution exceeded 1 seconds and was interrupted"
    assert "KeyboardInterrupt" in r["stderr"]
    r = ok(agent.execute("survivor"))
    assert r["result"] == "still here" and r["timedOut"] is False


def test_timeout_of_blocking_child_process(agent):
    ok(agent.execute("survivor = 'still here'"))
    start = time.monotonic()
    r = failed(agent.execute("import os\nos.system('sleep 100')\nprint('unreached?')",
                             timeout_seconds=1))
    assert time.monotonic() - start < 5
    assert r["timedOut"] is True
    assert r["stderr"].rstrip("\n").endswith("execution exceeded 1 seconds and was interrupted")
    assert ok(agent.execute("survivor"))["result"] == "still here"


def test_timeout_kills_only_what_the_cell_started(agent):
    # A process started by an earlier cell outlives a later cell's timeout; the later cell's own
    # child does not. (A cell without any child before it skips the scan of /proc.)
    ok(agent.execute("import subprocess\nkeeper = subprocess.Popen(['sleep', '30'])"))
    r = failed(agent.execute("import os\nos.system('sleep 100')", timeout_seconds=1))
    assert r["timedOut"] is True
    r = ok(agent.execute("keeper.poll() is None"))
    assert r["result"] is True, "a child of an earlier cell was killed by a later cell's timeout"
    ok(agent.execute("keeper.kill(); keeper.wait()"))


def test_fractional_timeout_message(agent):
    r = failed(agent.execute("while True:\n    pass", timeout_seconds=0.5))
    assert r["timedOut"] is True
    assert r["stderr"].rstrip("\n").splitlines()[-1] == \
        "TimeoutError: execution exceeded 0.5 seconds and was interrupted"


def test_user_keyboard_interrupt_is_failure(agent):
    r = failed(agent.execute("raise KeyboardInterrupt"))
    assert r["timedOut"] is False
    assert "KeyboardInterrupt" in r["stderr"]


def test_exit_does_not_kill_agent(agent):
    ok(agent.execute("survivor = 'still here'"))
    for code in ("exit()", "quit()", "import sys\nsys.exit(3)", "raise SystemExit('bye')"):
        r = failed(agent.execute("print('pre')\n" + code + "\nprint('post')"))
        assert r["stdout"] == "pre\n"
        assert "SystemExit" in r["stderr"]
        assert agent.proc.poll() is None
    assert ok(agent.execute("survivor"))["result"] == "still here"


def test_host_sigint_interrupts_cell(fresh_agent):
    a = fresh_agent()
    a.send({"id": 1, "type": "execute", "code": "import time\ntime.sleep(30)",
            "timeoutSeconds": 60, "outputLimit": 4096})
    time.sleep(0.5)
    os.kill(a.proc.pid, signal.SIGINT)
    r = a.recv(timeout=10)
    failed(r)
    assert r["timedOut"] is False and "KeyboardInterrupt" in r["stderr"]
    # A SIGINT between cells is ignored.
    os.kill(a.proc.pid, signal.SIGINT)
    time.sleep(0.2)
    assert a.request({"id": 2, "type": "ping"}) == {"id": 2, "type": "pong"}


def test_background_process_does_not_block_cell(agent):
    start = time.monotonic()
    r = ok(agent.execute(
        "import subprocess\np = subprocess.Popen('sleep 2; echo late', shell=True)\n'bg'"))
    assert r["result"] == "bg"
    assert time.monotonic() - start < 1.5
    r = ok(agent.execute("p.wait()"))
    assert r["result"] == 0
    assert "late" not in r["stdout"], "a finished cell's background output leaked into a later cell"


def test_cells_reuse_the_agents_threads(agent):
    """Output capture and the time limit run on long-lived threads: a thousand cells do not
    start a thousand threads (a thread start costs more than a short cell), and each cell still
    gets exactly its own output."""
    ok(agent.execute("import threading\nprint('warm')"))
    before = ok(agent.execute("threading.active_count()"))["result"]
    for i in range(40):
        r = ok(agent.execute("print(%d)\n%d" % (i, i), timeout_seconds=30))
        assert r["stdout"] == "%d\n" % i and r["result"] == i
    names = ok(agent.execute("print(*sorted(t.name for t in threading.enumerate()))"))["stdout"].split()
    assert len(names) == before, names
    assert "sandpiper-output" in names and "sandpiper-watchdog" in names


# ---------------------------------------------------------------------------
# Fallback without IPython
# ---------------------------------------------------------------------------

def test_plain_fallback_executor(fresh_agent):
    a = fresh_agent(extra_env={"SANDPIPER_AGENT_NO_IPYTHON": "1"})
    assert a.ready["type"] == "ready"
    ok(a.execute("x = 41"))
    r = ok(a.execute("print('p')\nx + 1"))
    assert r["result"] == 42 and r["stdout"] == "p\n"
    r = failed(a.execute("1/0"))
    assert "ZeroDivisionError" in r["stderr"]
    r = failed(a.execute("import time\ntime.sleep(100)", timeout_seconds=1))
    assert r["timedOut"] is True
    r = failed(a.execute("exit()"))
    assert "SystemExit" in r["stderr"]
    assert ok(a.execute("x"))["result"] == 41
