/// The one domain error of Sandpiper. Every layer throws it; the HTTP layer maps `kind` to a
/// status code in one place and sends `code` and `message` to the caller in the Azure error shape.
public struct SandpiperError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Kind: String, Sendable, Equatable {
        /// The caller sent something we refuse (400).
        case invalidArgument
        /// Missing or wrong credentials (401).
        case unauthorized
        /// No such pool, session, file or execution (404).
        case notFound
        /// The pool is at `maxConcurrentSessions` (404, as Azure does).
        case maxSessionsReached
        /// A body or upload over its limit (413).
        case payloadTooLarge
        /// The sandbox stopped answering or died; the session was ended (502).
        case sandboxFailure
        /// A bounded wait ran out (504).
        case timeout
        /// Temporarily unable to serve, e.g. no sandbox could be started (503).
        case unavailable
        /// Valid request the server does not implement for this pool (501).
        case unsupported
        /// A conflict with the current state (409).
        case conflict
        /// Our bug or an unexpected host failure (500).
        case internalError
    }

    public var kind: Kind
    /// Azure-style error code, e.g. `SessionPoolMaxSessionsReached`.
    public var code: String
    public var message: String

    public init(_ kind: Kind, code: String? = nil, _ message: String) {
        self.kind = kind
        self.code = code ?? Self.defaultCode(for: kind)
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    static func defaultCode(for kind: Kind) -> String {
        switch kind {
        case .invalidArgument: "BadRequest"
        case .unauthorized: "Unauthorized"
        case .notFound: "NotFound"
        case .maxSessionsReached: "SessionPoolMaxSessionsReached"
        case .payloadTooLarge: "PayloadTooLarge"
        case .sandboxFailure: "SessionSandboxFailure"
        case .timeout: "Timeout"
        case .unavailable: "ServiceUnavailable"
        case .unsupported: "NotSupported"
        case .conflict: "Conflict"
        case .internalError: "InternalServerError"
        }
    }

    public static func invalid(_ message: String, code: String = "BadRequest") -> SandpiperError {
        SandpiperError(.invalidArgument, code: code, message)
    }

    public static func notFound(_ message: String, code: String = "NotFound") -> SandpiperError {
        SandpiperError(.notFound, code: code, message)
    }

    public static func internalError(_ message: String) -> SandpiperError {
        SandpiperError(.internalError, message)
    }
}
