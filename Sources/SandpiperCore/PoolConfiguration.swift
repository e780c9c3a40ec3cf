/// The kind of sessions a pool serves (Azure's `containerType`).
public enum PoolType: String, Sendable, Codable, CaseIterable {
    /// Stateful IPython kernel.
    case pythonLTS = "PythonLTS"
    /// Stateful JavaScript on Node.js.
    case nodeLTS = "NodeLTS"
    /// A persistent bash.
    case shell = "Shell"
    /// The user's own OCI image serving HTTP; requests are proxied to it (`container` in the pool).
    case customContainer = "CustomContainer"

    /// Accepts any casing, as Azure does for enum values.
    public init(caseInsensitive raw: String) throws(SandpiperError) {
        guard let match = Self.allCases.first(where: { $0.rawValue.lowercased() == raw.lowercased() }) else {
            throw SandpiperError.invalid(
                "unknown pool type '\(raw)'; valid types: \(Self.allCases.map(\.rawValue).joined(separator: ", "))",
                code: "SessionTypeNotSupported"
            )
        }
        self = match
    }
}

/// How strongly a pool's sessions are walled off from the host.
public enum IsolationTier: String, Sendable, Codable, CaseIterable {
    /// Linux namespaces, seccomp and cgroups around a process on the host kernel (bubblewrap).
    case namespaces
    /// gVisor: a user-space kernel (runsc, ptrace platform) between the session and the host.
    case gvisor

    public init(caseInsensitive raw: String) throws(SandpiperError) {
        guard let match = Self.allCases.first(where: { $0.rawValue == raw.lowercased() }) else {
            throw SandpiperError.invalid(
                "unknown isolation '\(raw)'; valid: \(Self.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
        self = match
    }
}

/// How a pool starts its sessions.
public enum LaunchMode: String, Sendable, Codable, CaseIterable {
    /// A warm template process forks each session (Python pools on the namespace tier without
    /// egress); other pools, or a host where the template cannot run, use `exec`.
    case fork
    /// A fresh sandbox and interpreter per session.
    case exec

    public init(caseInsensitive raw: String) throws(SandpiperError) {
        guard let match = Self.allCases.first(where: { $0.rawValue == raw.lowercased() }) else {
            throw SandpiperError.invalid(
                "unknown launch '\(raw)'; valid: \(Self.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
        self = match
    }
}

/// Resource limits applied to every session of a pool.
public struct SessionLimits: Sendable, Equatable, Codable {
    /// Memory (RSS + tmpfs pages of /tmp) in bytes; the sandbox is OOM-killed above it.
    public var memoryBytes: Int64
    /// CPU quota in cores (0.5 = half a core).
    public var cpus: Double
    /// Maximum number of processes and threads.
    public var pids: Int
    /// Size of the session's `/mnt/data` in bytes.
    public var diskBytes: Int64
    /// Size of the session's private `/tmp` in bytes.
    public var tmpBytes: Int64

    public init(
        memoryBytes: Int64 = 1 << 30,
        cpus: Double = 1,
        pids: Int = 128,
        diskBytes: Int64 = 1 << 30,
        tmpBytes: Int64 = 256 << 20
    ) {
        self.memoryBytes = memoryBytes
        self.cpus = cpus
        self.pids = pids
        self.diskBytes = diskBytes
        self.tmpBytes = tmpBytes
    }
}

/// One session pool, as defined in the config file (names follow Azure's ARM properties).
public struct PoolConfiguration: Sendable, Equatable {
    public var name: String
    public var type: PoolType
    /// Sandboxes kept started and waiting for a new identifier.
    public var readySessionInstances: Int
    /// Live sessions at most; the next new identifier gets `SessionPoolMaxSessionsReached`.
    public var maxConcurrentSessions: Int
    /// Idle seconds after which a session is destroyed; every call resets the clock.
    public var cooldownPeriodInSeconds: Int
    /// Outbound network for sessions. Off: loopback only.
    public var egressEnabled: Bool
    /// The isolation tier the pool's sandboxes run in.
    public var isolation: IsolationTier
    /// `fork` (the default) or `exec`; see `LaunchMode` and `forks`.
    public var launch: LaunchMode
    public var limits: SessionLimits
    /// Upper bound for one execution, whatever the caller asks (Azure: 220 s).
    public var maxExecutionSeconds: Int
    /// Used when the caller sends no `timeoutInSeconds`.
    public var defaultExecutionSeconds: Int
    /// Largest accepted upload in bytes (Azure: 128 MB).
    public var maxUploadBytes: Int64
    /// The container of a `CustomContainer` pool (nil for every other type).
    public var container: ContainerTemplate?

    public init(
        name: String,
        type: PoolType = .pythonLTS,
        readySessionInstances: Int = 2,
        maxConcurrentSessions: Int = 20,
        cooldownPeriodInSeconds: Int = 300,
        egressEnabled: Bool = false,
        isolation: IsolationTier = .namespaces,
        launch: LaunchMode = .fork,
        limits: SessionLimits = SessionLimits(),
        maxExecutionSeconds: Int = 220,
        defaultExecutionSeconds: Int = 220,
        maxUploadBytes: Int64 = 128 * 1024 * 1024,
        container: ContainerTemplate? = nil
    ) {
        self.container = container
        self.name = name
        self.type = type
        self.readySessionInstances = readySessionInstances
        self.maxConcurrentSessions = maxConcurrentSessions
        self.cooldownPeriodInSeconds = cooldownPeriodInSeconds
        self.egressEnabled = egressEnabled
        self.isolation = isolation
        self.launch = launch
        self.limits = limits
        self.maxExecutionSeconds = maxExecutionSeconds
        self.defaultExecutionSeconds = defaultExecutionSeconds
        self.maxUploadBytes = maxUploadBytes
    }

    /// True when sessions are forked from a warm template: asked for, and possible for this pool
    /// (Python, namespace tier, no egress). Everything else starts a fresh sandbox per session.
    public var forks: Bool {
        launch == .fork && container == nil && type == .pythonLTS && isolation == .namespaces && !egressEnabled
    }

    /// Pool names appear in URLs and in cgroup names: keep them boring.
    public static func validateName(_ name: String) throws(SandpiperError) {
        let allowed = name.utf8.allSatisfy { byte in
            (0x61...0x7A).contains(byte) || (0x30...0x39).contains(byte) || byte == UInt8(ascii: "-")
                || byte == UInt8(ascii: "_")
        }
        guard !name.isEmpty, name.utf8.count <= 63, allowed else {
            throw SandpiperError.invalid(
                "pool name '\(name)' must be 1-63 characters of lowercase letters, digits, '-' or '_'"
            )
        }
    }

    /// Checks every field; the message names the pool and the field.
    public func validate() throws(SandpiperError) {
        try Self.validateName(name)
        func fail(_ text: String) -> SandpiperError { .invalid("pool '\(name)': \(text)") }
        guard readySessionInstances >= 0, readySessionInstances <= 1000 else {
            throw fail("readySessionInstances must be between 0 and 1000")
        }
        guard maxConcurrentSessions >= 1, maxConcurrentSessions <= 10_000 else {
            throw fail("maxConcurrentSessions must be between 1 and 10000")
        }
        guard cooldownPeriodInSeconds >= 1, cooldownPeriodInSeconds <= 86_400 else {
            throw fail("cooldownPeriodInSeconds must be between 1 and 86400")
        }
        guard maxExecutionSeconds >= 1, maxExecutionSeconds <= 3600 else {
            throw fail("maxExecutionSeconds must be between 1 and 3600")
        }
        guard defaultExecutionSeconds >= 1, defaultExecutionSeconds <= maxExecutionSeconds else {
            throw fail("defaultExecutionSeconds must be between 1 and maxExecutionSeconds")
        }
        guard limits.memoryBytes >= 64 << 20 else { throw fail("memory must be at least 64 MiB") }
        guard limits.cpus > 0, limits.cpus <= 64 else { throw fail("cpus must be in (0, 64]") }
        guard limits.pids >= 8, limits.pids <= 100_000 else { throw fail("pids must be between 8 and 100000") }
        guard limits.diskBytes >= 1 << 20 else { throw fail("disk must be at least 1 MiB") }
        guard limits.tmpBytes >= 1 << 20 else { throw fail("tmp must be at least 1 MiB") }
        guard maxUploadBytes >= 1 else { throw fail("maxUploadBytes must be positive") }
        if type == .customContainer {
            guard let container else {
                throw fail("type CustomContainer needs a 'container' object (image, targetPort, ...)")
            }
            do {
                try container.validate()
            } catch {
                throw fail(error.message)
            }
        } else if container != nil {
            throw fail("'container' is only valid for type CustomContainer")
        }
    }
}
