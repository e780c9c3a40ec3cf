"""Host files and the file API.

A sandbox sees only /usr, the runtime, the agents, a few generated /etc files, its own /mnt/data
and a private /tmp, all but the last two read-only. These tests try to read and write host
files (directly, through /proc, through the server's data directory and through another
session), and to make the *server* (root on the host) follow symlinks, hard links, `..` and odd
upload names out of a session's /mnt/data.
"""

import glob
import json
import os
import uuid

import pytest
import requests

from conftest import API_KEY
from security_helpers import host_file_state, with_values

# Tries to read (or list) each path; answers {path: "READ n" | "LISTED n" | "<Error>:<strerror>"}.
TRY_READ = r'''
import json, os
def attempt(path):
    try:
        if os.path.isdir(path):
            return "LISTED %d" % len(os.listdir(path))
        with open(path, "rb") as f:
            return "READ %d" % len(f.read(1 << 16))
    except OSError as e:
        return "%s:%s" % (type(e).__name__, os.strerror(e.errno))
json.dumps({p: attempt(p) for p in PATHS})
'''

HOST_SECRETS = [
    "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/root", "/root/.ssh", "/home", "/boot", "/run",
    "/var/log", "/var/lib/sandpiper/api-key", "/var/lib/sandpiper/sandpiper.sqlite", "/var/lib/sandpiper/sessions",
    "/proc/1/root/etc/shadow", "/proc/1/root/root", "/proc/1/root/var/lib/sandpiper/api-key", "/proc/kmsg",
    "/proc/kcore", "/proc/kpagecount", "/dev/core", "/sys/kernel/security", "/sys/fs/cgroup",
]


def raw_request(api, method, url):
    """Sends `url` exactly as written (no client-side dot-segment normalisation)."""
    req = requests.Request(method, url, headers=api.http.headers).prepare()
    req.url = url
    return api.http.send(req, timeout=30)


def refused(outcome):
    return not outcome.startswith(("READ", "LISTED"))


def test_host_secrets_are_unreadable(lab):
    """Code cannot read host secrets: /etc/shadow, /root, other users' homes, logs, the default
    state directory, kernel memory and log interfaces, not even through /proc/1/root."""
    assert os.path.exists("/etc/shadow") and os.path.isdir("/root")  # the host has them
    sess = lab.session()
    seen = sess.probe(with_values(TRY_READ, PATHS=HOST_SECRETS))
    leaked = {p: o for p, o in seen.items() if not refused(o)}
    assert not leaked, "host paths readable from a sandbox: %r" % leaked
    with open("/etc/passwd") as f:
        host_passwd = f.read()
    inside = sess.ok("open('/etc/passwd').read()")["result"]
    assert inside != host_passwd, "the sandbox sees the host's own /etc/passwd"
    lab.contained(sess)


def test_no_process_exposes_the_api_key_or_server_environment(lab):
    """No process visible to a sandbox (/proc/*/environ, cmdline) carries the server's API key or
    its SANDPIPER_* environment."""
    sess = lab.session()
    seen = sess.probe(r'''
import json, os
found = {}
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self", "1"]:
    for what in ("environ", "cmdline"):
        try:
            found["%s/%s" % (pid, what)] = open("/proc/%s/%s" % (pid, what), "rb").read().decode("latin-1")
        except OSError as e:
            found["%s/%s" % (pid, what)] = "ERR " + os.strerror(e.errno)
found["os.environ"] = repr(dict(os.environ))
json.dumps(found)
''')
    assert len(seen) >= 4
    for name, text in seen.items():
        assert API_KEY not in text, "the API key is visible in %s" % name
        assert "SANDPIPER_API_KEY" not in text, "the server's environment is visible in %s: %r" % (name, text[:300])
    lab.contained(sess)


def test_server_state_directory_is_out_of_reach(lab, server):
    """The server's data directory (sqlite, seccomp program, sessions, agents, generated /etc) is
    neither readable nor writable from a sandbox, by its real host path."""
    data = server.data_dir
    assert os.path.exists(os.path.join(data, "sandpiper.sqlite"))
    paths = [data, data + "/sandpiper.sqlite", data + "/sandpiper.sqlite-wal", data + "/seccomp.bpf",
             data + "/sessions", data + "/etc", data + "/agents", data + "/api-key", os.path.dirname(data),
             os.path.join(server.tmp, "config.json"), os.path.join(server.tmp, "server.log")]
    sess = lab.session()
    seen = sess.probe(with_values(TRY_READ, PATHS=paths))
    leaked = {p: o for p, o in seen.items() if not refused(o)}
    assert not leaked, "the server's state is readable from a sandbox: %r" % leaked
    marker = "pwned-" + uuid.uuid4().hex
    writes = sess.probe(with_values(r'''
import json, os
res = {}
for d in DIRS:
    try:
        with open(os.path.join(d, MARKER), "w") as f:
            f.write("x")
        res[d] = "WROTE"
    except OSError as e:
        res[d] = os.strerror(e.errno)
json.dumps(res)
''', DIRS=[data, data + "/sessions", data + "/etc", server.tmp], MARKER=marker))
    assert "WROTE" not in writes.values(), writes
    for d in [data, data + "/sessions", data + "/etc", server.tmp]:
        assert not os.path.exists(os.path.join(d, marker)), "a sandbox wrote into %s" % d
    lab.contained(sess)


def test_host_filesystem_is_read_only_and_tmp_is_private(lab, server):
    """Writes to /usr, /etc, the agents, the runtime, / and /proc/sys fail; /tmp is the sandbox's
    own (a file written there never shows up in the host's /tmp)."""
    marker = "sec-tmp-" + uuid.uuid4().hex
    runtime = os.environ.get("SANDPIPER_PYTHON_RUNTIME", "/var/lib/sandpiper/runtimes/python")
    agent = os.path.join(server.data_dir, "agents", "python", "agent.py")
    before = host_file_state(agent)
    sess = lab.session()
    seen = sess.probe(with_values(r'''
import json, os
res = {}
for path in TARGETS:
    try:
        if path.startswith("/proc"):
            fd = os.open(path, os.O_WRONLY)          # never written to: opening is the test
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(fd, b"")
        os.close(fd)
        res[path] = "OPENED FOR WRITING"
    except OSError as e:
        res[path] = os.strerror(e.errno)
with open("/tmp/" + MARKER, "w") as f:
    f.write("inside")
res["tmp"] = sorted(os.listdir("/tmp"))
json.dumps(res)
''', MARKER=marker, TARGETS=[
        "/usr/bin/" + marker, "/usr/lib/" + marker, "/etc/passwd", "/etc/" + marker, "/" + marker,
        "/opt/sandpiper/agents/python/agent.py", "/opt/sandpiper/agents/" + marker, runtime + "/bin/" + marker,
        runtime + "/bin/python", "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
    ]))
    tmp_listing = seen.pop("tmp")
    opened = {p: o for p, o in seen.items() if o == "OPENED FOR WRITING"}
    assert not opened, "host paths writable from a sandbox: %r" % opened
    assert marker in tmp_listing
    assert not os.path.exists("/tmp/" + marker), "the sandbox's /tmp is the host's /tmp"
    assert not os.path.exists("/usr/bin/" + marker) and not os.path.exists(runtime + "/bin/" + marker)
    assert host_file_state(agent) == before, "the installed agent changed"
    lab.contained(sess)


def test_other_sessions_files_are_unreachable_by_path(lab, server):
    """A session cannot reach another session's /mnt/data: not by the host path of its tmpfs,
    not through /proc/<pid>/root, not through the file API."""
    victim, attacker = lab.session(tag="victim"), lab.session(tag="attacker")
    name, secret = "secret-%s.txt" % uuid.uuid4().hex, "s3cret-" + uuid.uuid4().hex
    victim.ok("open(%r, 'w').write(%r)" % ("/mnt/data/" + name, secret))
    attacker.ok("1")
    host_paths = []
    sessions_dir = os.path.join(server.data_dir, "sessions")
    for entry in os.listdir(sessions_dir):
        candidate = os.path.join(sessions_dir, entry, "data", name)
        if os.path.exists(candidate):
            host_paths.append(candidate)
    # (Found only while sessions' /mnt/data are tmpfs mounts under the data directory; the
    # attacker also guesses with a glob over that directory.)
    seen = attacker.probe(with_values(r'''
import glob, json, os
res = {}
candidates = list(HOST_PATHS) + ["/mnt/data/../" + NAME, "/mnt/" + NAME, "/tmp/" + NAME]
candidates += glob.glob(SESSIONS + "/*/data/" + NAME)
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    candidates.append("/proc/%s/root/mnt/data/%s" % (pid, NAME))
    candidates.append("/proc/%s/cwd/%s" % (pid, NAME))
for path in candidates:
    try:
        res[path] = open(path).read()
    except OSError as e:
        res[path] = "ERR " + os.strerror(e.errno)
res["own listing"] = repr(sorted(os.listdir("/mnt/data")))
json.dumps(res)
''', HOST_PATHS=host_paths, NAME=name, SESSIONS=sessions_dir))
    leaked = {p: v for p, v in seen.items() if secret in v}
    assert not leaked, "another session's file was read: %r" % leaked
    r = attacker.download(name)
    assert r.status_code == 404 and secret not in r.text
    for path in host_paths:
        rel = os.path.relpath(path, os.path.join(sessions_dir, "x", "data"))  # ../../<sandbox>/data/<name>
        r = raw_request(lab.api, "GET", lab.api.url("files/content/" + rel, attacker.id))
        assert r.status_code in (400, 404) and secret not in r.text, (r.status_code, r.text[:300])
    assert victim.ok("open(%r).read()" % ("/mnt/data/" + name))["result"] == secret
    lab.contained(attacker)
    lab.contained(victim)


def test_symlinks_to_host_files_are_never_served(lab, server):
    """The server (root on the host) never follows a symlink a sandbox planted in /mnt/data:
    links to /etc/shadow, the server's sqlite file, its /proc/self/environ (the API key), / and
    the data directory are neither served nor listed as files."""
    sess = lab.session()
    server_pid = server.proc.pid
    links = {
        "shadow": "/etc/shadow", "passwd": "/etc/passwd", "sqlite": server.data_dir + "/sandpiper.sqlite",
        "selfenv": "/proc/self/environ", "srvenv": "/proc/%d/environ" % server_pid, "root": "/",
        "datadir": server.data_dir, "hosttmp": "/tmp", "canary": "/proc/1/root/mnt/data/canary.txt",
    }
    sess.ok(with_values("import os\nfor k, v in LINKS.items():\n    os.symlink(v, '/mnt/data/' + k)\n", LINKS=links))
    responses = []
    for name in list(links) + ["root/etc/passwd", "root/etc/shadow", "datadir/sandpiper.sqlite",
                               "hosttmp/" + os.path.basename(server.tmp) + "/config.json"]:
        for r in (sess.download(name), lab.api.http.get(lab.api.url("files/" + name, sess.id), timeout=30),
                  lab.api.http.get(lab.api.url("python/downloadFile", sess.id, extra="&filename=" + name), timeout=30)):
            responses.append(r)
            assert r.status_code in (400, 404), "a symlink was followed: %s -> %d %r" % (
                name, r.status_code, r.text[:200])
            assert API_KEY not in r.text and "root:x:0:0" not in r.text and "SQLite format" not in r.text, \
                "host data served through symlink %s: %r" % (name, r.text[:200])
    listed = lab.api.list_files(sess.id)
    assert not set(listed) & set(links), "symlinks are listed as files: %r" % listed
    lab.contained(sess, responses)


def test_uploads_and_deletes_do_not_follow_symlinks(lab, server):
    """Uploads through a symlinked directory are refused; an upload or delete naming a symlink
    replaces or removes the link, never the host file it points to."""
    victim_file = os.path.join(server.tmp, "host-victim-%s.txt" % uuid.uuid4().hex)
    with open(victim_file, "w") as f:
        f.write("host file")
    os.chmod(victim_file, 0o644)
    guarded = [victim_file, "/etc/passwd", server.data_dir + "/sandpiper.sqlite"]
    before = {p: host_file_state(p) for p in guarded[:2]}
    marker = "pwned-" + uuid.uuid4().hex
    sess = lab.session()
    links = {"root": "/", "datadir": server.data_dir, "hosttmp": "/tmp", "srvtmp": server.tmp,
             "victim": victim_file, "passwd": "/etc/passwd", "sqlite": server.data_dir + "/sandpiper.sqlite"}
    sess.ok(with_values("import os\nfor k, v in LINKS.items():\n    os.symlink(v, '/mnt/data/' + k)\n", LINKS=links))
    responses = []
    for name in ["root/tmp/%s.txt" % marker, "datadir/%s.txt" % marker, "hosttmp/%s.txt" % marker,
                 "srvtmp/%s.txt" % marker]:
        r = sess.upload(name, marker.encode())
        responses.append(r)
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
    r = lab.api.http.post(lab.api.url("files/upload", sess.id, extra="&path=datadir"),
                          files={"file": (marker + ".txt", marker.encode())}, timeout=60)
    responses.append(r)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    for name in ["victim", "passwd", "sqlite"]:
        responses.append(sess.upload(name, marker.encode()))
    sess.ok(with_values("import os\nos.symlink(V, '/mnt/data/victim2')\n", V=victim_file))
    responses.append(lab.api.http.delete(lab.api.url("files/victim2", sess.id), timeout=30))
    responses.append(lab.api.http.delete(lab.api.url("files/root/etc/passwd", sess.id), timeout=30))
    for d in ["/tmp", server.data_dir, server.tmp]:
        assert not os.path.exists(os.path.join(d, marker + ".txt")), "an upload escaped into %s" % d
    for path, state in before.items():
        assert host_file_state(path) == state, "host file %s changed through a symlink" % path
    with open(server.data_dir + "/sandpiper.sqlite", "rb") as f:
        assert marker.encode() not in f.read()
    lab.contained(sess, responses)


def test_hard_links_cannot_reach_host_files(lab):
    """Hard links from /mnt/data to host files fail (another filesystem); a multi-link file inside
    /mnt/data is not served (clear 4xx error, never a 5xx)."""
    sess = lab.session()
    seen = sess.probe(r'''
import json, os
res = {}
for src in ["/etc/passwd", "/usr/bin/python3", "/opt/sandpiper/agents/python/agent.py", "/proc/self/environ",
            "/proc/1/root/etc/hosts", "/tmp"]:
    try:
        os.link(src, "/mnt/data/hl-" + os.path.basename(src))
        res[src] = "LINKED"
    except OSError as e:
        res[src] = os.strerror(e.errno)
open("/mnt/data/own.txt", "w").write("own")
os.link("/mnt/data/own.txt", "/mnt/data/own-link.txt")
json.dumps(res)
''')
    assert "LINKED" not in seen.values(), seen
    responses = [sess.download("own-link.txt"), sess.download("own.txt")]
    for r in responses:
        assert r.status_code == 200 and r.text == "own" or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    lab.contained(sess, responses)


TRAVERSAL_NAMES = [
    "../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e/%2e%2e/etc/passwd", "..", "%2e%2e",
    "%2Fetc%2Fpasswd", "/mnt/data/../../etc/passwd", "sub/../../etc/passwd", "..%5C..%5Cetc%5Cpasswd",
    "%252e%252e%252fetc%252fpasswd", "canary.txt/..", "./canary.txt",
]


def test_dotdot_and_absolute_names_in_the_file_api_are_refused(lab):
    """`..`, encoded `..`, absolute paths and double-encoded traversal in download, info, delete,
    downloadFile and the `path` parameter never reach a host file (400 InvalidFilePath or 404)."""
    sess = lab.session()
    sess.ok("open('/mnt/data/keep.txt', 'w').write('keep')")
    pool = lab.server.pool_url("python")
    query = "?api-version=2024-02-02-preview&identifier=" + sess.id
    responses = []
    for name in TRAVERSAL_NAMES:
        for method, op in [("GET", "files/content/"), ("GET", "files/"), ("DELETE", "files/")]:
            responses.append(raw_request(lab.api, method, pool + "/" + op + name + query))
        responses.append(lab.api.http.get(pool + "/python/downloadFile" + query + "&filename=" + name, timeout=30))
        responses.append(lab.api.http.get(pool + "/files" + query + "&path=" + name, timeout=30))
    for r in responses:
        assert r.status_code in (400, 404), (r.request.method, r.request.url, r.status_code, r.text[:300])
        assert "root:x:0:0" not in r.text
    assert sess.download("keep.txt").text == "keep"
    lab.contained(sess, responses)


def raw_upload(api, sess, disposition, data=b"payload"):
    boundary = "sec-boundary-" + uuid.uuid4().hex
    head = ("--%s\r\nContent-Disposition: form-data; name=\"file\"; %s\r\n"
            "Content-Type: application/octet-stream\r\n\r\n" % (boundary, disposition))
    body = head.encode("utf-8", "surrogateescape") + data + ("\r\n--%s--\r\n" % boundary).encode()
    return api.http.post(api.url("files/upload", sess.id, sess.pool), data=body, timeout=60,
                         headers={"Content-Type": "multipart/form-data; boundary=" + boundary})


def test_upload_names_with_traversal_are_refused(lab, server):
    """Multipart file names with `../`, absolute paths, `/mnt/data/..` or an RFC 5987 encoded `..`,
    and a `path=` outside /mnt/data, are refused with 400 and nothing is written outside."""
    sess = lab.session()
    marker = "esc-" + uuid.uuid4().hex
    names = ["../%s-1" % marker, "../../../../../../tmp/%s-2" % marker, "/tmp/%s-3" % marker, "/etc/passwd",
             "/mnt/data/../%s-4" % marker, "sub/../../%s-5" % marker, "..", ".", "/", "/mnt/data/"]
    responses = [raw_upload(lab.api, sess, 'filename="%s"' % n) for n in names]
    responses.append(raw_upload(lab.api, sess, "filename*=UTF-8''..%%2F..%%2F..%%2Ftmp%%2F%s-6" % marker))
    for path in ["..", "../..", "/tmp", "/etc", "/proc/self"]:
        responses.append(lab.api.http.post(lab.api.url("files/upload", sess.id, extra="&path=" + path),
                                           files={"file": (marker + "-7", b"x")}, timeout=60))
    for r in responses:
        assert r.status_code == 400, (r.status_code, r.text[:300])
        assert r.headers.get("x-ms-error-code") == "InvalidFilePath", r.text[:300]
    with open("/etc/passwd", "rb") as f:
        assert b"payload" not in f.read()
    hits = glob.glob("/tmp/*%s*" % marker) + glob.glob("/etc/*%s*" % marker) + \
        glob.glob(os.path.join(server.tmp, "**", "*%s*" % marker), recursive=True)
    assert not hits, "uploads escaped /mnt/data: %r" % hits
    lab.contained(sess, responses)


def test_upload_names_with_nul_long_unicode_and_controls(lab):
    """NUL, control characters, over-long names and undecodable RFC 5987 names are 400s; unicode,
    RTL overrides and device-like names are ordinary names that round-trip exactly; names with
    backslashes stay a single file inside /mnt/data."""
    sess = lab.session()
    bad = ['filename="a\x00b.txt"', 'filename="%s"' % ("x" * 300), 'filename="%s"' % ("y/" * 600 + "z"),
           'filename="a\x01b"', 'filename="a\x7fb"', "filename*=UTF-8''a%00b.txt", "filename*=UTF-8''%FF%FE.txt",
           "filename*=UTF-8''a%0d%0ab"]
    responses = [raw_upload(lab.api, sess, d) for d in bad]
    for d, r in zip(bad, responses):
        assert r.status_code == 400, (d, r.status_code, r.text[:300])
    good = ["r\u00e9sum\u00e9-\U0001F600.txt", "\u202etxt.exe", "con", "nul.txt",
            "\u4e2d\u6587 \u0645\u0631\u062d\u0628\u0627.csv"]
    for name in good:
        data = ("content of " + name).encode()
        r = lab.api.upload(sess.id, name, data)
        responses.append(r)
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        d = sess.download(name)
        assert d.status_code == 200 and d.content == data, (name, d.status_code)
    r = lab.api.upload(sess.id, "a\\..\\..\\b.txt", b"backslashes")
    responses.append(r)
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    inside = json.loads(sess.ok("import json, os\njson.dumps(sorted(os.listdir('/mnt/data')))")["result"])
    assert set(good) <= set(inside), inside
    assert len(inside) == len(good) + (r.status_code == 200), inside
    listed = lab.api.list_files(sess.id)
    assert all("/" not in name for name in listed), listed
    lab.contained(sess, responses)


# Lists every descriptor of every process the sandbox can see (run with python3 in any pool).
FD_SCAN = r'''
import json, os, stat
out = {}
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        fds = os.listdir("/proc/%s/fd" % pid)
    except OSError:
        continue
    for fd in fds:
        path = "/proc/%s/fd/%s" % (pid, fd)
        try:
            out[pid + "/" + fd] = [os.readlink(path), stat.S_ISDIR(os.stat(path).st_mode)]
        except OSError:
            pass
print(json.dumps(out))
'''
FD_ALLOWED = ("pipe:", "socket:", "anon_inode:", "/dev/", "/mnt/data", "/tmp", "/usr/", "/proc/", "/etc/",
              "/opt/sandpiper/", "/var/lib/sandpiper/runtimes/")


@pytest.mark.parametrize("pool", ["python", "node", "shell"])
def test_no_descriptor_reaches_outside_the_sandbox(lab, pool):
    """No process in a sandbox holds a descriptor inherited from the host (or a pool template):
    no directory outside /mnt/data and /tmp, no file outside the sandbox's own view, so nothing
    to openat() or fchdir() out of."""
    sess = lab.session(pool)
    if pool == "python":
        stdout = sess.ok(FD_SCAN)["stdout"]
    elif pool == "shell":
        stdout = sess.sh("python3 - <<'EOF'\n" + FD_SCAN + "\nEOF")[1]
    else:
        stdout = sess.ok("require('child_process').execFileSync('python3', ['-c', %s]).toString()"
                         % json.dumps(FD_SCAN))["result"]
    fds = json.loads(stdout)
    assert fds, "no descriptor listed (the scan proves nothing)"
    outside = {k: v for k, v in fds.items() if not v[0].startswith(FD_ALLOWED)}
    assert not outside, "descriptors reaching outside the sandbox: %r" % outside
    dirs = {k: v for k, v in fds.items() if v[1] and not v[0].startswith(("/mnt/data", "/tmp", "/proc/"))}
    assert not dirs, "directory descriptors outside /mnt/data and /tmp: %r" % dirs
    lab.contained(sess)


def test_gvisor_host_files_are_unreachable(lab, server):
    """In a gVisor sandbox too, host secrets, the server's state and /proc/1/root are out of
    reach, and the kernel it talks to is gVisor's, not the host's."""
    sess = lab.session("python-gvisor")
    paths = HOST_SECRETS + [server.data_dir, server.data_dir + "/sandpiper.sqlite", server.tmp]
    seen = sess.probe(with_values(TRY_READ, PATHS=paths))
    leaked = {p: o for p, o in seen.items() if not refused(o) and p not in ("/sys/fs/cgroup", "/run")}
    assert not leaked, "host paths readable from a gVisor sandbox: %r" % leaked
    version = sess.ok("open('/proc/version').read()")["result"]
    assert os.uname().release not in version, "gVisor sandbox reports the host kernel: %r" % version
    lab.contained(sess)
