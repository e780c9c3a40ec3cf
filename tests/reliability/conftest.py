"""Reliability fixtures: each test module starts its own `sandpiper serve` (rel_helpers.Server)
with its own data directory and sandbox uid base, and may SIGKILL and restart it.

The binary comes from SANDPIPER_BIN (default <repo>/.build/debug/sandpiper) and runs as root.
The e2e helpers (binary lookup, port file, mount listing) are reused from tests/e2e.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
sys.path.insert(0, str(HERE))

import rel_helpers as rh  # noqa: E402
from e2e_helpers import mounts_under  # noqa: E402

# Tables the tests want shown at the end of the run (leak baseline vs after, ...).
REPORTS = []


def pytest_terminal_summary(terminalreporter):
    for title, text in REPORTS:
        terminalreporter.write_sep("-", title)
        terminalreporter.write_line(text)


@pytest.fixture
def report():
    def add(title, text):
        REPORTS.append((title, text))
        print(text)

    return add


def _cleanup_server(srv):
    """SIGTERM (the server destroys its sandboxes), then make sure nothing of its uids survives:
    returns the leftover processes found (killed here so the next test starts clean)."""
    if srv.proc is None:
        return []
    rc = srv.stop(timeout=60)
    rh.wait_until(lambda: not rh.uid_pids(srv.uids), timeout=10)
    leftover = rh.uid_pids(srv.uids)
    problems = []
    if leftover:
        problems.append("sandbox-uid processes left after shutdown:\n" + rh.describe_pids(leftover))
        for pid in leftover:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
    if rc not in (0, None) and srv.proc.returncode not in (-9,):
        problems.append("sandpiper exited with %s after SIGTERM" % rc)
    return problems


@pytest.fixture
def servers(request):
    """Factory: servers(pools, uid_offset, **kw) -> a started-later rel_helpers.Server with its
    own work directory. Torn down (SIGTERM, leftovers checked, work dir removed) after the test."""
    made = []

    def make(pools, uid_offset, server_extra=None, data_dir=None, workdir=None, name="server"):
        wd = workdir or rh.make_workdir("sandpiper-rel-")
        srv = rh.Server(wd, pools, rh.UID_BASE + uid_offset, server_extra=server_extra, data_dir=data_dir, name=name)
        made.append(srv)
        return srv

    yield make
    problems = []
    for srv in made:
        problems += _cleanup_server(srv)
        mounts = mounts_under(srv.data_dir)
        parents, groups = rh.sandbox_cgroups(srv.data_dir)
        if mounts:
            problems.append("mounts left under %s after shutdown: %s" % (srv.data_dir, mounts))
        if groups:
            problems.append("sandbox cgroups left after shutdown: %s" % groups)
        for parent in parents:  # empty unless reported above; a server that crashed leaves them
            try:
                os.rmdir(parent)
            except OSError:
                pass
        if not mounts:
            shutil.rmtree(srv.workdir, ignore_errors=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def small_tmpfs():
    """Mounts a tmpfs of the given size on a fresh directory; unmounted (lazily if still busy)
    and removed afterwards."""
    mounted = []

    def make(size="64m"):
        base = rh.make_workdir("sandpiper-rel-disk-")
        point = os.path.join(base, "disk")
        os.mkdir(point)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0711" % size, "tmpfs", point], check=True)
        mounted.append((base, point))
        return base, point

    yield make
    for base, point in mounted:
        for mount in sorted({line.split()[4] for line in mounts_under(point)}, key=len, reverse=True):
            if subprocess.run(["umount", mount], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mount], capture_output=True)
        time.sleep(0.1)
        if not mounts_under(point):
            shutil.rmtree(base, ignore_errors=True)
