import Foundation
import HTTPTypes
import Hummingbird
import Logging
import SandpiperCore
import SandpiperSessions

/// Azure Dynamic Sessions data plane, legacy generation (2024-02-02-preview): every route lives
/// under a pool endpoint, `/pools/{pool}` or the ARM-style
/// `/subscriptions/{s}/resourceGroups/{g}/sessionPools/{pool}`.
public struct DataPlaneController<Context: RequestContext>: Sendable {
    let sessions: SessionManager
    /// Per-stream cap on stdout/stderr of legacy executions (Azure documents none for them).
    let legacyOutputLimit: Int

    public static var poolPrefixes: [String] {
        ["/pools/:pool", "/subscriptions/:subscription/resourceGroups/:resourceGroup/sessionPools/:pool"]
    }

    /// `http` or `https`: what the server listens with (`X-Forwarded-Proto` of proxied requests).
    let scheme: String

    public init(sessions: SessionManager, legacyOutputLimit: Int = 1 << 20, scheme: String = "http") {
        self.sessions = sessions
        self.legacyOutputLimit = legacyOutputLimit
        self.scheme = scheme
    }

    public func register(on router: Router<Context>) {
        for prefix in Self.poolPrefixes {
            for method in [HTTPRequest.Method.get, .post, .delete, .put, .patch, .head, .options] {
                router.on(RouterPath(prefix + "/**"), method: method) { request, context in
                    try await self.dispatch(request, context: context)
                }
            }
        }
    }

    // MARK: Dispatch

    struct Call {
        let pool: SessionPool
        let query: QueryParameters
        let operation: [String]

        func identifier() throws(SandpiperError) -> SessionIdentifier {
            try SessionIdentifier(validating: query["identifier"])
        }

        func session() async throws -> Session {
            try await pool.session(for: identifier())
        }

        /// A modern file name, under the `path` query parameter's directory when there is one.
        func prefixed(_ name: String) -> String {
            guard let directory = query["path"], !directory.isEmpty else { return name }
            return directory.hasSuffix("/") ? directory + name : directory + "/" + name
        }
    }

    func dispatch(_ request: Request, context: Context) async throws -> Response {
        guard let poolName = context.parameters.get("pool") else {
            throw SandpiperError.notFound("no pool in the path", code: "RouteNotFound")
        }
        let pool = try sessions.pool(named: poolName)
        let operation = context.parameters.getCatchAll().map { QueryParameters.decode(String($0)) }
        let call = Call(pool: pool, query: QueryParameters(request.uri.query), operation: operation)
        let method = request.method
        let ops = operation.map { $0.lowercased() }

        if pool.configuration.type == .customContainer {
            return try await customContainer(request, call, context: context)
        }
        let modern = call.query.isModernAPI
        switch (method, ops.first) {
        case (.post, "code") where ops == ["code", "execute"], (.post, "python") where ops == ["python", "execute"]:
            return try await legacyExecute(request, call)
        case (.post, "executions") where ops.count == 1:
            return try await modernExecute(request, call, requestPath: request.uri.path)
        case (.get, "executions") where ops.count == 2:
            return try await executionStatus(call, id: operation[1], requestPath: request.uri.path)
        case (.post, "files") where ops == ["files", "upload"],
            (.post, "python") where ops == ["python", "uploadfile"]:
            return try await legacyUpload(request, call)
        case (.post, "files") where ops == ["files"]:
            return try await modernUpload(request, call)
        case (.get, "files") where ops == ["files"]:
            return modern ? try await modernList(call, requestPath: request.uri.path) : try await legacyList(call)
        case (.get, "python") where ops == ["python", "files"]:
            return try await legacyList(call)
        case (.get, "python") where ops == ["python", "downloadfile"]:
            return try await download(call, name: call.query["filename"] ?? "")
        case (.get, "files") where !modern && ops.count >= 3 && ops[1] == "content":
            return try await download(call, name: operation.dropFirst(2).joined(separator: "/"))
        case (.get, "files") where modern && ops.count >= 3 && ops.last == "content":
            return try await download(
                call,
                name: call.prefixed(operation.dropFirst().dropLast().joined(separator: "/"))
            )
        case (.get, "files") where ops.count >= 2:
            let name = operation.dropFirst().joined(separator: "/")
            return modern
                ? try await modernFileInfo(call, name: call.prefixed(name)) : try await legacyFileInfo(call, name: name)
        case (.delete, "files") where ops.count >= 2:
            let name = operation.dropFirst().joined(separator: "/")
            return modern
                ? try await modernDelete(call, name: call.prefixed(name)) : try await legacyDelete(call, name: name)
        case (.get, "session") where ops.count == 1, (.post, ".management") where ops == [".management", "getsession"]:
            return try await sessionInfo(call)
        case (.delete, "session") where ops.count == 1:
            return try await deleteSession(call)
        case (.post, ".management") where ops == [".management", "stopsession"]:
            return try await stopSession(call)
        case (.get, "listsessions") where ops.count == 1,
            (.post, ".management") where ops == [".management", "listsessions"]:
            return try await listSessions(call, requestPath: request.uri.path)
        case (.get, "metadata") where ops.count == 1:
            return try await metadata(call)
        default:
            throw SandpiperError.notFound(
                "no such operation: \(method) \(operation.joined(separator: "/")) on pool '\(pool.configuration.name)'",
                code: "RouteNotFound"
            )
        }
    }

    // MARK: Custom containers

    /// A custom pool: `.management/stopSession`, `getSession` and `listSessions` are Sandpiper's;
    /// every other request goes to the identifier's container.
    func customContainer(_ request: Request, _ call: Call, context: Context) async throws -> Response {
        let ops = call.operation.map { $0.lowercased() }
        switch (request.method, ops) {
        case (.post, [".management", "stopsession"]):
            return try await stopSession(call)
        case (.post, [".management", "getsession"]):
            return try await sessionInfo(call)
        case (.post, [".management", "listsessions"]), (.get, [".management", "listsessions"]):
            return try await listSessions(call, requestPath: request.uri.path)
        default:
            break
        }
        let identifier = try call.identifier()
        let session = try await call.pool.session(for: identifier)
        guard let endpoint = session.sandbox as? any ContainerEndpoint else {
            throw SandpiperError.internalError(
                "the session of custom pool '\(call.pool.configuration.name)' is no container"
            )
        }
        let path = request.uri.path
        let prefixSegments = path.hasPrefix("/subscriptions/") ? 6 : 2
        let proxy = ContainerProxy(
            endpoint: endpoint,
            connectTimeout: .seconds(10),
            responseTimeout: .seconds(call.pool.configuration.maxExecutionSeconds),
            scheme: scheme
        )
        let clientAddress = (context as? any RemoteAddressRequestContext)?.remoteAddress?.ipAddress
        let target = ContainerProxy.target(path: path, query: request.uri.query, prefixSegments: prefixSegments)
        if let upgrade = ContainerProxy.upgradeProtocol(request),
            let client = (context as? any ChannelRequestContext)?.channel
        {
            return try await proxy.upgrade(
                request,
                protocol: upgrade,
                target: target,
                clientAddress: clientAddress,
                client: client,
                session: session
            )
        }
        return try await session.use { _ in
            try await proxy.forward(request, target: target, clientAddress: clientAddress)
        }
    }

    // MARK: Execute

    func legacyExecute(_ request: Request, _ call: Call) async throws -> Response {
        let identifier = try call.identifier()
        let body = try await RequestBody.json(request)
        let pool = call.pool.configuration
        var execution = try executionRequest(body, pool: pool, outputLimit: legacyOutputLimit)
        if pool.type == .shell {
            execution.stdin = try RequestBody.string(body, "stdin")
            execution.outputLimit = try Self.streamLimit(body) ?? Self.defaultStreamLimit
        }
        let session = try await call.pool.session(for: identifier)
        let outcome = try await session.execute(execution)
        let properties: [String: JSONValue] = [
            "$id": .string("2"),
            "status": .string(Self.legacyStatus(outcome, pool: pool)),
            "stdout": .string(outcome.stdout),
            "stderr": .string(outcome.stderr),
            "result": outcome.result,
            "executionResult": outcome.result,
            "executionTimeInMilliseconds": .integer(Int64(outcome.durationMilliseconds.rounded())),
        ]
        return JSONResponse.make(JSONValue.object(["$id": .string("1"), "properties": .object(properties)]))
    }

    /// `Success`/`Failure`; Shell pools put the exit code there, as a string, as Azure does.
    static func legacyStatus(_ outcome: ExecutionOutcome, pool: PoolConfiguration) -> String {
        if pool.type == .shell, let exitCode = outcome.exitCode { return "\(exitCode)" }
        return outcome.status.rawValue
    }

    /// `outputStreamsMaxLength` when the body has it.
    static func streamLimit(_ body: [String: JSONValue]) throws(SandpiperError) -> Int? {
        guard let requested = try RequestBody.integer(body, "outputStreamsMaxLength") else { return nil }
        guard requested >= 1 else {
            throw SandpiperError.invalid("'outputStreamsMaxLength' must be at least 1", code: "InvalidRequestBody")
        }
        return min(requested, maxStreamLimit)
    }

    func executionRequest(
        _ body: [String: JSONValue],
        pool: PoolConfiguration,
        outputLimit: Int
    ) throws(SandpiperError) -> ExecutionRequest {
        guard let code = try RequestBody.string(body, "code") else {
            throw SandpiperError.invalid("the request body needs a 'code' string", code: "SessionPropertiesMissing")
        }
        if let inputType = try RequestBody.string(body, "codeInputType"),
            !["inline", "inlinetext", "inlinebase64"].contains(inputType.lowercased())
        {
            throw SandpiperError.invalid("unsupported codeInputType '\(inputType)'", code: "InvalidRequestBody")
        }
        var source = code
        if try RequestBody.string(body, "codeInputType")?.lowercased() == "inlinebase64" {
            guard let data = Data(base64Encoded: code), let text = String(data: data, encoding: .utf8) else {
                throw SandpiperError.invalid("'code' is not valid base64-encoded UTF-8", code: "InvalidRequestBody")
            }
            source = text
        }
        return ExecutionRequest(
            code: source,
            timeoutSeconds: try Self.timeout(body, pool: pool),
            outputLimit: outputLimit
        )
    }

    /// `timeoutInSeconds`, capped by the pool; the pool's default when absent.
    static func timeout(_ body: [String: JSONValue], pool: PoolConfiguration) throws(SandpiperError) -> Double {
        guard let requested = try RequestBody.integer(body, "timeoutInSeconds") else {
            return Double(pool.defaultExecutionSeconds)
        }
        guard requested >= 1 else {
            throw SandpiperError.invalid("'timeoutInSeconds' must be at least 1", code: "InvalidRequestBody")
        }
        return Double(min(requested, pool.maxExecutionSeconds))
    }

    // MARK: Files

    /// Streams a multipart upload into the session, under the `path` query parameter's directory.
    func receiveUpload(_ request: Request, _ call: Call) async throws -> FileEntry {
        let identifier = try call.identifier()
        let directory = try SessionFilePath(validating: call.query["path"] ?? "", allowRoot: true)
        let session = try await call.pool.session(for: identifier)
        return try await session.use { session in
            try await MultipartUpload.receive(request, maxBytes: call.pool.configuration.maxUploadBytes) { name in
                let path = directory.appending(try SessionFilePath(validating: name))
                return try await session.sandbox.createFile(path)
            }
        }
    }

    func legacyUpload(_ request: Request, _ call: Call) async throws -> Response {
        let entry = try await receiveUpload(request, call)
        return JSONResponse.make(
            JSONValue.object(["$id": .string("1"), "value": .array([Self.legacyEntry(entry, id: 2)])])
        )
    }

    func legacyList(_ call: Call) async throws -> Response {
        let identifier = try call.identifier()
        let directory = try SessionFilePath(validating: call.query["path"] ?? "", allowRoot: true)
        let session = try await call.pool.session(for: identifier)
        let entries = try await session.use { session in
            try await session.sandbox.listFiles(in: directory, recursive: true)
        }
        var next = 2
        var values: [JSONValue] = []
        for entry in entries where !entry.isDirectory {
            values.append(Self.legacyEntry(entry, id: next))
            next += 2
        }
        return JSONResponse.make(JSONValue.object(["$id": .string("1"), "value": .array(values)]))
    }

    func legacyFileInfo(_ call: Call, name: String) async throws -> Response {
        let identifier = try call.identifier()
        let path = try SessionFilePath(validating: name)
        let session = try await call.pool.session(for: identifier)
        let entry = try await session.use { try await $0.sandbox.fileInfo(path) }
        return JSONResponse.make(Self.legacyEntry(entry, id: 1))
    }

    func legacyDelete(_ call: Call, name: String) async throws -> Response {
        let identifier = try call.identifier()
        let path = try SessionFilePath(validating: name)
        let session = try await call.pool.session(for: identifier)
        try await session.use { try await $0.sandbox.deleteFile(path) }
        return JSONResponse.make(JSONValue.object(["message": .string("file deleted successfully")]))
    }

    func download(_ call: Call, name: String) async throws -> Response {
        let identifier = try call.identifier()
        let path = try SessionFilePath(validating: name)
        let session = try await call.pool.session(for: identifier)
        let reader = try await session.use { try await $0.sandbox.openFile(path) }
        let body = ResponseBody(contentLength: Int(reader.size)) { writer in
            defer { reader.close() }
            while true {
                let chunk = try await reader.read(maxBytes: 256 << 10)
                if chunk.isEmpty { break }
                try await writer.write(ByteBuffer(bytes: chunk))
            }
            try await writer.finish(nil)
        }
        return Response(
            status: .ok,
            headers: [
                .contentType: MediaTypes.guess(path.name),
                .contentDisposition: "attachment; filename*=UTF-8''"
                    + (path.name.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? "file"),
            ],
            body: body
        )
    }

    static func legacyEntry(_ entry: FileEntry, id: Int) -> JSONValue {
        .object([
            "$id": .string("\(id)"),
            "properties": .object([
                "$id": .string("\(id + 1)"),
                "filename": .string(entry.path.relative),
                "size": .integer(entry.size),
                "lastModifiedTime": .string(Timestamps.format(entry.modified)),
            ]),
        ])
    }
}

enum Timestamps {
    static func format(_ date: Date) -> String {
        date.formatted(
            .iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted)
        )
    }
}

enum MediaTypes {
    static let byExtension: [String: String] = [
        "txt": "text/plain; charset=utf-8", "csv": "text/csv", "json": "application/json", "png": "image/png",
        "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif", "svg": "image/svg+xml", "pdf": "application/pdf",
        "html": "text/html; charset=utf-8", "md": "text/markdown", "py": "text/x-python", "js": "text/javascript",
        "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "zip": "application/zip", "yaml": "application/yaml", "yml": "application/yaml", "xml": "application/xml",
        "parquet": "application/vnd.apache.parquet", "tar": "application/x-tar", "gz": "application/gzip",
    ]

    static func guess(_ name: String) -> String {
        guard let dot = name.lastIndex(of: ".") else { return "application/octet-stream" }
        return byExtension[name[name.index(after: dot)...].lowercased()] ?? "application/octet-stream"
    }
}
