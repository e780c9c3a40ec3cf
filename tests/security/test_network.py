"""Network with egress off (every pool of this suite).

A sandbox has its own network namespace holding only `lo`. The tests run their own listeners on
the host's 127.0.0.1 (TCP, UDP and an abstract unix socket, see LoopbackTrap) and assert that
nothing from a sandbox ever reaches them, nor the Sandpiper server's port. No test sends a
packet anywhere but 127.0.0.0/8; the name lookup runs only after the sandbox has shown it has no
interface but lo and no route.
"""

import socket
import time

import pytest

from security_helpers import LoopbackTrap, with_values

INTERFACES = r'''
import errno, json, os
def read(p):
    try:
        return open(p).read()
    except OSError as e:
        return "ERR " + errno.errorcode[e.errno]
out = {}
dev = read("/proc/net/dev")
out["ifaces"] = sorted(l.split(":")[0].strip() for l in dev.splitlines()[2:]) if not dev.startswith("ERR") else dev
out["sys_class_net"] = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
out["routes"] = [l for l in read("/proc/net/route").splitlines()[1:] if l.strip()]
out["routes6"] = [l for l in read("/proc/net/ipv6_route").splitlines() if l.strip() and l.split()[-1] != "lo"]
out["addrs6"] = [l for l in read("/proc/net/if_inet6").splitlines() if l.strip() and l.split()[-1] != "lo"]
out["arp"] = [l for l in read("/proc/net/arp").splitlines()[1:] if l.strip()]
'''

CONNECT = r'''
import errno, json, socket
def tcp(host, port):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        return "CONNECTED"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
def udp(host, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(5):
            u.sendto(b"datagram from a sandbox", (host, port))
        u.settimeout(0.3)
        try:
            u.recvfrom(100)
        except OSError:
            pass
        return "SENT"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        u.close()
def abstract(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect("\0" + name)
        return "CONNECTED"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
'''


@pytest.fixture
def trap():
    """A host loopback trap, checked to work (a host-side control connection is seen) before use."""
    t = LoopbackTrap()
    with socket.create_connection(("127.0.0.1", t.tcp_port), timeout=5):
        pass
    control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    control.sendto(b"control", ("127.0.0.1", t.udp_port))
    control.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect("\0" + t.abstract_name)
    c.close()
    for _ in range(50):
        if {s[0] for s in t.seen} == {"tcp", "udp", "unix"}:
            break
        time.sleep(0.05)
    assert {s[0] for s in t.seen} == {"tcp", "udp", "unix"}, "the trap does not see host traffic: %r" % t.seen
    t.seen.clear()
    yield t
    t.close(settle=0)


def test_only_loopback_and_no_route(lab):
    """The only interface is lo (/proc/net/dev, /sys/class/net, if_inet6); there is no IPv4 or
    IPv6 route and no neighbour."""
    sess = lab.session()
    seen = sess.probe(INTERFACES + "json.dumps(out)")
    assert seen["ifaces"] == ["lo"], seen
    assert seen["sys_class_net"] in ([], ["lo"]), seen
    assert seen["routes"] == [] and seen["routes6"] == [] and seen["addrs6"] == [] and seen["arp"] == [], seen
    lab.contained(sess)


def test_tcp_to_the_hosts_loopback_never_arrives(lab, trap):
    """TCP connections to a listener on the host's 127.0.0.1 (and other 127/8 addresses and
    `localhost`) are refused inside the sandbox and never reach the host."""
    sess = lab.session()
    seen = sess.probe(with_values(CONNECT + r'''
json.dumps({h: tcp(h, PORT) for h in ["127.0.0.1", "127.0.0.2", "127.1.2.3", "localhost"]})
''', PORT=trap.tcp_port))
    hits = trap.close()
    assert not hits, "the host listener saw connections from a sandbox: %r" % hits
    assert "CONNECTED" not in seen.values(), seen
    assert seen["127.0.0.1"] == "ECONNREFUSED", seen
    lab.contained(sess)


def test_udp_to_the_hosts_loopback_never_arrives(lab, trap):
    """UDP datagrams sent to a socket on the host's 127.0.0.1 never arrive."""
    sess = lab.session()
    seen = sess.probe(with_values(CONNECT + r'''
json.dumps({h: udp(h, PORT) for h in ["127.0.0.1", "127.0.0.2", "localhost"]})
''', PORT=trap.udp_port))
    hits = trap.close()
    assert not hits, "the host UDP socket received datagrams from a sandbox: %r" % hits
    assert seen, seen
    lab.contained(sess)


def test_the_servers_own_port_is_unreachable(lab, server):
    """The Sandpiper API (127.0.0.1:<port> on the host) cannot be reached from a sandbox, neither
    by a raw connect nor by an HTTP client."""
    sess = lab.session()
    seen = sess.probe(with_values(CONNECT + r'''
import urllib.request
res = {"connect": tcp("127.0.0.1", PORT)}
try:
    res["http"] = urllib.request.urlopen("http://127.0.0.1:%d/healthz" % PORT, timeout=3).status
except Exception as e:
    res["http"] = type(e).__name__
json.dumps(res)
''', PORT=server.port))
    assert seen["connect"] in ("ECONNREFUSED", "ENETUNREACH"), seen
    assert seen["http"] != 200, seen
    lab.contained(sess)


def test_abstract_unix_sockets_of_the_host_are_unreachable(lab, trap):
    """Abstract unix sockets live in the network namespace: a host one cannot be connected to."""
    sess = lab.session()
    seen = sess.probe(with_values(CONNECT + "json.dumps(abstract(NAME))\n", NAME=trap.abstract_name))
    hits = trap.close()
    assert not hits and seen == "ECONNREFUSED", (seen, hits)
    lab.contained(sess)


def test_name_resolution_fails(lab):
    """Names outside /etc/hosts do not resolve (no resolver is reachable); the lookup is only tried
    after the sandbox showed it has no interface but lo and no route, so no query can leave."""
    sess = lab.session()
    seen = sess.probe(INTERFACES + r'''
import socket
if out["ifaces"] == ["lo"] and not out["routes"] and not out["routes6"]:
    for name in ["example.com", "pypi.org"]:
        try:
            out[name] = socket.getaddrinfo(name, 443)[0][4][0]
        except socket.gaierror as e:
            out[name] = "gaierror %d" % e.errno
else:
    out["skipped"] = "the sandbox has a network: no lookup attempted"
json.dumps(out)
''')
    assert "skipped" not in seen, seen
    assert seen["example.com"].startswith("gaierror") and seen["pypi.org"].startswith("gaierror"), seen
    lab.contained(sess)


def test_a_sandbox_listener_is_not_reachable_from_the_host(lab):
    """A server a sandbox starts on its 127.0.0.1 is invisible on the host's 127.0.0.1."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sess = lab.session()
    seen = sess.ok(with_values(r'''
import socket
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", PORT))
listener.listen(5)
listener.getsockname()[1]
''', PORT=port))
    assert seen["result"] == port, seen
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
    lab.contained(sess)


def test_gvisor_network_is_isolated(lab, server, trap):
    """A gVisor sandbox also has only lo and no route; TCP, UDP and abstract-socket traffic to the
    host's loopback (the trap and the server's port) never arrives."""
    sess = lab.session("python-gvisor")
    seen = sess.probe(with_values(INTERFACES + CONNECT + r'''
out["tcp"] = tcp("127.0.0.1", TCP)
out["server"] = tcp("127.0.0.1", SERVER)
out["udp"] = udp("127.0.0.1", UDP)
out["abstract"] = abstract(NAME)
json.dumps(out)
''', TCP=trap.tcp_port, UDP=trap.udp_port, SERVER=server.port, NAME=trap.abstract_name))
    hits = trap.close()
    assert not hits, "the host saw traffic from a gVisor sandbox: %r" % hits
    assert seen["ifaces"] == ["lo"] and seen["routes"] == [] and seen["routes6"] == [], seen
    assert seen["tcp"] in ("ECONNREFUSED", "ENETUNREACH") and seen["server"] in ("ECONNREFUSED", "ENETUNREACH"), seen
    assert seen["abstract"] == "ECONNREFUSED", seen
    lab.contained(sess)
