import Logging
import SandpiperCore
import SandpiperTestSupport
import Testing

@testable import SandpiperSessions

@Suite("SessionManager")
struct SessionManagerTests {
    @Test("leftovers are removed before the server starts, never by the running service")
    func leftoversBeforeStart() async throws {
        let backend = FakeBackend()
        let pool = makePool(ready: 1, backend: backend)
        let manager = SessionManager(
            pools: [pool],
            backends: [backend],
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        await manager.removeLeftovers()
        #expect(backend.counters.cleanups == 1)

        // The service starts alongside the HTTP server: a cleanup there would remove sandboxes
        // that first requests start meanwhile. By its first refill it would have run.
        let running = Task { try await manager.run() }
        for _ in 0..<500 where backend.counters.launched == 0 {
            try await Task.sleep(for: .milliseconds(10))
        }
        #expect(backend.counters.launched >= 1)
        #expect(backend.counters.cleanups == 1)
        running.cancel()
        _ = await running.result
    }
}
