import Foundation
import Logging
import SandpiperCore

/// One pool: its ready sandboxes and its live sessions. All bookkeeping happens on the actor;
/// sandbox launches and teardowns happen outside it (awaited), and state is re-checked after.
public actor SessionPool {
    public nonisolated let configuration: PoolConfiguration
    private let backend: any SandboxBackend
    private let logger: Logger
    private let now: @Sendable () -> Date

    private var ready: [any Sandbox] = []
    private var sessions: [SessionIdentifier: Session] = [:]
    /// Allocations in progress, so that two first calls with one identifier share a session.
    private var allocating: [SessionIdentifier: Task<Session, any Error>] = [:]
    private var launching = 0
    /// Ready sandboxes already prewarmed (ids), pruned to the ready queue after each pass.
    private var prewarmed: Set<String> = []
    /// The prewarm pass in progress, owned here: the refill loop never waits for it.
    private var prewarming: Task<Void, Never>?
    private var prewarmAgain = false
    private var shuttingDown = false
    private var lastLaunchError: SandpiperError?
    private nonisolated let refillSignal: AsyncStream<Void>.Continuation
    private let refillRequests: AsyncStream<Void>

    public init(
        configuration: PoolConfiguration,
        backend: any SandboxBackend,
        logger: Logger,
        now: @escaping @Sendable () -> Date = Date.init
    ) {
        self.configuration = configuration
        self.backend = backend
        var logger = logger
        logger[metadataKey: "pool"] = "\(configuration.name)"
        self.logger = logger
        self.now = now
        (self.refillRequests, self.refillSignal) = AsyncStream.makeStream(bufferingPolicy: .bufferingNewest(1))
    }

    // MARK: Sessions

    /// The live session for `identifier`, allocating one from the ready sandboxes when the
    /// identifier is new (or its previous sandbox died).
    public func session(for identifier: SessionIdentifier) async throws -> Session {
        if let existing = sessions[identifier] {
            if existing.sandbox.isAlive {
                existing.touch()
                return existing
            }
            logger.warning("session's sandbox died; starting a fresh one", metadata: ["identifier": "\(identifier)"])
            sessions[identifier] = nil
            await existing.sandbox.destroy()
            if let again = sessions[identifier], again.sandbox.isAlive { return again }
        }
        if let pending = allocating[identifier] {
            return try await pending.value
        }
        guard !shuttingDown else {
            throw SandpiperError(.unavailable, "pool '\(configuration.name)' is shutting down")
        }
        guard sessions.count + allocating.count < configuration.maxConcurrentSessions else {
            throw SandpiperError(
                .maxSessionsReached,
                "session pool '\(configuration.name)' has reached its maximum of "
                    + "\(configuration.maxConcurrentSessions) concurrent sessions; retry after a session idles out "
                    + "or delete one"
            )
        }
        // Owned through `allocating` until it completes; every waiter awaits the same task.
        let task = Task { try await self.allocate(identifier) }
        allocating[identifier] = task
        defer { allocating[identifier] = nil }
        return try await task.value
    }

    /// The live session for `identifier` if there is one; never allocates.
    public func existingSession(for identifier: SessionIdentifier) -> Session? {
        guard let session = sessions[identifier], session.sandbox.isAlive else { return nil }
        return session
    }

    /// Ends a session now (Azure's `DELETE session`). Returns false when there was none.
    @discardableResult
    public func removeSession(_ identifier: SessionIdentifier) async -> Bool {
        guard let session = sessions.removeValue(forKey: identifier) else { return false }
        logger.info("session deleted", metadata: ["identifier": "\(identifier)", "sandbox": "\(session.sandbox.id)"])
        await session.sandbox.destroy()
        return true
    }

    public var liveSessions: [Session] {
        sessions.values.sorted { $0.createdAt < $1.createdAt }
    }

    public var readyCount: Int { ready.count }
    public var sessionCount: Int { sessions.count }

    private func allocate(_ identifier: SessionIdentifier) async throws -> Session {
        let sandbox: any Sandbox
        if let warm = await takeReady() {
            sandbox = warm
        } else {
            logger.info("no ready sandbox; starting one on the request path")
            sandbox = try await launchSandbox()
        }
        let session = Session(identifier: identifier, sandbox: sandbox, poolName: configuration.name, now: now)
        sessions[identifier] = session
        logger.info("session allocated", metadata: ["identifier": "\(identifier)", "sandbox": "\(sandbox.id)"])
        if ready.isEmpty {
            requestRefill()
        } else {
            // Ready sandboxes remain: the replacement can start once this caller's first call has
            // run, rather than take a core from it (a launch is tens of ms of CPU).
            Task { [weak self] in
                try? await Task.sleep(for: Self.refillDelayWhileReady)
                self?.requestRefill()
            }
        }
        return session
    }

    /// The first live ready sandbox; dead ones met on the way are torn down here.
    private func takeReady() async -> (any Sandbox)? {
        while !ready.isEmpty {
            let candidate = ready.removeFirst()
            if candidate.isAlive { return candidate }
            logger.warning("a ready sandbox died while waiting", metadata: ["sandbox": "\(candidate.id)"])
            await candidate.destroy()
        }
        return nil
    }

    private func launchSandbox() async throws -> any Sandbox {
        launching += 1
        defer { launching -= 1 }
        let spec = SandboxSpec(id: UUID().uuidString.lowercased(), pool: configuration)
        do {
            let sandbox = try await backend.launch(spec)
            lastLaunchError = nil
            return sandbox
        } catch let error as SandpiperError {
            lastLaunchError = error
            throw error
        } catch {
            let wrapped = SandpiperError(.unavailable, "could not start a sandbox: \(error)")
            lastLaunchError = wrapped
            throw wrapped
        }
    }

    // MARK: Refill

    /// How long a refill waits after an allocation that left ready sandboxes in the queue.
    static let refillDelayWhileReady: Duration = .milliseconds(25)

    public nonisolated func requestRefill() {
        refillSignal.yield()
    }

    /// Ends the refill loop; sandboxes already started stay until `shutdown()`.
    public nonisolated func stopRefilling() {
        refillSignal.finish()
    }

    private var deficit: Int {
        shuttingDown ? 0 : max(0, configuration.readySessionInstances - ready.count - launching)
    }

    private func addReady(_ sandbox: any Sandbox) async {
        if shuttingDown {
            await sandbox.destroy()
        } else {
            ready.append(sandbox)
        }
    }

    /// Brings the ready queue back to `readySessionInstances`, keeping up to `parallelism`
    /// launches in flight (the backend's figure when nil): as one finishes the next starts.
    /// Stops starting new ones after a failure. Returns false when a launch failed.
    func refillOnce(parallelism: Int? = nil) async -> Bool {
        var width = parallelism ?? 2
        if parallelism == nil { width = await backend.refillParallelism(for: configuration) }
        width = max(1, width)
        return await withTaskGroup(of: Bool.self) { group in
            var inFlight = 0
            var succeeded = true
            while true {
                while succeeded, inFlight < width, deficit > 0 {
                    launching += 1
                    inFlight += 1
                    group.addTask {
                        let spec = SandboxSpec(id: UUID().uuidString.lowercased(), pool: self.configuration)
                        do {
                            let sandbox = try await self.backend.launch(spec)
                            await self.launched(sandbox)
                            return true
                        } catch {
                            await self.recordLaunchFailure(error)
                            return false
                        }
                    }
                }
                guard let ok = await group.next() else { return succeeded }
                inFlight -= 1
                succeeded = succeeded && ok
            }
        }
    }

    private func launched(_ sandbox: any Sandbox) async {
        launching -= 1
        await addReady(sandbox)
    }

    private func recordLaunchFailure(_ error: any Error) {
        launching -= 1
        let wrapped = (error as? SandpiperError) ?? SandpiperError(.unavailable, "could not start a sandbox: \(error)")
        lastLaunchError = wrapped
        logger.error("sandbox launch failed", metadata: ["error": "\(wrapped.message)"])
    }

    /// Prewarms the ready sandboxes, oldest first (the next to be taken), one at a time; stops
    /// as soon as a launch is due (refilling comes first) or the pool shuts down. A sandbox taken
    /// meanwhile is left alone; one taken while its prewarm runs just answers its first call
    /// after it.
    func prewarmReady() async {
        let started = ContinuousClock.now
        var count = 0
        for sandbox in ready where !prewarmed.contains(sandbox.id) {
            if shuttingDown || deficit > 0 || Task.isCancelled { break }
            guard ready.contains(where: { $0 === sandbox }), sandbox.isAlive else { continue }
            prewarmed.insert(sandbox.id)
            await sandbox.prewarm()
            count += 1
        }
        let live = Set(ready.map(\.id))
        prewarmed.formIntersection(live)
        if count > 0 {
            logger.debug(
                "ready sandboxes prewarmed",
                metadata: ["count": "\(count)", "took": "\(ContinuousClock.now - started)", "ready": "\(ready.count)"]
            )
        }
    }

    /// Starts a prewarm pass unless one runs; then another follows it, for what it missed.
    private func startPrewarming() {
        guard !shuttingDown else { return }
        guard prewarming == nil else {
            prewarmAgain = true
            return
        }
        prewarmAgain = false
        prewarming = Task {
            await self.prewarmReady()
            await self.prewarmingEnded()
        }
    }

    private func prewarmingEnded() {
        prewarming = nil
        if prewarmAgain { startPrewarming() }
    }

    /// The refill loop: wakes on demand and retries failures with backoff. Returns when the
    /// task is cancelled or the pool shuts down.
    public func runRefiller() async {
        requestRefill()
        var backoff: Duration = .milliseconds(500)
        for await _ in refillRequests {
            if Task.isCancelled || shuttingDown { break }
            if await refillOnce() {
                backoff = .milliseconds(500)
                startPrewarming()
            } else {
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(30))
                requestRefill()
            }
        }
    }

    // MARK: Reaping

    /// Destroys sessions idle for longer than the cooldown, and dead ones. Returns the
    /// identifiers removed.
    @discardableResult
    public func reapExpired() async -> [SessionIdentifier] {
        let cutoff = now().addingTimeInterval(-Double(configuration.cooldownPeriodInSeconds))
        var victims: [Session] = []
        let current = now()
        for (identifier, session) in sessions {
            let idle: Bool
            if let lifetime = maxAlivePeriod {
                // OnContainerExit: no idle timeout, only the container's exit or its maximum age.
                idle = current.timeIntervalSince(session.createdAt) >= lifetime
            } else {
                idle = !session.isBusy && session.lastAccessed < cutoff
            }
            if idle || !session.sandbox.isAlive {
                sessions[identifier] = nil
                victims.append(session)
            }
        }
        let deadReady = ready.filter { !$0.isAlive }
        ready.removeAll { !$0.isAlive }
        for session in victims {
            logger.info(
                session.sandbox.isAlive ? "session idle past cooldown; destroying" : "session's sandbox died; removing",
                metadata: ["identifier": "\(session.identifier)", "sandbox": "\(session.sandbox.id)"]
            )
            await session.sandbox.destroy()
        }
        for sandbox in deadReady { await sandbox.destroy() }
        if !victims.isEmpty || !deadReady.isEmpty { requestRefill() }
        return victims.map(\.identifier)
    }

    // MARK: Shutdown

    /// Stops refilling and destroys every sandbox of the pool.
    public func shutdown() async {
        shuttingDown = true
        refillSignal.finish()
        prewarming?.cancel()
        await prewarming?.value
        for task in allocating.values { _ = try? await task.value }
        let all = ready + sessions.values.map(\.sandbox)
        ready.removeAll()
        sessions.removeAll()
        await withTaskGroup(of: Void.self) { group in
            for sandbox in all { group.addTask { await sandbox.destroy() } }
        }
        logger.info("pool shut down", metadata: ["destroyed": "\(all.count)"])
    }

    public var lastError: SandpiperError? { lastLaunchError }

    // MARK: Metadata

    public nonisolated let createdAt = Date()
    private var runtimeDescription: RuntimeDescription?

    /// The pool's runtime and packages, asked once of a sandbox and then cached.
    public func runtime() async throws -> RuntimeDescription {
        if let runtimeDescription { return runtimeDescription }
        let description: RuntimeDescription
        if let sandbox = ready.first(where: { $0.isAlive })
            ?? sessions.values.first(where: { $0.sandbox.isAlive })?.sandbox
        {
            description = try await sandbox.describeRuntime()
        } else {
            let sandbox = try await launchSandbox()
            do {
                description = try await sandbox.describeRuntime()
            } catch {
                await sandbox.destroy()
                throw error
            }
            await addReady(sandbox)
        }
        runtimeDescription = description
        return description
    }

    /// When an idle session will be destroyed if nothing calls it.
    public nonisolated func expiry(of session: Session) -> Date {
        if let lifetime = maxAlivePeriod { return session.createdAt.addingTimeInterval(lifetime) }
        return session.lastAccessed.addingTimeInterval(Double(configuration.cooldownPeriodInSeconds))
    }

    /// A custom pool with lifecycle OnContainerExit: sessions live until their container exits,
    /// at most this long; idle time does not count.
    nonisolated var maxAlivePeriod: Double? {
        guard let lifecycle = configuration.container?.lifecycle, lifecycle.type == .onContainerExit else { return nil }
        return Double(lifecycle.maxAlivePeriodInSeconds ?? 3600)
    }
}
