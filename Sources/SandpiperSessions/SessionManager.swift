import Logging
import SandpiperCore
import ServiceLifecycle

/// The registry of pools, and the service that keeps them refilled and reaped. It runs in the
/// application's `ServiceGroup` before the HTTP server, so it shuts down after it.
public final class SessionManager: Service, Sendable {
    public let pools: [String: SessionPool]
    /// Asynchronous executions of every pool.
    public let executions = ExecutionRegistry()
    private let backends: [any SandboxBackend]
    private let reapInterval: Duration
    private let logger: Logger

    public init(
        pools: [SessionPool],
        backends: [any SandboxBackend],
        reapInterval: Duration = .seconds(1),
        logger: Logger
    ) {
        self.pools = Dictionary(uniqueKeysWithValues: pools.map { ($0.configuration.name, $0) })
        self.backends = backends
        self.reapInterval = reapInterval
        self.logger = logger
    }

    public func pool(named name: String) throws(SandpiperError) -> SessionPool {
        guard let pool = pools[name] else {
            throw SandpiperError.notFound("session pool '\(name)' does not exist", code: "SessionPoolNotFound")
        }
        return pool
    }

    /// Removes what an earlier run of the server left (each backend's `cleanupLeftovers`: every
    /// sandbox it has recorded, and its stray cgroups and directories). Await it before the server
    /// takes requests: a sandbox started meanwhile would be torn down as it starts or runs. (It
    /// used to open `run()`, which starts alongside the HTTP server, and under load a first
    /// request could launch a sandbox before it ran.)
    public func removeLeftovers() async {
        for backend in backends { await backend.cleanupLeftovers() }
    }

    /// Refills and reaps until graceful shutdown, then destroys every sandbox. Leftovers of an
    /// earlier run are `removeLeftovers()`'s, before the server starts.
    public func run() async throws {
        await withGracefulShutdownHandler {
            await withTaskGroup(of: Void.self) { group in
                for pool in pools.values {
                    group.addTask { await pool.runRefiller() }
                }
                group.addTask { await self.reapLoop() }
                await group.waitForAll()
            }
        } onGracefulShutdown: {
            // Ending the refill streams lets `runRefiller` return; the reaper sees the shutdown.
            for pool in self.pools.values { pool.stopRefilling() }
        }
        await executions.shutdown()
        await withTaskGroup(of: Void.self) { group in
            for pool in pools.values { group.addTask { await pool.shutdown() } }
        }
        for backend in backends { await backend.shutdown() }
    }

    private func reapLoop() async {
        while !Task.isCancelled, !Task.isShuttingDownGracefully {
            try? await Task.sleep(for: reapInterval)
            for pool in pools.values { await pool.reapExpired() }
        }
    }
}
