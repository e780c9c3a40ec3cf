import Hummingbird
import HummingbirdCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOHTTPTypes

/// Limits that keep slow or hostile HTTP clients from starving everybody else: a request head
/// must arrive in time, a request body must keep flowing, and one client address can hold only
/// so many connections. See docs/security.md ("Hostile HTTP clients").
public struct HTTPLimits: Sendable, Equatable {
    /// From connection open (or the end of the previous response) to a complete request head.
    public var requestHeadTimeout: Duration = .seconds(30)
    /// Longest silence allowed while a request body is being received.
    public var requestBodyTimeout: Duration = .seconds(60)
    /// Connections open at once, over all clients (more wait in the listen backlog).
    public var maxConnections = 4096
    /// Connections open at once from one remote address; more are closed at once.
    public var maxConnectionsPerClient = 512
    /// Request head size (all header lines together) and header count.
    public var maxHeaderBytes = 64 * 1024
    public var maxHeaderCount = 200

    public init() {}

    /// The handlers to add to every HTTP/1 connection, in order: the guards, then the upgrade
    /// pass-through (which removes the HTTP timers once a connection is spliced to a container).
    public func channelHandlers(registry: ClientConnectionRegistry) -> [any RemovableChannelHandler] {
        [
            ClientConnectionLimitHandler(registry: registry, limit: maxConnectionsPerClient),
            RequestDeadlineHandler(head: requestHeadTimeout, body: requestBodyTimeout),
            UpgradePassThroughHandler(),
        ]
    }

    /// Sandpiper's HTTP/1.1 server: every connection gets `channelHandlers` and the header limits.
    public func http1Server(registry: ClientConnectionRegistry) -> HTTPServerBuilder {
        .http1(
            configuration: .init(
                additionalChannelHandlers: channelHandlers(registry: registry),
                idleTimeout: .seconds(75),
                httpDecoderConfiguration: .init(
                    maxHeaderFieldSize: maxHeaderBytes,
                    maxHeaderListSize: maxHeaderBytes,
                    maxHeaderFieldCount: maxHeaderCount
                )
            )
        )
    }
}

/// Counts open connections per remote address (IP, without the port). Shared by every
/// connection's `ClientConnectionLimitHandler`.
public final class ClientConnectionRegistry: Sendable {
    private let counts = NIOLockedValueBox([String: Int]())
    private let logger: Logger

    public init(logger: Logger) { self.logger = logger }

    /// Registers a connection; false when `client` already holds `limit` connections.
    func open(_ client: String, limit: Int) -> Bool {
        let accepted = counts.withLockedValue { counts in
            let current = counts[client, default: 0]
            guard current < limit else { return false }
            counts[client] = current + 1
            return true
        }
        if !accepted {
            logger.warning(
                "refused a connection: client already holds the maximum",
                metadata: ["client": "\(client)", "limit": "\(limit)"]
            )
        }
        return accepted
    }

    func close(_ client: String) {
        counts.withLockedValue { counts in
            let remaining = counts[client, default: 1] - 1
            counts[client] = remaining > 0 ? remaining : nil
        }
    }

    /// Open connections of one client (for tests and diagnostics).
    public func connections(of client: String) -> Int {
        counts.withLockedValue { $0[client, default: 0] }
    }
}

/// Closes a new connection when its remote address already holds the per-client maximum.
final class ClientConnectionLimitHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart

    private let registry: ClientConnectionRegistry
    private let limit: Int
    /// The address this connection is counted under, once counted.
    private var counted: String?

    init(registry: ClientConnectionRegistry, limit: Int) {
        self.registry = registry
        self.limit = limit
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { register(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        register(context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        release()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        release()
    }

    private func register(_ context: ChannelHandlerContext) {
        guard counted == nil else { return }
        let client = context.channel.remoteAddress?.ipAddress ?? "unknown"
        if registry.open(client, limit: limit) {
            counted = client
        } else {
            context.close(promise: nil)
        }
    }

    private func release() {
        if let client = counted {
            registry.close(client)
            counted = nil
        }
    }
}

/// Closes a connection whose request head does not arrive within `head` (slowloris), or whose
/// request body stalls for `body`. No timer runs while a request is being handled, so a long
/// execution is never cut; keep-alive idleness between requests counts as waiting for a head.
final class RequestDeadlineHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    private let head: TimeAmount
    private let body: TimeAmount
    private var timer: Scheduled<Void>?

    init(head: Duration, body: Duration) {
        self.head = TimeAmount(head)
        self.body = TimeAmount(body)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context, head) }
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context, head)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        disarm()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        disarm()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head, .body: arm(context, body)
        case .end: disarm()
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) { arm(context, head) }
        context.write(data, promise: promise)
    }

    /// A request the HTTP parser refuses (a head over the size or count limits, bad syntax) gets
    /// a JSON error like every other, then the connection is closed: its framing is lost.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parserError = error as? HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        disarm()
        let (status, code, message): (HTTPResponse.Status, String, String) =
            switch parserError {
            case .headerOverflow:
                (
                    .init(code: 431), "RequestHeaderFieldsTooLarge",
                    "the request head is over the server's size or count limit"
                )
            default:
                (.badRequest, "BadRequest", "the request is not valid HTTP/1.1 (\(parserError))")
            }
        let body = ByteBuffer(string: #"{"error":{"code":"\#(code)","message":"\#(message)"}}"#)
        var fields = HTTPFields()
        fields[.contentType] = "application/json"
        fields[.contentLength] = "\(body.readableBytes)"
        fields[.connection] = "close"
        fields[.xMsErrorCode] = code
        context.write(wrapOutboundOut(.head(HTTPResponse(status: status, headerFields: fields))), promise: nil)
        context.write(wrapOutboundOut(.body(body)), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }

    private func arm(_ context: ChannelHandlerContext, _ delay: TimeAmount) {
        timer?.cancel()
        let channel = context.channel
        timer = context.eventLoop.scheduleTask(in: delay) { channel.close(promise: nil) }
    }

    private func disarm() {
        timer?.cancel()
        timer = nil
    }
}
