import Foundation
import NIOCore
import NIOPosix
import SandpiperCore
import Synchronization

/// The host side of the guest agent protocol (docs/agent-protocol.md): length-prefixed JSON
/// frames over two pipes that belong to the agent alone, never the user's stdout/stderr.
/// Requests carry ids; each reply resumes the caller that sent the matching id.
final class AgentChannel: Sendable {
    /// Frames from a guest are hostile input: this caps what one can make the server buffer.
    static let maxInboundFrame = 32 << 20

    /// A frame from the agent. A field of the wrong type makes the whole frame malformed; an
    /// absent field and a JSON null are both nil, except `result`, where null is a value (the
    /// agent's answer for nan and inf).
    struct Reply: Sendable {
        var id: Int?
        var type: String
        var status: String?
        var stdout: String?
        var stderr: String?
        var result: JSONValue?
        var jupyterResult: String?
        var timedOut: Bool?
        var durationMs: Double?
        var stdoutTruncated: Bool?
        var stderrTruncated: Bool?
        var message: String?
        var pid: Int?
        var version: String?
        var packages: [Package]?
        var runtime: Package?
        var exitCode: Int?

        struct Package: Sendable {
            var name: String
            var version: String

            init(name: String, version: String) {
                self.name = name
                self.version = version
            }

            init(json: JSONValue) throws(Malformed) {
                guard case .object(let fields) = json else { throw Malformed(field: "package") }
                guard case .string(let name)? = fields["name"] else { throw Malformed(field: "name") }
                guard case .string(let version)? = fields["version"] else { throw Malformed(field: "version") }
                self.name = name
                self.version = version
            }
        }

        struct Malformed: Error {
            var field: String
        }

        init(json: JSONValue) throws(Malformed) {
            guard case .object(let fields) = json else { throw Malformed(field: "frame") }
            func field<T>(_ name: String, _ read: (JSONValue) -> T?) throws(Malformed) -> T? {
                guard let value = fields[name], value != .null else { return nil }
                guard let typed = read(value) else { throw Malformed(field: name) }
                return typed
            }
            func string(_ name: String) throws(Malformed) -> String? { try field(name) { $0.stringValue } }
            func bool(_ name: String) throws(Malformed) -> Bool? {
                try field(name) { if case .bool(let value) = $0 { value } else { nil } }
            }
            func int(_ name: String) throws(Malformed) -> Int? {
                try field(name) { if case .integer(let value) = $0 { Int(exactly: value) } else { nil } }
            }
            guard let type = try string("type") else { throw Malformed(field: "type") }
            self.type = type
            id = try int("id")
            status = try string("status")
            stdout = try string("stdout")
            stderr = try string("stderr")
            result = fields["result"]
            jupyterResult = try string("jupyterResult")
            timedOut = try bool("timedOut")
            durationMs = try field("durationMs") {
                switch $0 {
                case .number(let value): value
                case .integer(let value): Double(value)
                default: nil
                }
            }
            stdoutTruncated = try bool("stdoutTruncated")
            stderrTruncated = try bool("stderrTruncated")
            message = try string("message")
            pid = try int("pid")
            version = try string("version")
            packages = try field("packages") {
                if case .array(let list) = $0 { try? list.map(Package.init(json:)) } else { nil }
            }
            runtime = try field("runtime") { try? Package(json: $0) }
            exitCode = try int("exitCode")
        }
    }

    private struct State {
        var nextID = 1
        var pending: [Int: CheckedContinuation<Reply, any Error>] = [:]
        var ready: CheckedContinuation<Reply, any Error>?
        var readyReply: Reply?
        var closed: SandpiperError?
    }

    private let channel: any Channel
    private let state: Mutex<State>

    private init(channel: any Channel) {
        self.channel = channel
        self.state = Mutex(State())
    }

    /// Takes ownership of `input` (agent → host) and `output` (host → agent).
    static func open(input: Int32, output: Int32) async throws -> AgentChannel {
        let box = StateBox()
        let channel = try await NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.allowRemoteHalfClosure, value: false)
            .takingOwnershipOfDescriptors(input: input, output: output) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(FrameDecoder(maxFrame: AgentChannel.maxInboundFrame))
                    )
                    try channel.pipeline.syncOperations.addHandler(InboundHandler(box: box))
                    return channel
                }
            }
        let agent = AgentChannel(channel: channel)
        box.attach(agent)
        return agent
    }

    var isOpen: Bool { state.withLock { $0.closed == nil } }

    /// Waits for the agent's `ready` frame.
    func waitUntilReady(timeout: Duration) async throws -> Reply {
        let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.nanoseconds))) {
            self.fail(SandpiperError(.timeout, code: "SandboxStartTimeout", "the sandbox agent did not start in time"))
        }
        defer { timer.cancel() }
        return try await withCheckedThrowingContinuation { continuation in
            let immediate: Result<Reply, any Error>? = state.withLock { state in
                if let reply = state.readyReply { return .success(reply) }
                if let closed = state.closed { return .failure(closed) }
                state.ready = continuation
                return nil
            }
            if let immediate { continuation.resume(with: immediate) }
        }
    }

    /// Sends a request and waits for its reply, at most `timeout`.
    func request(_ fields: [String: JSONValue], timeout: Duration) async throws -> Reply {
        let id: Int = try state.withLock { state in
            if let closed = state.closed { throw closed }
            defer { state.nextID += 1 }
            return state.nextID
        }
        var message = fields
        message["id"] = .integer(Int64(id))
        let body = JSONValue.object(message).serialized()
        var frame = channel.allocator.buffer(capacity: body.count + 4)
        frame.writeInteger(UInt32(body.count))
        frame.writeBytes(body)

        let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.nanoseconds))) {
            self.fail(SandpiperError(.timeout, code: "SessionAgentTimeout", "the session's agent stopped answering"))
        }
        defer { timer.cancel() }
        return try await withCheckedThrowingContinuation { continuation in
            let closed: SandpiperError? = state.withLock { state in
                if let closed = state.closed { return closed }
                state.pending[id] = continuation
                return nil
            }
            if let closed {
                continuation.resume(throwing: closed)
                return
            }
            channel.writeAndFlush(frame).whenFailure { error in
                self.fail(
                    SandpiperError(
                        .sandboxFailure,
                        code: "SessionAgentFailure",
                        "cannot reach the session's agent: \(error)"
                    )
                )
            }
        }
    }

    /// Fails every waiter and closes the pipes. Later requests fail at once.
    func fail(_ error: SandpiperError) {
        let waiters: [CheckedContinuation<Reply, any Error>] = state.withLock { state in
            if state.closed == nil { state.closed = error }
            var all = Array(state.pending.values)
            state.pending.removeAll()
            if let ready = state.ready {
                all.append(ready)
                state.ready = nil
            }
            return all
        }
        for waiter in waiters { waiter.resume(throwing: error) }
        channel.close(promise: nil)
    }

    fileprivate func deliver(_ frame: ByteBuffer) {
        let reply: Reply
        do {
            reply = try Reply(json: JSONValue.parse(frame.readableBytesView))
        } catch {
            let why = (error as? Reply.Malformed).map { "its '\($0.field)' field" } ?? "\(error)"
            fail(
                SandpiperError(
                    .sandboxFailure,
                    code: "SessionAgentFailure",
                    "the session's agent sent a malformed reply (\(why))"
                )
            )
            return
        }
        let waiter: CheckedContinuation<Reply, any Error>? = state.withLock { state in
            if reply.type == "ready" {
                state.readyReply = reply
                defer { state.ready = nil }
                return state.ready
            }
            guard let id = reply.id else { return nil }
            return state.pending.removeValue(forKey: id)
        }
        waiter?.resume(returning: reply)
    }

    fileprivate func closedByPeer(_ error: (any Error)?) {
        let reason = error.map { "\($0)" } ?? "it exited"
        fail(SandpiperError(.sandboxFailure, code: "SessionAgentFailure", "the session's agent is gone (\(reason))"))
    }

    /// Lets the pipeline handler reach the channel object created after the pipeline.
    private final class StateBox: Sendable {
        private let agent = Mutex<AgentChannel?>(nil)
        private let early = Mutex<[ByteBuffer]>([])
        private let earlyClose = Mutex<(Bool, String?)>((false, nil))

        func attach(_ channel: AgentChannel) {
            agent.withLock { $0 = channel }
            for frame in early.withLock({ frames in
                defer { frames.removeAll() }
                return frames
            }) {
                channel.deliver(frame)
            }
            let (closed, reason) = earlyClose.withLock { $0 }
            if closed { channel.closedByPeer(reason.map { SandpiperError(.sandboxFailure, $0) }) }
        }

        func frame(_ buffer: ByteBuffer) {
            if let channel = agent.withLock({ $0 }) {
                channel.deliver(buffer)
            } else {
                early.withLock { $0.append(buffer) }
            }
        }

        func closed(_ error: (any Error)?) {
            if let channel = agent.withLock({ $0 }) {
                channel.closedByPeer(error)
            } else {
                earlyClose.withLock { $0 = (true, error.map { "\($0)" }) }
            }
        }
    }

    private final class InboundHandler: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let box: StateBox

        init(box: StateBox) { self.box = box }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            box.frame(unwrapInboundIn(data))
        }

        func channelInactive(context: ChannelHandlerContext) {
            box.closed(nil)
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            box.closed(error)
            context.close(promise: nil)
        }
    }

    private struct FrameDecoder: ByteToMessageDecoder {
        typealias InboundOut = ByteBuffer
        let maxFrame: Int

        mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
            guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
            guard Int(length) <= maxFrame else {
                throw SandpiperError(
                    .sandboxFailure,
                    code: "SessionAgentFailure",
                    "the session's agent sent an oversized frame"
                )
            }
            guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
            buffer.moveReaderIndex(forwardBy: 4)
            guard let frame = buffer.readSlice(length: Int(length)) else { return .needMoreData }
            context.fireChannelRead(wrapInboundOut(frame))
            return .continue
        }

        mutating func decodeLast(
            context: ChannelHandlerContext,
            buffer: inout ByteBuffer,
            seenEOF: Bool
        ) throws -> DecodingState {
            try decode(context: context, buffer: &buffer)
        }
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
