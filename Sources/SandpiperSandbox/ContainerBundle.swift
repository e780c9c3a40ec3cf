import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// An image from the local store, as the container runtime needs it (the `sandpiper` command
/// resolves pools' images with `ImageStore` and registers them with the backend).
public struct ContainerImage: Sendable, Equatable {
    public var name: String
    public var digest: String
    /// Unpacked layer directories, top first (overlayfs `lowerdir=` order).
    public var lowerDirectories: [String]
    public var entrypoint: [String]
    public var cmd: [String]
    /// `NAME=value` entries.
    public var environment: [String]
    public var workingDirectory: String?
    public var user: String?

    public init(
        name: String,
        digest: String,
        lowerDirectories: [String],
        entrypoint: [String],
        cmd: [String],
        environment: [String],
        workingDirectory: String?,
        user: String?
    ) {
        self.name = name
        self.digest = digest
        self.lowerDirectories = lowerDirectories
        self.entrypoint = entrypoint
        self.cmd = cmd
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.user = user
    }

    /// The process to run: the template's command/args over the image's Entrypoint/Cmd
    /// (Kubernetes rules: `command` replaces both Entrypoint and Cmd unless `args` is given).
    public func commandLine(for template: ContainerTemplate) -> [String] {
        let entry = template.command ?? entrypoint
        let arguments = template.args ?? (template.command == nil ? cmd : [])
        return entry + arguments
    }

    /// The image's environment with the template's on top (same name: the template wins).
    public func environment(for template: ContainerTemplate) -> [String] {
        var order: [String] = []
        var values: [String: String] = [:]
        func set(_ name: String, _ value: String) {
            if values[name] == nil { order.append(name) }
            values[name] = value
        }
        for entry in environment {
            let parts = entry.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            set(String(parts[0]), parts.count > 1 ? String(parts[1]) : "")
        }
        for variable in template.environment { set(variable.name, variable.value) }
        if values["PATH"] == nil { set("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") }
        if values["HOSTNAME"] == nil { set("HOSTNAME", "sandbox") }
        return order.map { $0 + "=" + (values[$0] ?? "") }
    }
}

/// The OCI bundle (`config.json`) of one custom-container session. For crun: every namespace
/// including a user namespace whose root is the session's unprivileged host uid, a seccomp
/// profile, a minimal capability set, no new privileges, read-only /sys, a private /tmp. For
/// runsc (gVisor): the same process, capabilities and mounts, but the namespaces are gVisor's
/// own kernel's (no user namespace, no seccomp profile: the container never reaches the host's
/// kernel), and gVisor makes /dev itself.
enum ContainerBundle {
    /// Kept inside the user namespace (they give nothing on the host: root there is the session uid).
    static let capabilities = [
        "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ]

    /// Refused with EPERM: what a web service never needs and kernel attacks often do (the same
    /// list as the namespace tier's filter). `clone3` gets ENOSYS so libc falls back to `clone`,
    /// whose CLONE_NEWUSER is refused.
    static let deniedSyscalls = [
        "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "delete_module", "finit_module", "fsconfig",
        "fsmount", "fsopen", "fspick", "init_module", "io_uring_enter", "io_uring_register", "io_uring_setup",
        "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
        "name_to_handle_at", "open_by_handle_at", "open_tree", "perf_event_open", "pivot_root", "process_vm_readv",
        "process_vm_writev", "ptrace", "quotactl", "reboot", "request_key", "setns", "settimeofday", "swapoff",
        "swapon", "syslog", "umount2", "unshare", "userfaultfd", "adjtimex", "iopl", "ioperm", "personality",
    ]

    static var seccompArchitectures: [String] {
        #if arch(x86_64)
            ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
        #elseif arch(arm64)
            ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
        #else
            []
        #endif
    }

    static var seccompProfile: JSONValue {
        let newUser: Int64 = 0x1000_0000
        let tiocsti: Int64 = 0x5412
        return .object([
            "defaultAction": .string("SCMP_ACT_ALLOW"),
            "architectures": .array(seccompArchitectures.map(JSONValue.string)),
            "syscalls": .array([
                .object([
                    "names": .array(deniedSyscalls.map(JSONValue.string)), "action": .string("SCMP_ACT_ERRNO"),
                    "errnoRet": .integer(Int64(EPERM)),
                ]),
                .object([
                    "names": .array([.string("clone3")]), "action": .string("SCMP_ACT_ERRNO"),
                    "errnoRet": .integer(Int64(ENOSYS)),
                ]),
                .object([
                    "names": .array([.string("clone")]), "action": .string("SCMP_ACT_ERRNO"),
                    "errnoRet": .integer(Int64(EPERM)),
                    "args": .array([
                        .object([
                            "index": .integer(0), "value": .integer(newUser), "valueTwo": .integer(newUser),
                            "op": .string("SCMP_CMP_MASKED_EQ"),
                        ])
                    ]),
                ]),
                .object([
                    "names": .array([.string("ioctl")]), "action": .string("SCMP_ACT_ERRNO"),
                    "errnoRet": .integer(Int64(EPERM)),
                    "args": .array([
                        .object([
                            "index": .integer(1), "value": .integer(0xFFFF_FFFF), "valueTwo": .integer(tiocsti),
                            "op": .string("SCMP_CMP_MASKED_EQ"),
                        ])
                    ]),
                ]),
            ]),
        ])
    }

    /// Writes `<bundle>/config.json`.
    static func write(
        bundle: String,
        rootfs: String,
        uid: UInt32,
        arguments: [String],
        environment: [String],
        workingDirectory: String,
        limits: SessionLimits,
        networkNamespace: String?,
        gvisor: Bool = false
    ) throws {
        try FileManager.default.createDirectory(atPath: bundle, withIntermediateDirectories: true)
        func mount(_ destination: String, _ type: String, _ source: String, _ options: [String]) -> JSONValue {
            .object([
                "destination": .string(destination), "type": .string(type), "source": .string(source),
                "options": .array(options.map(JSONValue.string)),
            ])
        }
        let devices: [JSONValue] = [
            mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
            mount("/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
            mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        ]
        let mounts: [JSONValue] =
            [mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"])] + (gvisor ? [] : devices) + [
                // A fresh sysfs needs a network namespace of the container's own user namespace; a joined
                // one (egress) gets the host's /sys, read-only, as rootless containers do.
                networkNamespace == nil || gvisor
                    ? mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"])
                    : mount("/sys", "none", "/sys", ["rbind", "nosuid", "noexec", "nodev", "ro"]),
                mount("/tmp", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=1777", "size=\(limits.tmpBytes)"]),
            ]
        let ids: JSONValue = .array([
            .object(["containerID": .integer(0), "hostID": .integer(Int64(uid)), "size": .integer(1)])
        ])
        var namespaces: [JSONValue] =
            (gvisor ? ["pid", "ipc", "uts", "mount"] : ["pid", "ipc", "uts", "user", "mount", "cgroup"])
            .map { .object(["type": .string($0)]) }
        namespaces.append(
            networkNamespace.map { .object(["type": .string("network"), "path": .string($0)]) }
                ?? .object(["type": .string("network")])
        )
        var linux: [String: JSONValue] = [
            "namespaces": .array(namespaces),
            "maskedPaths": .array(
                [
                    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
                ].map(JSONValue.string)
            ),
            "readonlyPaths": .array(
                ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"].map(JSONValue.string)
            ),
        ]
        if !gvisor {
            linux["uidMappings"] = ids
            linux["gidMappings"] = ids
            linux["seccomp"] = seccompProfile
        }
        let caps = JSONValue.array(capabilities.map(JSONValue.string))
        let config: JSONValue = .object([
            "ociVersion": .string("1.0.2"),
            "hostname": .string("sandbox"),
            "root": .object(["path": .string(rootfs), "readonly": .bool(false)]),
            "process": .object([
                "terminal": .bool(false),
                "user": .object(["uid": .integer(0), "gid": .integer(0)]),
                "args": .array(arguments.map(JSONValue.string)),
                "env": .array(environment.map(JSONValue.string)),
                "cwd": .string(workingDirectory),
                "noNewPrivileges": .bool(true),
                "capabilities": .object([
                    "bounding": caps, "effective": caps, "permitted": caps, "inheritable": .array([]),
                    "ambient": .array([]),
                ]),
                "rlimits": .array([
                    .object(["type": .string("RLIMIT_NOFILE"), "hard": .integer(4096), "soft": .integer(4096)]),
                    .object(["type": .string("RLIMIT_CORE"), "hard": .integer(0), "soft": .integer(0)]),
                ]),
            ]),
            "mounts": .array(mounts),
            "linux": .object(linux),
        ])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try encoder.encode(config).write(to: URL(fileURLWithPath: bundle + "/config.json"))
    }
}
