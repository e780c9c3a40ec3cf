import AsyncHTTPClient
import Foundation
import Hummingbird
import NIOCore
import NIOHTTP1
import SandpiperAPI
import SandpiperCore
import SandpiperSessions
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// The proxy of custom container pools, end to end: a real Sandpiper HTTP server on loopback
/// (the production router), a real HTTP client, and containers running `Fixtures/web.c` under
/// crun.
@Suite("Custom container proxy over HTTP", .enabled(if: integrationEnabled), .serialized)
struct ContainerProxyTests {
    static let script = #"""
        set -e
        L="$1"; B="$L/bundle"; F="$2"
        umoci init --layout "$L/layout"
        umoci new --image "$L/layout:web"
        umoci unpack --image "$L/layout:web" "$B" >/dev/null
        mkdir -p "$B/rootfs/bin" "$B/rootfs/tmp"
        gcc -static -O1 -o "$B/rootfs/bin/web" "$F/web.c"
        umoci repack --image "$L/layout:web" "$B"
        umoci config --image "$L/layout:web" --config.entrypoint /bin/web
        """#

    static let apiKey = "proxy-test-key"

    /// The server, its pool and a client, for one test.
    struct Server: Sendable {
        let base: String
        let authority: String
        let client: HTTPClient
        let fixture: Fixture
        let pool: SessionPool
        let port: Int
        /// The server's per-client connection count (the production guards).
        let connections: ClientConnectionRegistry

        func request(
            _ method: HTTPMethod,
            _ path: String,
            identifier: String,
            body: HTTPClientRequest.Body? = nil,
            headers: [(String, String)] = []
        ) async throws -> HTTPClientResponse {
            let separator = path.contains("?") ? "&" : "?"
            var request = HTTPClientRequest(url: base + path + separator + "identifier=" + identifier)
            request.method = method
            request.headers.add(name: "Authorization", value: "Bearer \(ContainerProxyTests.apiKey)")
            for (name, value) in headers { request.headers.add(name: name, value: value) }
            if let body { request.body = body }
            return try await client.execute(request, timeout: .seconds(120))
        }

        func text(_ method: HTTPMethod, _ path: String, identifier: String, body: String? = nil) async throws -> Reply {
            let response = try await request(
                method,
                path,
                identifier: identifier,
                body: body.map { .bytes(ByteBuffer(string: $0)) }
            )
            let buffer = try await response.body.collect(upTo: 1 << 20)
            return Reply(Int(response.status.code), String(buffer: buffer))
        }
    }

    struct Reply: Equatable, CustomStringConvertible {
        let status: Int
        let body: String
        init(_ status: Int, _ body: String) {
            self.status = status
            self.body = body
        }
        var description: String { "\(status) \(body)" }
    }

    /// `i % 251` for i in 0..<(251 + 256 KiB): any run of the pattern up to 256 KiB is a slice.
    static let pattern: [UInt8] = (0..<(251 + (256 << 10))).map { UInt8($0 % 251) }

    /// `size` bytes of `i % 251` in chunks (up to 256 KiB), made as the client sends them.
    struct PatternBody: AsyncSequence, Sendable {
        let size: Int
        let chunk: Int
        struct AsyncIterator: AsyncIteratorProtocol {
            let size: Int
            let chunk: Int
            var offset = 0
            mutating func next() async -> ByteBuffer? {
                guard offset < size else { return nil }
                let count = Swift.min(chunk, size - offset)
                let start = offset % 251
                let buffer = ByteBuffer(bytes: ContainerProxyTests.pattern[start..<(start + count)])
                offset += count
                return buffer
            }
        }
        func makeAsyncIterator() -> AsyncIterator { AsyncIterator(size: size, chunk: chunk) }
    }

    static func pool(maxExecutionSeconds: Int = 30, liveness: ContainerProbe? = nil) -> PoolConfiguration {
        var pool = Fixture.pool(name: "web", cooldown: 300)
        pool.type = .customContainer
        pool.maxExecutionSeconds = maxExecutionSeconds
        pool.defaultExecutionSeconds = maxExecutionSeconds
        pool.container = ContainerTemplate(image: "local/web:test", targetPort: 8080, livenessProbe: liveness)
        return pool
    }

    /// Runs `body` against a live server on 127.0.0.1 (an ephemeral port) serving `configuration`.
    static func withServer(_ configuration: PoolConfiguration, _ body: (Server) async throws -> Void) async throws {
        let fixture = try await ContainerTests.fixture(script: script)
        let pool = SessionPool(configuration: configuration, backend: fixture.backend, logger: fixture.logger)
        let sessions = SessionManager(pools: [pool], backends: [fixture.backend], logger: fixture.logger)
        await sessions.removeLeftovers()  // as `serve` does, before the port opens
        let (ports, portSink) = AsyncStream<Int>.makeStream()
        let connections = ClientConnectionRegistry(logger: fixture.logger)
        // The production server: guards, header limits and the upgrade pass-through.
        let app = Application(
            router: buildRouter(sessions: sessions, apiKey: apiKey),
            server: HTTPLimits().http1Server(registry: connections),
            configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            services: [sessions],
            onServerRunning: { channel in
                portSink.yield(channel.localAddress?.port ?? 0)
                portSink.finish()
            },
            logger: fixture.logger
        )
        let running = Task { try await app.runService(gracefulShutdownSignals: []) }
        var iterator = ports.makeAsyncIterator()
        guard let port = await iterator.next() else {
            Issue.record("the server did not start")
            running.cancel()
            _ = await running.result
            await pool.shutdown()
            await fixture.tearDown()
            return
        }
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let server = Server(
            base: "http://127.0.0.1:\(port)/pools/web",
            authority: "127.0.0.1:\(port)",
            client: client,
            fixture: fixture,
            pool: pool,
            port: port,
            connections: connections
        )
        do {
            try await body(server)
        } catch {
            Issue.record(error)
        }
        try? await client.shutdown()
        running.cancel()
        _ = await running.result
        await pool.shutdown()
        await fixture.tearDown()
    }

    static func fnv(_ bytes: some Sequence<UInt8>, _ start: UInt32 = 2_166_136_261) -> UInt32 {
        bytes.reduce(start) { ($0 ^ UInt32($1)) &* 16_777_619 }
    }

    static func errorCode(_ text: String) -> String? {
        guard let data = text.data(using: .utf8),
            let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let error = object["error"] as? [String: Any]
        else { return nil }
        return error["code"] as? String
    }

    @Test("each identifier reaches its own container, whose state is its own")
    func routing() async throws {
        try await Self.withServer(Self.pool()) { server in
            let reply1 = try await server.text(.POST, "/state", identifier: "alpha-1", body: "from-a")
            #expect(reply1 == Reply(200, "state=from-a\n"))
            let reply2 = try await server.text(.POST, "/state", identifier: "bravo-2", body: "from-b")
            #expect(reply2 == Reply(200, "state=from-b\n"))
            let reply3 = try await server.text(.GET, "/state", identifier: "alpha-1")
            #expect(reply3 == Reply(200, "state=from-a\n"))
            let reply4 = try await server.text(.GET, "/state", identifier: "bravo-2")
            #expect(reply4 == Reply(200, "state=from-b\n"))
            #expect(await server.pool.sessionCount == 2)
        }
    }

    @Test("method, path, query and body arrive unchanged; Authorization stays behind; X-Forwarded-* are added")
    func forwarding() async throws {
        try await Self.withServer(Self.pool()) { server in
            let body = "hello, container"
            let response = try await server.request(
                .PUT,
                "/echo/sub/path?x=1&y=two%20words&api-version=2024-02-02-preview",
                identifier: "fwd-1",
                body: .bytes(.init(string: body)),
                headers: [("X-Custom", "value 1"), ("X-Forwarded-For", "10.1.2.3")]
            )
            #expect(response.status == .ok)
            let text = String(buffer: try await response.body.collect(upTo: 1 << 20))
            let lines = Set(text.split(separator: "\n").map(String.init))
            #expect(lines.contains("method=PUT"), "\(text)")
            // Sandpiper's own query parameters (identifier, api-version) are not the container's.
            #expect(lines.contains("target=/echo/sub/path?x=1&y=two%20words"), "\(text)")
            #expect(lines.contains("body-bytes=\(body.utf8.count)"), "\(text)")
            #expect(lines.contains("body-fnv=" + String(format: "%08x", Self.fnv(body.utf8))), "\(text)")
            #expect(lines.contains("header:X-Custom: value 1"), "\(text)")
            #expect(lines.contains("header:X-Forwarded-For: 10.1.2.3, 127.0.0.1"), "\(text)")
            #expect(lines.contains("header:X-Forwarded-Proto: http"), "\(text)")
            #expect(lines.contains("header:X-Forwarded-Host: \(server.authority)"), "\(text)")
            #expect(lines.contains("header:Host: \(server.authority)"), "\(text)")
            #expect(!text.lowercased().contains("authorization"), "\(text)")
            #expect(!text.contains(Self.apiKey), "\(text)")

            // The ARM-style pool endpoint reaches the same container; the container's own statuses pass.
            var arm = HTTPClientRequest(
                url:
                    "http://\(server.authority)/subscriptions/s/resourceGroups/g/sessionPools/web/nothing?identifier=fwd-1"
            )
            arm.headers.add(name: "Authorization", value: "Bearer \(Self.apiKey)")
            let notFound = try await server.client.execute(arm, timeout: .seconds(30))
            #expect(notFound.status == .notFound)
            #expect(String(buffer: try await notFound.body.collect(upTo: 1 << 16)) == "not found\n")
            #expect(await server.pool.sessionCount == 1)
        }
    }

    /// The resident set size of this process (the server and the client), in bytes.
    static func residentBytes() -> Int {
        let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
        let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }

    /// Samples the RSS while `body` runs; returns its peak above the RSS at the start.
    static func peakGrowth(_ body: () async throws -> Void) async throws -> Int {
        let start = residentBytes()
        let sampler = Task {
            var peak = start
            while !Task.isCancelled {
                peak = max(peak, residentBytes())
                try? await Task.sleep(for: .milliseconds(20))
            }
            return peak
        }
        try await body()
        sampler.cancel()
        return max(await sampler.value, residentBytes()) - start
    }

    @Test("50 MiB up and down stream through without the server holding them")
    func largeBodies() async throws {
        try await Self.withServer(Self.pool()) { server in
            let size = 50 << 20
            // Warm up the session, the connection pool and the allocator first.
            _ = try await server.text(.GET, "/state", identifier: "big-1")
            let upload = try await Self.peakGrowth {
                let response = try await server.request(
                    .POST,
                    "/echo",
                    identifier: "big-1",
                    body: .stream(PatternBody(size: size, chunk: 256 << 10), length: .known(Int64(size)))
                )
                let text = String(buffer: try await response.body.collect(upTo: 1 << 20))
                #expect(text.contains("body-bytes=\(size)\n"), "\(text.prefix(200))")
                // FNV-1a of the 50 MiB (computed independently, with Python).
                #expect(text.contains("body-fnv=27ff4ce5\n"), "\(text.prefix(200))")
            }
            var received = 0
            var mismatches = 0
            let download = try await Self.peakGrowth {
                let response = try await server.request(.GET, "/download?bytes=\(size)", identifier: "big-1")
                #expect(response.status == .ok)
                #expect(response.headers.first(name: "Content-Length") == "\(size)")
                for try await buffer in response.body {
                    var rest = buffer
                    while let slice = rest.readSlice(length: Swift.min(rest.readableBytes, 256 << 10)) {
                        let start = received % 251
                        let same = slice.withUnsafeReadableBytes { bytes in
                            Self.pattern.withUnsafeBytes {
                                memcmp(bytes.baseAddress!, $0.baseAddress! + start, bytes.count)
                            }
                        }
                        if same != 0 { mismatches += 1 }
                        received += slice.readableBytes
                        if rest.readableBytes == 0 { break }
                    }
                }
            }
            #expect(received == size)
            #expect(mismatches == 0)
            print("proxy RSS growth: upload \(upload >> 20) MiB, download \(download >> 20) MiB for \(size >> 20) MiB")
            // Held in memory, either body alone would add 50 MiB.
            #expect(upload < 24 << 20, "upload grew RSS by \(upload >> 20) MiB")
            #expect(download < 24 << 20, "download grew RSS by \(download >> 20) MiB")
        }
    }

    @Test("a container that drops, refuses or stalls gives a 502 or 504 JSON error")
    func errors() async throws {
        try await Self.withServer(Self.pool(maxExecutionSeconds: 2)) { server in
            let drop = try await server.text(.GET, "/drop", identifier: "err-1")
            let (dropped, droppedBody) = (drop.status, drop.body)
            #expect(dropped == 502, "\(droppedBody)")
            #expect(Self.errorCode(droppedBody) == "ContainerResponseFailed", "\(droppedBody)")

            let started = ContinuousClock.now
            let stall = try await server.text(.GET, "/slow?seconds=6", identifier: "err-1")
            let (slow, slowBody) = (stall.status, stall.body)
            let waited = ContinuousClock.now - started
            #expect(slow == 504, "\(slowBody)")
            #expect(Self.errorCode(slowBody) == "ContainerTimeout", "\(slowBody)")
            #expect(waited >= .seconds(2) && waited < .seconds(5), "answered after \(waited)")

            let reply6 = try await server.text(.GET, "/stop-listening", identifier: "err-1")
            #expect(reply6.status == 200)
            let refusal = try await server.text(.GET, "/echo", identifier: "err-1")
            let (refused, refusedBody) = (refusal.status, refusal.body)
            #expect(refused == 502, "\(refusedBody)")
            #expect(Self.errorCode(refusedBody) == "ContainerUnreachable", "\(refusedBody)")
        }
    }

    @Test("a container whose liveness probe fails is replaced: the next request gets a fresh one")
    func liveness() async throws {
        let probe = ContainerProbe(action: .httpGet(path: "/health", port: 8080), periodSeconds: 1, failureThreshold: 2)
        try await Self.withServer(Self.pool(liveness: probe)) { server in
            let reply7 = try await server.text(.POST, "/state", identifier: "live-1", body: "before")
            #expect(reply7.body == "state=before\n")
            let identifier = try SessionIdentifier(validating: "live-1")
            let first = try #require(await server.pool.existingSession(for: identifier)?.sandbox as? ContainerSandbox)
            // Healthy: the probe keeps passing.
            try await Task.sleep(for: .seconds(3))
            #expect(first.isAlive)
            let reply8 = try await server.text(.GET, "/sick", identifier: "live-1")
            #expect(reply8.status == 200)
            for _ in 0..<100 where first.isAlive { try await Task.sleep(for: .milliseconds(100)) }
            #expect(!first.isAlive, "the failing liveness probe did not end the session")
            // The reaper removes the dead container at once, without waiting for a request.
            var gone = false
            for _ in 0..<50 {
                gone = !FileManager.default.fileExists(atPath: first.directory)
                if gone { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(gone, "the container outlived its failed liveness probe")
            let reply5 = try await server.text(.GET, "/state", identifier: "live-1")
            #expect(reply5 == Reply(200, "state=\n"))
            let second = try #require(await server.pool.existingSession(for: identifier)?.sandbox as? ContainerSandbox)
            #expect(second.id != first.id)
        }
    }
}
