import Foundation
import SandpiperCore
import Synchronization

/// One live session: a caller's identifier bound to one sandbox until it idles out.
/// Executions are serialised; file operations may run beside them.
public final class Session: Sendable {
    public let identifier: SessionIdentifier
    public let sandbox: any Sandbox
    public let poolName: String
    public let createdAt: Date

    private struct Activity {
        var lastAccessed: Date
        var callsInFlight: Int
    }

    private let activity: Mutex<Activity>
    private let executionLock = AsyncSerialLock()
    private let now: @Sendable () -> Date

    init(identifier: SessionIdentifier, sandbox: any Sandbox, poolName: String, now: @escaping @Sendable () -> Date) {
        self.identifier = identifier
        self.sandbox = sandbox
        self.poolName = poolName
        self.now = now
        let created = now()
        self.createdAt = created
        self.activity = Mutex(Activity(lastAccessed: created, callsInFlight: 0))
    }

    public var lastAccessed: Date { activity.withLock { $0.lastAccessed } }

    /// True while a call is running: such a session is never reaped.
    public var isBusy: Bool { activity.withLock { $0.callsInFlight > 0 } }

    func touch() {
        let date = now()
        activity.withLock { $0.lastAccessed = date }
    }

    /// Marks a call as in flight for the duration of `body`, resetting the idle clock at both ends.
    public func use<T: Sendable>(
        _ body: @Sendable (Session) async throws -> T
    ) async throws -> T {
        beginCall()
        defer { endCall() }
        return try await body(self)
    }

    /// Marks a call as in flight until the matching `endCall()`, for calls that outlive a request
    /// handler (a relayed WebSocket): the session is not reaped while it is open. Resets the idle
    /// clock; `endCall()` resets it again.
    public func beginCall() {
        let date = now()
        activity.withLock {
            $0.callsInFlight += 1
            $0.lastAccessed = date
        }
    }

    public func endCall() {
        let date = now()
        activity.withLock {
            $0.callsInFlight -= 1
            $0.lastAccessed = date
        }
    }

    /// Runs code; executions of this session run one at a time in arrival order.
    public func execute(_ request: ExecutionRequest) async throws -> ExecutionOutcome {
        try await use { session in
            try await session.executionLock.withLock {
                try await session.sandbox.execute(request)
            }
        }
    }
}
