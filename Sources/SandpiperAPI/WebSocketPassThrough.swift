import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOPosix
import SandpiperCore
import SandpiperSessions

#if canImport(Glibc)
    import Glibc
#endif

/// A request context that knows the client's connection (WebSocket pass-through takes it over).
public protocol ChannelRequestContext {
    var channel: any Channel { get }
}

// WebSocket (and any other `Upgrade`) pass-through for custom container pools.
//
// The client's upgrade request is routed, authorised and forwarded like any proxied request
// (`Authorization` stripped, `X-Forwarded-*` added), with its `Upgrade` and `Connection` kept.
// When the container answers 101, that answer goes to the client as it is, and from then on
// both connections carry raw bytes, spliced both ways by a pair of `SpliceHandler`s: the
// container negotiates the subprotocol and extensions itself, and every frame (text, binary,
// fragments, ping/pong, close with its code) reaches the other side untouched. Any other answer
// goes back as an ordinary response and the connection closes after it.
//
// The client's connection is the one the server built with every guard of `HTTPLimits` (request
// head deadline, per-client connection count, header limits) and those apply up to and
// including the upgrade request; after the 101 the per-client count still holds the connection,
// and only the HTTP timers (head deadline, idle timeout) are removed, as a WebSocket may be idle
// for as long as its peers ping.

extension ContainerProxy {
    /// The answer to an upgrade request is capped (a refusal is a short error page).
    static let maxRefusalBytes = 1 << 20

    /// Whether `request` asks to switch protocols (as NIO's HTTP parser decides it: `Upgrade`
    /// plus a `Connection: upgrade` token), which stops HTTP parsing on its connection.
    static func upgradeProtocol(_ request: Request) -> String? {
        upgradeProtocol(upgrade: request.headers[values: .upgrade], connection: request.headers[values: .connection])
    }

    static func upgradeProtocol(upgrade: [String], connection: [String]) -> String? {
        let tokens = connection.flatMap { $0.split(separator: ",") }
        guard !upgrade.isEmpty,
            tokens.contains(where: { $0.trimmingCharacters(in: .whitespaces).lowercased() == "upgrade" })
        else { return nil }
        return upgrade.joined(separator: ", ")
    }

    /// Forwards an upgrade request; on the container's 101 the client's connection `client` is
    /// spliced to the container's once the 101 is written (`UpgradePassThroughHandler`). The
    /// session counts as busy until either side closes; destroying it closes both.
    func upgrade(
        _ request: Request,
        protocol upgrade: String,
        target: String,
        clientAddress: String?,
        client: any Channel,
        session: Session
    ) async throws -> Response {
        let fd = try await endpoint.connect(timeout: connectTimeout)
        let handshake = ContainerHandshakeHandler(timeout: responseTimeout)
        let container: any Channel
        do {
            container = try await ClientBootstrap(group: client.eventLoop)
                // The container's end of input is an event (`inputClosed`), not a close, so that
                // bytes it sent with its 101 survive its closing before the splice is in place.
                .channelOption(.allowRemoteHalfClosure, value: true)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try handshake.install(on: channel.pipeline.syncOperations)
                    }
                }
                .withConnectedSocket(fd)
                .get()
        } catch {
            close(fd)
            throw ContainerProxy.unreachable(error)
        }
        // Owned here until the client's pass-through handler takes it.
        var handedOver = false
        defer { if !handedOver { container.close(promise: nil) } }

        let answer = try await handshake.answer(
            sending: requestHead(request, target: target, clientAddress: clientAddress, upgrade: upgrade),
            over: container
        )
        var fields = HTTPFields()
        for header in answer.head.headers {
            let name = header.name.lowercased()
            guard name != "content-length", name != "transfer-encoding",
                let fieldName = HTTPField.Name(header.name)
            else { continue }
            // Only a switch keeps its `Upgrade` and `Connection`; a refusal is a plain answer.
            if answer.body == nil || !Self.hopByHop.contains(name) {
                fields.append(HTTPField(name: fieldName, value: header.value))
            }
        }
        let status = HTTPResponse.Status(
            code: Int(answer.head.status.code),
            reasonPhrase: answer.head.status.reasonPhrase
        )
        if let body = answer.body {
            return Response(status: status, headers: fields, body: .init(byteBuffer: body))
        }

        session.beginCall()
        let stopWatching = endpoint.onDestroy { container.close(promise: nil) }
        container.closeFuture.whenComplete { _ in
            stopWatching()
            session.endCall()
        }
        try await client.eventLoop.submit {
            try client.pipeline.syncOperations.handler(type: UpgradePassThroughHandler.self).arm(container)
        }.get()
        handedOver = true
        return Response(status: status, headers: fields)
    }
}

/// The container's answer to an upgrade request: its head, and the body of a refusal (nil for 101).
struct UpgradeAnswer: Sendable {
    let head: HTTPResponseHead
    let body: ByteBuffer?
}

/// Sends the upgrade request to the container and reads its answer: a 101 (then reading stops
/// until the splice, whatever the container sent after its 101 stays in the HTTP decoder to be
/// forwarded, and the container's end of input, if it comes, waits in `InputClosedHolder`), or a
/// refusal with its body. Fails with 502 when the container closes first and 504 when it does not
/// answer in time.
final class ContainerHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    // @unchecked: every member is touched on the container channel's event loop only.
    typealias InboundIn = HTTPClientResponsePart

    private let timeout: Duration
    private let inputClosed = InputClosedHolder()
    private let encoder = HTTPRequestEncoder()
    private let decoder = ByteToMessageHandler(HTTPResponseDecoder(leftOverBytesStrategy: .forwardBytes))
    private var promise: EventLoopPromise<UpgradeAnswer>?
    private var timer: Scheduled<Void>?
    private var refusal: (head: HTTPResponseHead, body: ByteBuffer)?

    init(timeout: Duration) { self.timeout = timeout }

    func install(on pipeline: ChannelPipeline.SynchronousOperations) throws {
        try pipeline.addHandlers([inputClosed, encoder, decoder, self])
    }

    func answer(sending head: HTTPRequestHead, over channel: any Channel) async throws -> UpgradeAnswer {
        let answer = try await channel.eventLoop.flatSubmit {
            let promise = channel.eventLoop.makePromise(of: UpgradeAnswer.self)
            self.promise = promise
            self.timer = channel.eventLoop.scheduleTask(in: TimeAmount(self.timeout)) {
                self.finish(
                    .failure(
                        SandpiperError(
                            .timeout,
                            code: "ContainerTimeout",
                            "the container did not answer the upgrade within \(self.timeout)"
                        )
                    )
                )
                channel.close(promise: nil)
            }
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
            return promise.futureResult
        }.get()
        return answer
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head) where head.status == .switchingProtocols:
            // Nothing more is read until the splice: the decoder keeps what came after the 101,
            // and the end of input (read anyway when the container closes) waits in front of it.
            try? context.channel.syncOptions?.setOption(.autoRead, value: false)
            inputClosed.hold()
            finish(.success(UpgradeAnswer(head: head, body: nil)))
        case .head(let head):
            refusal = (head, context.channel.allocator.buffer(capacity: 0))
        case .body(var buffer):
            guard var current = refusal else { return }
            guard current.body.readableBytes + buffer.readableBytes <= ContainerProxy.maxRefusalBytes else {
                finish(.failure(Self.failed("the container refused the upgrade with an answer over 1 MiB")))
                context.close(promise: nil)
                return
            }
            current.body.writeBuffer(&buffer)
            refusal = current
        case .end:
            // The end of a 101 is the start of the other protocol; that of a refusal ends the exchange.
            guard let refusal else { return }
            finish(.success(UpgradeAnswer(head: refusal.head, body: refusal.body)))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(Self.failed("the container closed the connection without answering the upgrade")))
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // Only before a 101 (the decoder has seen it, so a body that ends with the connection has ended).
        if event as? ChannelEvent == .inputClosed {
            finish(.failure(Self.failed("the container closed the connection without answering the upgrade")))
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(.failure(Self.failed("the container's answer to the upgrade failed: \(ContainerProxy.describe(error))")))
        context.close(promise: nil)
    }

    /// After the 101: the HTTP handlers leave and `splice` gets the raw bytes, first those the
    /// decoder held back, then the end of input if the container has closed meanwhile.
    func handOver(_ channel: any Channel, to splice: SpliceHandler) throws {
        let pipeline = channel.pipeline.syncOperations
        try pipeline.addHandler(splice)
        pipeline.removeHandler(self, promise: nil)
        pipeline.removeHandler(encoder, promise: nil)
        // The decoder forwards what it holds as it leaves (no read-complete follows: flush it).
        // It does so only while it has not seen the end of input (NIO's `HTTPDecoder.decodeLast`
        // drops leftover bytes at EOF), which is why `inputClosed` keeps that from it until now.
        let removed = channel.eventLoop.makePromise(of: Void.self)
        pipeline.removeHandler(decoder, promise: removed)
        let inputClosed = self.inputClosed
        removed.futureResult.assumeIsolated().whenComplete { _ in
            splice.flushPartner()
            if !inputClosed.release() {
                try? channel.syncOptions?.setOption(.autoRead, value: true)
            }
        }
    }

    private func finish(_ result: Result<UpgradeAnswer, any Error>) {
        timer?.cancel()
        timer = nil
        guard let promise else { return }
        self.promise = nil
        promise.completeWith(result)
    }

    private static func failed(_ message: String) -> SandpiperError {
        SandpiperError(.sandboxFailure, code: "ContainerResponseFailed", message)
    }
}

/// In front of the container connection's HTTP decoder: after the 101 (`hold`) it keeps the
/// container's end of input from the decoder, which would drop the bytes it holds if it saw it,
/// and passes it on to the splice once the decoder is gone (`release`). A container that sends
/// frames with its 101 and closes at once thus has them delivered, then the close.
final class InputClosedHolder: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    private var context: ChannelHandlerContext?
    private var holding = false
    private var held = false

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    func hold() { holding = true }

    /// Stops holding and passes on the end of input if it came; returns whether it did.
    func release() -> Bool {
        holding = false
        guard held, let context else { return false }
        held = false
        context.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        return true
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if holding, event as? ChannelEvent == .inputClosed {
            held = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// On every client connection, after the guards: watches requests that switch protocols. The
/// connection of such a request cannot carry another HTTP request (the parser stops after it),
/// so a non-101 answer closes it. A 101 of a proxied upgrade (`arm`) splices the connection to
/// the container's as soon as the 101 is written, and removes the HTTP timers.
public final class UpgradePassThroughHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = HTTPRequestPart
    public typealias InboundOut = HTTPRequestPart
    public typealias OutboundIn = HTTPResponsePart
    public typealias OutboundOut = HTTPResponsePart

    private enum State {
        case http(switching: Bool, closeAfterResponse: Bool)
        /// A container connection waits for the 101 to be written.
        case armed(any Channel)
        /// Bytes flow; what the HTTP handlers still write is dropped.
        case spliced
    }
    private var state = State.http(switching: false, closeAfterResponse: false)

    public init() {}

    func arm(_ container: any Channel) {
        guard case .http = state else {
            container.close(promise: nil)
            return
        }
        state = .armed(container)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head(let request) = unwrapInboundIn(data), case .http = state {
            let switching =
                request.method == .connect
                || ContainerProxy.upgradeProtocol(
                    upgrade: request.headerFields[values: .upgrade],
                    connection: request.headerFields[values: .connection]
                ) != nil
            state = .http(switching: switching, closeAfterResponse: false)
        }
        context.fireChannelRead(data)
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch (state, unwrapOutboundIn(data)) {
        case (.spliced, _):
            promise?.succeed()
        case (.armed(let container), .head(let response)) where response.status == .switchingProtocols:
            context.write(data, promise: promise)
            splice(context, container)
        case (.armed(let container), .head(var response)):
            container.close(promise: nil)
            response.headerFields[.connection] = "close"
            state = .http(switching: true, closeAfterResponse: true)
            context.write(wrapOutboundOut(.head(response)), promise: promise)
        case (.http(switching: true, _), .head(var response)) where response.status.kind != .informational:
            response.headerFields[.connection] = "close"
            state = .http(switching: true, closeAfterResponse: true)
            context.write(wrapOutboundOut(.head(response)), promise: promise)
        case (.http(_, closeAfterResponse: true), .end):
            context.writeAndFlush(data, promise: promise)
            context.close(promise: nil)
        default:
            context.write(data, promise: promise)
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if case .armed(let container) = state { container.close(promise: nil) }
        context.fireChannelInactive()
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        if case .armed(let container) = state { container.close(promise: nil) }
    }

    private func splice(_ context: ChannelHandlerContext, _ container: any Channel) {
        state = .spliced
        let (clientSide, containerSide) = SpliceHandler.pair()
        let pipeline = context.pipeline.syncOperations
        do {
            // In front of the HTTP codec (behind TLS, when there is TLS): raw bytes from here on.
            let encoder = try pipeline.handler(type: HTTPResponseEncoder.self)
            try pipeline.addHandler(clientSide, position: .before(encoder))
            if let deadline = try? pipeline.handler(type: RequestDeadlineHandler.self) {
                pipeline.removeHandler(deadline, promise: nil)
            }
            if let idle = try? pipeline.handler(type: HTTPConnectionStateHandler.self) {
                pipeline.removeHandler(idle, promise: nil)
            }
            try container.pipeline.syncOperations.handler(type: ContainerHandshakeHandler.self)
                .handOver(container, to: containerSide)
        } catch {
            container.close(promise: nil)
            context.flush()
            context.close(promise: nil)
            return
        }
        context.flush()
        if !container.isActive { clientSide.partnerClosed() }
    }
}

/// One end of a byte splice between two channels on the same event loop (after NIO's
/// `GlueHandler`): what one side reads the other writes, a side reads only while its partner can
/// write (backpressure both ways), and when one closes the other closes once its writes are out.
/// On the client's side it also drops whatever the HTTP handlers behind it still write and closes
/// the connection when the server shuts down.
final class SpliceHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny
    typealias OutboundIn = NIOAny
    typealias OutboundOut = NIOAny

    private var partner: SpliceHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false

    static func pair() -> (SpliceHandler, SpliceHandler) {
        let first = SpliceHandler()
        let second = SpliceHandler()
        first.partner = second
        second.partner = first
        return (first, second)
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        partner = nil
    }

    // MARK: Partner

    private func partnerWrite(_ data: NIOAny) { context?.write(data, promise: nil) }

    private func partnerFlush() { context?.flush() }

    /// Flushes what this side passed to its partner outside a read (bytes held by a removed decoder).
    func flushPartner() { partner?.partnerFlush() }

    /// The partner's connection is gone: close this one after what is queued is written.
    func partnerClosed() {
        guard let context else { return }
        context.writeAndFlush(NIOAny(context.channel.allocator.buffer(capacity: 0)))
            .assumeIsolated().whenComplete { _ in context.close(promise: nil) }
    }

    private var partnerWritable: Bool { context?.channel.isWritable ?? false }

    private func partnerBecameWritable() {
        guard pendingRead else { return }
        pendingRead = false
        context?.read()
    }

    // MARK: Channel events

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { partner?.partnerWrite(data) }

    func channelReadComplete(context: ChannelHandlerContext) { partner?.partnerFlush() }

    func channelInactive(context: ChannelHandlerContext) {
        partner?.partnerClosed()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case ChannelEvent.inputClosed:
            context.close(promise: nil)
        case is ChannelShouldQuiesceEvent:
            // The server stops: relays end with it.
            context.close(promise: nil)
        default:
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { partner?.partnerBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

    /// Writes from behind (the HTTP handlers) have nothing to say any more.
    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        promise?.succeed()
    }

    func read(context: ChannelHandlerContext) {
        if partner?.partnerWritable ?? false {
            context.read()
        } else {
            pendingRead = true
        }
    }
}
