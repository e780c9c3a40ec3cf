import struct Foundation.Date

/// What a backend must remember about a running sandbox to remove it after a crash of the
/// server: its processes' cgroups, its mounts and its directory. Written before the sandbox
/// starts, deleted after it is gone.
public struct SandboxRecord: Codable, Sendable, Equatable {
    public var id: String
    public var pool: String
    public var backend: String
    public var pid: Int32
    public var uid: UInt32
    public var directory: String
    public var cgroupDirectories: [String]
    public var createdAt: Date

    public init(
        id: String,
        pool: String,
        backend: String,
        pid: Int32 = 0,
        uid: UInt32,
        directory: String,
        cgroupDirectories: [String],
        createdAt: Date
    ) {
        self.id = id
        self.pool = pool
        self.backend = backend
        self.pid = pid
        self.uid = uid
        self.directory = directory
        self.cgroupDirectories = cgroupDirectories
        self.createdAt = createdAt
    }
}

/// Durable store of sandbox records (SQLite in the server; in memory in tests).
public protocol SandboxRecordStore: Sendable {
    func save(_ record: SandboxRecord) async throws
    func removeRecord(id: String) async throws
    func records(backend: String) async throws -> [SandboxRecord]
}

/// A store that forgets everything when the process ends (tests, and `--ephemeral`).
public actor InMemorySandboxRecordStore: SandboxRecordStore {
    private var stored: [String: SandboxRecord] = [:]

    public init() {}

    public func save(_ record: SandboxRecord) { stored[record.id] = record }
    public func removeRecord(id: String) { stored[id] = nil }
    public func records(backend: String) -> [SandboxRecord] {
        stored.values.filter { $0.backend == backend }.sorted { $0.createdAt < $1.createdAt }
    }
}
