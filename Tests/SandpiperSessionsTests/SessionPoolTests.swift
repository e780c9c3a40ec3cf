import Foundation
import Logging
import SandpiperCore
import SandpiperTestSupport
import Synchronization
import Testing

@testable import SandpiperSessions

/// A clock the test moves by hand.
final class ManualClock: Sendable {
    private let current = Mutex(Date(timeIntervalSince1970: 1_000_000))
    var now: @Sendable () -> Date { { self.current.withLock { $0 } } }
    func advance(seconds: Double) { current.withLock { $0 = $0.addingTimeInterval(seconds) } }
}

func makePool(
    ready: Int = 2,
    max: Int = 3,
    cooldown: Int = 60,
    backend: FakeBackend = FakeBackend(),
    clock: ManualClock = ManualClock()
) -> SessionPool {
    let configuration = PoolConfiguration(
        name: "test",
        readySessionInstances: ready,
        maxConcurrentSessions: max,
        cooldownPeriodInSeconds: cooldown
    )
    return SessionPool(
        configuration: configuration,
        backend: backend,
        logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }),
        now: clock.now
    )
}

func id(_ raw: String) throws -> SessionIdentifier { try SessionIdentifier(validating: raw) }

@Suite("SessionPool")
struct SessionPoolTests {
    @Test("Refill brings the ready queue to readySessionInstances")
    func refill() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 3, backend: backend)
        #expect(await pool.refillOnce())
        #expect(await pool.readyCount == 3)
        #expect(backend.counters.launched == 3)
        #expect(await pool.refillOnce())
        #expect(backend.counters.launched == 3, "a full pool launches nothing more")
    }

    @Test("Once full, the pool prewarms each ready sandbox once, oldest first, and never a taken one")
    func prewarmsReady() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 3, max: 5, backend: backend)
        #expect(await pool.refillOnce())
        await pool.prewarmReady()
        var sandboxes = backend.sandboxes.withLock { $0 }
        #expect(sandboxes.map { $0.prewarms.withLock { $0 } } == [1, 1, 1])
        await pool.prewarmReady()
        #expect(sandboxes.map { $0.prewarms.withLock { $0 } } == [1, 1, 1], "a sandbox is prewarmed once")

        // Taking one and refilling: only the new sandbox is prewarmed.
        let session = try await pool.session(for: id("alpha"))
        #expect(session.sandbox.id == sandboxes[0].id, "the oldest ready sandbox is taken first")
        #expect(await pool.refillOnce())
        await pool.prewarmReady()
        sandboxes = backend.sandboxes.withLock { $0 }
        #expect(sandboxes.map { $0.prewarms.withLock { $0 } } == [1, 1, 1, 1])
    }

    @Test("A prewarm pass stops as soon as a launch is due, and a sandbox taken meanwhile is skipped")
    func prewarmYieldsToRefill() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 3, max: 5, backend: backend)
        #expect(await pool.refillOnce())
        let sandboxes = backend.sandboxes.withLock { $0 }
        for sandbox in sandboxes { sandbox.prewarmDelay.withLock { $0 = .milliseconds(300) } }
        let pass = Task { await pool.prewarmReady() }
        // While the oldest is being prewarmed, the next two are taken: the pool is short of
        // ready sandboxes, so the pass ends without touching the rest.
        try await Task.sleep(for: .milliseconds(100))
        _ = try await pool.session(for: id("alpha"))
        _ = try await pool.session(for: id("beta"))
        await pass.value
        #expect(sandboxes.map { $0.prewarms.withLock { $0 } } == [1, 0, 0])
    }

    @Test("A new identifier takes a ready sandbox instead of launching one")
    func allocatesFromReady() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 2, backend: backend)
        _ = await pool.refillOnce()
        let session = try await pool.session(for: id("alpha"))
        #expect(backend.counters.launched == 2, "no launch on the request path")
        #expect(await pool.readyCount == 1)
        let again = try await pool.session(for: id("alpha"))
        #expect(again === session, "same identifier, same session")
        #expect(again.sandbox.id == session.sandbox.id)
    }

    @Test("A ready sandbox that died while waiting is torn down and skipped")
    func deadReadySkipped() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 2, backend: backend)
        _ = await pool.refillOnce()
        let dead = try #require(backend.sandboxes.withLock { $0.first })
        dead.kill()
        let session = try await pool.session(for: id("skip-dead"))
        #expect(session.sandbox.id != dead.id)
        #expect(dead.isDestroyed)
        #expect(backend.counters.launched == 2)
    }

    @Test("With no ready sandbox a session is launched on demand")
    func launchesOnDemand() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 0, backend: backend)
        let session = try await pool.session(for: id("beta-1"))
        #expect(session.sandbox.isAlive)
        #expect(backend.counters.launched == 1)
    }

    @Test("Concurrent first calls with one identifier share one session")
    func concurrentFirstCalls() async throws {
        let backend = FakeBackend(launchDelay: .milliseconds(50))
        let pool = makePool(ready: 0, max: 10, backend: backend)
        let ids = try await withThrowingTaskGroup(of: String.self) { group in
            for _ in 0..<8 { group.addTask { try await pool.session(for: id("shared")).sandbox.id } }
            return try await group.reduce(into: Set<String>()) { $0.insert($1) }
        }
        #expect(ids.count == 1)
        #expect(backend.counters.launched == 1)
    }

    @Test("The pool refuses identifiers past maxConcurrentSessions with SessionPoolMaxSessionsReached")
    func maxSessions() async throws {
        let pool = makePool(ready: 0, max: 2)
        _ = try await pool.session(for: id("one1"))
        _ = try await pool.session(for: id("two2"))
        await #expect(throws: SandpiperError.self) { try await pool.session(for: id("three")) }
        do {
            _ = try await pool.session(for: id("three"))
        } catch let error as SandpiperError {
            #expect(error.kind == .maxSessionsReached)
            #expect(error.code == "SessionPoolMaxSessionsReached")
        }
        // Existing identifiers still work at the cap.
        _ = try await pool.session(for: id("one1"))
    }

    @Test("Idle sessions are destroyed after the cooldown; each call resets the clock")
    func reaping() async throws {
        let backend = FakeBackend()
        let clock = ManualClock()
        let pool = makePool(ready: 0, max: 5, cooldown: 60, backend: backend, clock: clock)
        let keep = try await pool.session(for: id("keep"))
        let drop = try await pool.session(for: id("drop"))
        clock.advance(seconds: 40)
        _ = try await keep.execute(ExecutionRequest(code: "x", timeoutSeconds: 1, outputLimit: 10))
        clock.advance(seconds: 30)
        let reaped = await pool.reapExpired()
        #expect(reaped.map(\.value) == ["drop"])
        #expect((drop.sandbox as? FakeSandbox)?.isDestroyed == true)
        #expect(keep.sandbox.isAlive)
        #expect(await pool.sessionCount == 1)
        clock.advance(seconds: 61)
        #expect(await pool.reapExpired().map(\.value) == ["keep"])
        #expect(backend.counters.destroyed == 2)
    }

    @Test("A session running an execution is never reaped, however long it runs")
    func busyNotReaped() async throws {
        let clock = ManualClock()
        let pool = makePool(ready: 0, cooldown: 1, clock: clock)
        let session = try await pool.session(for: id("busy"))
        let running = Task {
            try await session.execute(ExecutionRequest(code: "sleep:0.3", timeoutSeconds: 5, outputLimit: 10))
        }
        try await Task.sleep(for: .milliseconds(50))
        clock.advance(seconds: 100)
        #expect(await pool.reapExpired().isEmpty)
        _ = try await running.value
        clock.advance(seconds: 100)
        #expect(await pool.reapExpired().count == 1)
    }

    @Test("Executions of one session run one at a time, in order")
    func serialised() async throws {
        let pool = makePool(ready: 0)
        let session = try await pool.session(for: id("serial"))
        let start = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<3 {
                group.addTask {
                    _ = try await session.execute(
                        ExecutionRequest(code: "sleep:0.1", timeoutSeconds: 5, outputLimit: 10)
                    )
                }
            }
            try await group.waitForAll()
        }
        #expect(ContinuousClock.now - start >= .milliseconds(290))
    }

    @Test("Different sessions execute in parallel")
    func parallel() async throws {
        let pool = makePool(ready: 0, max: 5)
        let a = try await pool.session(for: id("par-a"))
        let b = try await pool.session(for: id("par-b"))
        let start = ContinuousClock.now
        // One second each: together well under the two seconds they would take one after the
        // other, with room for a loaded machine.
        async let first = a.execute(ExecutionRequest(code: "sleep:1", timeoutSeconds: 5, outputLimit: 10))
        async let second = b.execute(ExecutionRequest(code: "sleep:1", timeoutSeconds: 5, outputLimit: 10))
        _ = try await (first, second)
        #expect(ContinuousClock.now - start < .milliseconds(1800))
    }

    @Test("A session whose sandbox died is replaced by a fresh one on the next call")
    func deadSandboxReplaced() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 0, backend: backend)
        let first = try await pool.session(for: id("phoenix"))
        await #expect(throws: SandpiperError.self) {
            try await first.execute(ExecutionRequest(code: "crash", timeoutSeconds: 1, outputLimit: 10))
        }
        let second = try await pool.session(for: id("phoenix"))
        #expect(second !== first)
        #expect(second.sandbox.isAlive)
        #expect((first.sandbox as? FakeSandbox)?.isDestroyed == true)
    }

    @Test("Deleting a session frees its identifier and its slot")
    func delete() async throws {
        let pool = makePool(ready: 0, max: 1)
        let first = try await pool.session(for: id("gone"))
        #expect(try await pool.removeSession(id("gone")))
        #expect(try await pool.removeSession(id("gone")) == false)
        let other = try await pool.session(for: id("next"))
        #expect(other !== first)
    }

    @Test("Failed launches surface a clear error and refill recovers when the backend does")
    func launchFailures() async throws {
        let backend = FakeBackend()
        backend.setFailing(true)
        let pool = makePool(ready: 2, backend: backend)
        #expect(await pool.refillOnce() == false)
        #expect(await pool.lastError?.code == "SandboxStartFailed")
        do {
            _ = try await pool.session(for: id("nope"))
            Issue.record("expected a failure")
        } catch let error as SandpiperError {
            #expect(error.code == "SandboxStartFailed")
        }
        backend.setFailing(false)
        #expect(await pool.refillOnce())
        #expect(await pool.readyCount == 2)
    }

    @Test("Shutdown destroys ready sandboxes and sessions")
    func shutdown() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 2, backend: backend)
        _ = await pool.refillOnce()
        _ = try await pool.session(for: id("live"))
        await pool.shutdown()
        #expect(backend.counters.destroyed == backend.counters.launched)
        await #expect(throws: SandpiperError.self) { try await pool.session(for: id("after")) }
    }

    @Test("The refill loop keeps the pool full as sessions take sandboxes")
    func refillLoop() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 2, max: 10, backend: backend)
        let loop = Task { await pool.runRefiller() }
        defer {
            loop.cancel()
            pool.stopRefilling()
        }
        for attempt in 0..<100 where await pool.readyCount < 2 {
            _ = attempt
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(await pool.readyCount == 2)
        _ = try await pool.session(for: id("take-1"))
        _ = try await pool.session(for: id("take-2"))
        for _ in 0..<100 where await pool.readyCount < 2 {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(await pool.readyCount == 2)
        #expect(backend.counters.launched == 4)
    }

    @Test("The refill loop prewarms in the background: a slow prewarm never delays a refill")
    func prewarmInBackground() async throws {
        let backend = FakeBackend(prewarmDelay: .seconds(5))
        let pool = makePool(ready: 2, max: 10, backend: backend)
        let loop = Task { await pool.runRefiller() }
        defer {
            loop.cancel()
            pool.stopRefilling()
        }
        for _ in 0..<100 where await pool.readyCount < 2 {
            try await Task.sleep(for: .milliseconds(10))
        }
        // The first ready sandbox is being prewarmed (for 5 s) when both are taken.
        for _ in 0..<100 where backend.sandboxes.withLock({ $0.first?.prewarms.withLock { $0 } ?? 0 }) == 0 {
            try await Task.sleep(for: .milliseconds(10))
        }
        let clock = ContinuousClock()
        let started = clock.now
        _ = try await pool.session(for: id("take-1"))
        _ = try await pool.session(for: id("take-2"))
        for _ in 0..<200 where await pool.readyCount < 2 {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(await pool.readyCount == 2)
        #expect(clock.now - started < .seconds(2), "the refill waited for a prewarm")
        await pool.shutdown()
    }
}
