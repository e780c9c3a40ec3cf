"""Sandpiper shell guest agent.

Runs inside a sandbox and executes shell commands on behalf of the host, like
the Azure Container Apps Shell session pool. All commands of a session run in
ONE long-lived `bash --noprofile --norc`, so the working directory, variables,
functions and aliases persist between commands.

Requests arrive on fd 3, responses leave on fd 4; both use length-prefixed
JSON frames (4-byte big-endian length, then UTF-8 JSON). See
docs/agent-protocol.md for the wire protocol.

How a command runs:
- the agent writes the command to a private file and creates fresh FIFOs for
  its stdout and stderr (plus a file or /dev/null for its stdin);
- a small driver loop inside bash (reading "go" lines on fd 200) evaluates the
  command with those redirections and writes the exit status to fd 200's
  sibling, fd 201. fds 200/201 are closed for the command itself;
- the agent collects the FIFOs until the status arrives, so background jobs
  that keep the FIFOs open never block a reply; what they write later is
  drained and discarded.

Python 3.11 standard library only.
"""

import errno
import fcntl
import json
import math
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

PROTOCOL_VERSION = 1
REQUEST_FD = 3
RESPONSE_FD = 4
MAX_REQUEST_FRAME = 64 * 1024 * 1024  # host -> agent
MAX_RESPONSE_FRAME = 16 * 1024 * 1024  # agent -> host
DEFAULT_OUTPUT_LIMIT = 1024 * 1024
READ_CHUNK = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
TIMEOUT_EXIT_CODE = 124
TERM_GRACE = 0.5  # SIGTERM -> SIGKILL for the command's processes
STUCK_GRACE = 1.5  # after the SIGKILL: then restart bash itself
DRAIN_GRACE = 0.02  # after the status arrives: wait this long for more output
DRAIN_MAX = 0.25
BASH_CMD_FD = 200
BASH_STATUS_FD = 201


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

_diag_fd = None


def log(msg):
    fd = _diag_fd if _diag_fd is not None else 2
    try:
        os.write(fd, ("sandpiper-agent: %s\n" % msg).encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def utf8_cut(data, limit):
    """Cut UTF-8 bytes to at most `limit` bytes without splitting a character."""
    if len(data) <= limit:
        return data
    cut = limit
    back = 0
    while cut > 0 and back < 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
        back += 1
    if back == 3 and cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut = limit
    return data[:cut]


def cap_text(text, limit):
    if text is None:
        return "", False
    if len(text) * 4 <= limit:
        return text, False
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False
    return utf8_cut(raw, limit).decode("utf-8", "replace"), True


def cap_text_tail(text, limit):
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False
    if limit <= 0:
        return "", True
    tail = raw[len(raw) - limit:]
    i = 0
    while i < len(tail) and i < 4 and (tail[i] & 0xC0) == 0x80:
        i += 1
    return tail[i:].decode("utf-8", "replace"), True


def decode_capped(data, limit):
    text = utf8_cut(bytes(data), limit).decode("utf-8", "replace")
    return cap_text(text, limit)[0]


def clean_str(s):
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def clean_json(obj):
    if isinstance(obj, str):
        return clean_str(obj)
    if isinstance(obj, dict):
        return {clean_str(str(k)): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def encode_json(obj):
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError):
        text = json.dumps(clean_json(obj), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"), default=str)
        return text.encode("utf-8")


def format_seconds(t):
    try:
        if float(t) == int(t):
            return str(int(t))
    except (OverflowError, ValueError):
        pass
    return repr(float(t))


def to_bytes(text):
    return text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)


# ----------------------------------------------------------------------------
# Protocol channel (fd 3 in, fd 4 out)
# ----------------------------------------------------------------------------

class ChannelClosed(Exception):
    pass


class FrameTooLarge(Exception):
    def __init__(self, size):
        super().__init__(size)
        self.size = size


class Channel:
    def __init__(self, rfd, wfd):
        self.rfd = rfd
        self.wfd = wfd

    def _read_exact(self, n):
        chunks = []
        remaining = n
        while remaining:
            chunk = os.read(self.rfd, min(remaining, READ_CHUNK))
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _discard(self, n):
        while n:
            chunk = os.read(self.rfd, min(n, READ_CHUNK))
            if not chunk:
                raise ChannelClosed()
            n -= len(chunk)

    def recv(self):
        header = self._read_exact(4)
        if header is None:
            raise ChannelClosed()
        (size,) = struct.unpack(">I", header)
        if size > MAX_REQUEST_FRAME:
            self._discard(size)
            raise FrameTooLarge(size)
        payload = self._read_exact(size) if size else b""
        if payload is None:
            raise ChannelClosed()
        return payload

    def send(self, obj):
        payload = encode_json(obj)
        data = memoryview(struct.pack(">I", len(payload)) + payload)
        while data:
            try:
                n = os.write(self.wfd, data)
            except BrokenPipeError:
                raise ChannelClosed()
            except BlockingIOError:
                select.select([], [self.wfd], [], 1.0)
                continue
            data = data[n:]


# ----------------------------------------------------------------------------
# Process helpers
# ----------------------------------------------------------------------------

def descendants(pid):
    found = set()
    stack = [pid]
    use_children_files = os.path.exists("/proc/%d/task/%d/children" % (pid, pid))
    parents = {}
    if not use_children_files:
        try:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open("/proc/%s/stat" % entry, "rb") as f:
                        stat = f.read()
                    ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
                    parents.setdefault(ppid, []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        except OSError:
            return found
    while stack:
        p = stack.pop()
        if use_children_files:
            kids = []
            try:
                tids = os.listdir("/proc/%d/task" % p)
            except OSError:
                continue
            for tid in tids:
                try:
                    with open("/proc/%d/task/%s/children" % (p, tid)) as f:
                        kids.extend(int(k) for k in f.read().split())
                except (OSError, ValueError):
                    continue
        else:
            kids = parents.get(p, [])
        for k in kids:
            if k not in found:
                found.add(k)
                stack.append(k)
    return found


def signal_pids(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


# ----------------------------------------------------------------------------
# Output collection
# ----------------------------------------------------------------------------

_devnull_w = None


def devnull_w():
    global _devnull_w
    if _devnull_w is None:
        _devnull_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _devnull_w


def discard_some(fd):
    """Move up to 1 MiB from fd to /dev/null. Returns bytes moved (0 = EOF)."""
    splice = getattr(os, "splice", None)
    if splice is not None:
        try:
            return splice(fd, devnull_w(), READ_CHUNK, flags=getattr(os, "SPLICE_F_NONBLOCK", 2))
        except BlockingIOError:
            raise
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                raise
    return len(os.read(fd, READ_CHUNK))


class Sink:
    """Collects at most `limit` bytes from a non-blocking FIFO read end."""

    def __init__(self, fd, limit):
        self.fd = fd
        self.limit = limit
        self.keep = limit + 4  # a few extra bytes to cut on a character boundary
        self.buf = bytearray()
        self.total = 0
        self.eof = False

    def read_some(self):
        """Read what is available. Returns False when nothing was available."""
        try:
            if len(self.buf) >= self.keep:
                n = discard_some(self.fd)
                if n == 0:
                    self.eof = True
                self.total += n
                return True
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            self.eof = True
            return True
        if not data:
            self.eof = True
            return True
        self.total += len(data)
        room = self.keep - len(self.buf)
        if room > 0:
            self.buf += data[:room] if len(data) > room else data
        return True

    def text(self):
        return decode_capped(self.buf, self.limit), self.total > self.limit


class OrphanDrainer(threading.Thread):
    """Reads and discards FIFOs still held open by background jobs."""

    def __init__(self):
        super().__init__(name="sandpiper-orphan-drain", daemon=True)
        self.lock = threading.Lock()
        self.incoming = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def add(self, fd):
        with self.lock:
            self.incoming.append(fd)
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def run(self):
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        fds = set()
        while True:
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self.wake_r:
                    try:
                        while os.read(self.wake_r, 4096):
                            pass
                    except OSError:
                        pass
                    with self.lock:
                        new, self.incoming = self.incoming, []
                    for nfd in new:
                        fds.add(nfd)
                        poller.register(nfd, select.POLLIN)
                    continue
                try:
                    n = discard_some(fd)
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                if n == 0:
                    poller.unregister(fd)
                    fds.discard(fd)
                    try:
                        os.close(fd)
                    except OSError:
                        pass


# ----------------------------------------------------------------------------
# The persistent bash
# ----------------------------------------------------------------------------

def shell_quote(s):
    return "'" + s.replace("'", "'\\''") + "'"


def find_bash():
    for candidate in (shutil.which("bash"), "/usr/bin/bash", "/bin/bash"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "bash"


class Bash:
    def __init__(self, bash_path, workdir, cwd):
        self.workdir = workdir
        self.cmd_file = os.path.join(workdir, "cmd")
        self.in_path = os.path.join(workdir, "in")
        self.out_path = os.path.join(workdir, "out")
        self.err_path = os.path.join(workdir, "err")
        cmd_r, self.cmd_w = os.pipe()
        self.status_r, st_w = os.pipe()
        os.set_blocking(self.status_r, False)
        q = shell_quote
        # One line, so that bash's "line N" in error messages is the line of
        # the user's command.
        driver = "; ".join([
            "exec %d<&%d %d>&%d %d<&- %d>&-" % (BASH_CMD_FD, cmd_r, BASH_STATUS_FD, st_w, cmd_r, st_w),
            "builtin shopt -s expand_aliases",
            "while builtin read -r -u %d _; do { builtin eval -- \"$(< %s)\"; } < %s > %s 2> %s %d<&- %d>&-" % (
                BASH_CMD_FD, q(self.cmd_file), q(self.in_path), q(self.out_path), q(self.err_path),
                BASH_CMD_FD, BASH_STATUS_FD),
            "builtin printf '%%d\\n' \"$?\" >&%d" % BASH_STATUS_FD,
            "done",
        ])
        env = dict(os.environ)
        for var in ("BASH_ENV", "ENV"):
            env.pop(var, None)
        try:
            self.proc = subprocess.Popen(
                [bash_path, "--noprofile", "--norc", "-c", driver, "bash"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=_diag_fd if _diag_fd is not None else None,
                cwd=cwd if cwd and os.path.isdir(cwd) else None,
                env=env,
                pass_fds=(cmd_r, st_w),
                start_new_session=True,
            )
        finally:
            os.close(cmd_r)
            os.close(st_w)
        self.pid = self.proc.pid
        self.pidfd = None
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.status_buf = b""
        self.last_cwd = cwd

    def alive(self):
        return self.proc.poll() is None

    def cwd(self):
        try:
            return os.readlink("/proc/%d/cwd" % self.pid)
        except OSError:
            return self.last_cwd

    def close(self, kill=True):
        if kill and self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for fd in (self.cmd_w, self.status_r, self.pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.cmd_w = self.status_r = self.pidfd = None

    def exit_code(self):
        rc = self.proc.poll()
        if rc is None:
            try:
                rc = self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                return None
        return 128 - rc if rc < 0 else rc


# ----------------------------------------------------------------------------
# Agent
# ----------------------------------------------------------------------------

class RequestError(Exception):
    pass


def fit_result_frame(reply):
    budget = MAX_RESPONSE_FRAME - 64
    for _ in range(64):
        payload = encode_json(reply)
        if len(payload) <= budget:
            return reply
        over = len(payload) - budget
        sizes = {k: len(encode_json(reply[k])) for k in ("stdout", "stderr") if isinstance(reply.get(k), str)}
        key = max(sizes, key=sizes.get)
        raw = reply[key].encode("utf-8", "surrogatepass")
        ratio = max(1.0, sizes[key] / max(1, len(raw)))
        keep = max(0, len(raw) - int(over / ratio) - 1024)
        reply[key] = utf8_cut(raw, keep).decode("utf-8", "replace")
        reply[key + "Truncated"] = True
    return reply


def tool_version(argv, pattern=r"(\d+(?:\.\d+)+)"):
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=5).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, out)
    return m.group(1) if m else None


class Agent:
    def __init__(self, channel):
        self.channel = channel
        self.bash_path = find_bash()
        self.workdir = tempfile.mkdtemp(prefix=".sandpiper-shell-")
        self.home_cwd = os.getcwd()
        self.bash = None
        self.drainer = OrphanDrainer()
        self.drainer.start()
        self.version = None
        self.tools = None
        self.process_groups = []

    # -- bash lifecycle ----------------------------------------------------

    def start_bash(self, cwd=None):
        self.ensure_workdir()
        self.bash = Bash(self.bash_path, self.workdir, cwd or self.home_cwd)
        # Each bash leads its own process group; background jobs stay in it
        # after bash is replaced. They are ended when the session ends.
        self.process_groups.append(self.bash.pid)

    def ensure_bash(self):
        if self.bash is None or not self.bash.alive():
            cwd = self.bash.last_cwd if self.bash is not None else None
            if self.bash is not None:
                self.bash.close()
            self.start_bash(cwd)

    def ensure_workdir(self):
        try:
            os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise RequestError("cannot create the agent's work directory: %s" % e)

    def bash_version(self):
        if self.version is None:
            v = tool_version([self.bash_path, "--noprofile", "--norc", "-c",
                              'echo "${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}.${BASH_VERSINFO[2]}"'])
            self.version = v or ""
        return self.version

    def list_tools(self):
        if self.tools is None:
            tools = []
            for name, argv in (("python3", ["python3", "--version"]),
                               ("node", ["node", "--version"]),
                               ("git", ["git", "--version"]),
                               ("gcc", ["gcc", "-dumpfullversion", "-dumpversion"]),
                               ("perl", ["perl", "-e", "print $^V"])):
                if shutil.which(argv[0]) is None:
                    continue
                v = tool_version(argv)
                if v:
                    tools.append({"name": name, "version": v})
            self.tools = sorted(tools, key=lambda p: p["name"].lower())
        return self.tools

    # -- serving --------------------------------------------------------------

    def serve(self):
        while True:
            try:
                payload = self.channel.recv()
            except ChannelClosed:
                return
            except FrameTooLarge as e:
                self.channel.send({"id": None, "type": "error", "message":
                                   "request frame too large: %d bytes (limit %d)"
                                   % (e.size, MAX_REQUEST_FRAME)})
                continue
            try:
                reply = self.handle(payload)
            except ChannelClosed:
                return
            except BaseException as e:
                reply = {"id": None, "type": "error", "message": "internal error: %r" % (e,)}
                log("internal error: %s" % traceback.format_exc())
            self.channel.send(reply)

    def handle(self, payload):
        try:
            request = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return {"id": None, "type": "error", "message": "malformed request: %s" % e}
        if not isinstance(request, dict):
            return {"id": None, "type": "error", "message": "request must be a JSON object"}
        rid = request.get("id")
        if isinstance(rid, bool) or not isinstance(rid, int):
            rid = None
        kind = request.get("type")
        try:
            if kind == "execute":
                return self.execute(rid, request)
            if kind == "ping":
                return {"id": rid, "type": "pong"}
            if kind == "packages":
                return {"id": rid, "type": "packages", "packages": self.list_tools(),
                        "runtime": {"name": "bash", "version": self.bash_version()}}
        except RequestError as e:
            return {"id": rid, "type": "error", "message": str(e)}
        except ChannelClosed:
            raise
        except Exception as e:
            log("internal error: %s" % traceback.format_exc())
            return {"id": rid, "type": "error", "message": "internal error: %r" % (e,)}
        return {"id": rid, "type": "error", "message": "unknown request type: %r" % (kind,)}

    # -- execute --------------------------------------------------------------

    @staticmethod
    def parse_execute(request):
        code = request.get("code")
        if not isinstance(code, str):
            raise RequestError("execute: 'code' must be a string")
        stdin = request.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise RequestError("execute: 'stdin' must be a string")
        timeout = request.get("timeoutSeconds")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise RequestError("execute: 'timeoutSeconds' must be a number")
            try:
                timeout = float(timeout)
            except OverflowError:
                timeout = math.inf
            if math.isnan(timeout) or timeout <= 0 or math.isinf(timeout):
                timeout = None
        limit = request.get("outputLimit", DEFAULT_OUTPUT_LIMIT)
        if limit is None:
            limit = DEFAULT_OUTPUT_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise RequestError("execute: 'outputLimit' must be a number")
        if isinstance(limit, float) and math.isnan(limit):
            limit = DEFAULT_OUTPUT_LIMIT
        limit = int(max(0, min(limit, MAX_RESPONSE_FRAME)))
        return code, stdin, timeout, limit

    def _prepare_files(self, code, stdin):
        """Write the command, stdin and fresh FIFOs. Returns (out_sink_fd, err_sink_fd, keep_fds)."""
        self.ensure_workdir()
        bash = self.bash
        for p in (bash.cmd_file, bash.in_path, bash.out_path, bash.err_path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        with open(bash.cmd_file, "wb") as f:
            f.write(to_bytes(code))
        if stdin is None:
            os.symlink(os.devnull, bash.in_path)
        else:
            with open(bash.in_path, "wb") as f:
                f.write(to_bytes(stdin))
        read_fds = []
        keep_fds = []
        for p in (bash.out_path, bash.err_path):
            os.mkfifo(p, 0o600)
            r = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            # Our own writer keeps the FIFO "connected" until the command ends,
            # so EOF means "every writer is gone" and never "not opened yet".
            w = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(r, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
            read_fds.append(r)
            keep_fds.append(w)
        return read_fds[0], read_fds[1], keep_fds

    def execute(self, rid, request):
        code, stdin, timeout, limit = self.parse_execute(request)
        notes = []
        if self.bash is not None and not self.bash.alive():
            notes.append("sandpiper-agent: the shell had exited; a new one was started.")
        self.ensure_bash()
        bash = self.bash
        start = time.monotonic()
        out_fd, err_fd, keep_fds = self._prepare_files(code, stdin)
        out = Sink(out_fd, limit)
        err = Sink(err_fd, limit)
        before = None
        if timeout is not None:
            try:
                before = descendants(bash.pid)
            except Exception:
                before = None

        poller = select.poll()
        for fd in (out_fd, err_fd, bash.status_r):
            poller.register(fd, select.POLLIN)
        if bash.pidfd is not None:
            poller.register(bash.pidfd, select.POLLIN)

        try:
            os.write(bash.cmd_w, b"go\n")
        except OSError:
            pass  # bash died: noticed below

        exit_code = None
        bash_died = False
        timed_out = False
        restarted = False
        deadline = start + timeout if timeout is not None else None
        term_at = kill_at = None
        last_alive_check = start
        while exit_code is None and not bash_died:
            now = time.monotonic()
            wait = 0.1
            for t in (deadline if not timed_out else None, term_at, kill_at):
                if t is not None:
                    wait = min(wait, max(0.0, t - now))
            try:
                events = poller.poll(int(wait * 1000) + 1)
            except InterruptedError:
                events = []
            for fd, ev in events:
                if fd == out_fd or fd == err_fd:
                    sink = out if fd == out_fd else err
                    for _ in range(16):  # bounded, to keep other fds serviced
                        if not sink.read_some() or sink.eof:
                            break
                    if sink.eof:
                        poller.unregister(fd)
                elif fd == bash.status_r:
                    try:
                        data = os.read(bash.status_r, 4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        poller.unregister(fd)  # every writer gone: bash exited
                        bash_died = not bash.alive() or bash.exit_code() is not None
                        continue
                    bash.status_buf += data
                    if b"\n" in bash.status_buf:
                        line, _, rest = bash.status_buf.partition(b"\n")
                        bash.status_buf = rest
                        try:
                            exit_code = int(line.strip() or b"0")
                        except ValueError:
                            exit_code = 1
                elif bash.pidfd is not None and fd == bash.pidfd:
                    poller.unregister(fd)
                    bash_died = True
            if exit_code is not None or bash_died:
                break
            now = time.monotonic()
            if bash.pidfd is None and now - last_alive_check > 0.1:
                last_alive_check = now
                if not bash.alive():
                    bash_died = True
                    break
            if deadline is not None and not timed_out and now >= deadline:
                timed_out = True
                pids = self._new_descendants(bash, before)
                signal_pids(pids, signal.SIGTERM)
                term_at = now + TERM_GRACE
            elif term_at is not None and now >= term_at:
                term_at = None
                signal_pids(self._new_descendants(bash, before), signal.SIGKILL)
                kill_at = now + STUCK_GRACE
            elif kill_at is not None and now >= kill_at:
                # bash itself is busy (a loop of builtins, `exec sleep`, ...):
                # restart it, keeping the working directory.
                kill_at = None
                cwd = bash.cwd()
                signal_pids(self._new_descendants(bash, before), signal.SIGKILL)
                try:
                    os.kill(bash.pid, signal.SIGKILL)
                except OSError:
                    pass
                bash.last_cwd = cwd
                restarted = True
                bash_died = True

        # The command is over: stop holding the FIFOs open, then collect what
        # is still buffered. Writers that remain are background jobs.
        for w in keep_fds:
            os.close(w)
        self._drain_after(out, err)
        for sink in (out, err):
            if sink.eof:
                os.close(sink.fd)
            else:
                self.drainer.add(sink.fd)
        for p in (bash.out_path, bash.err_path, bash.in_path, bash.cmd_file):
            try:
                os.unlink(p)
            except OSError:
                pass

        if bash_died:
            code_of_bash = bash.exit_code()
            cwd = bash.last_cwd
            if exit_code is None:
                exit_code = code_of_bash if code_of_bash is not None else 1
            bash.close()
            self.bash = None
            if restarted:
                notes.append("sandpiper-agent: the shell did not stop after its child processes were "
                             "killed, so it was restarted in %s; shell variables, functions and "
                             "aliases were lost." % cwd)
            else:
                notes.append("sandpiper-agent: the shell exited with status %s; a new shell was "
                             "started in %s (shell variables, functions and aliases were reset)."
                             % (exit_code, cwd))
            try:
                self.start_bash(cwd)
            except Exception as e:
                log("cannot restart bash: %s" % e)
                self.bash = None
        else:
            bash.last_cwd = bash.cwd()
        if timed_out:
            exit_code = TIMEOUT_EXIT_CODE
        duration_ms = (time.monotonic() - start) * 1000.0

        stdout, stdout_trunc = out.text()
        stderr, stderr_trunc = err.text()
        tail = "".join(n + "\n" for n in notes)
        if timed_out:
            tail += ("TimeoutError: command exceeded %s seconds and was killed\n"
                     % format_seconds(timeout))
        if tail:
            tail, tail_cut = cap_text_tail(tail, limit)
            room = limit - len(tail.encode("utf-8", "surrogatepass"))
            cut = False
            if stderr and not stderr.endswith("\n"):
                stderr, cut = cap_text(stderr, max(0, room - 1))
                if stderr:
                    stderr += "\n"
            else:
                stderr, cut = cap_text(stderr, max(0, room))
            stderr += tail
            stderr_trunc = stderr_trunc or cut or tail_cut

        reply = {
            "id": rid,
            "type": "result",
            "status": "Success" if exit_code == 0 else "Failure",
            "stdout": stdout,
            "stderr": stderr,
            "result": "",
            "jupyterResult": "",
            "timedOut": timed_out,
            "durationMs": duration_ms,
            "stdoutTruncated": bool(stdout_trunc),
            "stderrTruncated": bool(stderr_trunc),
            "exitCode": int(exit_code),
        }
        return fit_result_frame(reply)

    @staticmethod
    def _new_descendants(bash, before):
        try:
            pids = descendants(bash.pid)
        except Exception:
            return set()
        return pids - before if before is not None else pids

    @staticmethod
    def _drain_after(out, err):
        poller = select.poll()
        active = {}
        for sink in (out, err):
            if not sink.eof:
                poller.register(sink.fd, select.POLLIN)
                active[sink.fd] = sink
        end = time.monotonic() + DRAIN_MAX
        while active:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                events = poller.poll(int(min(left, DRAIN_GRACE) * 1000) + 1)
            except InterruptedError:
                continue
            if not events:
                break
            for fd, _ in events:
                sink = active.get(fd)
                if sink is None:
                    continue
                for _ in range(16):
                    if not sink.read_some() or sink.eof:
                        break
                if sink.eof:
                    poller.unregister(fd)
                    del active[fd]


# ----------------------------------------------------------------------------
# Process set-up
# ----------------------------------------------------------------------------

def relocate_fd(fd):
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def fd_is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def setup_process():
    global _diag_fd
    for fd in (REQUEST_FD, RESPONSE_FD):
        if not fd_is_open(fd):
            os.write(2, b"sandpiper-agent: fd 3 (requests) and fd 4 (responses) must be open\n")
            os._exit(2)
    rfd = relocate_fd(REQUEST_FD)
    wfd = relocate_fd(RESPONSE_FD)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    for fd in (1, 2):
        if not fd_is_open(fd):
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    _diag_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 10)
    # A no-op handler rather than SIG_IGN: an ignored SIGINT would be
    # inherited by bash and every command.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    return Channel(rfd, wfd)


def main():
    channel = setup_process()
    agent = Agent(channel)
    try:
        agent.start_bash()
        channel.send({"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                      "language": "shell", "version": agent.bash_version()})
        agent.serve()
    except ChannelClosed:
        pass
    # The session is over: end bash and the jobs left in its process groups.
    for pgid in agent.process_groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(agent.workdir, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
