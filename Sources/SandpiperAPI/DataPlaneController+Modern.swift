import Foundation
import HTTPTypes
import Hummingbird
import SandpiperCore
import SandpiperSessions

/// The modern data plane (2024-10-02-preview and later): `executions`, flat file shapes,
/// session management and pool metadata.
extension DataPlaneController {
    static var defaultStreamLimit: Int { 4096 }
    static var maxStreamLimit: Int { 16 << 20 }
    static var pageSize: Int { 500 }

    // MARK: Executions

    func modernExecute(_ request: Request, _ call: Call, requestPath: String) async throws -> Response {
        let identifier = try call.identifier()
        let body = try await RequestBody.json(request)
        let executionID = try Self.executionID(request.headers[.operationID])
        let pool = call.pool.configuration
        let limit = try Self.streamLimit(body) ?? Self.defaultStreamLimit
        let execution: ExecutionRequest
        if pool.type == .shell {
            execution = try shellExecution(body, pool: pool, outputLimit: limit)
        } else {
            if try RequestBody.string(body, "shellCommand") != nil
                || RequestBody.lookup(body, "execCommandAndArgs") != nil
                || RequestBody.lookup(body, "command") != nil
            {
                throw SandpiperError.invalid(
                    "shellCommand, execCommandAndArgs and command are for Shell pools; pool '\(pool.name)' is "
                        + pool.type.rawValue,
                    code: "InvalidRequestBody"
                )
            }
            execution = try executionRequest(body, pool: pool, outputLimit: limit)
        }
        let jupyterFormat =
            try Self.bool(body, "returnJupyterFormatExecutionResult") || Self.bool(body, "returnJupyterFormat")
        let type = try Self.executionType(body)
        let session = try await call.pool.session(for: identifier)
        var headers: HTTPFields = [
            .operationID: executionID,
            .operationLocation: Self.operationLocation(requestPath: requestPath, id: executionID, call: call),
        ]
        headers[.contentType] = "application/json; charset=utf-8"
        if type == "Asynchronous" {
            _ = try await sessions.executions.start(
                id: executionID,
                session: session,
                request: execution,
                jupyterFormat: jupyterFormat
            )
            let body = Self.executionJSON(
                id: executionID,
                identifier: identifier,
                type: type,
                status: "Running",
                outcome: nil,
                jupyter: false
            )
            return Self.json(body, status: .accepted, headers: headers)
        }
        let outcome = try await session.execute(execution)
        let json = Self.executionJSON(
            id: executionID,
            identifier: identifier,
            type: type,
            status: Self.modernStatus(outcome),
            outcome: outcome,
            jupyter: jupyterFormat
        )
        return Self.json(json, status: .ok, headers: headers)
    }

    func executionStatus(_ call: Call, id: String, requestPath: String) async throws -> Response {
        let identifier = try call.identifier()
        guard
            let record = await sessions.executions.record(
                pool: call.pool.configuration.name,
                identifier: identifier,
                id: id
            )
        else {
            throw SandpiperError.notFound(
                "no execution '\(id)' in this session (finished results are kept for 10 minutes)",
                code: "ExecutionNotFound"
            )
        }
        var json: JSONValue
        switch record.state {
        case .running:
            json = Self.executionJSON(
                id: id,
                identifier: identifier,
                type: "Asynchronous",
                status: "Running",
                outcome: nil,
                jupyter: false
            )
        case .finished(let outcome):
            json = Self.executionJSON(
                id: id,
                identifier: identifier,
                type: "Asynchronous",
                status: Self.modernStatus(outcome),
                outcome: outcome,
                jupyter: record.jupyterFormat
            )
        case .failed(let error):
            json = Self.executionJSON(
                id: id,
                identifier: identifier,
                type: "Asynchronous",
                status: "Failed",
                outcome: nil,
                jupyter: false
            )
            if case .object(var object) = json {
                object["error"] = .object(["code": .string(error.code), "message": .string(error.message)])
                json = .object(object)
            }
        }
        return Self.json(json, status: .ok, headers: [.operationID: id])
    }

    /// `Succeeded`/`Failed`; Shell pools answer the exit code as a string (`"0"`, `"2"`).
    static func modernStatus(_ outcome: ExecutionOutcome) -> String {
        if let exitCode = outcome.exitCode { return "\(exitCode)" }
        return outcome.status == .success ? "Succeeded" : "Failed"
    }

    /// A Shell pool's command: `shellCommand` (a bash command line) or `execCommandAndArgs`
    /// (alias `command`: argv, quoted for bash), optional `stdin`. `code` is refused, as Azure does.
    func shellExecution(_ body: [String: JSONValue], pool: PoolConfiguration, outputLimit: Int) throws(SandpiperError)
        -> ExecutionRequest
    {
        let shellCommand = try RequestBody.string(body, "shellCommand")
        var argv: [String]?
        for name in ["execCommandAndArgs", "command"] {
            switch RequestBody.lookup(body, name) {
            case nil, .null?: continue
            case .array(let items)?:
                var strings: [String] = []
                for item in items {
                    guard case .string(let text) = item else {
                        throw SandpiperError.invalid(
                            "'\(name)' must be an array of strings",
                            code: "InvalidRequestBody"
                        )
                    }
                    strings.append(text)
                }
                guard !strings.isEmpty else {
                    throw SandpiperError.invalid("'\(name)' is empty", code: "InvalidRequestBody")
                }
                argv = strings
            case .string(let text)?:
                argv = ["/bin/bash", "-c", text]
            default:
                throw SandpiperError.invalid("'\(name)' must be an array of strings", code: "InvalidRequestBody")
            }
        }
        if shellCommand != nil, argv != nil {
            throw SandpiperError.invalid(
                "send either shellCommand or execCommandAndArgs, not both",
                code: "InvalidRequestBody"
            )
        }
        guard let command = shellCommand ?? argv.map({ $0.map(Self.shellQuote).joined(separator: " ") }) else {
            throw SandpiperError.invalid(
                "Shell pools need 'shellCommand' or 'execCommandAndArgs' (code and codeInputType are not accepted)",
                code: "SessionPropertiesMissing"
            )
        }
        return ExecutionRequest(
            code: command,
            timeoutSeconds: try Self.timeout(body, pool: pool),
            outputLimit: outputLimit,
            stdin: try RequestBody.string(body, "stdin")
        )
    }

    /// Single-quotes an argument for bash unless it is plainly safe.
    static func shellQuote(_ argument: String) -> String {
        let safe =
            !argument.isEmpty
            && argument.unicodeScalars.allSatisfy {
                CharacterSet.alphanumerics.contains($0) || "-_./=:,@%+".unicodeScalars.contains($0)
            }
        return safe ? argument : "'" + argument.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    static func executionJSON(
        id: String,
        identifier: SessionIdentifier,
        type: String,
        status: String,
        outcome: ExecutionOutcome?,
        jupyter: Bool
    ) -> JSONValue {
        var object: [String: JSONValue] = [
            "id": .string(id),
            "identifier": .string(identifier.value),
            "executionType": .string(type),
            "status": .string(status),
        ]
        if let outcome {
            object["result"] = .object([
                "stdout": .string(outcome.stdout),
                "stderr": .string(outcome.stderr),
                "executionResult": jupyter ? .string(outcome.jupyterResult) : outcome.result,
                "executionTimeInMilliseconds": .integer(Int64(outcome.durationMilliseconds.rounded())),
            ])
        }
        return .object(object)
    }

    static func executionID(_ header: String?) throws(SandpiperError) -> String {
        guard let header, !header.isEmpty else { return UUID().uuidString.lowercased() }
        guard header.utf8.count <= 128,
            header.utf8.allSatisfy({ (0x21...0x7E).contains($0) && $0 != UInt8(ascii: "/") })
        else {
            throw SandpiperError.invalid(
                "the operation-id header must be 1 to 128 printable ASCII characters without '/'",
                code: "InvalidOperationId"
            )
        }
        return header
    }

    static func executionType(_ body: [String: JSONValue]) throws(SandpiperError) -> String {
        guard let raw = try RequestBody.string(body, "executionType") else { return "Synchronous" }
        switch raw.lowercased() {
        case "synchronous": return "Synchronous"
        case "asynchronous": return "Asynchronous"
        default:
            throw SandpiperError.invalid(
                "executionType must be Synchronous or Asynchronous",
                code: "InvalidRequestBody"
            )
        }
    }

    static func bool(_ body: [String: JSONValue], _ name: String) throws(SandpiperError) -> Bool {
        switch RequestBody.lookup(body, name) {
        case nil, .null?: return false
        case .bool(let value)?: return value
        case .string(let text)? where ["true", "false"].contains(text.lowercased()): return text.lowercased() == "true"
        default: throw SandpiperError.invalid("'\(name)' must be true or false", code: "InvalidRequestBody")
        }
    }

    /// `/pools/p/executions/{id}?api-version=…&identifier=…`, on the same pool prefix the caller used.
    static func operationLocation(requestPath: String, id: String, call: Call) -> String {
        let base =
            requestPath.hasSuffix("/executions") ? String(requestPath.dropLast("/executions".count)) : requestPath
        var query = "identifier=" + Self.encode(call.query["identifier"] ?? "")
        if let version = call.query["api-version"] { query = "api-version=" + Self.encode(version) + "&" + query }
        return base + "/executions/" + Self.encode(id) + "?" + query
    }

    static func encode(_ value: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        return value.addingPercentEncoding(withAllowedCharacters: allowed) ?? value
    }

    static func json(_ value: JSONValue, status: HTTPResponse.Status, headers: HTTPFields = [:]) -> Response {
        var response = JSONResponse.make(value, status: status)
        for field in headers { response.headers[field.name] = field.value }
        return response
    }

    // MARK: Files

    static func resourceFile(_ entry: FileEntry) -> JSONValue {
        .object([
            "name": .string(entry.path.name),
            "type": .string(entry.isDirectory ? "Directory" : "File"),
            "contentType": .string(entry.isDirectory ? "application/octet-stream" : MediaTypes.guess(entry.path.name)),
            "sizeInBytes": .integer(entry.size),
            "lastModifiedAt": .string(Timestamps.format(entry.modified)),
            "directory": .string(entry.path.parentRelative),
        ])
    }

    func modernUpload(_ request: Request, _ call: Call) async throws -> Response {
        JSONResponse.make(Self.resourceFile(try await receiveUpload(request, call)))
    }

    func modernList(_ call: Call, requestPath: String) async throws -> Response {
        let identifier = try call.identifier()
        let directory = try SessionFilePath(validating: call.query["path"] ?? "", allowRoot: true)
        let recursive = call.query.bool("recursive")
        let skip = max(0, Int(call.query["skip"] ?? "") ?? 0)
        let session = try await call.pool.session(for: identifier)
        let entries = try await session.use { try await $0.sandbox.listFiles(in: directory, recursive: recursive) }
        let page = entries.dropFirst(skip).prefix(Self.pageSize)
        var next: JSONValue = .null
        if skip + page.count < entries.count {
            next = .string(Self.nextLink(requestPath: requestPath, call: call, skip: skip + page.count))
        }
        return JSONResponse.make(JSONValue.object(["value": .array(page.map(Self.resourceFile)), "nextLink": next]))
    }

    static func nextLink(requestPath: String, call: Call, skip: Int) -> String {
        var parts: [String] = []
        for name in ["api-version", "identifier", "path", "recursive"] {
            if let value = call.query[name] { parts.append(name + "=" + encode(value)) }
        }
        parts.append("skip=\(skip)")
        return requestPath + "?" + parts.joined(separator: "&")
    }

    func modernFileInfo(_ call: Call, name: String) async throws -> Response {
        let identifier = try call.identifier()
        let path = try SessionFilePath(validating: name)
        let session = try await call.pool.session(for: identifier)
        let entry = try await session.use { try await $0.sandbox.fileInfo(path) }
        return JSONResponse.make(Self.resourceFile(entry))
    }

    func modernDelete(_ call: Call, name: String) async throws -> Response {
        let identifier = try call.identifier()
        let path = try SessionFilePath(validating: name)
        let session = try await call.pool.session(for: identifier)
        try await session.use { try await $0.sandbox.deleteFile(path) }
        return Response(status: .noContent)
    }

    // MARK: Sessions

    func sessionJSON(_ session: Session, pool: SessionPool) -> JSONValue {
        .object([
            "identifier": .string(session.identifier.value),
            "createdAt": .string(Timestamps.format(session.createdAt)),
            "lastAccessedAt": .string(Timestamps.format(session.lastAccessed)),
            "expireAt": .string(Timestamps.format(pool.expiry(of: session))),
            "etag": .string(session.sandbox.id),
        ])
    }

    func sessionInfo(_ call: Call) async throws -> Response {
        let identifier = try call.identifier()
        guard let session = await call.pool.existingSession(for: identifier) else {
            throw SandpiperError.notFound(
                "no live session '\(identifier)' in pool '\(call.pool.configuration.name)'",
                code: "SessionNotFound"
            )
        }
        return JSONResponse.make(sessionJSON(session, pool: call.pool))
    }

    /// Idempotent: deleting a session that is not there is not an error (LangChain calls it on close).
    func deleteSession(_ call: Call) async throws -> Response {
        let identifier = try call.identifier()
        await call.pool.removeSession(identifier)
        return Response(status: .noContent)
    }

    func stopSession(_ call: Call) async throws -> Response {
        let identifier = try call.identifier()
        guard await call.pool.removeSession(identifier) else {
            throw SandpiperError.notFound(
                "no live session '\(identifier)' in pool '\(call.pool.configuration.name)'",
                code: "SessionNotFound"
            )
        }
        return JSONResponse.make(
            JSONValue.string("Session \(identifier) in session pool \(call.pool.configuration.name) stopped.")
        )
    }

    func listSessions(_ call: Call, requestPath: String) async throws -> Response {
        let all = await call.pool.liveSessions
        let skip = max(0, Int(call.query["skip"] ?? "") ?? 0)
        let page = all.dropFirst(skip).prefix(Self.pageSize)
        var object: [String: JSONValue] = ["sessions": .array(page.map { sessionJSON($0, pool: call.pool) })]
        if skip + page.count < all.count {
            object["nextLink"] = .string(Self.nextLink(requestPath: requestPath, call: call, skip: skip + page.count))
        }
        return JSONResponse.make(JSONValue.object(object))
    }

    static func kernel(for type: PoolType, ipython: String, runtime: RuntimeDescription.Package) -> JSONValue {
        switch type {
        case .pythonLTS:
            .object([
                "name": .string("IPython"), "version": .string(ipython), "projectUrl": .string("https://ipython.org"),
                "description": .string("Stateful IPython kernel for Python code executions"),
            ])
        case .nodeLTS:
            .object([
                "name": .string("Sandpiper Node.js agent"), "version": .string(runtime.version),
                "projectUrl": .string("https://nodejs.org"),
                "description": .string("Stateful JavaScript context with top-level await for code executions"),
            ])
        case .shell:
            .object([
                "name": .string("bash"), "version": .string(runtime.version),
                "projectUrl": .string("https://www.gnu.org/software/bash/"),
                "description": .string("Persistent bash shell for command executions"),
            ])
        case .customContainer:
            .object([
                "name": .string(runtime.name), "version": .string(runtime.version),
                "description": .string("Custom container; requests are proxied to its HTTP port"),
            ])
        }
    }

    func metadata(_ call: Call) async throws -> Response {
        let description = try await call.pool.runtime()
        let ipython = description.packages.first { $0.name.lowercased() == "ipython" }?.version ?? ""
        let created = Timestamps.format(call.pool.createdAt)
        return JSONResponse.make(
            JSONValue.object([
                "runtimes": .array([
                    .object([
                        "name": .string(description.runtime.name), "version": .string(description.runtime.version),
                    ])
                ]),
                "preInstalledPackages": .array(
                    description.packages.map { .object(["name": .string($0.name), "version": .string($0.version)]) }
                ),
                "createdAt": .string(created),
                "lastUpdatedAt": .string(created),
                "jupyterKernel": Self.kernel(
                    for: call.pool.configuration.type,
                    ipython: ipython,
                    runtime: description.runtime
                ),
            ])
        )
    }
}
