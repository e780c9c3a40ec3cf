"""The same attacks from the Node.js and Shell pools.

Host files, processes and signals, network, a fork bomb, an output flood, a cell that never
returns and the agent channel, written in JavaScript (NodeLTS pool) and bash (Shell pool). The
pools have the same limits as the Python one (256 MiB, 64 pids, 16 MiB disks, 30 s).
"""

import json
import os
import time
import uuid

import pytest

from conftest import API_KEY, PIDS_LIMIT
from security_helpers import LoopbackTrap, UidSampler, host_pids_of_uid, vm_rss_kib

RSS_GROWTH_KIB = 96 << 10


@pytest.fixture
def trap():
    t = LoopbackTrap()
    yield t
    t.close(settle=0)


def js(value):
    """A JavaScript literal for a Python str/int/list/dict (JSON is valid JavaScript)."""
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Node.js


def test_node_host_files_are_unreachable(lab, server):
    """From Node: host secrets, the server's state and other processes' environments are out of
    reach, and nothing can be written outside /mnt/data and /tmp."""
    sess = lab.session("node")
    paths = ["/etc/shadow", "/root", "/home", "/var/lib/sandpiper/api-key", server.data_dir,
             server.data_dir + "/sandpiper.sqlite", "/proc/1/root/etc/shadow", "/proc/kmsg"]
    marker = "node-" + uuid.uuid4().hex
    seen = sess.probe("""
const fs = require("fs");
const out = {reads: {}, writes: {}, environ: []};
for (const p of %s) {
  try { const st = fs.statSync(p); out.reads[p] = st.isDirectory() ? "LISTED " + fs.readdirSync(p).length
                                                                    : "READ " + fs.readFileSync(p).length; }
  catch (e) { out.reads[p] = e.code; }
}
for (const p of %s) {
  try { fs.writeFileSync(p, "x"); out.writes[p] = "WROTE"; } catch (e) { out.writes[p] = e.code; }
}
for (const pid of fs.readdirSync("/proc").filter(x => /^[0-9]+$/.test(x))) {
  try { out.environ.push(fs.readFileSync("/proc/" + pid + "/environ", "latin1")); } catch (e) {}
}
JSON.stringify(out)
""" % (js(paths), js(["/usr/bin/" + marker, "/etc/" + marker, "/" + marker, server.data_dir + "/" + marker])))
    leaked = {p: v for p, v in seen["reads"].items() if v.startswith(("READ", "LISTED"))}
    assert not leaked, leaked
    assert "WROTE" not in seen["writes"].values(), seen["writes"]
    assert not any(API_KEY in e or "SANDPIPER_API_KEY" in e for e in seen["environ"])
    assert not os.path.exists(os.path.join(server.data_dir, marker))
    lab.contained(sess)


def test_node_sees_and_signals_only_its_own_processes(lab, server):
    """From Node: /proc lists only the sandbox's processes and process.kill of the server's and
    the test runner's pids fails."""
    sess = lab.session("node")
    seen = sess.probe("""
const fs = require("fs");
const procs = {};
for (const p of fs.readdirSync("/proc").filter(x => /^[0-9]+$/.test(x))) {
  try { procs[p] = fs.readFileSync("/proc/" + p + "/cmdline", "utf8").replace(/\\0/g, " "); } catch (e) { procs[p] = e.code; }
}
const kill = pid => { try { process.kill(pid, "SIGKILL"); return "SENT"; } catch (e) { return e.code; } };
JSON.stringify({procs, server: kill(%d), runner: kill(%d)})
""" % (server.proc.pid, os.getpid()))
    assert 1 <= len(seen["procs"]) <= 8, seen["procs"]
    assert not any("sandpiper serve" in c or "pytest" in c for c in seen["procs"].values()), seen["procs"]
    assert seen["server"] == "ESRCH" and seen["runner"] == "ESRCH", seen
    assert server.proc.poll() is None
    lab.contained(sess)


def test_node_network_is_isolated(lab, server, trap):
    """From Node: only lo; TCP to the host's loopback listener and to the server's port is
    refused, UDP datagrams never arrive."""
    sess = lab.session("node")
    seen = sess.probe("""
const net = require("net"), dgram = require("dgram"), os = require("os");
const tcp = port => new Promise(res => {
  const c = net.connect(port, "127.0.0.1");
  c.setTimeout(3000, () => { c.destroy(); res("TIMEOUT"); });
  c.on("connect", () => { c.destroy(); res("CONNECTED"); });
  c.on("error", e => res(e.code));
});
const udp = port => new Promise(res => {
  const u = dgram.createSocket("udp4");
  u.send("node datagram", port, "127.0.0.1", e => { u.close(); res(e ? e.code : "SENT"); });
});
const out = {ifaces: Object.keys(os.networkInterfaces()), trap: await tcp(%d), server: await tcp(%d), udp: await udp(%d)};
JSON.stringify(out)
""" % (trap.tcp_port, server.port, trap.udp_port))
    hits = trap.close()
    assert not hits, "the host saw traffic from a Node sandbox: %r" % hits
    assert seen["ifaces"] == ["lo"] and seen["trap"] == "ECONNREFUSED" and seen["server"] == "ECONNREFUSED", seen
    lab.contained(sess)


def test_node_spawn_bomb_is_held_by_the_pids_limit(lab):
    """From Node: spawning hundreds of long-lived children stops at the pids limit (EAGAIN), and
    the session keeps working."""
    sess = lab.session("node")
    sess.ok("1")
    uid = sess.host_uid()
    seen = sess.probe("""
const { spawn } = require("child_process");
let ok = 0; const errors = {};
for (let i = 0; i < 300; i++) {
  try { const c = spawn("sleep", ["600"]); c.on("error", e => { errors[e.code] = (errors[e.code] || 0) + 1; }); if (c.pid) ok++; }
  catch (e) { errors[e.code] = (errors[e.code] || 0) + 1; }
}
await new Promise(r => setTimeout(r, 300));
JSON.stringify({ok, errors})
""", timeout=20)
    assert seen["ok"] < PIDS_LIMIT and seen["errors"].get("EAGAIN"), seen
    assert len(host_pids_of_uid(uid)) <= PIDS_LIMIT + 2
    lab.contained(sess)


def test_node_output_flood_is_bounded(lab, server):
    """From Node: 1 GiB to stdout comes back as a bounded response, quickly, and the server's
    RSS does not grow."""
    sess = lab.session("node")
    sess.ok("1")
    rss = vm_rss_kib(server.proc.pid)
    started = time.monotonic()
    r = sess.run('const b = "x".repeat(1 << 20); for (let i = 0; i < 1024; i++) process.stdout.write(b); 1', timeout=30)
    assert time.monotonic() - started < 60
    assert r.status_code == 200 and len(r.content) < 8 << 20, (r.status_code, len(r.content))
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB
    lab.contained(sess, r)


def test_node_cells_that_never_return_time_out(lab):
    """From Node: `while(true){}` times out with the context intact; a busy loop in a timer that
    the vm timeout cannot stop makes the agent restart its worker within the grace period."""
    sess = lab.session("node")
    sess.ok("var kept = 41")
    props = sess.ok("while (true) {}", timeout=2)
    assert props["status"] == "Failure" and "TimeoutError" in props["stderr"], props
    assert sess.ok("kept + 1")["result"] == 42
    started = time.monotonic()
    r = sess.run("setTimeout(() => { while (true) {} }, 0); await new Promise(r => setTimeout(r, 100000))", timeout=2)
    assert time.monotonic() - started < 2 + 10 + 5
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert r.json()["properties"]["status"] == "Failure"
    lab.contained(sess, r)


def test_node_cannot_reach_the_agent_channel(lab):
    """From Node: the worker cannot open the supervisor's channel pipes through /proc, and
    writing garbage to whatever it can open never hurts the server."""
    sess = lab.session("node")
    sess.ok("1")
    r = sess.run("""
const fs = require("fs");
const out = {};
for (const pid of [process.ppid, 1]) {
  let fds = [];
  try { fds = fs.readdirSync("/proc/" + pid + "/fd"); } catch (e) { out[pid] = e.code; }
  for (const f of fds) {
    try { const fd = fs.openSync("/proc/" + pid + "/fd/" + f, "w"); fs.writeSync(fd, "\\xff\\xff\\xff\\xf0garbage"); fs.closeSync(fd); out[pid + "/" + f] = "WROTE"; }
    catch (e) { out[pid + "/" + f] = e.code; }
  }
}
JSON.stringify(out)
""", timeout=10)
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    lab.contained(sess, r)


# ---------------------------------------------------------------------------------------------
# Shell


def test_shell_host_files_are_unreachable(lab, server):
    """From bash: host secrets and the server's state cannot be read, the host's /usr and /etc
    cannot be written, and no process environment carries the API key."""
    sess = lab.session("shell")
    marker = "sh-" + uuid.uuid4().hex
    status, out, err = sess.sh("""
for p in /etc/shadow /root /home /var/lib/sandpiper/api-key %(data)s %(data)s/sandpiper.sqlite /proc/1/root/etc/shadow; do
  if cat "$p" >/dev/null 2>&1 || ls "$p" >/dev/null 2>&1; then echo "LEAK $p"; fi
done
for p in /usr/bin/%(m)s /etc/%(m)s /%(m)s %(data)s/%(m)s; do
  if ( : > "$p" ) 2>/dev/null; then echo "WROTE $p"; fi
done
cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c -e SANDPIPER_API_KEY -e %(key)s || true
""" % {"data": server.data_dir, "m": marker, "key": API_KEY})
    assert "LEAK" not in out and "WROTE" not in out, out
    assert out.strip().splitlines()[-1] == "0", out
    assert not os.path.exists(os.path.join(server.data_dir, marker))
    lab.contained(sess)


def test_shell_sees_and_signals_only_its_own_processes(lab, server):
    """From bash: `ps -e` lists only the sandbox's processes; kill -9 of the server's pid, the
    test runner's pid and -1 does not reach the host; the server keeps serving."""
    sess = lab.session("shell")
    status, out, err = sess.sh("ps -e -o pid=,args= | grep -v 'ps -e'; echo ---; kill -9 %d; echo server=$?; "
                               "kill -9 %d; echo runner=$?" % (server.proc.pid, os.getpid()))
    procs, _, kills = out.partition("---\n")
    lines = [line for line in procs.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 8, procs
    assert not any("sandpiper serve" in line or "pytest" in line for line in lines), procs
    assert "server=1" in kills and "runner=1" in kills, kills
    r = sess.run("kill -9 -1; echo after")
    assert server.proc.poll() is None
    lab.contained(sess, r)


def test_shell_network_is_isolated(lab, server, trap):
    """From bash: /dev/tcp to the host's loopback listener and the server's port fails, /dev/udp
    datagrams never arrive, and there is no interface but lo."""
    sess = lab.session("shell")
    status, out, err = sess.sh("""
(echo hi > /dev/tcp/127.0.0.1/%d) 2>/dev/null && echo TRAP-CONNECTED
(echo hi > /dev/tcp/127.0.0.1/%d) 2>/dev/null && echo SERVER-CONNECTED
for i in 1 2 3; do echo datagram > /dev/udp/127.0.0.1/%d; done 2>/dev/null
tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '
""" % (trap.tcp_port, server.port, trap.udp_port), timeout=20)
    hits = trap.close()
    assert not hits, "the host saw traffic from a Shell sandbox: %r" % hits
    assert "CONNECTED" not in out and out.split() == ["lo"], out
    lab.contained(sess)


def test_shell_fork_bomb_is_held_by_the_pids_limit(lab):
    """From bash: the classic `:(){ :|:& };:` stays within pids.max on the host, the command
    ends by its timeout, and the identifier works again."""
    sess = lab.session("shell")
    sess.ok("true")
    sampler = UidSampler(sess.host_uid())
    started = time.monotonic()
    r = sess.run("bomb() { bomb | bomb & }; bomb; sleep 100", timeout=3)
    elapsed = time.monotonic() - started
    peak = sampler.stop()
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    assert peak <= PIDS_LIMIT + 2, "the shell session had %d host processes" % peak
    assert elapsed < 3 + 10 + 15, elapsed
    lab.contained(sess, r)


def test_shell_output_flood_is_bounded(lab, server):
    """From bash: 2 GB on stdout and stderr come back cut to the stream limit, quickly, and the
    server's RSS does not grow."""
    sess = lab.session("shell")
    sess.ok("true")
    rss = vm_rss_kib(server.proc.pid)
    started = time.monotonic()
    r = sess.run("yes | head -c 2000000000; yes err | head -c 500000000 >&2; echo done >&2", timeout=30)
    assert time.monotonic() - started < 60
    assert r.status_code == 200 and len(r.content) < 1 << 20, (r.status_code, len(r.content))
    assert vm_rss_kib(server.proc.pid) - rss < RSS_GROWTH_KIB
    lab.contained(sess, r)


def test_shell_commands_that_never_return_time_out(lab):
    """From bash: `sleep 1000` is killed at the timeout with the shell's state kept; a builtin
    busy loop gets the shell restarted; both answer within the grace period."""
    sess = lab.session("shell")
    sess.ok("export KEPT=yes")
    started = time.monotonic()
    props = sess.ok("sleep 1000", timeout=2)
    assert props["status"] == "124" and "TimeoutError" in props["stderr"], props
    assert sess.sh("echo $KEPT")[1] == "yes\n"
    r = sess.run("while :; do :; done", timeout=2)
    assert time.monotonic() - started < 2 * (2 + 10) + 5
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    lab.contained(sess, r)


def test_shell_cannot_corrupt_the_agent_channel(lab):
    """From bash: the host's channel pipes of the agent cannot be reopened through /proc; garbage
    written to whatever can be opened is a clear error at worst."""
    sess = lab.session("shell")
    sess.ok("true")
    r = sess.run(r"""python3 - <<'EOF'
import os
for pid in {os.getppid(), 1, 2}:
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        continue
    for f in fds:
        try:
            fd = os.open("/proc/%d/fd/%s" % (pid, f), os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"\xff\xff\xff\xf0garbage")
            os.close(fd)
            print("wrote", pid, f)
        except OSError as e:
            print(pid, f, e.strerror)
EOF""", timeout=10)
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    lab.contained(sess, r)
