import CSandpiperShims
import Dispatch
import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Outbound network for a sandbox whose pool enables egress: slirp4netns, run as the sandbox's
/// own unprivileged uid and inside its cgroups, gives the sandbox's network namespace a tap
/// device with NAT to the outside (10.0.2.100, gateway 10.0.2.2, DNS 10.0.2.3). The host's
/// loopback is NOT reachable through it (`--disable-host-loopback`).
///
/// bubblewrap holds the sandbox before exec (`--block-fd`) until the network is up, so user
/// code never runs without it. The user namespace owning the sandbox's network namespace comes
/// from `NS_GET_USERNS` (bubblewrap nests a second user namespace; joining the first fails).
enum SlirpNetwork {
    static let timeoutMilliseconds: Int32 = 15_000

    /// Returns slirp4netns's pid (our child, to reap after the sandbox is killed).
    static func attach(
        infoFD: Int32,
        blockFD: Int32,
        cgroupProcs: [String],
        uid: UInt32,
        slirp: String,
        setpriv: String
    ) async throws -> pid_t {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(
                    with: Result {
                        try attachBlocking(
                            infoFD: infoFD,
                            blockFD: blockFD,
                            cgroupProcs: cgroupProcs,
                            uid: uid,
                            slirp: slirp,
                            setpriv: setpriv
                        )
                    }
                )
            }
        }
    }

    private static func failure(_ what: String) -> SandpiperError {
        SandpiperError(.unavailable, code: "SandboxNetworkFailed", "cannot set up the sandbox's network: \(what)")
    }

    /// Runs slirp4netns as `uid`, inside the sandbox's cgroups, on the network namespace `netns`
    /// (owned by a user namespace of that uid), and waits until tap0 is up. Returns its pid.
    static func startSlirp(netns: Int32, cgroupProcs: [String], uid: UInt32, slirp: String, setpriv: String) throws
        -> pid_t
    {
        let userns = sandpiper_ns_get_userns(netns)
        guard userns >= 0 else { throw failure("cannot find the user namespace: \(String(cString: strerror(errno)))") }
        defer { close(userns) }
        let ready = try Pipe()
        defer { close(ready.read) }
        let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(devNull) }
        let arguments =
            ["-c", joinCgroupsScript, "sandpiper-slirp"] + cgroupProcs + ["--"]
            + [
                setpriv, "--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", "--bounding-set=-all", "--inh-caps=-all",
                "--", slirp, "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-seccomp",
                "--ready-fd=5",
                "--userns-path=/proc/self/fd/3", "--netns-type=path", "/proc/self/fd/4", "tap0",
            ]
        let pid: pid_t
        do {
            pid = try ChildProcess.spawn(
                executable: "/bin/sh",
                arguments: arguments,
                fds: [devNull, devNull, devNull, userns, netns, ready.write]
            )
        } catch {
            close(ready.write)
            throw error
        }
        close(ready.write)
        var byte: UInt8 = 0
        guard sandpiper_read_timeout(ready.read, &byte, 1, timeoutMilliseconds) == 1 else {
            kill(pid, SIGKILL)
            throw failure("slirp4netns did not come up")
        }
        return pid
    }

    /// The shell script that writes its pid into each cgroup.procs file given before `--`, then
    /// execs the rest: every process of a sandbox starts inside its cgroups.
    static let joinCgroupsScript =
        #"while [ "$1" != "--" ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#

    /// For gVisor: a network namespace (owned by a user namespace of the session uid) held by a
    /// sleeping process, with slirp4netns attached. runsc joins it with `--network=sandbox`.
    /// Returns the holder's and slirp4netns's pids (our children).
    static func makeNamespace(
        cgroupProcs: [String],
        uid: UInt32,
        slirp: String,
        setpriv: String,
        unshare: String = "/usr/bin/unshare",
        loopbackUp: Bool = false
    ) async throws -> (holder: pid_t, slirp: pid_t) {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(
                    with: Result {
                        let ready = try Pipe()
                        defer { close(ready.read) }
                        let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
                        defer { close(devNull) }
                        let arguments =
                            ["-c", joinCgroupsScript, "sandpiper-netns"] + cgroupProcs + ["--"]
                            + [
                                setpriv, "--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", "--bounding-set=-all",
                                "--inh-caps=-all", "--", unshare, "--user", "--map-root-user", "--net", "--",
                                "/bin/sh", "-c",
                                (loopbackUp ? "/usr/sbin/ip link set lo up || exit 1; " : "")
                                    + "echo up >&3; exec 3>&-; exec sleep infinity",
                            ]
                        let holder: pid_t
                        do {
                            holder = try ChildProcess.spawn(
                                executable: "/bin/sh",
                                arguments: arguments,
                                fds: [devNull, devNull, devNull, ready.write]
                            )
                        } catch {
                            close(ready.write)
                            throw error
                        }
                        close(ready.write)
                        var byte: UInt8 = 0
                        guard sandpiper_read_timeout(ready.read, &byte, 1, timeoutMilliseconds) == 1 else {
                            kill(holder, SIGKILL)
                            throw failure("the network namespace did not come up")
                        }
                        let netns = open("/proc/\(holder)/ns/net", O_RDONLY | O_CLOEXEC)
                        guard netns >= 0 else {
                            kill(holder, SIGKILL)
                            throw failure("cannot open the network namespace")
                        }
                        defer { close(netns) }
                        do {
                            let slirpPID = try startSlirp(
                                netns: netns,
                                cgroupProcs: cgroupProcs,
                                uid: uid,
                                slirp: slirp,
                                setpriv: setpriv
                            )
                            return (holder, slirpPID)
                        } catch {
                            kill(holder, SIGKILL)
                            throw error
                        }
                    }
                )
            }
        }
    }

    private static func attachBlocking(
        infoFD: Int32,
        blockFD: Int32,
        cgroupProcs: [String],
        uid: UInt32,
        slirp: String,
        setpriv: String
    ) throws -> pid_t {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let count = sandpiper_read_timeout(infoFD, &buffer, UInt(buffer.count), timeoutMilliseconds)
        guard count > 0 else { throw failure("bubblewrap reported no sandbox pid") }
        let info = String(decoding: buffer.prefix(count), as: UTF8.self)
        guard let range = info.range(of: #""child-pid":\s*(\d+)"#, options: .regularExpression),
            let childPID = Int32(info[range].split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "")
        else { throw failure("unexpected bubblewrap info '\(info)'") }

        let netns = open("/proc/\(childPID)/ns/net", O_RDONLY | O_CLOEXEC)
        guard netns >= 0 else { throw failure("cannot open the network namespace") }
        defer { close(netns) }
        let pid = try startSlirp(netns: netns, cgroupProcs: cgroupProcs, uid: uid, slirp: slirp, setpriv: setpriv)
        // Release bubblewrap: the agent starts with the network in place.
        var go: UInt8 = 1
        guard write(blockFD, &go, 1) == 1 else {
            kill(pid, SIGKILL)
            throw failure("cannot release the sandbox")
        }
        return pid
    }
}
