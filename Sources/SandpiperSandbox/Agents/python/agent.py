"""Sandpiper Python guest agent.

Runs inside a sandbox and executes code statefully on behalf of the host.
Requests arrive on fd 3, responses leave on fd 4; both use length-prefixed
JSON frames (4-byte big-endian length, then UTF-8 JSON).  fd 0/1/2 belong to
user code.  See docs/agent-protocol.md for the exact wire protocol.

Python 3.11 standard library only; IPython and matplotlib are used when present.
"""

import base64
import binascii
import contextlib
import ctypes
import fcntl
import importlib
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import resource  # here, not in each forked session: importing it there cost ~170 page copies
import select
import signal
import _signal
import struct
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
SAFE_INT = 2 ** 53
READ_CHUNK = 1 << 20
SIGINT = int(signal.SIGINT)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

_diag_fd = None  # CLOEXEC duplicate of the agent's original fd 2
_template_pid = None  # set in a fork template: it must never start a thread (they do not survive fork)


def log(msg):
    """Diagnostics for the host's log (the agent's original stderr)."""
    fd = _diag_fd if _diag_fd is not None else 2
    try:
        os.write(fd, ("sandpiper-agent: %s\n" % msg).encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def block_sigint_in_this_thread():
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (OSError, ValueError, AttributeError):
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
        cut = limit  # not valid UTF-8 anyway; cut at the byte limit
    return data[:cut]


def cap_text(text, limit):
    """Return (text, truncated) with text's UTF-8 encoding at most limit bytes."""
    if text is None:
        return "", False
    if len(text) * 4 <= limit:
        return text, False
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text, False
    return utf8_cut(raw, limit).decode("utf-8", "replace"), True


def cap_text_tail(text, limit):
    """Like cap_text but keeps the end of the text."""
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
    # U+FFFD replacements can expand invalid bytes; re-cap to be exact.
    return cap_text(text, limit)[0]


def clean_str(s):
    """Make a str safe to encode as UTF-8 JSON (replace lone surrogates)."""
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
        """Return the payload bytes of the next frame; ChannelClosed on EOF."""
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

    def send_bytes(self, payload):
        data = memoryview(struct.pack(">I", len(payload)) + payload)
        while data:
            try:
                n = os.write(self.wfd, data)
            except BrokenPipeError:
                raise ChannelClosed()
            data = data[n:]

    def send(self, obj):
        self.send_bytes(obj.payload if type(obj) is EncodedReply else encode_json(obj))


class EncodedReply(dict):
    """A reply already encoded to check that its frame fits (`fit_result_frame`): the channel
    sends that payload rather than encoding the reply a second time."""

    __slots__ = ("payload",)


# ----------------------------------------------------------------------------
# fd-level output capture
# ----------------------------------------------------------------------------

class OutputPump(threading.Thread):
    """One long-lived thread that drains every capture pipe of this process.

    A cell's output must be drained while the cell runs (a pipe holds 1 MiB; a cell that
    writes more would block on itself), but starting reader threads per cell costs more
    than the cell itself (a thread start waits for the new thread to take the GIL). The
    pump waits on an epoll set that the cell's thread edits directly: a capture joins it when
    its cell starts and leaves it before its write end is closed, so a cell that prints
    nothing never wakes the pump (each wake-up is a thread switch and a GIL hand-over). The
    pump reads what arrives under the capture's lock, and keeps discarding the output of
    captures whose cell has ended while a background process still holds the write end,
    until that process lets go."""

    _instance = None

    @classmethod
    def shared(cls):
        """The pump of this process; a forked child (a session) starts its own, lazily: a
        template never has one, because threads do not survive fork."""
        pump = cls._instance
        if pump is None or pump.owner != os.getpid():
            pump = cls._instance = cls()
            pump.start()
        return pump

    def __init__(self):
        super().__init__(name="sandpiper-output", daemon=True)
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.captures = {}  # read fd -> StreamCapture
        self.epoll = select.epoll()

    def add(self, capture):
        with self.lock:
            self.captures[capture.rfd] = capture
            self.epoll.register(capture.rfd, select.EPOLLIN)

    def remove_locked(self, capture):
        """Takes a capture out of the set (the pump's lock is held); no event of it follows."""
        if self.captures.pop(capture.rfd, None) is not None:
            try:
                self.epoll.unregister(capture.rfd)
            except (OSError, ValueError):
                pass

    def run(self):
        block_sigint_in_this_thread()
        while True:
            try:
                events = self.epoll.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                with self.lock:
                    capture = self.captures.get(fd)
                    if capture is not None:
                        capture.pump_locked()


class StreamCapture:
    """Points `target_fd` at a pipe and collects at most `limit` bytes (the pump drains it)."""

    def __init__(self, target_fd, limit, name):
        self.target_fd = target_fd
        self.keep = limit + 4  # a few extra bytes to cut on a character boundary
        self.limit = limit
        self.buf = bytearray()
        self.total = 0
        self.eof = False
        self.orphaned = False
        # A template rehearses cells without the pump: it must stay single-threaded to fork,
        # and its rehearsal cell writes nothing.
        self.pump = None if os.getpid() == _template_pid else OutputPump.shared()
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass
        os.set_blocking(r, False)
        self.rfd = r
        try:
            self.saved = os.dup(target_fd)
        except OSError:  # user code closed the fd; restore it to /dev/null later
            self.saved = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(w, target_fd)  # inheritable, so subprocesses write into the pipe
        os.close(w)
        if self.pump is not None:
            self.pump.add(self)

    def pump_locked(self):
        """Reads what the pipe holds now (the pump's lock is held, or there is no pump).
        Closes the pipe at EOF."""
        while not self.eof:
            try:
                data = os.read(self.rfd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.eof = True
                if self.pump is not None:
                    self.pump.remove_locked(self)
                os.close(self.rfd)
                return
            if self.orphaned:
                continue
            self.total += len(data)
            room = self.keep - len(self.buf)
            if room > 0:
                self.buf += data[:room] if len(data) > room else data

    def finish(self):
        """Restore the fd, collect the text. Returns (text, truncated)."""
        # The capture leaves the pump before its write end closes: its end of file is read
        # here, not by a woken pump.
        if self.pump is not None:
            with self.pump.lock:
                self.pump.remove_locked(self)
        os.dup2(self.saved, self.target_fd)
        os.close(self.saved)
        # Usually nothing else holds the write end: what is left is read here, then EOF.
        # Otherwise a background process does; collect what it writes for up to 0.5 s,
        # then the pump discards the rest until it lets go.
        deadline = time.monotonic() + 0.5
        while True:
            self.pump_locked()
            if self.eof:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.orphaned = True
                if self.pump is not None:
                    self.pump.add(self)
                break
            try:
                select.select([self.rfd], [], [], min(remaining, 0.05))
            except (OSError, ValueError):
                pass
        text = decode_capped(self.buf, self.limit)
        truncated = self.total > self.limit
        self.buf = bytearray()
        return text, truncated


def flush_std_streams():
    seen = set()
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        try:
            s.flush()
        except BaseException:
            pass


# ----------------------------------------------------------------------------
# Process helpers (timeout escalation)
# ----------------------------------------------------------------------------

def has_children():
    """False when this process has no child at all: one waitid, where `descendants` reads a
    /proc file per thread (a quarter of a warm `1+1`)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except OSError:
        pass
    return True


def descendants(pid):
    found = set()
    stack = [pid]
    use_children_files = os.path.exists("/proc/%d/task/%d/children" % (pid, pid))
    if not use_children_files:
        parents = {}
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


# ----------------------------------------------------------------------------
# Results and images
# ----------------------------------------------------------------------------

class CellState:
    def __init__(self):
        self.tracebacks = []
        self.last_format = None  # format dict of the last displayed expression
        self.image = None  # (format, base64 str) of the last shown/displayed image


def image_from_bundle(data):
    """Extract ("png"|"jpeg", base64 str) from a MIME bundle, or None."""
    if not isinstance(data, dict):
        return None
    for mime, fmt in (("image/png", "png"), ("image/jpeg", "jpeg")):
        value = data.get(mime)
        if value is None:
            continue
        if isinstance(value, tuple) and value:
            value = value[0]
        try:
            if isinstance(value, (bytes, bytearray, memoryview)):
                raw = bytes(value)
            elif isinstance(value, str):
                raw = binascii.a2b_base64(value.encode("ascii"))
            else:
                continue
        except (binascii.Error, UnicodeEncodeError, ValueError):
            continue
        if raw:
            return fmt, base64.b64encode(raw).decode("ascii")
    return None


DEEP_TRACEBACK = 100
_AGENT_FILE = os.path.abspath(__file__)


def traceback_depth(value, tb, limit=DEEP_TRACEBACK + 1):
    """Frames in tb plus those of chained exceptions, counted up to `limit`."""
    depth = 0
    seen = set()
    while True:
        while tb is not None and depth < limit:
            depth += 1
            tb = tb.tb_next
        if depth >= limit or value is None or id(value) in seen:
            return depth
        seen.add(id(value))
        value = value.__cause__ or value.__context__
        tb = getattr(value, "__traceback__", None)


def _internal_frame(tb):
    name = tb.tb_frame.f_code.co_filename
    return (name == _AGENT_FILE or os.sep + "IPython" + os.sep in name
            or name.startswith("<frozen"))


def plain_traceback(etype, value, tb):
    while tb is not None and _internal_frame(tb):
        tb = tb.tb_next
    return "".join(traceback.format_exception(etype, value, tb))


def figure_has_content(fig):
    return bool(getattr(fig, "axes", None) or getattr(fig, "lines", None)
                or getattr(fig, "images", None) or getattr(fig, "texts", None)
                or getattr(fig, "patches", None) or getattr(fig, "artists", None))


def render_figure_png(fig):
    """PNG bytes of a matplotlib figure (like Jupyter's inline backend), or None."""
    if not figure_has_content(fig):
        return None
    buf = io.BytesIO()
    if getattr(fig, "canvas", None) is None:
        from matplotlib.backend_bases import FigureCanvasBase
        FigureCanvasBase(fig)
    fig.canvas.print_figure(buf, format="png", bbox_inches="tight",
                            facecolor=fig.get_facecolor(), edgecolor=fig.get_edgecolor())
    return buf.getvalue()


def _figure_png_formatter(fig):
    try:
        return render_figure_png(fig)
    except Exception:
        return None


# ----------------------------------------------------------------------------
# Shells: IPython (preferred) and a plain fallback
# ----------------------------------------------------------------------------

def make_ipython_shell(agent):
    from traitlets.config import Config
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.autocall import ExitAutocall

    try:
        from IPython.lib.pretty import _repr_pprint
    except ImportError:
        _repr_pprint = None

    def plain_repr_is_ipythons(shell, kind):
        """True when IPython would show a `kind` (int, bool or str) as its repr alone: no
        printer registered for it, in text/plain or any other active format."""
        formatters = shell.display_formatter.formatters
        plain = formatters.get("text/plain")
        printed_as = int if kind is bool else kind
        if (_repr_pprint is None or plain is None or not plain.enabled
                or plain.type_printers.get(printed_as) is not _repr_pprint):
            return False
        for mime in shell.display_formatter.active_types:
            other = formatters.get(mime)
            if mime != "text/plain" and other is not None and (
                    kind in other.type_printers or printed_as in other.type_printers):
                return False
        return True

    class AgentDisplayHook(DisplayHook):
        def compute_format_data(self, result):
            # Most results are a plain int, bool or str: formatted here exactly as IPython
            # would (its repr). Its formatter machinery cost a fifth of a warm `1+1`.
            kind = type(result)
            if kind in (int, bool, str) and plain_repr_is_ipythons(self.shell, kind):
                return {"text/plain": repr(result)}, {}
            return super().compute_format_data(result)

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            agent.on_result_format(format_dict)

        def log_output(self, format_dict):
            pass

        def finish_displayhook(self):
            self._is_active = False

    class AgentDisplayPublisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None,
                    update=False, **kwargs):
            agent.on_display(data)

        def clear_output(self, wait=False):
            pass

    class AgentExit(ExitAutocall):
        def __call__(self, code=None):
            raise SystemExit(code)

    class AgentShell(InteractiveShell):
        displayhook_class = AgentDisplayHook
        display_pub_class = AgentDisplayPublisher

        @contextlib.contextmanager
        def _tee(self, channel):
            # IPython 9 tees stdout/stderr into in-memory history; a flood
            # would then grow without bound.  We capture at the fd level.
            yield

        def _format_exception_for_storage(self, exception, *args, **kwargs):
            # IPython 9 formats every exception a second time for its history
            # (slow for deep tracebacks, and kept in memory). Not needed here.
            return {"ename": type(exception).__name__, "evalue": "", "traceback": []}

        def _showtraceback(self, etype, evalue, stb):
            try:
                text = self.InteractiveTB.stb2text(stb)
            except Exception:
                text = "".join(traceback.format_exception(etype, evalue, None))
            agent.on_traceback(text)

        def showtraceback(self, exc_tuple=None, filename=None, tb_offset=None,
                          exception_only=False, running_compiled_code=False):
            agent.formatting_since = time.monotonic()
            try:
                if not exception_only:
                    # IPython's formatter needs seconds for deep tracebacks
                    # (e.g. RecursionError); use the stdlib formatter there.
                    try:
                        etype, value, tb = self._get_exc_info(exc_tuple)
                    except Exception:
                        etype = value = tb = None
                    if (etype is not None and not issubclass(etype, SyntaxError)
                            and traceback_depth(value, tb) > DEEP_TRACEBACK):
                        agent.on_traceback(plain_traceback(etype, value, tb))
                        return None
                return super().showtraceback(exc_tuple, filename, tb_offset,
                                             exception_only, running_compiled_code)
            finally:
                agent.formatting_since = None

        def ask_exit(self):
            raise SystemExit()

        def enable_gui(self, gui=None):
            pass

        def init_virtualenv(self):
            pass

    import warnings
    warnings.filterwarnings("ignore", message="To exit: use 'exit', 'quit', or Ctrl-D",
                            category=UserWarning)

    cfg = Config()
    cfg.HistoryManager.enabled = False
    cfg.HistoryManager.hist_file = ":memory:"
    cfg.InteractiveShell.colors = "nocolor"
    cfg.InteractiveShell.autoindent = False
    cfg.InteractiveShell.xmode = "Context"
    cfg.InteractiveShell.ast_node_interactivity = "last_expr"
    cfg.InteractiveShell.banner1 = ""
    cfg.InteractiveShell.banner2 = ""

    shell = AgentShell.instance(config=cfg)
    try:
        shell.colors = "nocolor"
    except Exception:
        try:
            shell.colors = "NoColor"
        except Exception:
            pass
    exiter = AgentExit(shell)
    try:
        shell.exiter = exiter
    except Exception:
        pass
    for name in ("exit", "quit"):
        shell.user_ns[name] = exiter
        shell.user_ns_hidden[name] = exiter
    # IPython shows DeprecationWarnings raised from cells; setuptools' notice on
    # `import pkg_resources` would then prefix AutoGen's package probe output.
    # This must come after the shell exists: IPython inserts its own filter first.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated",
                            category=DeprecationWarning)
    formatter = shell.display_formatter
    try:
        formatter.active_types = ["text/plain", "image/png", "image/jpeg"]
    except Exception:
        pass
    try:
        formatter.formatters["image/png"].for_type_by_name(
            "matplotlib.figure", "Figure", _figure_png_formatter)
    except Exception:
        pass
    return shell


class PlainResult:
    def __init__(self):
        self.result = None
        self.error_before_exec = None
        self.error_in_exec = None

    @property
    def success(self):
        return self.error_before_exec is None and self.error_in_exec is None


def _ends_with_semicolon(code):
    """True if the last token of code is ';' (output suppression, as in IPython)."""
    import tokenize
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    skip = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
            tokenize.INDENT, tokenize.DEDENT)
    for tok in reversed(tokens):
        if tok.type in skip:
            continue
        return tok.type == tokenize.OP and tok.string == ";"
    return False


class PlainShell:
    """Minimal stand-in for IPython when it is not installed."""

    def __init__(self, agent):
        import builtins
        import types
        self.agent = agent
        self.count = 0
        module = types.ModuleType("__main__")
        module.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = module
        self.user_ns = module.__dict__
        self.user_ns["exit"] = self.user_ns["quit"] = self._exit

    @staticmethod
    def _exit(code=None):
        raise SystemExit(code)

    def _tb(self, exc, skip_frames=True):
        tb = exc.__traceback__
        if skip_frames and tb is not None:
            tb = tb.tb_next  # drop run_cell's own frame
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        self.agent.on_traceback(text)

    def run_cell(self, code, store_history=True):
        import ast
        import linecache
        self.count += 1
        filename = "<cell-%d>" % self.count
        res = PlainResult()
        try:
            tree = ast.parse(code, filename, "exec")
        except (SyntaxError, ValueError, OverflowError) as e:
            res.error_before_exec = e
            self.agent.on_traceback("".join(traceback.format_exception_only(type(e), e)))
            return res
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not _ends_with_semicolon(code):
            last = ast.Expression(tree.body.pop().value)
        try:
            exec(compile(tree, filename, "exec"), self.user_ns)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.user_ns)
                if value is not None:
                    res.result = value
                    self.user_ns["_"] = value
                    import pprint
                    try:
                        text = pprint.pformat(value, sort_dicts=False)
                    except Exception:
                        text = object.__repr__(value)
                    bundle = {"text/plain": text}
                    try:
                        if type(value).__module__ == "matplotlib.figure":
                            png = render_figure_png(value)
                        else:
                            png = getattr(value, "_repr_png_", lambda: None)()
                        if png:
                            bundle["image/png"] = png
                    except Exception:
                        pass
                    self.agent.on_result_format(bundle)
        except BaseException as e:  # noqa: B902 - user code may raise anything
            res.error_in_exec = e
            self._tb(e)
        return res


# ----------------------------------------------------------------------------
# The agent
# ----------------------------------------------------------------------------

def ignore_sigint(signum, frame):
    """SIGINT handler outside of user code: ignore (stray or late interrupts)."""


class CellTimer:
    """One cell's time limit, as the watchdog sees it."""

    def __init__(self, timeout, children_before):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.children_before = children_before
        self.done = threading.Event()
        self.interrupted = False  # sent SIGINT while user code was running


class Watchdog(threading.Thread):
    """One long-lived thread that enforces the running cell's time limit (starting a thread
    per cell costs more than a short cell). Arming a cell rarely wakes it: it sleeps until the
    earliest deadline it knows of and then looks at whichever cell is armed by then."""

    _instance = None

    @classmethod
    def shared(cls, agent):
        dog = cls._instance
        if dog is None or dog.owner != os.getpid():  # threads do not survive fork
            dog = cls._instance = cls(agent)
            dog.start()
        return dog

    def __init__(self, agent):
        super().__init__(name="sandpiper-watchdog", daemon=True)
        self.owner = os.getpid()
        self.agent = agent
        self.cond = threading.Condition(threading.Lock())
        self.timer = None
        self.sleeping_until = None  # None: idle, no deadline in view

    def arm(self, timeout, children_before):
        timer = CellTimer(timeout, children_before)
        with self.cond:
            self.timer = timer
            if self.sleeping_until is None or timer.deadline < self.sleeping_until:
                self.cond.notify()
        return timer

    def disarm(self, timer):
        timer.done.set()
        with self.cond:
            if self.timer is timer:
                self.timer = None

    def run(self):
        block_sigint_in_this_thread()
        while True:
            with self.cond:
                timer = self.timer
                now = time.monotonic()
                if timer is None or timer.done.is_set():
                    self.sleeping_until = None
                    self.cond.wait()
                    continue
                if now < timer.deadline:
                    self.sleeping_until = timer.deadline
                    self.cond.wait(timer.deadline - now)
                    continue
                self.sleeping_until = None
            self.fire(timer)

    def fire(self, timer):
        main_ident = threading.main_thread().ident
        while not timer.done.is_set():
            agent = self.agent
            since = agent.formatting_since
            if agent.executing and (since is None or time.monotonic() - since > 2.0):
                timer.interrupted = True
                try:
                    signal.pthread_kill(main_ident, signal.SIGINT)
                except (OSError, ValueError):
                    pass
            if timer.done.wait(1.0):
                return
            if timer.children_before is not None:
                # The main thread did not react (e.g. blocked in os.system(),
                # which ignores SIGINT): kill processes started by this cell.
                try:
                    for pid in descendants(os.getpid()) - timer.children_before:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                except Exception:
                    pass


class Agent:
    def __init__(self, channel):
        self.channel = channel
        self.pid = os.getpid()
        self.shell = None
        self.ipython = False
        self.cell = None
        self.executing = False
        self.formatting_since = None  # set while IPython formats a traceback

    # -- hooks called by the shell ------------------------------------------

    def on_traceback(self, text):
        text = ANSI_RE.sub("", text)
        if self.cell is not None:
            self.cell.tracebacks.append(text)
        else:
            log(text)

    def on_result_format(self, format_dict):
        if self.cell is not None:
            self.cell.last_format = format_dict

    def on_display(self, data):
        image = image_from_bundle(data)
        if image is not None:
            if self.cell is not None:
                self.cell.image = image
            return
        if isinstance(data, dict) and "text/plain" in data:
            try:
                sys.stdout.write(str(data["text/plain"]) + "\n")
            except Exception:
                pass

    # -- matplotlib integration ---------------------------------------------

    def install_pyplot_hooks(self):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        current = getattr(plt, "show", None)
        if current is None or getattr(current, "_sandpiper_show", False):
            return
        agent = self

        def show(*args, **kwargs):
            """Render the current figure as the cell's image and close all figures."""
            agent.capture_open_figures()

        show._sandpiper_show = True
        show._sandpiper_original = current
        plt.show = show

    def capture_open_figures(self):
        """Render the most recent pyplot figure into the cell image; close all."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            from matplotlib._pylab_helpers import Gcf
            managers = list(Gcf.get_all_fig_managers())
        except Exception:
            managers = []
        try:
            for manager in reversed(managers):  # last = most recently active
                png = render_figure_png(manager.canvas.figure)
                if png:
                    if self.cell is not None:
                        self.cell.image = ("png", base64.b64encode(png).decode("ascii"))
                    break
        finally:
            try:
                plt.close("all")
            except Exception:
                pass

    def close_figures(self):
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            try:
                plt.close("all")
            except Exception:
                pass

    # -- start-up -------------------------------------------------------------

    def start_shell(self):
        if os.environ.get("SANDPIPER_AGENT_NO_IPYTHON") != "1":
            try:
                self.shell = make_ipython_shell(self)
                self.ipython = True
            except Exception as e:
                log("IPython unavailable, using the plain executor: %r" % (e,))
        if self.shell is None:
            self.shell = PlainShell(self)

    def warm_up(self):
        for name in ("numpy", "pandas"):
            try:
                importlib.import_module(name)
            except BaseException:
                pass
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
            from matplotlib.figure import Figure
            fig = Figure(figsize=(1, 1))
            fig.add_subplot().plot([0, 1], [0, 1])
            fig.axes[0].set_title("warm-up")
            render_figure_png(fig)
        except BaseException:
            pass
        self.install_pyplot_hooks()
        if self.ipython:
            # Import traceback formatting machinery now rather than on the
            # first user error.
            try:
                try:
                    raise ValueError("warm-up")
                except ValueError:
                    etype, value, tb = sys.exc_info()
                self.shell.InteractiveTB.structured_traceback(etype, value, tb)
            except BaseException:
                pass
            flush_std_streams()
            try:
                self.shell.run_cell("pass", store_history=False)
            except BaseException:
                pass
        # A template stays single-threaded (no time limit: no watchdog thread).
        self.rehearse(None if os.getpid() == _template_pid else 30)

    def rehearse(self, timeout=None):
        """One whole `1+1` cell through execute() and the reply's encoding, as a caller's first
        cell runs, leaving no trace in the user's namespace, history or `_`: first-use work
        (formatters, the display hook, the encoder) happens here and not on a caller's clock.
        In a template it is done once for every session it forks; in a forked session it
        copies the pages a first cell writes (copy-on-write) while the session waits, ready."""
        ns = self.shell.user_ns
        before = set(ns)
        hook = getattr(self.shell, "displayhook", None)
        saved = {name: getattr(hook, name) for name in ("_", "__", "___") if hasattr(hook, name)}
        try:
            request = {"code": "1+1"}
            if timeout is not None:
                request["timeoutSeconds"] = timeout
            self.execute(None, request, store_history=False)  # encodes the reply, too
        except BaseException:
            pass
        finally:
            for name in set(ns) - before:
                ns.pop(name, None)
            for name in ("_", "__", "___"):
                if name in before and name in saved:
                    ns[name] = saved[name]
            for name, value in saved.items():
                setattr(hook, name, value)
            outputs = ns.get("_oh")
            if isinstance(outputs, dict):
                outputs.clear()
        flush_std_streams()

    # -- request handling -----------------------------------------------------

    def serve(self):
        while True:
            try:
                payload = self.channel.recv()
            except ChannelClosed:
                return
            except FrameTooLarge as e:
                self.channel.send({"id": None, "type": "error",
                                   "message": "frame of %d bytes exceeds the %d byte limit"
                                   % (e.size, MAX_REQUEST_FRAME)})
                continue
            except KeyboardInterrupt:
                continue
            try:
                reply = self.handle(payload)
            except ChannelClosed:
                return
            except BaseException as e:  # the agent must survive anything
                reply = {"id": None, "type": "error", "message": "internal error: %r" % (e,)}
                log("internal error: %s" % traceback.format_exc())
            try:
                self.channel.send(reply)
            except ChannelClosed:
                return
            except KeyboardInterrupt:
                continue

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
            if kind == "warm":
                self.rehearse(timeout=30)
                return {"id": rid, "type": "warmed"}
            if kind == "packages":
                return {"id": rid, "type": "packages", "packages": list_packages(),
                        "runtime": {"name": "python", "version": platform.python_version()}}
        except RequestError as e:
            return {"id": rid, "type": "error", "message": str(e)}
        except BaseException as e:
            log("internal error: %s" % traceback.format_exc())
            return {"id": rid, "type": "error", "message": "internal error: %r" % (e,)}
        return {"id": rid, "type": "error", "message": "unknown request type: %r" % (kind,)}

    def execute(self, rid, request, store_history=True):
        code = request.get("code")
        if not isinstance(code, str):
            raise RequestError("execute: 'code' must be a string")
        timeout = request.get("timeoutSeconds")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise RequestError("execute: 'timeoutSeconds' must be a number")
            try:
                timeout = float(timeout)
            except OverflowError:
                timeout = math.inf
            if math.isnan(timeout) or timeout <= 0 or timeout >= threading.TIMEOUT_MAX:
                timeout = None  # no limit
        limit = request.get("outputLimit", DEFAULT_OUTPUT_LIMIT)
        if limit is None:
            limit = DEFAULT_OUTPUT_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise RequestError("execute: 'outputLimit' must be a number")
        if isinstance(limit, float) and math.isnan(limit):
            limit = DEFAULT_OUTPUT_LIMIT
        limit = int(max(0, min(limit, MAX_RESPONSE_FRAME)))

        cell = CellState()
        self.install_pyplot_hooks()
        children_before = None
        if timeout is not None:
            try:
                children_before = descendants(os.getpid()) if has_children() else set()
            except Exception:
                children_before = None
        flush_std_streams()
        start = time.monotonic()
        out = StreamCapture(1, limit, "stdout")
        try:
            err = StreamCapture(2, limit, "stderr")
        except BaseException:
            out.finish()
            raise
        self.cell = cell
        timer = None
        res = None
        internal_error = None
        try:
            try:
                if timeout is not None:
                    timer = Watchdog.shared(self).arm(timeout, children_before)
                res = self._run_user_code(code, store_history)
                if os.getpid() != self.pid:
                    # A fork()ed child of user code came back here: it must
                    # never speak the protocol.
                    os._exit(0)
            except KeyboardInterrupt:
                self.executing = False
            finally:
                self.executing = False
                if timer is not None:
                    Watchdog.shared(self).disarm(timer)
            timed_out = bool(timer is not None and timer.interrupted)
            interrupted = res is None
            exited = False
            if self.ipython and getattr(self.shell, "exit_now", False):
                self.shell.exit_now = False
                exited = True
            success = (res is not None and bool(res.success) and not timed_out and not exited)

            value = res.result if res is not None else None
            result_json = ""
            jupyter = ""
            if success:
                try:
                    result_json, jupyter = self.convert_result(value, cell, limit)
                except BaseException as e:
                    internal_error = e
                    result_json, jupyter = "", ""
            # Figures: use them when the cell succeeded, close them regardless.
            try:
                if success and not (cell.last_format and image_from_bundle(cell.last_format)):
                    self.capture_open_figures()
                else:
                    self.close_figures()
            except BaseException:
                self.close_figures()
            if success:
                image = None
                if cell.last_format:
                    image = image_from_bundle(cell.last_format)
                if image is None:
                    image = cell.image
                if image is not None:
                    result_json = {"type": "image", "format": image[0], "base64_data": image[1]}
            self.install_pyplot_hooks()
            self._cleanup_history()
        finally:
            self.cell = None
            flush_std_streams()
            stdout, stdout_trunc = out.finish()
            stderr, stderr_trunc = err.finish()
        duration_ms = (time.monotonic() - start) * 1000.0

        # Tracebacks and notes go after whatever the cell wrote to stderr.
        tail = "".join(t if t.endswith("\n") else t + "\n" for t in cell.tracebacks)
        if interrupted and not timed_out and not cell.tracebacks:
            tail += "KeyboardInterrupt\n"
        if exited or (res is not None and isinstance(res.error_in_exec, SystemExit)):
            tail += "Note: SystemExit was caught; the session keeps running and its state is kept.\n"
        if internal_error is not None:
            tail += "sandpiper agent: could not convert the result: %r\n" % (internal_error,)
        if timed_out:
            tail += ("TimeoutError: execution exceeded %s seconds and was interrupted\n"
                     % format_seconds(timeout))
        if tail:
            tail, tail_cut = cap_text_tail(tail, limit)
            room = limit - len(tail.encode("utf-8", "surrogatepass"))
            if stderr and not stderr.endswith("\n"):
                stderr += "\n"
            stderr, cut = cap_text(stderr, max(0, room))
            stderr += tail
            stderr_trunc = stderr_trunc or cut or tail_cut

        reply = {
            "id": rid,
            "type": "result",
            "status": "Success" if success else "Failure",
            "stdout": stdout,
            "stderr": stderr,
            "result": result_json,
            "jupyterResult": jupyter,
            "timedOut": timed_out,
            "durationMs": duration_ms,
            "stdoutTruncated": bool(stdout_trunc),
            "stderrTruncated": bool(stderr_trunc),
        }
        return fit_result_frame(reply)

    def _run_user_code(self, code, store_history=True):
        # While user code runs, SIGINT uses Python's C-level default handler
        # (raises KeyboardInterrupt without adding an agent frame to the
        # traceback); otherwise it is ignored.
        try:
            try:
                # _signal: signal.signal's enum conversions cost more than the call, per cell.
                _signal.signal(SIGINT, signal.default_int_handler)
                self.executing = True
                return self.shell.run_cell(code, store_history=store_history)
            finally:
                self.executing = False
                _signal.signal(SIGINT, ignore_sigint)
        except KeyboardInterrupt:
            self.executing = False
            _signal.signal(SIGINT, ignore_sigint)
            return None

    def _cleanup_history(self):
        hm = getattr(self.shell, "history_manager", None)
        if hm is None:
            return
        for attr in ("outputs", "output_hist_reprs", "exceptions"):
            d = getattr(hm, attr, None)
            if isinstance(d, dict):
                try:
                    d.clear()
                except Exception:
                    pass

    def convert_result(self, value, cell, limit):
        """Return (result, jupyterResult) for the cell's last expression value."""
        if value is None:
            return "", ""
        text = None
        if cell.last_format and isinstance(cell.last_format.get("text/plain"), str):
            text = cell.last_format["text/plain"]
        if text is None:
            try:
                text = repr(value)
            except Exception:
                text = "<%s object (repr failed)>" % type(value).__name__
        jupyter, _ = cap_text(text, limit)
        if isinstance(value, bool):
            return bool(value), jupyter
        if isinstance(value, int):
            if -SAFE_INT <= value <= SAFE_INT:
                return int(value), jupyter
            try:
                digits = int.__repr__(value)
            except ValueError:  # beyond sys.get_int_max_str_digits()
                digits = text
            return cap_text(digits, limit)[0], jupyter
        if isinstance(value, float):
            f = float(value)
            return (f if math.isfinite(f) else None), jupyter
        if isinstance(value, str):
            return cap_text(str.__str__(value), limit)[0], jupyter
        return jupyter, jupyter


class RequestError(Exception):
    pass


def fit_result_frame(reply):
    """Shrink text fields until the encoded frame fits MAX_RESPONSE_FRAME."""
    budget = MAX_RESPONSE_FRAME - 64
    for _ in range(64):
        payload = encode_json(reply)
        if len(payload) <= budget:
            fitted = EncodedReply(reply)
            fitted.payload = payload
            return fitted
        over = len(payload) - budget
        sizes = {}
        for key in ("stdout", "stderr", "jupyterResult", "result"):
            v = reply.get(key)
            if isinstance(v, str):
                sizes[key] = len(encode_json(v))
            elif isinstance(v, dict):
                sizes[key] = len(encode_json(v))
        key = max(sizes, key=sizes.get)
        v = reply[key]
        if isinstance(v, dict):
            reply[key] = "<image omitted: too large for a response frame>"
            continue
        raw = v.encode("utf-8", "surrogatepass")
        ratio = max(1.0, sizes[key] / max(1, len(raw)))
        keep = max(0, len(raw) - int(over / ratio) - 1024)
        reply[key] = utf8_cut(raw, keep).decode("utf-8", "replace")
        if key == "stdout":
            reply["stdoutTruncated"] = True
        elif key == "stderr":
            reply["stderrTruncated"] = True
    return reply


def list_packages():
    seen = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.metadata["Name"]
            version = dist.version
        except Exception:
            continue
        if not name:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key not in seen:
            seen[key] = {"name": name, "version": version or ""}
    return sorted(seen.values(), key=lambda p: (p["name"].lower(), p["name"]))


# ----------------------------------------------------------------------------
# Process set-up
# ----------------------------------------------------------------------------

def relocate_fd(fd):
    """Move fd to a high, close-on-exec descriptor so children never inherit it."""
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

    # fd 0 is /dev/null (user code reading stdin sees EOF); fd 1/2 must exist.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    for fd in (1, 2):
        if not fd_is_open(fd):
            os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    _diag_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 10)

    # Python-level streams: UTF-8, stdout line-buffered, stderr unbuffered.
    sys.stdin = sys.__stdin__ = io.open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.open(1, "wb", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True, write_through=True)

    for var, prefix in (("IPYTHONDIR", "sandpiper-ipython-"), ("MPLCONFIGDIR", "sandpiper-mpl-")):
        if not os.environ.get(var):
            try:
                os.environ[var] = tempfile.mkdtemp(prefix=prefix)
            except OSError as e:  # no writable temp dir: the libraries cope
                log("cannot create %s: %s" % (var, e))
    os.environ["MPLBACKEND"] = "Agg"

    # Imports from the working directory (e.g. uploaded modules) like Jupyter.
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and sys.path[0] == here:
        sys.path[0] = ""
    elif "" not in sys.path:
        sys.path.insert(0, "")

    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    except (OSError, ValueError):
        pass
    return Channel(rfd, wfd)


# IPython installs its own module as sys.modules["__main__"]; keep ours alive.
_THIS_MODULE = sys.modules.get(__name__)


def main():
    channel = setup_process()
    agent = Agent(channel)
    signal.signal(signal.SIGINT, ignore_sigint)
    agent.start_shell()
    agent.warm_up()
    flush_std_streams()
    try:
        channel.send({"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                      "language": "python", "version": platform.python_version()})
        agent.serve()
    except ChannelClosed:
        pass
    flush_std_streams()
    # os._exit: never wait for user threads or run user atexit handlers.
    os._exit(0)


# ----------------------------------------------------------------------------
# Warm-fork template (docs/architecture.md, "Warm-fork sessions")
#
# The template runs as root of its own user namespace (inside a bubblewrap
# sandbox, under a filter that still lets it unshare, mount and setns for its
# children), imports and warms everything once, then forks into one forker per
# core. Each forker runs the native fork loop (Sources/SandpiperForker): per
# request it takes a session's pid 1 made by sandpiper-init (new mount, pid,
# net, ipc and uts namespaces, the session's /proc, /tmp and /mnt/data, dropped
# to the init uid and the session filter, reaping orphans) and forks itself once
# into those namespaces as the session's agent, which the loop confines (the
# session's uid, no capability, no_new_privs, the seccomp filter) before any of
# its Python code, let alone the user's, runs.
# ----------------------------------------------------------------------------

TEMPLATE_CONTROL_FD = 3
SESSION_INIT = "/opt/sandpiper/agents/sandpiper-init"
FORKER_LIBRARY = "/opt/sandpiper/agents/libSandpiperForker.so"


def reseed():
    """A forked session must not replay its siblings' random numbers. `random` is reseeded from
    os.urandom by CPython's own at-fork hook (random.py registers it; PyOS_AfterFork_Child runs
    it): seeding it again here cost ~20 page copies per session. numpy's global generator has
    no such hook."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
        except Exception:
            pass


class ForkHooks:
    """The interpreter's at-fork child hooks (os.register_at_fork), trimmed in the template. A
    session is forked (in C, sandpiper_forker_serve_all) from a process with one Python thread
    that holds no lock, so of the hooks the stack registers only `random`'s reseed does anything
    a session needs: threading's, logging's lock re-creation and matplotlib's font-cache clear
    (the template emptied that cache already) changed nothing and cost ~100 page copies per
    session (556 -> 447 faults by `ready`). The session puts the whole list back before any code
    of the user's runs, so a fork of the user's own gets every hook."""

    def __init__(self):
        self.hooks = None
        self.full = []

    def trim(self):
        """Keeps `random`'s reseed only. Finds the list (the interpreter's own, which
        os.register_at_fork appends to) among the collector's objects, so it runs before
        gc.freeze(); and the template must not os.fork() after it (logging's hook takes a lock
        before a fork for the child's hook to re-create). Leaves the list alone unless exactly one
        holds threading's hook and the template runs one thread."""
        import gc
        import random
        if threading.active_count() != 1:
            return False
        found = [o for o in gc.get_objects()
                 if type(o) is list and any(h is threading._after_fork for h in o)
                 and all(callable(h) for h in o)]
        if len(found) != 1:
            return False
        self.hooks = found[0]
        self.full = list(self.hooks)
        seed = getattr(random, "_inst", None)
        self.hooks[:] = [h for h in self.full if getattr(h, "__self__", None) is seed
                         and getattr(h, "__name__", "") == "seed"]
        return True

    def restore(self):
        """In a session, after PyOS_AfterFork_Child ran the trimmed list."""
        if self.hooks is not None:
            self.hooks[:] = self.full


_fork_hooks = ForkHooks()


def session_agent(agent):
    """Pid 2 of the session: the agent, as the session uid, under seccomp, in /mnt/data."""
    for var in ("IPYTHONDIR", "MPLCONFIGDIR"):
        try:
            os.makedirs(os.environ[var], exist_ok=True)
        except (KeyError, OSError):
            pass
    reseed()
    agent.channel = Channel(relocate_fd(REQUEST_FD), relocate_fd(RESPONSE_FD))
    agent.pid = os.getpid()
    global _diag_fd
    _diag_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 10)
    signal.signal(signal.SIGINT, ignore_sigint)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    except (OSError, ValueError):
        pass
    try:
        agent.channel.send({"type": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                            "language": "python", "version": platform.python_version(),
                            "forked": True})
        agent.serve()
    except ChannelClosed:
        pass
    flush_std_streams()
    os._exit(0)


def session_child(agent):
    """Pid 2 of a new session, just forked: the native loop has confined it already (see
    Sources/SandpiperForker/forker.c); it becomes the session's agent."""
    global _template_pid
    _template_pid = None  # pids repeat across pid namespaces: a session may get the template's
    try:
        ctypes.pythonapi.PyOS_AfterFork_Child()  # what os.fork does in its child
        _fork_hooks.restore()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        session_agent(agent)
    except BaseException:
        log("session set-up failed: %s" % traceback.format_exc())
    os._exit(1)


def reap_children(signum=None, frame=None):
    """The template's children, reaped as they end. In the native loop this handler never runs,
    but the signal interrupts its wait, and the loop reaps at once."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def template_main(forker_fds):
    """The pool's fork template: warms the interpreter once, then forks sessions on request
    (`serve_forks`). The host gives it one control socket per forker: fd 3, and the
    `forker_fds`. Each further forker is a fork of the warm template, taken in the native code
    before any request, and serves its own socket, so that sessions fork on every core at once."""
    global _diag_fd, _template_pid
    _template_pid = os.getpid()
    _diag_fd = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 10)
    controls = [TEMPLATE_CONTROL_FD] + list(forker_fds)
    for fd in controls:
        os.set_inheritable(fd, False)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    # The fork loop (Sources/SandpiperForker), loaded before the warm-up so its pages are shared.
    forker = ctypes.PyDLL(FORKER_LIBRARY)
    forker.sandpiper_forker_serve_all.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int,
                                                  ctypes.c_char_p]
    forker.sandpiper_forker_serve_all.restype = ctypes.c_int
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.open(1, "wb", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
        line_buffering=True, write_through=True)
    os.environ["MPLBACKEND"] = "Agg"
    if "" not in sys.path:
        sys.path.insert(0, "")
    agent = Agent(None)
    agent.start_shell()
    agent.warm_up()
    flush_std_streams()
    # matplotlib drops its FreeType fonts in every forked child (they read their files through a
    # shared offset): dropped here once, the children have nothing to free (~150 page copies
    # fewer per session); each loads the fonts it uses, as it would have anyway.
    font_manager = sys.modules.get("matplotlib.font_manager")
    clear_fonts = getattr(getattr(font_manager, "_get_font", None), "cache_clear", None)
    if clear_fonts is not None:
        clear_fonts()
    import gc
    gc.collect()
    if not _fork_hooks.trim():
        log("fork template: at-fork hooks left whole (more than one thread, or no single hook list)")
    gc.freeze()  # objects shared with every child stay out of its collections (no copies)
    signal.signal(signal.SIGCHLD, reap_children)
    own_pid_namespace = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    serve_forks(forker, controls, agent, own_pid_namespace)


def serve_forks(forker, controls, agent, own_pid_namespace):
    """The template's last line of Python: the native code backs the heap with huge pages,
    forks one forker per further control socket and serves the first itself; each forker says
    `ready` and forks a session per request. It returns only in each forked session (or when the
    host is gone)."""
    fds = (ctypes.c_int * len(controls))(*controls)
    status = forker.sandpiper_forker_serve_all(fds, len(controls), own_pid_namespace, SESSION_INIT.encode())
    if status != 1:
        os._exit(0 if status == 0 else 1)
    session_child(agent)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--template"]:
        template_main([int(fd) for fd in sys.argv[2:]])
    else:
        main()
