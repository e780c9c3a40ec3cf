import Foundation
import SandpiperCore

/// Asynchronous executions (`executionType: Asynchronous`): each runs in a task owned here, and
/// its outcome is kept for `retention` after it finishes so callers can poll it; then it is
/// forgotten (404). At most `capacity` records are kept; the oldest finished go first.
public actor ExecutionRegistry {
    public enum State: Sendable {
        case running
        case finished(ExecutionOutcome)
        case failed(SandpiperError)
    }

    public struct Record: Sendable {
        public var id: String
        public var pool: String
        public var identifier: SessionIdentifier
        public var state: State
        /// The caller asked for Jupyter-format results (`returnJupyterFormatExecutionResult`).
        public var jupyterFormat: Bool
        public var createdAt: Date
        public var finishedAt: Date?
    }

    private struct Key: Hashable {
        var pool: String
        var identifier: SessionIdentifier
        var id: String
    }

    private var records: [Key: Record] = [:]
    private var tasks: [Key: Task<Void, Never>] = [:]
    private let retention: TimeInterval
    private let capacity: Int

    public init(retention: Duration = .seconds(600), capacity: Int = 10_000) {
        self.retention = Double(retention.components.seconds)
        self.capacity = capacity
    }

    /// Starts `request` on `session` in the background and returns its record (`running`).
    public func start(
        id: String,
        session: Session,
        request: ExecutionRequest,
        jupyterFormat: Bool = false
    ) throws(SandpiperError) -> Record {
        prune()
        let key = Key(pool: session.poolName, identifier: session.identifier, id: id)
        if records[key] != nil {
            throw SandpiperError(
                .conflict,
                code: "ExecutionAlreadyExists",
                "an execution with id '\(id)' already exists in this session"
            )
        }
        let running = records.values.filter { if case .running = $0.state { return true } else { return false } }.count
        guard records.count - running < capacity || running < capacity else {
            throw SandpiperError(
                .unavailable,
                code: "TooManyExecutions",
                "too many asynchronous executions are running; retry later"
            )
        }
        let record = Record(
            id: id,
            pool: session.poolName,
            identifier: session.identifier,
            state: .running,
            jupyterFormat: jupyterFormat,
            createdAt: Date()
        )
        records[key] = record
        tasks[key] = Task {
            let state: State
            do {
                state = .finished(try await session.execute(request))
            } catch let error as SandpiperError {
                state = .failed(error)
            } catch {
                state = .failed(SandpiperError(.internalError, "\(error)"))
            }
            self.complete(key, state)
        }
        return record
    }

    private func complete(_ key: Key, _ state: State) {
        tasks[key] = nil
        guard var record = records[key] else { return }
        record.state = state
        record.finishedAt = Date()
        records[key] = record
    }

    public func record(pool: String, identifier: SessionIdentifier, id: String) -> Record? {
        prune()
        return records[Key(pool: pool, identifier: identifier, id: id)]
    }

    /// Forgets finished records past their retention, then the oldest finished beyond capacity.
    private func prune() {
        let cutoff = Date().addingTimeInterval(-retention)
        for (key, record) in records {
            if let finished = record.finishedAt, finished < cutoff { records[key] = nil }
        }
        if records.count > capacity {
            let finished = records.compactMap { key, record in record.finishedAt.map { (key, $0) } }
                .sorted { $0.1 < $1.1 }
            for (key, _) in finished.prefix(records.count - capacity) { records[key] = nil }
        }
    }

    /// Cancels the waits of running executions (their sessions are being destroyed anyway).
    public func shutdown() {
        for task in tasks.values { task.cancel() }
        tasks.removeAll()
    }
}
