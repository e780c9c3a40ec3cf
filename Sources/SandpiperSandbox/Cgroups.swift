import CSandpiperShims
import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Per-sandbox cgroups: memory, CPU and pids limits, and a reliable way to kill every process
/// of a sandbox. Works on cgroup v1 (each controller its own hierarchy; the memory group is
/// nested under the server's own memory cgroup) and on v2 (one unified hierarchy).
/// `root` prefixes every path so tests can run against a fake cgroupfs tree.
public struct CgroupSetup: Sendable, Equatable {
    public enum Version: String, Sendable { case v1, v2 }

    public let version: Version
    /// v1: controller name → the directory under which sandbox groups are made.
    /// v2: the single key "unified".
    public let bases: [String: String]

    public static let v1Controllers = ["memory", "cpu", "pids"]

    public init(version: Version, bases: [String: String]) {
        self.version = version
        self.bases = bases
    }

    /// Finds the hierarchies from `/proc/self/mountinfo` and `/proc/self/cgroup`. On a hybrid
    /// host (v1 controllers plus an empty v2 mount) v1 wins when it has the controllers we need.
    public static func detect(
        mountinfo: String,
        selfCgroup: String,
        root: String = "",
        groupName: String = "sandpiper"
    ) throws(SandpiperError) -> CgroupSetup {
        var v1Mounts: [String: String] = [:]
        var v2Mount: String?
        for line in mountinfo.split(separator: "\n") {
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { continue }
            let left = halves[0].split(separator: " ")
            let right = halves[1].split(separator: " ")
            guard left.count >= 5, right.count >= 3 else { continue }
            let mountPoint = String(left[4])
            let fsType = right[0]
            if fsType == "cgroup2" {
                v2Mount = mountPoint
            } else if fsType == "cgroup" {
                let options = right[2].split(separator: ",").map(String.init)
                for controller in v1Controllers where options.contains(controller) {
                    v1Mounts[controller] = mountPoint
                }
            }
        }
        // /proc/self/cgroup: "hierarchy-id:controller-list:path"
        var ownPaths: [String: String] = [:]
        var unifiedPath: String?
        for line in selfCgroup.split(separator: "\n") {
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3 else { continue }
            let path = String(fields[2])
            if fields[0] == "0" && fields[1].isEmpty {
                unifiedPath = path
            }
            for controller in fields[1].split(separator: ",") {
                ownPaths[String(controller)] = path
            }
        }
        func join(_ parts: String...) -> String {
            var result = ""
            for part in parts where !part.isEmpty {
                let trimmed = part.hasPrefix("/") ? String(part.dropFirst()) : part
                if trimmed.isEmpty { continue }
                result += result.hasSuffix("/") ? trimmed : "/" + trimmed
            }
            return result.isEmpty ? "/" : result
        }
        if v1Controllers.allSatisfy({ v1Mounts[$0] != nil }) {
            var bases: [String: String] = [:]
            for controller in v1Controllers {
                let own = ownPaths[controller] ?? "/"
                bases[controller] = root + join(v1Mounts[controller] ?? "", own, groupName)
            }
            return CgroupSetup(version: .v1, bases: bases)
        }
        if let v2Mount, let unifiedPath {
            return CgroupSetup(version: .v2, bases: ["unified": root + join(v2Mount, unifiedPath, groupName)])
        }
        throw SandpiperError(
            .unavailable,
            code: "CgroupsUnavailable",
            "no usable cgroup hierarchy: need the v1 memory, cpu and pids controllers or a cgroup v2 mount"
        )
    }

    /// Reads the running system's layout.
    public static func detectHost(groupName: String = "sandpiper") throws(SandpiperError) -> CgroupSetup {
        let mountinfo = (SystemFile.read("/proc/self/mountinfo")) ?? ""
        let selfCgroup = (SystemFile.read("/proc/self/cgroup")) ?? ""
        return try detect(mountinfo: mountinfo, selfCgroup: selfCgroup, groupName: groupName)
    }

    /// The parent group's name for a data directory: servers with different data directories
    /// never touch each other's sandboxes, and a restart finds its predecessor's.
    public static func groupName(forStateDirectory path: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in path.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        return "sandpiper-" + String(hash, radix: 16).prefix(12)
    }

    /// The directories of one sandbox's groups.
    public func directories(for sandboxID: String) -> [String] {
        bases.keys.sorted().compactMap { key in bases[key].map { $0 + "/" + sandboxID } }
    }

    /// Prepares the parent groups (v2: enables the controllers down the tree).
    public func prepare() throws(SandpiperError) {
        for base in bases.values.sorted() {
            try makeDirectory(base)
        }
        if version == .v2, let base = bases["unified"] {
            let parent = (base as NSString).deletingLastPathComponent
            let wanted = "+memory +cpu +pids"
            // Controllers must be enabled in every ancestor's subtree_control; ours are enough
            // when the parent delegates them (systemd `Delegate=yes`, a container's root).
            for dir in [parent, base] {
                do {
                    try write(wanted, to: dir + "/cgroup.subtree_control")
                } catch {
                    throw SandpiperError(
                        .unavailable,
                        code: "CgroupsUnavailable",
                        "cannot enable memory, cpu and pids controllers in \(dir): \(error.message); run the "
                            + "server in a delegated cgroup with no other processes in it"
                    )
                }
            }
        }
    }

    /// Creates the sandbox's groups with its limits. Returns the files to write a pid into.
    public func create(sandboxID: String, limits: SessionLimits) throws(SandpiperError) -> [String] {
        var procs: [String] = []
        do {
            switch version {
            case .v1:
                for controller in Self.v1Controllers {
                    guard let base = bases[controller] else { continue }
                    let dir = base + "/" + sandboxID
                    try makeDirectory(dir)
                    switch controller {
                    case "memory":
                        try write("\(limits.memoryBytes)", to: dir + "/memory.limit_in_bytes")
                        // Swap accounting may be off; then there is no memsw file and no swap to limit.
                        if access(dir + "/memory.memsw.limit_in_bytes", F_OK) == 0 {
                            try write("\(limits.memoryBytes)", to: dir + "/memory.memsw.limit_in_bytes")
                        }
                    case "cpu":
                        // A new group's period is the kernel's 100 ms (not inherited): only the
                        // quota is written. Each write re-checks every group's bandwidth under a
                        // global lock, a cost that grows with the number of sessions.
                        try write("\(Int(limits.cpus * 100_000))", to: dir + "/cpu.cfs_quota_us")
                    case "pids":
                        try write("\(limits.pids)", to: dir + "/pids.max")
                    default: break
                    }
                    procs.append(dir + "/cgroup.procs")
                }
            case .v2:
                guard let base = bases["unified"] else { return [] }
                let dir = base + "/" + sandboxID
                try makeDirectory(dir)
                try write("\(limits.memoryBytes)", to: dir + "/memory.max")
                try write("0", to: dir + "/memory.swap.max", optional: true)
                try write("\(Int(limits.cpus * 100_000)) 100000", to: dir + "/cpu.max")
                try write("\(limits.pids)", to: dir + "/pids.max")
                procs.append(dir + "/cgroup.procs")
            }
        } catch {
            remove(sandboxID: sandboxID)
            throw error
        }
        return procs
    }

    /// Every pid in the sandbox's groups.
    public func pids(sandboxID: String) -> [pid_t] {
        var all = Set<pid_t>()
        for dir in directories(for: sandboxID) {
            all.formUnion(SystemFile.pids(dir + "/cgroup.procs"))
        }
        return all.sorted()
    }

    /// How many times the kernel's OOM killer struck inside the sandbox.
    public func oomKills(sandboxID: String) -> Int {
        let file: String
        switch version {
        case .v1: file = (bases["memory"] ?? "") + "/" + sandboxID + "/memory.oom_control"
        case .v2: file = (bases["unified"] ?? "") + "/" + sandboxID + "/memory.events"
        }
        guard let text = SystemFile.read(file) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("oom_kill ") {
            return Int(line.dropFirst("oom_kill ".count)) ?? 0
        }
        return 0
    }

    /// SIGKILLs every process of the sandbox until none is left but zombies (a fork bomb keeps
    /// forking while we kill, so repeat), then removes the groups. Safe to call more than once.
    /// `reap` is called between rounds so the caller can collect its own exited child.
    public func killAndRemove(sandboxID: String, reap: () -> Void = {}) {
        if version == .v2, let base = bases["unified"] {
            try? write("1", to: base + "/" + sandboxID + "/cgroup.kill", optional: true)
        }
        for round in 0..<300 {
            reap()
            let living = pids(sandboxID: sandboxID).filter { !Self.isZombie($0) }
            if living.isEmpty { break }
            for pid in living { kill(pid, SIGKILL) }
            usleep(round < 20 ? 500 : 10_000)
        }
        reap()
        remove(sandboxID: sandboxID)
    }

    static func isZombie(_ pid: pid_t) -> Bool {
        guard let stat = SystemFile.read("/proc/\(pid)/stat"),
            let close = stat.lastIndex(of: ")")
        else { return true }  // gone already
        let rest = stat[stat.index(after: close)...].drop { $0 == " " }
        return rest.first == "Z" || rest.first == "X"
    }

    /// Removes the groups (they must be empty). Retries briefly while exiting tasks drain.
    public func remove(sandboxID: String) {
        for dir in directories(for: sandboxID) {
            for attempt in 0..<50 {
                if rmdir(dir) == 0 || errno == ENOENT { break }
                if errno == ENOTEMPTY || errno == EBUSY {
                    // A fake tree holds plain files; a real cgroup directory never does.
                    if isFakeDirectory(dir) {
                        try? FileManager.default.removeItem(atPath: dir)
                        break
                    }
                }
                usleep(attempt < 10 ? 2000 : 20_000)
            }
        }
    }

    /// Names of sandbox groups present under our bases (for cleaning up after a crash).
    public func leftoverSandboxIDs() -> [String] {
        var ids = Set<String>()
        for base in bases.values {
            guard let entries = try? FileManager.default.contentsOfDirectory(atPath: base) else { continue }
            for entry in entries {
                var isDirectory: ObjCBool = false
                if FileManager.default.fileExists(atPath: base + "/" + entry, isDirectory: &isDirectory),
                    isDirectory.boolValue
                {
                    ids.insert(entry)
                }
            }
        }
        return ids.sorted()
    }

    private func isFakeDirectory(_ dir: String) -> Bool {
        let type = sandpiper_fs_type(dir)
        let cgroupMagic = 0x27e0eb
        let cgroup2Magic = 0x6367_7270
        return type >= 0 && type != cgroupMagic && type != cgroup2Magic
    }

    private func makeDirectory(_ path: String) throws(SandpiperError) {
        // The parent is made by `prepare()`: one mkdir(2) in the common case.
        if mkdir(path, 0o755) == 0 { return }
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw SandpiperError(.unavailable, code: "CgroupsUnavailable", "cannot create cgroup \(path): \(error)")
        }
    }

    private func write(_ value: String, to path: String, optional: Bool = false) throws(SandpiperError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 {
            if optional { return }
            throw SandpiperError(
                .unavailable,
                code: "CgroupsUnavailable",
                "cannot open \(path): \(String(cString: strerror(errno)))"
            )
        }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        if written != bytes.count && !optional {
            throw SandpiperError(
                .unavailable,
                code: "CgroupsUnavailable",
                "cannot write '\(value)' to \(path): \(String(cString: strerror(errno)))"
            )
        }
    }
}
