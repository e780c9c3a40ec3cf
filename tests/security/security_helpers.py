"""Code snippets and small host-side helpers shared by the abuse tests."""

import os
import socket
import threading
import time

# Errnos that mean "refused" (by seccomp, by missing capabilities, or not implemented at all):
# anything else (success, EINVAL, EFAULT, EBADF...) means the kernel got to work on the call.
REFUSED = {"EPERM", "EACCES", "ENOSYS"}

# Python, inside the sandbox: `sc(nr, *args)` calls a raw syscall and returns [ret, errno name].
SYSCALL_PRELUDE = r'''
import ctypes, errno, json, os, socket, struct, time
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
def _arg(a):
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, bytes):
        return ctypes.c_char_p(a)
    if a is None:
        return ctypes.c_void_p(0)
    return a
def sc(nr, *args):
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    e = ctypes.get_errno()
    return [r, errno.errorcode.get(e, str(e)) if r == -1 else None]
def buf(n, data=b""):
    b = ctypes.create_string_buffer(n)
    ctypes.memmove(b, data, len(data))
    return b
out = {}
'''

# x86_64 syscall numbers
NR = dict(
    ptrace=101, mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308, clone=56,
    clone3=435, keyctl=250, add_key=248, request_key=249, bpf=321, perf_event_open=298, init_module=175,
    finit_module=313, delete_module=176, kexec_load=246, clock_settime=227, settimeofday=164,
    clock_adjtime=305, adjtimex=159, userfaultfd=323, io_uring_setup=425, open_by_handle_at=304,
    name_to_handle_at=303, process_vm_readv=310, sethostname=170, personality=135, ioctl=16,
    fsopen=430, open_tree=428, move_mount=429, syslog=103,
)


def assert_refused(results, names=None):
    """Every named [ret, errno] in `results` is a failure with a refusal errno."""
    bad = {k: v for k, v in results.items() if (names is None or k in names)
           and not (v[0] == -1 and v[1] in REFUSED)}
    assert not bad, "these calls were not refused: %r (all: %r)" % (bad, results)


class LoopbackTrap:
    """A TCP listener and a UDP socket on the host's 127.0.0.1 (and an abstract unix socket) that
    record anything that reaches them. Sandboxes must never be able to."""

    def __init__(self):
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.tcp.settimeout(0.2)
        self.tcp_port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self.udp_port = self.udp.getsockname()[1]
        self.abstract_name = "sandpiper-security-%d-%d" % (self.tcp_port, self.udp_port)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.abstract_name)
        self.unix.listen(16)
        self.unix.settimeout(0.2)
        self.seen = []
        self._stop = False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop:
            for kind, sock, accept in (("tcp", self.tcp, True), ("udp", self.udp, False), ("unix", self.unix, True)):
                try:
                    if accept:
                        conn, peer = sock.accept()
                        self.seen.append((kind, peer))
                        conn.close()
                    else:
                        data, peer = sock.recvfrom(65536)
                        self.seen.append((kind, peer, data[:64]))
                except (socket.timeout, BlockingIOError):
                    pass
                except OSError:
                    if self._stop:
                        return

    def close(self, settle=0.5):
        """Stops watching (after `settle` seconds for late arrivals) and returns what was seen."""
        time.sleep(settle)
        self._stop = True
        self._thread.join(timeout=5)
        for sock in (self.tcp, self.udp, self.unix):
            sock.close()
        return self.seen


# ---------------------------------------------------------------------------------------------
# Host-side observation


def host_pids_of_uid(uid, coexisting=False):
    """Host pids whose real uid is `uid` (the processes of one namespace sandbox).

    A /proc scan is not atomic: while a fork bomb churns, a process read early may exit and a
    newer one appear later in the same scan, so a plain count can exceed what ever lived at
    once. With `coexisting`, only processes started before the scan began are kept (start
    times are in clock ticks since boot): those were all alive together at that instant, so
    the count is one the pids controller really allowed (a lower bound, never an over-count)."""
    ticks = os.sysconf("SC_CLK_TCK")
    scan_started = int(time.clock_gettime(time.CLOCK_BOOTTIME) * ticks)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/status" % entry) as f:
                owned = False
                for line in f:
                    if line.startswith("Uid:"):
                        owned = int(line.split()[1]) == uid
                        break
            if owned and coexisting:
                with open("/proc/%s/stat" % entry) as f:
                    # Field 22 (starttime) follows the ")" that closes the command name.
                    started = int(f.read().rsplit(")", 1)[1].split()[19])
                owned = started < scan_started
        except (OSError, ValueError, IndexError):
            continue
        if owned:
            pids.append(int(entry))
    return pids


def host_process_count():
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


class UidSampler:
    """Samples on the host, every 50 ms while an attack runs, how many processes a uid has (the
    peak) and how many processes the host has in all."""

    def __init__(self, uid):
        self.uid = uid
        self.peak = 0
        self.host_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, len(host_pids_of_uid(self.uid, coexisting=True)))
            self.host_peak = max(self.host_peak, host_process_count())
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)
        return self.peak


def with_values(code, **values):
    """Python source that first binds each keyword to its repr, then runs `code`."""
    return "".join("%s = %r\n" % item for item in values.items()) + code


def host_file_state(path):
    """(size, mtime_ns, first bytes) of a host file, or None: to prove a sandbox did not touch it."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            return st.st_size, st.st_mtime_ns, f.read(4096)
    except OSError:
        return None
