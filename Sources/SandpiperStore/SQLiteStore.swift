import Foundation
import GRDB
import SandpiperCore

/// The server's durable state in one SQLite file (`sandpiper.sqlite` in the data directory):
/// the sandbox records needed to clean up after a crash. WAL mode, one writer queue.
public final class SQLiteStore: SandboxRecordStore {
    private let database: DatabaseQueue

    public init(path: String) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(5)
        do {
            database = try DatabaseQueue(path: path, configuration: configuration)
            try database.writeWithoutTransaction { db in
                try db.execute(sql: "PRAGMA journal_mode = WAL")
                // Records describe processes, cgroups and mounts that a power loss takes with them: a
                // commit needs no fsync of its own (WAL stays consistent; checkpoints still sync).
                try db.execute(sql: "PRAGMA synchronous = NORMAL")
            }
            try Self.migrator.migrate(database)
        } catch {
            throw SandpiperError(
                .unavailable,
                code: "StateStoreUnavailable",
                "cannot open the state database at \(path): \(error)"
            )
        }
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1-sandboxes") { db in
            try db.create(table: "sandbox") { table in
                table.primaryKey("id", .text)
                table.column("backend", .text).notNull()
                table.column("pool", .text).notNull()
                table.column("record", .blob).notNull()
                table.column("createdAt", .datetime).notNull()
            }
        }
        return migrator
    }

    public func save(_ record: SandboxRecord) async throws {
        let blob = try JSONEncoder().encode(record)
        try await database.write { db in
            try db.execute(
                sql: """
                    INSERT INTO sandbox (id, backend, pool, record, createdAt) VALUES (?, ?, ?, ?, ?)
                    ON CONFLICT(id) DO UPDATE SET record = excluded.record
                    """,
                arguments: [record.id, record.backend, record.pool, blob, record.createdAt]
            )
        }
    }

    public func removeRecord(id: String) async throws {
        try await database.write { db in
            try db.execute(sql: "DELETE FROM sandbox WHERE id = ?", arguments: [id])
        }
    }

    public func records(backend: String) async throws -> [SandboxRecord] {
        let blobs: [Data] = try await database.read { db in
            try Data.fetchAll(
                db,
                sql: "SELECT record FROM sandbox WHERE backend = ? ORDER BY createdAt",
                arguments: [backend]
            )
        }
        return blobs.compactMap { try? JSONDecoder().decode(SandboxRecord.self, from: $0) }
    }
}
