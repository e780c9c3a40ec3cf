import struct Foundation.Date

/// What a caller asks a session to run.
public struct ExecutionRequest: Sendable, Equatable {
    public var code: String
    /// Wall-clock budget; the guest interrupts the code when it runs out.
    public var timeoutSeconds: Double
    /// Cap for each of stdout and stderr, in bytes.
    public var outputLimit: Int
    /// Standard input for a shell command (Shell pools); nil means /dev/null.
    public var stdin: String?

    public init(code: String, timeoutSeconds: Double, outputLimit: Int, stdin: String? = nil) {
        self.code = code
        self.timeoutSeconds = timeoutSeconds
        self.outputLimit = outputLimit
        self.stdin = stdin
    }
}

/// What came of an execution. User code failing is an outcome (`status == .failure`), not an error.
public struct ExecutionOutcome: Sendable, Equatable {
    public enum Status: String, Sendable, Equatable {
        case success = "Success"
        case failure = "Failure"
    }

    public var status: Status
    public var stdout: String
    public var stderr: String
    /// A JSON primitive, the text repr of a richer value, or an image object.
    public var result: JSONValue
    /// The Jupyter `text/plain` repr of the value ("" when none).
    public var jupyterResult: String
    public var timedOut: Bool
    public var durationMilliseconds: Double
    public var stdoutTruncated: Bool
    public var stderrTruncated: Bool
    /// A shell command's exit status (Shell pools); nil for interpreters.
    public var exitCode: Int?

    public init(
        status: Status,
        stdout: String = "",
        stderr: String = "",
        result: JSONValue = .string(""),
        jupyterResult: String = "",
        timedOut: Bool = false,
        durationMilliseconds: Double = 0,
        stdoutTruncated: Bool = false,
        stderrTruncated: Bool = false,
        exitCode: Int? = nil
    ) {
        self.exitCode = exitCode
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.result = result
        self.jupyterResult = jupyterResult
        self.timedOut = timedOut
        self.durationMilliseconds = durationMilliseconds
        self.stdoutTruncated = stdoutTruncated
        self.stderrTruncated = stderrTruncated
    }
}

/// A file or directory in a session's `/mnt/data`.
public struct FileEntry: Sendable, Equatable {
    public var path: SessionFilePath
    public var isDirectory: Bool
    public var size: Int64
    public var modified: Date

    public init(path: SessionFilePath, isDirectory: Bool, size: Int64, modified: Date) {
        self.path = path
        self.isDirectory = isDirectory
        self.size = size
        self.modified = modified
    }
}

/// What a session's runtime reports about itself (for the pool's `metadata`).
public struct RuntimeDescription: Sendable, Equatable {
    public struct Package: Sendable, Equatable {
        public var name: String
        public var version: String

        public init(name: String, version: String) {
            self.name = name
            self.version = version
        }
    }

    public var runtime: Package
    public var packages: [Package]

    public init(runtime: Package, packages: [Package]) {
        self.runtime = runtime
        self.packages = packages
    }
}

/// Reads one file of a session in chunks. Close it when done; closing twice is fine.
public protocol SandboxFileReader: Sendable {
    var size: Int64 { get }
    /// Up to `maxBytes`; an empty array at the end of the file.
    func read(maxBytes: Int) async throws -> [UInt8]
    func close()
}

/// Writes one file of a session. `finish()` makes it visible under its name; `abort()` (or
/// dropping it without finishing) leaves nothing behind.
public protocol SandboxFileWriter: Sendable {
    func write(_ bytes: [UInt8]) async throws
    func finish() async throws -> FileEntry
    func abort() async
}

/// One isolated sandbox running a guest agent. Implementations: the namespace backend
/// (bubblewrap) here; gVisor and microVMs later, behind the same protocol.
public protocol Sandbox: AnyObject, Sendable {
    /// Unique id of this sandbox (not the caller's identifier).
    var id: String { get }
    /// False once the guest has died or the sandbox was destroyed.
    var isAlive: Bool { get }

    /// Runs code in the guest. Throws `sandboxFailure` when the guest dies or stops answering;
    /// the sandbox is unusable afterwards.
    func execute(_ request: ExecutionRequest) async throws -> ExecutionOutcome

    func listFiles(in directory: SessionFilePath, recursive: Bool) async throws -> [FileEntry]
    func fileInfo(_ path: SessionFilePath) async throws -> FileEntry
    func openFile(_ path: SessionFilePath) async throws -> any SandboxFileReader
    /// Creates or replaces a file. Parent directories are created.
    func createFile(_ path: SessionFilePath) async throws -> any SandboxFileWriter
    func deleteFile(_ path: SessionFilePath) async throws

    /// The runtime and its preinstalled packages, as the guest itself reports them.
    func describeRuntime() async throws -> RuntimeDescription

    /// Stops everything and removes every trace (processes, mounts, cgroups, files).
    /// Idempotent.
    func destroy() async

    /// Work that makes the first call faster but is not needed to serve it (a forked Python
    /// session rehearses a cell: the copy-on-write faults of a first cell). The pool runs it on
    /// its ready sandboxes once it has nothing left to launch, one at a time, so refilling goes
    /// first. Returns at once when there is nothing to do; errors are the sandbox's to log.
    func prewarm() async
}

extension Sandbox {
    public func prewarm() async {}
}

/// What a backend needs to start a sandbox for a pool.
public struct SandboxSpec: Sendable {
    public var id: String
    public var pool: PoolConfiguration

    public init(id: String, pool: PoolConfiguration) {
        self.id = id
        self.pool = pool
    }
}

/// Starts sandboxes. One instance serves every pool of its kind.
public protocol SandboxBackend: Sendable {
    /// Starts a sandbox and waits until its guest is ready to execute.
    func launch(_ spec: SandboxSpec) async throws -> any Sandbox
    /// Removes whatever an earlier run of the server left behind.
    func cleanupLeftovers() async
    /// Called once every sandbox is destroyed, as the server stops.
    func shutdown() async
    /// How many launches for `pool` may be in flight at once while its ready queue refills.
    func refillParallelism(for pool: PoolConfiguration) async -> Int
}

extension SandboxBackend {
    /// Two: a launch that starts an interpreter keeps a core busy for its whole start.
    public func refillParallelism(for pool: PoolConfiguration) async -> Int { 2 }
}

/// A sandbox that runs a custom container serving HTTP (`CustomContainer` pools): the HTTP layer
/// proxies requests to it over connections made inside the session's network namespace.
public protocol ContainerEndpoint: Sendable {
    /// The port the container serves on (inside its own network namespace).
    var targetPort: Int { get }
    /// A new TCP connection to the container's `targetPort`; the caller owns the descriptor.
    /// Throws `sandboxFailure` (`ContainerUnreachable`) when nothing accepts it and `timeout`
    /// when the connection does not complete in time.
    func connect(timeout: Duration) async throws -> Int32
    /// Runs `action` once when the container is destroyed (at once when it already is), so that
    /// long-lived connections to it (relayed WebSockets) end with their session. The returned
    /// closure drops `action` again, for connections that end first.
    func onDestroy(_ action: @escaping @Sendable () -> Void) -> @Sendable () -> Void
}
