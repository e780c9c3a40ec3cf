import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// The gVisor tier: the same agent, runtime, /mnt/data, limits and lifecycle as the namespace
/// tier, but run by `runsc` (ptrace platform), so the agent talks to gVisor's user-space kernel
/// and never to the host's. runsc has no way to hand extra descriptors to the container, so the
/// agent's protocol pipes arrive as its stdin/stdout and a shell moves them to fds 3/4 before
/// the agent starts (stdout then points at the sandbox's own stderr, which the host drains).
enum GVisorBundle {
    /// The read-only root every gVisor sandbox shares: mount points and the usual symlinks.
    static func prepareRoot(at root: String, runtime: String) throws {
        let manager = FileManager.default
        for directory in [
            "usr", "etc", "tmp", "proc", "dev", "mnt/data", "opt/sandpiper/agents", String(runtime.dropFirst()),
        ] {
            try manager.createDirectory(atPath: root + "/" + directory, withIntermediateDirectories: true)
        }
        for file in ["etc/passwd", "etc/group", "etc/hosts", "etc/resolv.conf", "etc/ld.so.cache", "etc/localtime"]
        where !manager.fileExists(atPath: root + "/" + file) {
            manager.createFile(atPath: root + "/" + file, contents: nil)
        }
        for directory in ["etc/ssl", "etc/alternatives", "etc/ca-certificates", "etc/fonts"] {
            try manager.createDirectory(atPath: root + "/" + directory, withIntermediateDirectories: true)
        }
        for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
            let path = root + "/" + link
            if (try? manager.destinationOfSymbolicLink(atPath: path)) == nil {
                try manager.createSymbolicLink(atPath: path, withDestinationPath: target)
            }
        }
        chmod(root, 0o755)
    }

    /// Writes `<directory>/bundle/config.json` and returns the bundle directory.
    static func write(
        spec: SandboxSpec,
        backend: NamespaceBackend,
        directory: String,
        data: String,
        uid: UInt32,
        environment: [(String, String)],
        command: [String],
        networkNamespace: String? = nil
    ) throws -> String {
        let bundle = directory + "/bundle"
        try FileManager.default.createDirectory(atPath: bundle, withIntermediateDirectories: true)
        let runtime = backend.configuration.pythonRuntime
        func bind(_ source: String, _ destination: String, writable: Bool = false) -> JSONValue {
            .object([
                "destination": .string(destination), "type": .string("bind"), "source": .string(source),
                "options": .array([.string("rbind"), .string(writable ? "rw" : "ro")]),
            ])
        }
        var mounts: [JSONValue] = [
            .object(["destination": .string("/proc"), "type": .string("proc"), "source": .string("proc")]),
            .object([
                "destination": .string("/tmp"), "type": .string("tmpfs"), "source": .string("tmpfs"),
                "options": .array([
                    .string("nosuid"), .string("nodev"), .string("mode=1777"),
                    .string("size=\(spec.pool.limits.tmpBytes)"),
                ]),
            ]),
            bind("/usr", "/usr"),
            bind(runtime, runtime),
            bind(backend.installedAgentsDirectory, "/opt/sandpiper/agents"),
            bind(data, "/mnt/data", writable: true),
        ]
        for name in ["passwd", "group", "hosts"] + (networkNamespace == nil ? [] : ["resolv.conf"]) {
            mounts.append(bind(backend.etcDirectory + "/" + name, "/etc/" + name))
        }
        for path in [
            "/etc/ld.so.cache", "/etc/localtime", "/etc/ssl", "/etc/alternatives", "/etc/ca-certificates", "/etc/fonts",
        ]
        where access(path, F_OK) == 0 {
            mounts.append(bind(path, path))
        }
        // Move the protocol pipes from stdin/stdout to fds 3/4, point stdout at stderr.
        let wrapper = #"exec 3<&0 4>&1 0</dev/null 1>&2; exec "$@""#
        let config: JSONValue = .object([
            "ociVersion": .string("1.0.2"),
            "hostname": .string("sandbox"),
            "root": .object(["path": .string(backend.gvisorRootDirectory), "readonly": .bool(true)]),
            "process": .object([
                "terminal": .bool(false),
                "user": .object(["uid": .integer(Int64(uid)), "gid": .integer(Int64(uid))]),
                "args": .array((["/bin/sh", "-c", wrapper, "sandpiper-agent"] + command).map(JSONValue.string)),
                "env": .array(environment.map { .string($0.0 + "=" + $0.1) }),
                "cwd": .string("/mnt/data"),
                "noNewPrivileges": .bool(true),
                "capabilities": .object([
                    "bounding": .array([]), "effective": .array([]), "inheritable": .array([]),
                    "permitted": .array([]), "ambient": .array([]),
                ]),
                "rlimits": .array([
                    .object(["type": .string("RLIMIT_NOFILE"), "hard": .integer(4096), "soft": .integer(4096)]),
                    .object(["type": .string("RLIMIT_CORE"), "hard": .integer(0), "soft": .integer(0)]),
                ]),
            ]),
            "mounts": .array(mounts),
            "linux": .object([
                "namespaces": .array(
                    ["pid", "ipc", "uts", "mount"].map { .object(["type": .string($0)]) }
                        + [
                            networkNamespace.map { .object(["type": .string("network"), "path": .string($0)]) }
                                ?? .object(["type": .string("network")])
                        ]
                )
            ]),
        ])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try encoder.encode(config).write(to: URL(fileURLWithPath: bundle + "/config.json"))
        return bundle
    }

    /// `runsc` as the server starts it for one sandbox; its state lives in the session directory.
    static func arguments(runsc: String, directory: String, bundle: String, id: String, network: String) -> [String] {
        // --ignore-cgroups: runsc would otherwise move its sentry and gofer into unlimited groups of
        // its own; they must stay in the sandbox's cgroups, which carry the pool's limits.
        [
            runsc, "--root", directory + "/runsc", "--platform=ptrace", "--network=\(network)", "--ignore-cgroups",
            "run",
            "--bundle", bundle, id,
        ]
    }
}
