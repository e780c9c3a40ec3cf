#!/usr/bin/env bash
# Install what Sandpiper needs to run and to be tested, idempotently:
#   1. Debian packages (bubblewrap, slirp4netns, uidmap, python3-venv, ...), only if missing.
#   2. The sandbox Python runtime: a venv made from Debian's /usr/bin/python3 at
#      ${SANDPIPER_RUNTIME_DIR:-/var/lib/sandpiper/runtimes}/python, from the
#      pinned runtimes/python/requirements.txt.
#   3. The test venv for tests/agent and tests/e2e at
#      ${SANDPIPER_TEST_VENV:-/var/lib/sandpiper/test-venv}, from tests/requirements.txt.
#
# Each venv is built in a versioned directory next to its final path
# (.python-<hash>, where <hash> covers the requirements file and the interpreter),
# stamped when complete, and only then published by atomically replacing the
# symlink <path> -> .python-<hash>. A venv cannot be renamed after creation (its
# scripts and pyvenv.cfg hold absolute paths), hence the symlink; an interrupted
# install never replaces a working venv, and the next run starts the unstamped
# directory over. A second run with nothing changed takes well under a second.
#
# Usage: scripts/setup.sh [--runtime-only | --test-only] [--quiet]
# Environment:
#   SANDPIPER_RUNTIME_DIR         parent of the runtime venv (default /var/lib/sandpiper/runtimes)
#   SANDPIPER_TEST_VENV           test venv path (default /var/lib/sandpiper/test-venv)
#   SANDPIPER_RUNTIME_BASE_PYTHON interpreter for the runtime (default /usr/bin/python3)
#   SANDPIPER_TEST_BASE_PYTHON    interpreter for the test venv (default /usr/bin/python3,
#                                 else python3.11 on PATH)
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME_DIR=${SANDPIPER_RUNTIME_DIR:-/var/lib/sandpiper/runtimes}
TEST_VENV=${SANDPIPER_TEST_VENV:-/var/lib/sandpiper/test-venv}
RUNTIME_REQS=$ROOT/runtimes/python/requirements.txt
TEST_REQS=$ROOT/tests/requirements.txt
# Bump to force every machine to rebuild its venvs (e.g. when the steps below change).
LAYOUT_VERSION=1

# Modules the sandbox runtime must import (import names, not distribution names).
RUNTIME_IMPORTS="numpy, pandas, matplotlib, scipy, sympy, sklearn, statsmodels.api, networkx, PIL, \
openpyxl, xlsxwriter, docx, pptx, reportlab, lxml, bs4, pyarrow, seaborn, tabulate, requests, IPython, \
pkg_resources"
TEST_IMPORTS="pytest, requests, httpx, langchain_azure_dynamic_sessions"

APT_COMMON=(python3 python3-venv ca-certificates)
APT_ALL=(bubblewrap libseccomp-dev slirp4netns crun uidmap util-linux python3 python3-venv libsqlite3-dev
    procps iproute2 curl ca-certificates runsc openssl
    gzip zstd docker-registry umoci skopeo busybox-static apache2-utils)

do_runtime=1
do_test=1
quiet=0

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

while (($#)); do
    case $1 in
        --runtime-only) do_test=0 ;;
        --test-only) do_runtime=0 ;;
        --quiet | -q) quiet=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if ((do_runtime == 0 && do_test == 0)); then
    echo "setup.sh: --runtime-only and --test-only exclude each other" >&2
    exit 2
fi

log() { ((quiet)) || printf '==> %s\n' "$*"; }
note() { ((quiet)) || printf '    %s\n' "$*"; }
die() {
    printf 'setup.sh: error: %s\n' "$*" >&2
    exit 1
}

LOGFILE=$(mktemp -t sandpiper-setup.XXXXXX)
cleanup_files=("$LOGFILE")
BUILDING="" # a venv directory being built; removed if we stop before stamping it
cleanup() {
    rm -rf -- "${cleanup_files[@]}"
    if [[ -n $BUILDING ]]; then rm -rf -- "$BUILDING"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Run a command; with --quiet its output goes to a log that is shown only on failure.
run() {
    if ((quiet)); then
        if ! "$@" >"$LOGFILE" 2>&1; then
            echo "setup.sh: command failed: $*" >&2
            tail -n 60 "$LOGFILE" >&2
            return 1
        fi
    else
        "$@"
    fi
}

# ---------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------
ensure_apt() {
    local pkgs=("$@") missing=() p st
    if ! command -v dpkg-query >/dev/null 2>&1; then
        log "not a Debian system (no dpkg-query): skipping apt packages, make sure these exist: ${pkgs[*]}"
        return 0
    fi
    for p in "${pkgs[@]}"; do
        st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $st == installed ]] || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        log "apt packages present (${#pkgs[@]} checked)"
        return 0
    fi
    if ((EUID != 0)); then
        die "missing Debian packages: ${missing[*]}; run this script as root, or: sudo apt-get install ${missing[*]}"
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -q || die "apt-get update failed"
    run apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        die "apt-get install failed for: ${missing[*]}"
}

# ---------------------------------------------------------------------------
# 2./3. Virtual environments
# ---------------------------------------------------------------------------

# ensure_venv LABEL LINK REQS BASE_PYTHON POST_HOOK
# Makes LINK a symlink to a complete venv built from REQS with BASE_PYTHON, then
# runs POST_HOOK VENV_DIR (which must succeed before the venv is published).
ensure_venv() {
    local label=$1 link=$2 reqs=$3 py=$4 post=$5
    [[ -f $reqs ]] || die "$label: requirements file $reqs not found"
    [[ -x $py ]] || die "$label: base interpreter $py not found"
    local pyver
    pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ||
        die "$label: $py does not run"
    "$py" -c 'import venv, ensurepip' 2>/dev/null ||
        die "$label: $py lacks the venv/ensurepip modules (Debian: apt-get install python3-venv)"

    local hash
    hash=$({
        echo "layout=$LAYOUT_VERSION python=$py/$pyver"
        cat "$reqs"
    } | sha256sum | cut -c1-16)
    local parent name
    parent=$(dirname "$link")
    name=$(basename "$link")
    local verdir=".$name-$hash"
    local real="$parent/$verdir"
    local stamp="$real/.sandpiper-stamp"

    is_current() {
        [[ -L $link && $(readlink "$link") == "$verdir" && -f $stamp && $(<"$stamp") == "$hash" &&
            -x $real/bin/python ]]
    }
    if is_current; then
        log "$label up to date ($link, requirements hash $hash)"
        return 0
    fi

    mkdir -p "$parent" || die "$label: cannot create $parent"
    chmod a+rx "$parent" 2>/dev/null || true
    # Serialise concurrent setups of the same venv.
    local lockfd
    exec {lockfd}>"$parent/.$name.lock" || die "$label: cannot write to $parent"
    flock "$lockfd"
    if is_current; then
        log "$label up to date ($link, built by a concurrent run)"
        exec {lockfd}>&-
        return 0
    fi

    local t0=$SECONDS
    if [[ -f $stamp && $(<"$stamp") == "$hash" && -x $real/bin/python ]]; then
        log "$label already built in $real, publishing it"
    else
        log "installing $label: $real from ${reqs#"$ROOT"/} (python $pyver at $py)"
        rm -rf -- "$real"
        BUILDING=$real
        run "$py" -m venv "$real" || die "$label: python -m venv failed"
        run "$real/bin/python" -m pip install \
            --only-binary=:all: --no-input --progress-bar off --retries 5 \
            --disable-pip-version-check -r "$reqs" ||
            die "$label: pip install failed (see output above)"
        run "$real/bin/python" -m pip check || die "$label: pip check found inconsistent dependencies"
        "$post" "$real" || die "$label: post-install step failed"
        echo "$hash" >"$stamp"
        chmod a+r "$stamp"
        BUILDING=""
    fi

    # Publish: replace LINK atomically with a symlink to the new venv.
    if [[ -e $link && ! -L $link ]]; then
        # A plain directory from an older layout: move it aside (once).
        mv -T -- "$link" "$parent/.$name-old.$$" || die "$label: cannot move $link aside"
    fi
    ln -sfn -- "$verdir" "$parent/.$name.new.$$"
    mv -Tf -- "$parent/.$name.new.$$" "$link" || die "$label: cannot publish $link"

    # Remove venvs of older requirements (never the current one, never the lock).
    local old
    for old in "$parent/.$name-"*; do
        [[ -d $old && $old != "$real" ]] || continue
        rm -rf -- "$old"
    done
    exec {lockfd}>&-
    log "$label ready at $link ($((SECONDS - t0))s, $(du -sh "$real/" 2>/dev/null | cut -f1))"
}

runtime_post() {
    local venv=$1
    note "pre-compiling bytecode"
    # A few files in third-party test data are not valid Python 3; don't fail on them.
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >"$LOGFILE" 2>&1 ||
        note "compileall reported $(grep -c '^\*\*\*' "$LOGFILE" || true) file(s) it could not compile (ignored)"
    note "making the runtime world-readable"
    chmod -R a+rX "$venv" || return 1
    note "smoke test: import $RUNTIME_IMPORTS"
    local mpl
    mpl=$(mktemp -d -t sandpiper-mpl.XXXXXX)
    cleanup_files+=("$mpl")
    chmod 1777 "$mpl"
    MPLCONFIGDIR=$mpl "$venv/bin/python" -W ignore -c "import $RUNTIME_IMPORTS" ||
        { echo "setup.sh: runtime smoke test failed" >&2; return 1; }
    # The sandboxes run the runtime as unprivileged uids: check that nobody can use it.
    if ((EUID == 0)) && command -v setpriv >/dev/null 2>&1; then
        local -a asnobody=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/nonexistent MPLCONFIGDIR="$mpl")
        if "${asnobody[@]}" test -x "$venv/bin/python"; then
            note "smoke test as uid 65534"
            "${asnobody[@]}" "$venv/bin/python" -W ignore -B -c "import $RUNTIME_IMPORTS" ||
                { echo "setup.sh: runtime smoke test as uid 65534 failed (permissions?)" >&2; return 1; }
        else
            note "skipping the uid 65534 smoke test: a parent directory of $venv is not traversable by others"
        fi
    fi
}

test_post() {
    local venv=$1
    note "smoke test: import $TEST_IMPORTS"
    "$venv/bin/python" -W ignore -c "import $TEST_IMPORTS" ||
        { echo "setup.sh: test venv smoke test failed" >&2; return 1; }
}

pick_test_python() {
    if [[ -n ${SANDPIPER_TEST_BASE_PYTHON:-} ]]; then
        echo "$SANDPIPER_TEST_BASE_PYTHON"
    elif [[ -x /usr/bin/python3 ]]; then
        echo /usr/bin/python3
    else
        command -v python3.11 || command -v python3 || echo /usr/bin/python3
    fi
}

# ---------------------------------------------------------------------------
start=$SECONDS
if ((do_runtime && do_test)); then
    ensure_apt "${APT_ALL[@]}"
else
    ensure_apt "${APT_COMMON[@]}"
fi
# Node.js for NodeLTS pools: this kind of machine ships Node 20 in /usr/bin; elsewhere Debian's.
if ((do_runtime)) && [[ ! -x /usr/bin/node ]]; then
    ensure_apt nodejs
fi
# Egress (slirp4netns as the sandbox's unprivileged uid) opens /dev/net/tun: 0666 is the usual
# mode on Debian and Ubuntu, but some hosts ship it 0600.
if [[ -c /dev/net/tun ]] && ((EUID == 0)) && [[ $(stat -c %a /dev/net/tun) != 666 ]]; then
    log "making /dev/net/tun usable by sandbox uids (chmod 0666, the usual mode) for pools with egress"
    chmod 0666 /dev/net/tun
fi
if ((do_runtime)); then
    ensure_venv "python runtime" "$RUNTIME_DIR/python" "$RUNTIME_REQS" \
        "${SANDPIPER_RUNTIME_BASE_PYTHON:-/usr/bin/python3}" runtime_post
fi
if ((do_test)); then
    ensure_venv "test venv" "$TEST_VENV" "$TEST_REQS" "$(pick_test_python)" test_post
fi
log "setup done in $((SECONDS - start))s"
