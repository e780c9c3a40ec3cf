import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import SandpiperCore
import Synchronization
import Testing

@testable import SandpiperImages

/// A token-auth front for the test's `docker-registry`, as Docker Hub or ghcr.io run one, on
/// 127.0.0.1: `/v2/…` without a live bearer token gets 401 and a `Bearer realm=…` challenge naming
/// this front's own `/token`; `/token` issues a token only for the right basic credentials (or
/// anonymously, when allowed), the expected service and a `repository:<name>:pull` scope; authorised
/// manifest requests are proxied to the registry; authorised blob requests are redirected (307) to
/// a second listener on another port that stands in for blob storage (a CDN) and proxies them too.
final class BearerTokenFront: Sendable {
    static let service = "sandpiper-test-registry"

    struct Options: Sendable {
        var username = "sandpiper"
        var password = "s3cret"
        var allowAnonymous = false
        /// `token` (Docker) or `access_token` (OAuth 2 style), the key of the token in the JSON answer.
        var tokenKey = "token"
        /// How many authorised requests a token is good for before it "expires".
        var usesPerToken = Int.max
    }

    struct TokenRequest: Sendable, Equatable {
        var service: String?
        var scope: String?
        var authorization: String?
        var granted: Bool
    }

    /// What the front saw.
    struct Log: Sendable {
        var tokenRequests: [TokenRequest] = []
        var challenges = 0
        var authorised = 0
        /// The `Authorization` header of each request to the storage listener (nil when absent).
        var storageAuthorizations: [String?] = []
    }

    let registryPort: Int
    let port: Int
    let storagePort: Int
    let options = Mutex(Options())
    let log = Mutex(Log())
    /// Live tokens and the uses left to each.
    private let tokens = Mutex<[String: Int]>([:])
    private let client = HTTPClient(eventLoopGroupProvider: .singleton)
    private let servers = Mutex<[Task<Void, any Error>]>([])

    private init(registryPort: Int, port: Int, storagePort: Int) {
        self.registryPort = registryPort
        self.port = port
        self.storagePort = storagePort
    }

    /// Starts the front and the storage listener, each on a free loopback port.
    static func start(registryPort: Int) async throws -> BearerTokenFront {
        let front = BearerTokenFront(
            registryPort: registryPort,
            port: try RegistryIntegrationTests.freePort(),
            storagePort: try RegistryIntegrationTests.freePort()
        )
        var logger = Logger(label: "bearer-front")
        logger.logLevel = .critical  // not the start and cancellation chatter
        for port in [front.port, front.storagePort] {
            let (started, sink) = AsyncStream<Void>.makeStream()
            let app = Application(
                responder: CallbackResponder<BasicRequestContext> { request, _ in
                    try await front.respond(to: request)
                },
                configuration: .init(address: .hostname("127.0.0.1", port: port)),
                onServerRunning: { _ in sink.finish() },
                logger: logger
            )
            front.servers.withLock { $0.append(Task { try await app.runService(gracefulShutdownSignals: []) }) }
            for await _ in started {}
        }
        return front
    }

    func stop() async {
        for server in servers.withLock({ $0 }) {
            server.cancel()
            _ = await server.result
        }
        try? await client.shutdown()
    }

    /// Sets the options for the next pull (from the defaults) and forgets the log and the tokens issued so far.
    func reset(_ change: (inout Options) -> Void = { _ in }) {
        var next = Options()
        change(&next)
        options.withLock { $0 = next }
        log.withLock { $0 = Log() }
        tokens.withLock { $0 = [:] }
    }

    private func respond(to request: Request) async throws -> Response {
        let path = request.uri.path
        if path == "/token" { return token(request) }
        if path.hasPrefix("/storage/") {
            log.withLock { $0.storageAuthorizations.append(request.headers[.authorization]) }
            return try await proxy(String(path.dropFirst("/storage".count)), request: request)
        }
        guard path.hasPrefix("/v2/") else { return Response(status: .notFound) }
        guard authorised(request.headers[.authorization]) else { return challenge(path) }
        if path.contains("/blobs/") {
            return Response(
                status: .temporaryRedirect,
                headers: [.location: "http://127.0.0.1:\(storagePort)/storage\(path)"]
            )
        }
        return try await proxy(path, request: request)
    }

    private func authorised(_ header: String?) -> Bool {
        guard let header, header.hasPrefix("Bearer ") else { return false }
        let token = String(header.dropFirst("Bearer ".count))
        let live = tokens.withLock { tokens in
            guard let left = tokens[token], left > 0 else { return false }
            tokens[token] = left - 1
            return true
        }
        if live { log.withLock { $0.authorised += 1 } }
        return live
    }

    private func challenge(_ path: String) -> Response {
        log.withLock { $0.challenges += 1 }
        var value = #"Bearer realm="http://127.0.0.1:\#(port)/token",service="\#(Self.service)""#
        // /v2/<name>/manifests/… and /v2/<name>/blobs/…: the scope names the repository.
        for marker in ["/manifests/", "/blobs/"] {
            if let range = path.range(of: marker) {
                value +=
                    #",scope="repository:\#(path[path.index(path.startIndex, offsetBy: 4)..<range.lowerBound]):pull""#
            }
        }
        return Response(
            status: .unauthorized,
            headers: [.wwwAuthenticate: value, .contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: #"{"errors":[{"code":"UNAUTHORIZED"}]}"#))
        )
    }

    private func token(_ request: Request) -> Response {
        let options = options.withLock { $0 }
        let service = request.uri.queryParameters["service"].map(String.init)
        let scope = request.uri.queryParameters["scope"].map(String.init)
        let authorization = request.headers[.authorization]
        let expected = RegistryClient.basic(RegistryCredentials(username: options.username, password: options.password))
        let scopeOK =
            scope.map { $0.hasPrefix("repository:") && $0.hasSuffix(":pull") && $0.count > "repository::pull".count }
            ?? false
        let granted =
            service == Self.service && scopeOK
            && (authorization == expected || (authorization == nil && options.allowAnonymous))
        log.withLock {
            $0.tokenRequests.append(
                TokenRequest(service: service, scope: scope, authorization: authorization, granted: granted)
            )
        }
        guard granted else { return Response(status: .unauthorized) }
        let token = UUID().uuidString
        tokens.withLock { $0[token] = options.usesPerToken }
        return Response(
            status: .ok,
            headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(string: #"{"\#(options.tokenKey)":"\#(token)","expires_in":300}"#))
        )
    }

    /// The same GET on the registry behind; its status, content type, digest header and body.
    private func proxy(_ path: String, request: Request) async throws -> Response {
        var upstream = HTTPClientRequest(url: "http://127.0.0.1:\(registryPort)\(path)")
        if let accept = request.headers[.accept] { upstream.headers.add(name: "Accept", value: accept) }
        let response = try await client.execute(upstream, timeout: .seconds(30))
        let body = try await response.body.collect(upTo: 64 << 20)
        var headers = HTTPFields()
        for name in ["Content-Type", "Docker-Content-Digest"] {
            if let value = response.headers.first(name: name), let field = HTTPField.Name(name) {
                headers[field] = value
            }
        }
        return Response(
            status: .init(code: Int(response.status.code)),
            headers: headers,
            body: .init(byteBuffer: body)
        )
    }
}

extension RegistryIntegrationTests {
    /// `image pull` through a real bearer-token flow: the registry behind a token-auth front.
    @Test func bearerTokenRegistry() async throws {
        try Self.requireTools()
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let layout = try Self.buildImage(in: dir.path)
        let registry = try Registry(directory: dir.path + "/registry")
        defer { registry.stop() }
        try Self.run(
            "/usr/bin/skopeo",
            [
                "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", dir.path + "/pushed", "oci:\(layout):web",
                "docker://127.0.0.1:\(registry.port)/secure/web:1",
            ]
        )
        let pushed = try Digest(
            parsing: try String(contentsOfFile: dir.path + "/pushed", encoding: .utf8).trimmingWhitespace()
        )
        let front = try await BearerTokenFront.start(registryPort: registry.port)
        do {
            try await Self.bearerPulls(front: front, pushed: pushed, directory: dir.path)
        } catch {
            await front.stop()
            throw error
        }
        await front.stop()
    }

    private static func bearerPulls(front: BearerTokenFront, pushed: Digest, directory: String) async throws {
        let reference = try ImageReference(parsing: "127.0.0.1:\(front.port)/secure/web:1")
        let right = RegistryCredentials(username: "sandpiper", password: "s3cret")
        var stores = 0
        func pull(_ credentials: RegistryCredentials?) async throws -> (ImageStore, ImageRecord) {
            stores += 1  // a fresh store each time, so every blob is fetched
            let store = try ImageStore(dataDirectory: directory + "/data-\(stores)")
            return (store, try await store.pull(reference, credentials: credentials, insecure: true))
        }
        let scope = "repository:secure/web:pull"

        // Anonymous and wrong credentials: the token service refuses, the pull says so.
        for credentials in [nil, RegistryCredentials(username: "sandpiper", password: "wrong")] {
            front.reset()
            let refused = await #expect(throws: SandpiperError.self) { _ = try await pull(credentials) }
            #expect(refused?.code == "RegistryUnauthorized")
            #expect(refused?.kind == .unauthorized)
            let requests = front.log.withLock { $0.tokenRequests }
            #expect(requests.map(\.granted) == [false])
            #expect(requests.first?.authorization == credentials.map(RegistryClient.basic))
        }

        // The right credentials: one challenge, one token for the right service and scope, reused
        // for the manifest, the config and both layers; blob redirects to the other port go without it.
        front.reset()
        let (store, record) = try await pull(right)
        #expect(record.manifestDigest == pushed)
        try checkLayers(try await store.resolve(reference.description))
        let log = front.log.withLock { $0 }
        #expect(
            log.tokenRequests == [
                .init(
                    service: BearerTokenFront.service,
                    scope: scope,
                    authorization: RegistryClient.basic(right),
                    granted: true
                )
            ]
        )
        #expect(log.challenges == 1)
        #expect(log.authorised == 2 + record.layers.count)
        #expect(log.storageAuthorizations == Array(repeating: nil, count: 1 + record.layers.count))

        // A token that expires mid-pull (after the manifest and config) costs one re-auth, then the pull goes on.
        front.reset { $0.usesPerToken = 2 }
        #expect(try await pull(right).1.manifestDigest == pushed)
        let expiring = front.log.withLock { $0 }
        #expect(expiring.tokenRequests.map(\.granted) == [true, true])
        #expect(expiring.challenges == 2)
        #expect(expiring.authorised == 2 + record.layers.count)

        // A token the registry never honours: one token request, then a clear error, not a loop.
        front.reset { $0.usesPerToken = 0 }
        let dead = await #expect(throws: SandpiperError.self) { _ = try await pull(right) }
        #expect(dead?.code == "RegistryUnauthorized")
        #expect(front.log.withLock { $0.tokenRequests.count } == 1)

        // A public repository whose token service answers anonymously with `access_token`.
        front.reset {
            $0.allowAnonymous = true
            $0.tokenKey = "access_token"
        }
        #expect(try await pull(nil).1.manifestDigest == pushed)
        let anonymous = front.log.withLock { $0.tokenRequests }
        #expect(anonymous.map(\.authorization) == [nil])
        #expect(anonymous.map(\.granted) == [true])
    }
}
