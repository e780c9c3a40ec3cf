import CSandpiperShims
import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// The network of a gVisor container. gVisor's own network stack (runsc `--network=sandbox`)
/// answers only on the interfaces of the namespace runsc starts in, so the container's
/// namespace gets a veth link to a second namespace that holds nothing but the other end: the
/// host connects to the container's port from there (`proxyAddress` → `containerAddress`). The
/// container sees `lo` and `eth0`, and behind `eth0` only an address where nothing listens (and
/// slirp4netns's tap0 when the pool has egress). Both namespaces are held by sleeping processes,
/// our children, inside the session's cgroups.
enum ContainerNetwork {
    /// 169.254.1.2, the container's end (host byte order, for `sandpiper_connect_in_netns`).
    static let containerAddress: UInt32 = 0xA9FE_0102
    /// 127.0.0.1: where the host connects inside a crun container's own namespace.
    static let loopback: UInt32 = 0x7F00_0001

    struct Namespaces {
        /// The holders (our children) of the container's and the proxy's namespaces; a holder
        /// given in `make` (egress) is not repeated here.
        var holders: [pid_t]
        /// `/proc/<pid>/ns/net` of the namespace runsc joins.
        var container: String
        /// `/proc/<pid>/ns/net` of the namespace the host connects from.
        var proxy: String
    }

    /// Makes the proxy namespace, and the container's unless `containerHolder` (the egress
    /// namespace, already made) is given, and links them.
    static func make(cgroupProcs: [String], containerHolder: pid_t?) async throws -> Namespaces {
        var holders: [pid_t] = []
        do {
            let container: pid_t
            if let containerHolder {
                container = containerHolder
            } else {
                container = try await hold(cgroupProcs: cgroupProcs)
                holders.append(container)
            }
            let proxy = try await hold(cgroupProcs: cgroupProcs)
            holders.append(proxy)
            let script = """
                ip link add sp0 netns \(proxy) type veth peer name eth0 netns \(container) || exit 1
                nsenter --net=/proc/\(container)/ns/net sh -c \
                  'ip addr add 169.254.1.2/30 dev eth0 && ip link set eth0 up' || exit 1
                exec nsenter --net=/proc/\(proxy)/ns/net sh -c \
                  'ip addr add 169.254.1.1/30 dev sp0 && ip link set sp0 up'
                """
            let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
            defer { close(devNull) }
            let pid = try ChildProcess.spawn(
                executable: "/bin/sh",
                arguments: ["-c", script, "sandpiper-veth"],
                fds: [devNull, devNull, devNull]
            )
            let status = await ChildProcess.waitForExit(pid)
            guard status == 0 else { throw failure("could not link the container to the host (status \(status))") }
            return Namespaces(
                holders: holders,
                container: "/proc/\(container)/ns/net",
                proxy: "/proc/\(proxy)/ns/net"
            )
        } catch {
            for holder in holders {
                kill(holder, SIGKILL)
                _ = await ChildProcess.waitForExit(holder)
            }
            throw error
        }
    }

    /// A root-owned network namespace with `lo` up, held by `sleep` inside the session's cgroups.
    private static func hold(cgroupProcs: [String]) async throws -> pid_t {
        let ready = try Pipe()
        defer { close(ready.read) }
        let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(devNull) }
        let holder: pid_t
        do {
            holder = try ChildProcess.spawn(
                executable: "/bin/sh",
                arguments: ["-c", SlirpNetwork.joinCgroupsScript, "sandpiper-netns"] + cgroupProcs + [
                    "--", "/usr/bin/unshare", "--net", "--", "/bin/sh", "-c",
                    "/usr/sbin/ip link set lo up || exit 1; echo up >&3; exec 3>&-; exec sleep infinity",
                ],
                fds: [devNull, devNull, devNull, ready.write]
            )
        } catch {
            close(ready.write)
            throw error
        }
        close(ready.write)
        let readyFD = ready.read
        let up = await Task.detached {
            var byte: UInt8 = 0
            return sandpiper_read_timeout(readyFD, &byte, 1, SlirpNetwork.timeoutMilliseconds) == 1
        }.value
        guard up else {
            kill(holder, SIGKILL)
            _ = await ChildProcess.waitForExit(holder)
            throw failure("the network namespace did not come up")
        }
        return holder
    }

    private static func failure(_ what: String) -> SandpiperError {
        SandpiperError(.unavailable, code: "SandboxNetworkFailed", "cannot set up the container's network: \(what)")
    }
}
