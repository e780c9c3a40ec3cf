import CSandpiperShims
import Foundation
import Logging
import SandpiperCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Sandboxes made of Linux namespaces with bubblewrap, started as a per-session unprivileged
/// host uid, with a seccomp filter, cgroup limits and a size-limited tmpfs as `/mnt/data`.
public final class NamespaceBackend: SandboxBackend {
    public struct Configuration: Sendable {
        /// Holds `sessions/<sandbox>/data` mounts, the seccomp program and generated /etc files.
        public var stateDirectory: String
        /// The Python runtime (a venv) bound read-only into every sandbox at the same path.
        public var pythonRuntime: String
        /// Directory holding `python/agent.py`.
        public var agentsDirectory: String
        /// Host uids handed to sandboxes, one per live sandbox.
        public var uidRange: ClosedRange<UInt32>
        public var bubblewrap: String
        public var setpriv: String
        public var slirp4netns: String
        /// gVisor's runtime, for pools with `isolation: gvisor`.
        public var runsc: String
        /// The OCI runtime of `CustomContainer` pools.
        public var crun: String
        public var startupTimeout: Duration
        /// How long a pool's fork template may take to import and warm up; past it the pool
        /// starts its sessions with exec (and tries the template again 30 s later).
        public var templateStartupTimeout: Duration
        /// Send the agents' own stderr to the server's (for debugging the agents).
        public var inheritAgentStderr: Bool
        /// The static `sandpiper-init` program a fork template spawns as each session's first
        /// process (built with the server, found beside it), with the template's fork loop
        /// `libSandpiperForker.so` beside it. Without them, fork pools use exec.
        public var sessionInit: String

        public init(
            stateDirectory: String,
            pythonRuntime: String,
            agentsDirectory: String,
            uidRange: ClosedRange<UInt32> = 230_000...239_999,
            bubblewrap: String = "/usr/bin/bwrap",
            setpriv: String = "/usr/bin/setpriv",
            slirp4netns: String = "/usr/bin/slirp4netns",
            runsc: String = "/usr/bin/runsc",
            crun: String = "/usr/bin/crun",
            startupTimeout: Duration = .seconds(60),
            templateStartupTimeout: Duration = .seconds(60),
            inheritAgentStderr: Bool = false,
            sessionInit: String = NamespaceBackend.bundledSessionInit
        ) {
            self.stateDirectory = stateDirectory
            self.pythonRuntime = pythonRuntime
            self.agentsDirectory = agentsDirectory
            self.uidRange = uidRange
            self.bubblewrap = bubblewrap
            self.setpriv = setpriv
            self.slirp4netns = slirp4netns
            self.runsc = runsc
            self.crun = crun
            self.startupTimeout = startupTimeout
            self.templateStartupTimeout = templateStartupTimeout
            self.inheritAgentStderr = inheritAgentStderr
            self.sessionInit = sessionInit
        }
    }

    public static let name = "namespaces"

    /// The guest agents shipped with this build.
    public static var bundledAgentsDirectory: String {
        Bundle.module.resourceURL?.appendingPathComponent("Agents").path ?? "Agents"
    }

    /// `sandpiper-init` as built beside this build's resources (`.build/<configuration>/`), or
    /// beside the running executable.
    public static var bundledSessionInit: String {
        let name = "sandpiper-init"
        if let bundle = Bundle.module.resourceURL?.deletingLastPathComponent() {
            let path = bundle.appendingPathComponent(name).path
            if access(path, X_OK) == 0 { return path }
        }
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        return executable.deletingLastPathComponent().appendingPathComponent(name).path
    }

    let configuration: Configuration
    let cgroups: CgroupSetup
    let records: any SandboxRecordStore
    let logger: Logger
    private let usedUIDs = Mutex<Set<UInt32>>([])
    var sessionsDirectory: String { configuration.stateDirectory + "/sessions" }
    var seccompPath: String { configuration.stateDirectory + "/seccomp.bpf" }
    /// The fork templates' filter (see `sandpiper_seccomp_export_template_bpf`).
    var templateSeccompPath: String { configuration.stateDirectory + "/seccomp-template.bpf" }
    var etcDirectory: String { configuration.stateDirectory + "/etc" }
    var gvisorRootDirectory: String { configuration.stateDirectory + "/gvisor-root" }

    /// Checks the host and prepares shared files. Throws with a message that says what is
    /// missing (not root, no bubblewrap, no runtime, no cgroups).
    public init(
        configuration: Configuration,
        records: any SandboxRecordStore,
        cgroups: CgroupSetup? = nil,
        logger: Logger
    ) throws {
        self.configuration = configuration
        self.records = records
        self.logger = logger
        guard geteuid() == 0 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxBackendUnavailable",
                "the namespace sandbox needs root: it creates cgroups and runs each session as its own host uid"
            )
        }
        for (tool, path) in [("bubblewrap", configuration.bubblewrap), ("setpriv", configuration.setpriv)] {
            guard access(path, X_OK) == 0 else {
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxBackendUnavailable",
                    "\(tool) is not installed at \(path); run `make setup`"
                )
            }
        }
        let python = configuration.pythonRuntime + "/bin/python"
        guard access(python, X_OK) == 0 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxBackendUnavailable",
                "the sandbox Python runtime is missing at \(configuration.pythonRuntime); run `make setup`"
            )
        }
        guard access(configuration.agentsDirectory + "/python/agent.py", R_OK) == 0 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxBackendUnavailable",
                "the guest agents are missing at \(configuration.agentsDirectory)"
            )
        }
        try Self.checkTraversable(configuration.stateDirectory, what: "the data directory")
        try Self.checkTraversable(configuration.pythonRuntime, what: "the Python runtime")
        self.cgroups =
            try cgroups
            ?? CgroupSetup.detectHost(groupName: CgroupSetup.groupName(forStateDirectory: configuration.stateDirectory))
        try self.cgroups.prepare()
        try FileManager.default.createDirectory(
            atPath: configuration.stateDirectory + "/sessions",
            withIntermediateDirectories: true
        )
        chmod(configuration.stateDirectory, 0o711)
        chmod(configuration.stateDirectory + "/sessions", 0o711)
        try writeSeccompProgram()
        try writeEtcFiles()
        try installAgents()
        try GVisorBundle.prepareRoot(at: gvisorRootDirectory, runtime: configuration.pythonRuntime)
    }

    /// Sandboxes bind the agents from the state directory, which every sandbox uid can reach
    /// (a checkout under /root could not be bound by an unprivileged bubblewrap).
    var installedAgentsDirectory: String { configuration.stateDirectory + "/agents" }
    /// True when fork templates can run: `sandpiper-init` and the fork loop were installed with
    /// the agents.
    var hasSessionInit: Bool {
        access(installedAgentsDirectory + "/sandpiper-init", X_OK) == 0
            && access(installedAgentsDirectory + "/" + Self.forkerLibrary, R_OK) == 0
    }

    /// The fork loop's library, as SwiftPM builds it beside `sessionInit` and as installed with
    /// the agents.
    static let forkerLibrary = "libSandpiperForker.so"

    private func installAgents() throws {
        let target = installedAgentsDirectory
        let staging = target + ".new"
        try? FileManager.default.removeItem(atPath: staging)
        try FileManager.default.copyItem(atPath: configuration.agentsDirectory, toPath: staging)
        if let paths = FileManager.default.enumerator(atPath: staging) {
            for case let relative as String in paths {
                var isDirectory: ObjCBool = false
                FileManager.default.fileExists(atPath: staging + "/" + relative, isDirectory: &isDirectory)
                chmod(staging + "/" + relative, isDirectory.boolValue ? 0o755 : 0o644)
            }
        }
        // The forked sessions' init, executable by the templates (it drops to the init uid), and
        // the templates' fork loop.
        let forker = URL(fileURLWithPath: configuration.sessionInit).deletingLastPathComponent()
            .appendingPathComponent(Self.forkerLibrary).path
        if access(configuration.sessionInit, X_OK) == 0, access(forker, R_OK) == 0 {
            try FileManager.default.copyItem(atPath: configuration.sessionInit, toPath: staging + "/sandpiper-init")
            chmod(staging + "/sandpiper-init", 0o755)
            try FileManager.default.copyItem(atPath: forker, toPath: staging + "/" + Self.forkerLibrary)
            chmod(staging + "/" + Self.forkerLibrary, 0o644)
        }
        chmod(staging, 0o755)
        try? FileManager.default.removeItem(atPath: target)
        try FileManager.default.moveItem(atPath: staging, toPath: target)
    }

    /// Sandboxes run as unprivileged uids; bubblewrap, running as such a uid, must reach the
    /// directories it binds. Every ancestor must therefore be searchable by others.
    static func checkTraversable(_ path: String, what: String) throws(SandpiperError) {
        var current = URL(fileURLWithPath: path).standardizedFileURL.deletingLastPathComponent().path
        while current != "/" && !current.isEmpty {
            var info = stat()
            if stat(current, &info) == 0, info.st_mode & 0o001 == 0 {
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxBackendUnavailable",
                    "sandbox uids cannot reach \(what) \(path): \(current) is not searchable by other users (mode "
                        + String(info.st_mode & 0o777, radix: 8) + "); use a directory under a world-searchable path "
                        + "or run `chmod o+x \(current)`"
                )
            }
            current = (current as NSString).deletingLastPathComponent
        }
    }

    private func writeSeccompProgram() throws {
        for (path, export) in [
            (seccompPath, sandpiper_seccomp_export_bpf), (templateSeccompPath, sandpiper_seccomp_export_template_bpf),
        ] {
            let fd = open(path + ".tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw SandpiperError.internalError("cannot write \(path)") }
            let rc = export(fd)
            close(fd)
            guard rc == 0 else {
                throw SandpiperError.internalError("cannot build the seccomp filter (libseccomp error \(rc))")
            }
            rename(path + ".tmp", path)
        }
    }

    private func writeEtcFiles() throws {
        try FileManager.default.createDirectory(atPath: etcDirectory, withIntermediateDirectories: true)
        let files = [
            "passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\nuser:x:1000:1000:sandbox user:/mnt/data:/bin/bash\n"
                + "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            "group": "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n",
            "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            "resolv.conf": "nameserver 10.0.2.3\n",
        ]
        for (name, text) in files {
            try text.write(toFile: etcDirectory + "/" + name, atomically: true, encoding: .utf8)
            chmod(etcDirectory + "/" + name, 0o644)
        }
        chmod(etcDirectory, 0o755)
    }

    /// Images of `CustomContainer` pools, by pool name (resolved from the image store at start).
    private let images = Mutex<[String: ContainerImage]>([:])

    /// Gives a `CustomContainer` pool its resolved image.
    public func register(image: ContainerImage, forPool pool: String) {
        images.withLock { $0[pool] = image }
    }

    func image(forPool pool: String) -> ContainerImage? {
        images.withLock { $0[pool] }
    }

    /// Checks that this host can run the pool: its runtime exists, and egress can be set up.
    public func validate(_ pool: PoolConfiguration) throws(SandpiperError) {
        if pool.type == .customContainer {
            // The gVisor tier runs containers with runsc (checked below), the namespace tier with crun.
            guard pool.isolation == .gvisor || access(configuration.crun, X_OK) == 0 else {
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxBackendUnavailable",
                    "pool '\(pool.name)' is CustomContainer but crun is not installed at \(configuration.crun); "
                        + "run `make setup` (apt-get install crun)"
                )
            }
            guard image(forPool: pool.name) != nil else {
                throw SandpiperError(
                    .unavailable,
                    code: "ContainerImageNotFound",
                    "pool '\(pool.name)': its image is not resolved"
                )
            }
        }
        if pool.type == .nodeLTS, access("/usr/bin/node", X_OK) != 0 {
            throw SandpiperError(
                .unavailable,
                code: "SandboxBackendUnavailable",
                "pool '\(pool.name)' is NodeLTS but /usr/bin/node is not installed; run `make setup`"
            )
        }
        if pool.isolation == .gvisor {
            if let reason = Self.gvisorUnavailableReason(runsc: configuration.runsc) {
                throw SandpiperError(
                    .unavailable,
                    code: "IsolationTierUnavailable",
                    "pool '\(pool.name)' asks for isolation gvisor, which this host cannot run: \(reason)"
                )
            }
        }
        if pool.egressEnabled { try checkEgressSupport() }
    }

    /// Why gVisor cannot run here, or nil when a trial sandbox ran (`runsc do /bin/true`).
    public static func gvisorUnavailableReason(runsc: String = "/usr/bin/runsc") -> String? {
        guard access(runsc, X_OK) == 0 else {
            return "runsc is not installed at \(runsc) (apt-get install runsc, or `make setup`)"
        }
        guard geteuid() == 0 else { return "runsc must be started as root" }
        let root = "/tmp/sandpiper-runsc-probe-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: root) }
        let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(devNull) }
        guard
            let pid = try? ChildProcess.spawn(
                executable: runsc,
                arguments: ["--root", root, "--platform=ptrace", "--network=none", "do", "/bin/true"],
                fds: [devNull, devNull, devNull]
            )
        else { return "runsc could not be started" }
        var status: Int32 = 0
        for _ in 0..<300 {
            if waitpid(pid, &status, WNOHANG) == pid {
                return status == 0 ? nil : "a trial `runsc --platform=ptrace do /bin/true` failed (status \(status))"
            }
            usleep(20_000)
        }
        kill(pid, SIGKILL)
        waitpid(pid, &status, 0)
        return "a trial `runsc --platform=ptrace do /bin/true` did not finish in 6 s"
    }

    /// Egress needs slirp4netns and a /dev/net/tun that unprivileged users may open (mode 0666,
    /// the default on Debian and Ubuntu; `make setup` sets it).
    public func checkEgressSupport() throws(SandpiperError) {
        guard access(configuration.slirp4netns, X_OK) == 0 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxBackendUnavailable",
                "a pool enables egress but slirp4netns is not installed at \(configuration.slirp4netns); run `make setup`"
            )
        }
        var info = stat()
        guard stat("/dev/net/tun", &info) == 0, info.st_mode & 0o006 == 0o006 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxBackendUnavailable",
                "a pool enables egress but /dev/net/tun is missing or not usable by unprivileged users; "
                    + "run `chmod 0666 /dev/net/tun` (the usual mode) or `make setup`"
            )
        }
    }

    // MARK: UIDs

    func allocateUID() throws(SandpiperError) -> UInt32 {
        let range = configuration.uidRange
        let uid: UInt32? = usedUIDs.withLock { used in
            guard let free = range.first(where: { !used.contains($0) }) else { return nil }
            used.insert(free)
            return free
        }
        guard let uid else {
            throw SandpiperError(.unavailable, "no free sandbox uid left in \(range.lowerBound)...\(range.upperBound)")
        }
        return uid
    }

    func releaseUID(_ uid: UInt32) {
        _ = usedUIDs.withLock { $0.remove(uid) }
    }

    /// `count` consecutive free uids (a fork template's), returning the first.
    func allocateUIDBlock(count: UInt32) throws(SandpiperError) -> UInt32 {
        let range = configuration.uidRange
        let base: UInt32? = usedUIDs.withLock { used in
            var start = range.lowerBound
            while start + count - 1 <= range.upperBound {
                if let taken = (start..<(start + count)).last(where: { used.contains($0) }) {
                    start = taken + 1
                    continue
                }
                for uid in start..<(start + count) { used.insert(uid) }
                return start
            }
            return nil
        }
        guard let base else {
            throw SandpiperError(.unavailable, "no \(count) consecutive free sandbox uids left in \(range)")
        }
        return base
    }

    func releaseUIDBlock(base: UInt32, count: UInt32) {
        usedUIDs.withLock { used in
            for uid in base..<(base + count) { used.remove(uid) }
        }
    }

    /// The warm template of each fork pool (one per distinct pool configuration), made on first use.
    private let templates = Mutex<[ForkTemplate]>([])

    func template(for pool: PoolConfiguration) -> ForkTemplate {
        templates.withLock { templates in
            if let template = templates.first(where: { $0.pool == pool }) { return template }
            let template = ForkTemplate(pool: pool, backend: self)
            templates.append(template)
            return template
        }
    }

    // MARK: SandboxBackend

    public func launch(_ spec: SandboxSpec) async throws -> any Sandbox {
        if spec.pool.type == .customContainer {
            return try await ContainerSandbox.launch(spec: spec, backend: self)
        }
        if spec.pool.forks {
            let template = template(for: spec.pool)
            // A template (or forker) found dead is restarted for this very launch; a launch that
            // raced another's restart tries once more.
            for attempt in 0..<3 where await template.available {
                do {
                    return try await NamespaceSandbox.launchForked(spec: spec, backend: self, template: template)
                } catch let error as SandpiperError where error.code == ForkTemplate.goneCode && attempt < 2 {
                    continue
                } catch let error as SandpiperError where error.code == ForkTemplate.unavailableCode {
                    logger.warning(
                        "fork template unavailable; starting this session with exec",
                        metadata: ["pool": "\(spec.pool.name)", "error": "\(error.message)"]
                    )
                    break
                }
            }
        }
        return try await NamespaceSandbox.launch(spec: spec, backend: self)
    }

    /// Forked launches spend most of their time waiting (each forker forks one session at a
    /// time; a session sets itself up in a few ms): more of them overlap. Exec launches keep two.
    public func refillParallelism(for pool: PoolConfiguration) async -> Int {
        guard pool.forks else { return 2 }
        return await template(for: pool).available ? 6 : 2
    }

    /// Stops the fork templates and removes this server's (now empty) parent cgroups.
    public func shutdown() async {
        let all = templates.withLock { templates in
            defer { templates = [] }
            return templates
        }
        for template in all { await template.stop() }
        for base in cgroups.bases.values { rmdir(base) }
    }

    public func cleanupLeftovers() async {
        var cleaned = 0
        let known = (try? await records.records(backend: Self.name)) ?? []
        for record in known {
            // A pid from an earlier run is not our child; only the kill matters here.
            removeTraces(
                id: record.id,
                children: [],
                directory: record.directory,
                cgroupDirectories: record.cgroupDirectories
            )
            try? await records.removeRecord(id: record.id)
            cleaned += 1
        }
        // Belt and braces: groups and directories no record mentions (a lost or foreign state file).
        for id in cgroups.leftoverSandboxIDs() {
            cgroups.killAndRemove(sandboxID: id)
            cleaned += 1
        }
        if let entries = try? FileManager.default.contentsOfDirectory(atPath: sessionsDirectory) {
            for entry in entries {
                removeTraces(id: entry, children: [], directory: sessionsDirectory + "/" + entry, cgroupDirectories: [])
                cleaned += 1
            }
        }
        if cleaned > 0 {
            logger.notice("removed sandboxes left by an earlier run", metadata: ["count": "\(cleaned)"])
        }
    }

    /// Kills processes, removes cgroups, unmounts and deletes the sandbox directory.
    /// `children` are our own child processes of the sandbox; returns those not reaped yet,
    /// which the caller must wait for.
    @discardableResult
    func removeTraces(id: String, children: [pid_t], directory: String, cgroupDirectories: [String]) -> [pid_t] {
        var unreaped = children
        for child in children { kill(child, SIGKILL) }
        cgroups.killAndRemove(sandboxID: id) {
            unreaped.removeAll { ChildProcess.reapIfExited($0) }
        }
        // Groups recorded under another parent (the server may run in another cgroup now).
        for dir in cgroupDirectories where !cgroups.directories(for: id).contains(dir) {
            for round in 0..<200 {
                let pids = SystemFile.pids(dir + "/cgroup.procs")  // empty too when the group is gone
                if pids.isEmpty { break }
                for pid in pids { kill(pid, SIGKILL) }
                usleep(round < 10 ? 1000 : 10_000)
            }
            rmdir(dir)
        }
        // /mnt/data (agents) or the overlay root (custom containers).
        for mountPoint in [directory + "/data", directory + "/rootfs"] {
            for _ in 0..<3 {
                if umount2(mountPoint, Int32(MNT_DETACH)) != 0 { break }
            }
        }
        try? FileManager.default.removeItem(atPath: directory)
        return unreaped
    }
}
