import ArgumentParser
import Foundation
import SandpiperCore
import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// `sandpiper doctor`: which isolation tiers this host can run, and why not.
struct Doctor: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Report which isolation tiers this host supports (namespaces, gvisor, microvm) and why not."
    )

    @Option(name: .customLong("python-runtime"), help: "The sandbox Python venv to check.")
    var pythonRuntime: String =
        ProcessInfo.processInfo.environment["SANDPIPER_PYTHON_RUNTIME"] ?? "/var/lib/sandpiper/runtimes/python"

    func run() async throws {
        var namespacesOK = true
        print("Isolation tiers on this host:")
        var problems: [String] = []
        if geteuid() != 0 { problems.append("the server must run as root (cgroups, per-session uids)") }
        for (tool, path) in [("bubblewrap", "/usr/bin/bwrap"), ("setpriv", "/usr/bin/setpriv")]
        where access(path, X_OK) != 0 {
            problems.append("\(tool) is missing at \(path) (make setup)")
        }
        let userNamespaces =
            (try? String(contentsOfFile: "/proc/sys/user/max_user_namespaces", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        if userNamespaces == 0 { problems.append("user namespaces are disabled (user.max_user_namespaces = 0)") }
        do {
            let cgroups = try CgroupSetup.detectHost()
            print("  cgroups: \(cgroups.version.rawValue)")
        } catch {
            problems.append(error.message)
        }
        if access(pythonRuntime + "/bin/python", X_OK) != 0 {
            problems.append("the Python runtime is missing at \(pythonRuntime) (make setup)")
        }
        if problems.isEmpty {
            print("  namespaces  supported   bubblewrap + seccomp + cgroups, one uid per session")
        } else {
            namespacesOK = false
            print("  namespaces  UNAVAILABLE " + problems.joined(separator: "; "))
        }
        if let reason = NamespaceBackend.gvisorUnavailableReason() {
            print("  gvisor      UNAVAILABLE \(reason)")
        } else {
            print("  gvisor      supported   runsc, ptrace platform (a user-space kernel per session)")
        }
        print("  microvm     UNAVAILABLE not implemented; " + Self.kvmReport())
        print(
            "  egress      "
                + (Self.tunUsable()
                    ? "supported   slirp4netns"
                    : "UNAVAILABLE /dev/net/tun is not usable by unprivileged users (chmod 0666)")
        )
        if !namespacesOK { throw ExitCode(1) }
    }

    static func kvmReport() -> String {
        guard access("/dev/kvm", F_OK) == 0 else { return "no /dev/kvm on this host" }
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let hardware = cpuinfo.split(separator: "\n").contains {
            $0.hasPrefix("flags") && ($0.contains(" vmx") || $0.contains(" svm"))
        }
        return hardware
            ? "/dev/kvm with hardware virtualisation is present: a microVM tier could run here later"
            : "/dev/kvm exists but the CPU exposes no vmx/svm (nested or PVM KVM): stock guest kernels cannot boot"
    }

    static func tunUsable() -> Bool {
        var info = stat()
        return stat("/dev/net/tun", &info) == 0 && info.st_mode & 0o006 == 0o006
            && access("/usr/bin/slirp4netns", X_OK) == 0
    }
}
