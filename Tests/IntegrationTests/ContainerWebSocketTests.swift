import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket
import SandpiperAPI
import SandpiperCore
import SandpiperSessions
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// WebSocket pass-through, end to end: the production server on loopback (its guards and the
/// upgrade handler), NIO's WebSocket client (its upgrader checks `Sec-WebSocket-Accept`; its
/// frame codec masks what it sends), and `Fixtures/web.c`'s `/ws` echo in the containers.
extension ContainerProxyTests {
    /// One client WebSocket: frames in and out, with a deadline that closes it so a test that
    /// waits for a frame that never comes fails instead of hanging.
    struct Socket {
        var frames: NIOAsyncChannelInboundStream<WebSocketFrame>.AsyncIterator
        let outbound: NIOAsyncChannelOutboundWriter<WebSocketFrame>
        /// With `withWebSocket(delayFirstRead:)`: whether the client's first read held more than
        /// the 101's head (the bytes that followed it in the same read).
        let firstReadHeldMore: Bool?

        func send(_ opcode: WebSocketOpcode, _ data: ByteBuffer, fin: Bool = true) async throws {
            try await outbound.write(WebSocketFrame(fin: fin, opcode: opcode, maskKey: .random(), data: data))
        }

        func send(_ text: String) async throws { try await send(.text, ByteBuffer(string: text)) }

        mutating func receive() async throws -> WebSocketFrame? { try await frames.next() }

        /// The next frame, which must be a final text frame.
        mutating func text() async throws -> String {
            let frame = try #require(try await receive(), "the connection closed instead")
            #expect(frame.opcode == .text && frame.fin, "\(frame)")
            return String(buffer: frame.unmaskedData)
        }
    }

    enum Upgrade: Sendable {
        case upgraded(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, HTTPResponseHead, firstReadHeldMore: Bool?)
        /// The server's answer instead of a 101 (its start, as text).
        case refused(String)
    }

    /// In front of a client connection: keeps the start of what the server sends (to describe an
    /// answer that is no 101) and, with a `delay`, holds back the first read that long, so that
    /// what the server sends by then (the 101 and whatever follows it) arrives in that one read,
    /// noting whether that read held more than the response head.
    final class FirstReadProbe: ChannelDuplexHandler, RemovableChannelHandler {
        typealias InboundIn = ByteBuffer
        typealias InboundOut = ByteBuffer
        typealias OutboundIn = NIOAny

        private let delay: TimeAmount?
        private var delayed = false
        private(set) var firstReadHeldMore: Bool?
        private(set) var start = ""

        init(delay: TimeAmount?) { self.delay = delay }

        /// The probe of `channel` (on its event loop).
        static func of(_ channel: any Channel) -> FirstReadProbe? {
            try? channel.pipeline.syncOperations.handler(type: FirstReadProbe.self)
        }

        func read(context: ChannelHandlerContext) {
            guard let delay, !delayed else { return context.read() }
            delayed = true
            context.eventLoop.assumeIsolated().scheduleTask(in: delay) { context.read() }
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = unwrapInboundIn(data).readableBytesView
            if firstReadHeldMore == nil {
                let end = bytes.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound
                firstReadHeldMore = end.map { $0 < bytes.endIndex } ?? false
            }
            if start.utf8.count < 1024 { start += String(decoding: bytes.prefix(1024), as: UTF8.self) }
            context.fireChannelRead(data)
        }
    }

    /// Opens a WebSocket to `path` of the pool (with `identifier`) through the server and runs
    /// `body` with the server's 101 and the socket; the connection is closed afterwards.
    static func withWebSocket(
        _ server: Server,
        _ path: String,
        identifier: String,
        headers extra: [(String, String)] = [],
        delayFirstRead: TimeAmount? = nil,
        deadline: TimeAmount = .seconds(60),
        _ body: (HTTPResponseHead, inout Socket) async throws -> Void
    ) async throws {
        let separator = path.contains("?") ? "&" : "?"
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: server.authority)
        headers.add(name: "Authorization", value: "Bearer \(apiKey)")
        for (name, value) in extra { headers.add(name: name, value: value) }
        let head = HTTPRequestHead(
            version: .http1_1,
            method: .GET,
            uri: "/pools/web" + path + separator + "identifier=" + identifier,
            headers: headers
        )
        let upgrade = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: server.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(FirstReadProbe(delay: delayFirstRead))
                    let upgrader = NIOTypedWebSocketClientUpgrader<Upgrade>(maxFrameSize: 1 << 24) {
                        channel,
                        response in
                        channel.eventLoop.makeCompletedFuture {
                            .upgraded(
                                try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(
                                    wrappingChannelSynchronously: channel
                                ),
                                response,
                                firstReadHeldMore: delayFirstRead == nil
                                    ? nil : FirstReadProbe.of(channel)?.firstReadHeldMore
                            )
                        }
                    }
                    let configuration = NIOTypedHTTPClientUpgradeConfiguration<Upgrade>(
                        upgradeRequestHead: head,
                        upgraders: [upgrader],
                        notUpgradingCompletionHandler: { channel in
                            channel.eventLoop.makeCompletedFuture { .refused(FirstReadProbe.of(channel)?.start ?? "") }
                        }
                    )
                    // The bytes that follow the 101 in the same read (a frame the server sends right
                    // away) stay in the HTTP decoder when the upgrade removes it; NIO's default
                    // (`.dropBytes`) discards them, so such a frame would be lost whenever the
                    // 101 and the frame happen to be read together.
                    var pipeline = NIOUpgradableHTTPClientPipelineConfiguration(upgradeConfiguration: configuration)
                    pipeline.leftOverBytesStrategy = .forwardBytes
                    return try channel.pipeline.syncOperations.configureUpgradableHTTPClientPipeline(
                        configuration: pipeline
                    )
                }
            }
            .get()
        let channel: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>
        let response: HTTPResponseHead
        let firstReadHeldMore: Bool?
        switch upgrade {
        case .upgraded(let upgraded, let head, let heldMore):
            (channel, response, firstReadHeldMore) = (upgraded, head, heldMore)
        case .refused(let answer):
            Issue.record("the server did not upgrade \(path): \(answer)")
            return
        }
        let deadline = channel.channel.eventLoop.scheduleTask(in: deadline) { channel.channel.close(promise: nil) }
        defer { deadline.cancel() }
        try await channel.executeThenClose { inbound, outbound in
            var socket = Socket(
                frames: inbound.makeAsyncIterator(),
                outbound: outbound,
                firstReadHeldMore: firstReadHeldMore
            )
            try await body(response, &socket)
        }
    }

    /// Sends `request` on a new loopback connection to the server and returns all it answers
    /// until it closes the connection (or 30 s pass).
    static func rawExchange(port: Int, _ request: String) throws -> String {
        String(decoding: try rawBytes(port: port, request), as: UTF8.self)
    }

    /// Sends `request` on a new loopback connection to the server and returns what it answers
    /// until `enough` holds for it, the server closes the connection, or 30 s pass.
    static func rawBytes(
        port: Int,
        _ request: String,
        until enough: ([UInt8]) -> Bool = { _ in false }
    ) throws -> [UInt8] {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw SandpiperError.internalError("socket") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else { throw SandpiperError.internalError("connect") }
        var timeout = timeval(tv_sec: 30, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let bytes = Array(request.utf8)
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !enough(answer) {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            answer += buffer[0..<count]
        }
        return answer
    }

    /// `answer` split after its head (nil when the head is incomplete).
    static func splitHead(_ answer: [UInt8]) -> (head: String, rest: [UInt8])? {
        guard let end = answer.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return nil }
        return (String(decoding: answer[..<end], as: UTF8.self), Array(answer[end...]))
    }

    /// An unmasked (server to client) frame with a payload under 126 bytes.
    static func serverFrame(_ opcode: UInt8, _ payload: [UInt8]) -> [UInt8] {
        [0x80 | opcode, UInt8(payload.count)] + payload
    }

    static func upgradeRequest(_ server: Server, _ path: String, identifier: String) -> String {
        let separator = path.contains("?") ? "&" : "?"
        return "GET /pools/web\(path)\(separator)identifier=\(identifier) HTTP/1.1\r\nHost: \(server.authority)\r\n"
            + "Authorization: Bearer \(apiKey)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    }

    static func openDescriptors() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
    }

    /// Waits (up to 10 s) until `condition` holds; returns whether it did.
    static func eventually(_ condition: () async -> Bool) async throws -> Bool {
        for _ in 0..<100 {
            if await condition() { return true }
            try await Task.sleep(for: .milliseconds(100))
        }
        return await condition()
    }

    @Test("WebSocket: frames of every kind relayed both ways, per identifier, until either side closes")
    func webSocketRelay() async throws {
        try await Self.withServer(Self.pool()) { server in
            #expect(try await server.text(.POST, "/state", identifier: "ws-a", body: "A") == Reply(200, "state=A\n"))
            #expect(try await server.text(.POST, "/state", identifier: "ws-b", body: "B") == Reply(200, "state=B\n"))
            let sessionA = try #require(await server.pool.existingSession(for: SessionIdentifier(validating: "ws-a")))
            let connectionsBefore = server.connections.connections(of: "127.0.0.1")
            let descriptorsBefore = Self.openDescriptors()

            try await Self.withWebSocket(
                server,
                "/ws?hello",
                identifier: "ws-a",
                headers: [("Sec-WebSocket-Protocol", "chat, superchat"), ("X-Custom", "kept")]
            ) { head, a in
                // The container's handshake: its subprotocol choice; its first frame, sent in the
                // same write as its 101, arrives too.
                #expect(head.status == .switchingProtocols)
                #expect(head.headers["Sec-WebSocket-Protocol"] == ["chat"])
                #expect(try await a.text() == "hello")
                #expect(sessionA.isBusy, "an open WebSocket keeps its session busy")

                // The upgrade request as the container saw it.
                try await a.send("headers")
                let request = try await a.text()
                let lines = Set(request.split(separator: "\r\n").map(String.init))
                #expect(request.hasPrefix("GET /ws?hello HTTP/1.1\r\n"), "\(request)")
                #expect(lines.contains("Upgrade: websocket"), "\(request)")
                #expect(lines.contains("Connection: Upgrade"), "\(request)")
                #expect(lines.contains("Sec-WebSocket-Version: 13"), "\(request)")
                #expect(lines.contains("Sec-WebSocket-Protocol: chat, superchat"), "\(request)")
                #expect(lines.contains("X-Custom: kept"), "\(request)")
                #expect(lines.contains("X-Forwarded-For: 127.0.0.1"), "\(request)")
                #expect(lines.contains("X-Forwarded-Proto: http"), "\(request)")
                #expect(lines.contains("X-Forwarded-Host: \(server.authority)"), "\(request)")
                #expect(!request.lowercased().contains("authorization"), "\(request)")
                #expect(!request.contains(Self.apiKey), "\(request)")

                // Two identifiers, two containers, each with its own state.
                try await a.send("state")
                #expect(try await a.text() == "A")
                try await Self.withWebSocket(server, "/ws", identifier: "ws-b") { _, b in
                    try await b.send("state")
                    #expect(try await b.text() == "B")
                    // The container closes: its close frame and code reach the client, then the end.
                    try await b.send("close:4001")
                    let close = try #require(try await b.receive())
                    #expect(close.opcode == .connectionClose)
                    var payload = close.unmaskedData
                    #expect(payload.readInteger(as: UInt16.self) == 4001)
                    #expect(String(buffer: payload) == "server")
                    #expect(try await b.receive() == nil, "the relay outlived the container's close")
                }

                // Text, binary over 64 KiB (a 64-bit length), a fragmented message, a ping.
                try await a.send("text message")
                #expect(try await a.text() == "text message")
                let binary = ByteBuffer(bytes: Self.pattern[0..<(200 << 10)])
                try await a.send(.binary, binary)
                let echoed = try #require(try await a.receive())
                #expect(echoed.opcode == .binary && echoed.fin)
                #expect(echoed.unmaskedData == binary, "\(echoed.unmaskedData.readableBytes) bytes came back")
                try await a.send(.text, ByteBuffer(string: "frag-"), fin: false)
                try await a.send(.continuation, ByteBuffer(string: "ment"), fin: false)
                try await a.send(.continuation, ByteBuffer(string: "ed"), fin: true)
                for (opcode, fin, text) in [
                    (WebSocketOpcode.text, false, "frag-"), (.continuation, false, "ment"), (.continuation, true, "ed"),
                ] {
                    let frame = try #require(try await a.receive())
                    #expect(frame.opcode == opcode && frame.fin == fin && String(buffer: frame.unmaskedData) == text)
                }
                try await a.send(.ping, ByteBuffer(string: "are you there"))
                let pong = try #require(try await a.receive())
                #expect(pong.opcode == .pong && String(buffer: pong.unmaskedData) == "are you there")

                // The client closes with a code: the container answers it, then the relay ends.
                var code = ByteBuffer()
                code.writeInteger(UInt16(4000))
                code.writeString("bye")
                try await a.send(.connectionClose, code)
                let close = try #require(try await a.receive())
                #expect(close.opcode == .connectionClose && close.unmaskedData == code)
                #expect(try await a.receive() == nil, "the relay outlived the close handshake")
            }

            // Nothing is left: the session is idle again, the client's connections are gone, and
            // so are the descriptors of both sides of both relays.
            #expect(try await Self.eventually { !sessionA.isBusy }, "the session stayed busy")
            #expect(
                try await Self.eventually { server.connections.connections(of: "127.0.0.1") <= connectionsBefore },
                "connections: \(server.connections.connections(of: "127.0.0.1")), before: \(connectionsBefore)"
            )
            #expect(
                try await Self.eventually { Self.openDescriptors() <= descriptorsBefore },
                "descriptors: \(Self.openDescriptors()), before: \(descriptorsBefore)"
            )
            // The connection that carried HTTP before still does.
            #expect(try await server.text(.GET, "/state", identifier: "ws-a") == Reply(200, "state=A\n"))
        }
    }

    @Test("WebSocket: a container that is down gives a 502 JSON before the upgrade; a refusal passes through")
    func webSocketErrors() async throws {
        try await Self.withServer(Self.pool()) { server in
            // The container answers the upgrade with a plain 200 (its /echo is no WebSocket): the
            // client gets that answer, and the connection closes after it.
            let refused = try Self.rawExchange(
                port: server.port,
                Self.upgradeRequest(server, "/echo", identifier: "wse-1")
            )
            #expect(refused.hasPrefix("HTTP/1.1 200"), "\(refused)")
            #expect(refused.lowercased().contains("connection: close"), "\(refused)")
            #expect(refused.contains("target=/echo\n"), "\(refused)")

            #expect(try await server.text(.GET, "/stop-listening", identifier: "wse-1").status == 200)
            let down = try Self.rawExchange(port: server.port, Self.upgradeRequest(server, "/ws", identifier: "wse-1"))
            #expect(down.hasPrefix("HTTP/1.1 502"), "\(down)")
            let body = String(down.split(separator: "\r\n\r\n", maxSplits: 1).last ?? "")
            #expect(Self.errorCode(body) == "ContainerUnreachable", "\(down)")
            #expect(!down.contains("101"), "\(down)")
            let session = try #require(await server.pool.existingSession(for: SessionIdentifier(validating: "wse-1")))
            #expect(!session.isBusy)
        }
    }

    @Test(
        "WebSocket: an open socket keeps its session past the cooldown; stopping the session closes it",
        arguments: containerTiers
    )
    func webSocketSessionLifetime(isolation: IsolationTier) async throws {
        var configuration = Self.pool()
        configuration.cooldownPeriodInSeconds = 1
        // gVisor: a destroyed container's netstack sends no FIN; only Sandpiper can close the relay.
        configuration.isolation = isolation
        try await Self.withServer(configuration) { server in
            let identifier = try SessionIdentifier(validating: "wsl-1")
            try await Self.withWebSocket(server, "/ws", identifier: "wsl-1") { _, socket in
                let session = try #require(await server.pool.existingSession(for: identifier))
                try await Task.sleep(for: .seconds(2))
                #expect(await server.pool.reapExpired().isEmpty, "a session with an open WebSocket was reaped")
                #expect(await server.pool.existingSession(for: identifier) === session)
                try await socket.send("still here")
                #expect(try await socket.text() == "still here")

                let stop = try await server.request(.POST, "/.management/stopSession", identifier: "wsl-1")
                #expect(stop.status.code < 300, "\(stop.status)")
                let started = ContinuousClock.now
                #expect(try await socket.receive() == nil, "the WebSocket outlived its session")
                #expect(ContinuousClock.now - started < .seconds(10))
                #expect(try await Self.eventually { !session.isBusy })
            }
            // Closed and idle: the next reap after the cooldown removes a session again.
            _ = try await Self.withWebSocket(server, "/ws", identifier: "wsl-2") { _, socket in
                try await socket.send("x")
                #expect(try await socket.text() == "x")
            }
            let idle = try SessionIdentifier(validating: "wsl-2")
            #expect(await server.pool.existingSession(for: idle) != nil)
            try await Task.sleep(for: .seconds(2))
            await server.pool.reapExpired()
            #expect(await server.pool.existingSession(for: idle) == nil, "an idle session outlived its cooldown")
        }
    }

    @Test("WebSocket: a frame the container sends with its 101 arrives, also when the client reads both at once")
    func webSocketGreeting() async throws {
        try await Self.withServer(Self.pool()) { server in
            // What the server sends: the 101, then exactly the container's frame.
            let hello = Self.serverFrame(0x1, Array("hello".utf8))
            let answer = try Self.rawBytes(
                port: server.port,
                Self.upgradeRequest(server, "/ws?hello", identifier: "wsh-1")
            ) { (Self.splitHead($0)?.rest.count ?? 0) >= hello.count }
            let (head, rest) = try #require(Self.splitHead(answer), "\(answer)")
            #expect(head.hasPrefix("HTTP/1.1 101"), "\(head)")
            #expect(rest == hello)

            // NIO's client with its first read held back until the 101 and the frame are both
            // there: the frame must survive the client's upgrade (a few tries, as a loaded machine
            // may still deliver them apart).
            var together = false
            for _ in 0..<3 where !together {
                try await Self.withWebSocket(
                    server,
                    "/ws?hello",
                    identifier: "wsh-1",
                    delayFirstRead: .milliseconds(500),
                    deadline: .seconds(10)
                ) { (head: HTTPResponseHead, socket: inout Socket) async throws in
                    #expect(head.status == .switchingProtocols)
                    together = socket.firstReadHeldMore == true
                    #expect(try await socket.text() == "hello")
                }
            }
            #expect(together, "the client never read the 101 and the frame together")
        }
    }

    @Test("WebSocket: a container that closes right after its 101 still delivers the frames it sent with it")
    func webSocketContainerClosesAtOnce() async throws {
        try await Self.withServer(Self.pool()) { server in
            let connectionsBefore = server.connections.connections(of: "127.0.0.1")
            // `?bye`: the 101, a text frame and a close frame in one write, then the container closes.
            let frames =
                Self.serverFrame(0x1, Array("hello".utf8)) + Self.serverFrame(0x8, [0x03, 0xE8] + Array("bye".utf8))
            let answer = try Self.rawBytes(
                port: server.port,
                Self.upgradeRequest(server, "/ws?hello&bye", identifier: "wsc-1")
            )
            let (head, rest) = try #require(Self.splitHead(answer), "\(answer)")
            #expect(head.hasPrefix("HTTP/1.1 101"), "\(head)")
            #expect(rest == frames, "after the 101 and before the end: \(rest)")

            // (Checked on the raw bytes: NIO's client upgrade itself loses what follows the 101 when
            // the connection ends before its upgrade completes, as its HTTP decoder drops leftover
            // bytes at the end of input, the very behaviour the proxy has to work around.)
            let session = try #require(await server.pool.existingSession(for: SessionIdentifier(validating: "wsc-1")))
            #expect(try await Self.eventually { !session.isBusy }, "the session stayed busy")
            #expect(
                try await Self.eventually { server.connections.connections(of: "127.0.0.1") <= connectionsBefore },
                "connections: \(server.connections.connections(of: "127.0.0.1")), before: \(connectionsBefore)"
            )
        }
    }
}
