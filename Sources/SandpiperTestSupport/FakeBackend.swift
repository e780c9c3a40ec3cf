import Foundation
import SandpiperCore
import Synchronization

/// An in-memory backend for unit tests of pools, sessions and the HTTP layer. Its sandboxes
/// "execute" by echoing the code (or failing on demand) and keep files in a dictionary.
public final class FakeBackend: SandboxBackend {
    public struct Counters: Sendable {
        public var launched = 0
        public var destroyed = 0
        public var cleanups = 0
    }

    private let state = Mutex(Counters())
    private let failLaunches = Mutex(false)
    private let launchDelay: Duration
    private let prewarmDelay: Duration
    public let sandboxes = Mutex<[FakeSandbox]>([])

    public init(launchDelay: Duration = .zero, prewarmDelay: Duration = .zero) {
        self.launchDelay = launchDelay
        self.prewarmDelay = prewarmDelay
    }

    public var counters: Counters { state.withLock { $0 } }

    public func setFailing(_ failing: Bool) {
        failLaunches.withLock { $0 = failing }
    }

    public func launch(_ spec: SandboxSpec) async throws -> any Sandbox {
        if launchDelay > .zero { try await Task.sleep(for: launchDelay) }
        if failLaunches.withLock({ $0 }) {
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "fake launch failure")
        }
        let sandbox = FakeSandbox(id: spec.id) { [weak self] in
            self?.state.withLock { $0.destroyed += 1 }
        }
        sandbox.prewarmDelay.withLock { $0 = prewarmDelay }
        state.withLock { $0.launched += 1 }
        sandboxes.withLock { $0.append(sandbox) }
        return sandbox
    }

    public func cleanupLeftovers() async {
        state.withLock { $0.cleanups += 1 }
    }

    public func shutdown() async {}
}

public final class FakeSandbox: Sandbox {
    public let id: String
    private let onDestroy: @Sendable () -> Void
    private let alive = Mutex(true)
    private let destroyedFlag = Mutex(false)
    private let files = Mutex<[String: (bytes: [UInt8], modified: Date)]>([:])
    public let executions = Mutex<[ExecutionRequest]>([])
    /// How many times the pool prewarmed it; `prewarmDelay` is how long each takes.
    public let prewarms = Mutex(0)
    public let prewarmDelay = Mutex<Duration>(.zero)

    init(id: String, onDestroy: @escaping @Sendable () -> Void) {
        self.id = id
        self.onDestroy = onDestroy
    }

    public var isAlive: Bool { alive.withLock { $0 } }
    public var isDestroyed: Bool { destroyedFlag.withLock { $0 } }

    public func prewarm() async {
        prewarms.withLock { $0 += 1 }
        let delay = prewarmDelay.withLock { $0 }
        if delay > .zero { try? await Task.sleep(for: delay) }
    }

    /// Simulates the guest dying on its own.
    public func kill() { alive.withLock { $0 = false } }

    /// `sleep:<seconds>` waits; `fail` fails; `crash` kills the guest; `exit:<n>` ends like a
    /// shell command with status n; anything else echoes.
    public func execute(_ request: ExecutionRequest) async throws -> ExecutionOutcome {
        guard isAlive else {
            throw SandpiperError(.sandboxFailure, code: "SessionAgentFailure", "fake sandbox is dead")
        }
        executions.withLock { $0.append(request) }
        if request.code.hasPrefix("sleep:"), let seconds = Double(request.code.dropFirst(6)) {
            try await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
        }
        if request.code.hasPrefix("exit:"), let code = Int(request.code.dropFirst(5)) {
            return ExecutionOutcome(
                status: code == 0 ? .success : .failure,
                stdout: request.stdin ?? "",
                exitCode: code
            )
        }
        switch request.code {
        case "fail":
            return ExecutionOutcome(status: .failure, stderr: "Traceback: fake failure\n")
        case "crash":
            kill()
            throw SandpiperError(.sandboxFailure, code: "SessionAgentFailure", "fake agent died")
        default:
            return ExecutionOutcome(
                status: .success,
                stdout: "ran: \(request.code)\n",
                result: .integer(Int64(request.code.count)),
                jupyterResult: "\(request.code.count)",
                durationMilliseconds: 1.4
            )
        }
    }

    public func listFiles(in directory: SessionFilePath, recursive: Bool) async throws -> [FileEntry] {
        let prefix = directory.isRoot ? "" : directory.relative + "/"
        return files.withLock { files in
            files.filter { $0.key.hasPrefix(prefix) }
                .map { key, value in
                    FileEntry(
                        path: SessionFilePath(components: key.split(separator: "/").map(String.init)),
                        isDirectory: false,
                        size: Int64(value.bytes.count),
                        modified: value.modified
                    )
                }
                .sorted { $0.path.relative < $1.path.relative }
        }
    }

    public func fileInfo(_ path: SessionFilePath) async throws -> FileEntry {
        guard let file = files.withLock({ $0[path.relative] }) else {
            throw SandpiperError.notFound("file '\(path)' was not found in /mnt/data", code: "FileNotFound")
        }
        return FileEntry(path: path, isDirectory: false, size: Int64(file.bytes.count), modified: file.modified)
    }

    public func openFile(_ path: SessionFilePath) async throws -> any SandboxFileReader {
        guard let file = files.withLock({ $0[path.relative] }) else {
            throw SandpiperError.notFound("file '\(path)' was not found in /mnt/data", code: "FileNotFound")
        }
        return FakeReader(bytes: file.bytes)
    }

    public func createFile(_ path: SessionFilePath) async throws -> any SandboxFileWriter {
        FakeWriter(path: path) { bytes in
            self.files.withLock { $0[path.relative] = (bytes, Date()) }
        }
    }

    public func deleteFile(_ path: SessionFilePath) async throws {
        let removed = files.withLock { $0.removeValue(forKey: path.relative) }
        guard removed != nil else {
            throw SandpiperError.notFound("file '\(path)' was not found in /mnt/data", code: "FileNotFound")
        }
    }

    public func describeRuntime() async throws -> RuntimeDescription {
        RuntimeDescription(
            runtime: .init(name: "python", version: "3.11.2"),
            packages: [.init(name: "numpy", version: "2.4.6"), .init(name: "pandas", version: "3.1.1")]
        )
    }

    public func fileBytes(_ relative: String) -> [UInt8]? {
        files.withLock { $0[relative]?.bytes }
    }

    public func destroy() async {
        let first = destroyedFlag.withLock { done in
            defer { done = true }
            return !done
        }
        alive.withLock { $0 = false }
        if first { onDestroy() }
    }
}

final class FakeReader: SandboxFileReader {
    private let remaining: Mutex<ArraySlice<UInt8>>
    let size: Int64

    init(bytes: [UInt8]) {
        remaining = Mutex(bytes[...])
        size = Int64(bytes.count)
    }

    func read(maxBytes: Int) async throws -> [UInt8] {
        remaining.withLock { rest in
            let chunk = rest.prefix(maxBytes)
            rest = rest.dropFirst(chunk.count)
            return Array(chunk)
        }
    }

    func close() {}
}

final class FakeWriter: SandboxFileWriter {
    private let buffer = Mutex<[UInt8]>([])
    private let path: SessionFilePath
    private let commit: @Sendable ([UInt8]) -> Void

    init(path: SessionFilePath, commit: @escaping @Sendable ([UInt8]) -> Void) {
        self.path = path
        self.commit = commit
    }

    func write(_ bytes: [UInt8]) async throws {
        buffer.withLock { $0 += bytes }
    }

    func finish() async throws -> FileEntry {
        let bytes = buffer.withLock { $0 }
        commit(bytes)
        return FileEntry(path: path, isDirectory: false, size: Int64(bytes.count), modified: Date())
    }

    func abort() async {}
}
