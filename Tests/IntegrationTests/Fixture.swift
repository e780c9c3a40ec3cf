import Foundation
import Logging
import SandpiperCore
import SandpiperSessions
import Testing

@testable import SandpiperSandbox

/// Integration tests start real bubblewrap sandboxes with the real Python runtime. They run
/// when SANDPIPER_INTEGRATION=1 (as `make test` sets it); then a missing prerequisite fails
/// the test instead of skipping it.
let integrationEnabled = ProcessInfo.processInfo.environment["SANDPIPER_INTEGRATION"] == "1"

/// An isolation tier and, for Python on the namespace tier, how sessions start.
struct Tier: Sendable, Equatable, CustomTestStringConvertible {
    let isolation: IsolationTier
    let launch: LaunchMode

    static let namespaces = Tier(isolation: .namespaces, launch: .exec)
    static let forked = Tier(isolation: .namespaces, launch: .fork)
    static let gvisor = Tier(isolation: .gvisor, launch: .exec)

    var testDescription: String { launch == .fork ? "namespaces (forked)" : isolation.rawValue }
}

/// Every tier this host can run: the suites below run against each (a matrix, not a copy).
/// With SANDPIPER_REQUIRE_GVISOR=1 a host without gVisor fails instead of testing one tier.
/// `forked` only changes Python pools (others always exec).
let tiers: [Tier] = {
    if NamespaceBackend.gvisorUnavailableReason() == nil
        || ProcessInfo.processInfo.environment["SANDPIPER_REQUIRE_GVISOR"] == "1"
    {
        return [.forked, .namespaces, .gvisor]
    }
    return [.forked, .namespaces]
}()

let pythonRuntime =
    ProcessInfo.processInfo.environment["SANDPIPER_PYTHON_RUNTIME"] ?? "/var/lib/sandpiper/runtimes/python"

/// One backend with its own state directory and uid range, torn down after the test.
final class Fixture: Sendable {
    let stateDirectory: String
    let backend: NamespaceBackend
    let records: InMemorySandboxRecordStore
    /// Warnings and errors of the backend (a fork template falling back to exec, ...) on stderr.
    let logger = Logger(
        label: "integration",
        factory: { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = .warning
            return handler
        }
    )

    init(
        records: InMemorySandboxRecordStore = InMemorySandboxRecordStore(),
        stateDirectory: String? = nil,
        templateStartupTimeout: Duration = .seconds(60),
        wideUIDRange: Bool = false
    ) throws {
        self.stateDirectory = stateDirectory ?? "/tmp/sandpiper-it-" + UUID().uuidString.prefix(8).lowercased()
        self.records = records
        // 100 uids from 300,000-339,999, or 1,000 from 250,000-259,999 for a full-size pool.
        let base =
            wideUIDRange ? UInt32.random(in: 0..<10) * 1000 + 250_000 : UInt32.random(in: 0..<400) * 100 + 300_000
        let count: UInt32 = wideUIDRange ? 1000 : 100
        backend = try NamespaceBackend(
            configuration: .init(
                stateDirectory: self.stateDirectory,
                pythonRuntime: pythonRuntime,
                agentsDirectory: NamespaceBackend.bundledAgentsDirectory,
                uidRange: base...(base + count - 1),
                templateStartupTimeout: templateStartupTimeout
            ),
            records: records,
            logger: logger
        )
    }

    static func pool(
        name: String = "it",
        memory: Int64 = 512 << 20,
        pids: Int = 64,
        disk: Int64 = 64 << 20,
        egress: Bool = false,
        cooldown: Int = 300,
        tier: Tier = .namespaces
    ) -> PoolConfiguration {
        PoolConfiguration(
            name: name,
            readySessionInstances: 0,
            maxConcurrentSessions: 10,
            cooldownPeriodInSeconds: cooldown,
            egressEnabled: egress,
            isolation: tier.isolation,
            launch: tier.launch,
            limits: SessionLimits(memoryBytes: memory, cpus: 1, pids: pids, diskBytes: disk, tmpBytes: 64 << 20)
        )
    }

    func launch(_ pool: PoolConfiguration = Fixture.pool()) async throws -> NamespaceSandbox {
        let sandbox = try await backend.launch(SandboxSpec(id: UUID().uuidString.lowercased(), pool: pool))
        let launched = try #require(sandbox as? NamespaceSandbox)
        // The forked tier must really fork: a silent fall-back to exec would test the wrong thing.
        #expect(launched.forked == pool.forks, "forked: \(launched.forked), pool forks: \(pool.forks)")
        return launched
    }

    /// Processes still running as one of this fixture's uids.
    func processes(uid: UInt32) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return false }
            return status.split(separator: "\n").contains {
                $0.hasPrefix("Uid:") && $0.split(separator: "\t").dropFirst().first == Substring("\(uid)")
            }
        }
    }

    /// Processes whose command line names `text` (gVisor's runsc processes carry the sandbox id).
    func processes(commandContaining text: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { Int32($0) }.filter { pid in
            guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
            return String(decoding: data, as: UTF8.self).contains(text)
        }
    }

    func mounts(under path: String) -> [String] {
        let text = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { return nil }
            let point = String(fields[4])
            return point.hasPrefix(path) ? point : nil
        }
    }

    /// Asserts that nothing of the sandbox is left on the host.
    func expectNoTraces(of sandbox: NamespaceSandbox, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        var leftovers: [Int32] = []
        for _ in 0..<100 {
            leftovers = processes(uid: sandbox.uid)
            if leftovers.isEmpty { break }
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(leftovers.isEmpty, "processes left: \(leftovers)", sourceLocation: sourceLocation)
        #expect(
            backend.cgroups.pids(sandboxID: sandbox.id).isEmpty,
            "processes left in its cgroups",
            sourceLocation: sourceLocation
        )
        let runsc = processes(commandContaining: sandbox.id)
        #expect(runsc.isEmpty, "runsc processes left: \(runsc)", sourceLocation: sourceLocation)
        #expect(mounts(under: sandbox.directory).isEmpty, "mounts left", sourceLocation: sourceLocation)
        #expect(
            !FileManager.default.fileExists(atPath: sandbox.directory),
            "session directory left",
            sourceLocation: sourceLocation
        )
        for dir in backend.cgroups.directories(for: sandbox.id) {
            #expect(!FileManager.default.fileExists(atPath: dir), "cgroup left: \(dir)", sourceLocation: sourceLocation)
        }
        #expect(
            try await records.records(backend: NamespaceBackend.name).allSatisfy { $0.id != sandbox.id },
            sourceLocation: sourceLocation
        )
    }

    func tearDown() async {
        await backend.cleanupLeftovers()
        await backend.shutdown()
        try? FileManager.default.removeItem(atPath: stateDirectory)
    }
}

extension Sandbox {
    func run(_ code: String, timeout: Double = 30, outputLimit: Int = 1 << 20) async throws -> ExecutionOutcome {
        try await execute(ExecutionRequest(code: code, timeoutSeconds: timeout, outputLimit: outputLimit))
    }
}

/// Runs `body` with a fresh fixture and always tears it down.
func withFixture(
    templateStartupTimeout: Duration = .seconds(60),
    wideUIDRange: Bool = false,
    _ body: (Fixture) async throws -> Void
) async throws {
    try await Fixture(templateStartupTimeout: templateStartupTimeout, wideUIDRange: wideUIDRange).use(body)
}

extension Fixture {
    /// Runs `body` with this fixture, then tears it down whether `body` threw or not.
    func use(_ body: (Fixture) async throws -> Void) async throws {
        do {
            try await body(self)
        } catch {
            await tearDown()
            throw error
        }
        await tearDown()
    }
}

/// The tiers for Node and Shell pools, which never fork.
let execTiers = tiers.filter { $0.launch == .exec }
