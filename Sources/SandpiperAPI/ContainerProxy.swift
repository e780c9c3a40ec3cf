import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import NIOHTTP1
import NIOPosix
import SandpiperCore
import SandpiperSessions

#if canImport(Glibc)
    import Glibc
#endif

/// The request context of the Sandpiper router: Hummingbird's basics plus the client's address
/// (for `X-Forwarded-For` on proxied requests).
public struct SandpiperRequestContext: RequestContext, RemoteAddressRequestContext, ChannelRequestContext {
    public var coreContext: CoreRequestContextStorage
    public let remoteAddress: SocketAddress?
    public let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
        self.channel = source.channel
    }
}

/// Forwards one request to a custom container's HTTP port over a connection made inside the
/// session's network namespace. Bodies stream both ways (the response is read from the
/// container only as fast as the client takes it); `Authorization` and hop-by-hop headers stay
/// behind; `X-Forwarded-For/Proto/Host` are added. Errors before the container answered become
/// 502 (refused, reset, closed) or 504 (no answer in time); after that the connection is cut.
struct ContainerProxy {
    static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade",
    ]

    let endpoint: any ContainerEndpoint
    let connectTimeout: Duration
    let responseTimeout: Duration
    let scheme: String

    /// A container connection that could not be set up (502 `ContainerUnreachable`).
    static func unreachable(_ error: any Error) -> SandpiperError {
        SandpiperError(.sandboxFailure, code: "ContainerUnreachable", "cannot talk to the container: \(error)")
    }

    func forward(_ request: Request, target: String, clientAddress: String?) async throws -> Response {
        let fd = try await endpoint.connect(timeout: connectTimeout)
        typealias Connection = NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>
        let connection: Connection
        do {
            connection = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .withConnectedSocket(fd) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try Connection(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            close(fd)
            throw ContainerProxy.unreachable(error)
        }
        let head = requestHead(request, target: target, clientAddress: clientAddress)
        let (heads, headSink) = AsyncThrowingStream<HTTPResponseHead, any Error>.makeStream()
        let (chunks, chunkSink) = AsyncThrowingStream<ByteBuffer, any Error>.makeStream()
        let (demand, demandSink) = AsyncStream<Void>.makeStream()
        let body = request.body
        let pump = Task {
            do {
                try await connection.executeThenClose { inbound, outbound in
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask {
                            try await outbound.write(.head(head))
                            for try await buffer in body {
                                try await outbound.write(.body(.byteBuffer(buffer)))
                            }
                            try await outbound.write(.end(nil))
                        }
                        var parts = inbound.makeAsyncIterator()
                        var answered = false
                        var wanted = demand.makeAsyncIterator()
                        loop: while let part = try await parts.next() {
                            switch part {
                            case .head(let response):
                                // 1xx (100 Continue) precede the real answer.
                                if response.status.code < 200 { continue }
                                answered = true
                                headSink.yield(response)
                                headSink.finish()
                            case .body(let buffer):
                                chunkSink.yield(buffer)
                                // One chunk at a time: the client's pace is the container's.
                                if await wanted.next() == nil { break loop }
                            case .end:
                                break loop
                            }
                        }
                        if !answered {
                            throw SandpiperError(
                                .sandboxFailure,
                                code: "ContainerResponseFailed",
                                "the container closed the connection without answering"
                            )
                        }
                        chunkSink.finish()
                        group.cancelAll()
                    }
                }
            } catch {
                headSink.finish(throwing: error)
                chunkSink.finish(throwing: error)
            }
        }
        // The head, or 504 when the container takes too long to answer.
        let response: HTTPResponseHead
        do {
            response = try await withThrowingTaskGroup(of: HTTPResponseHead?.self) { group in
                group.addTask {
                    var iterator = heads.makeAsyncIterator()
                    return try await iterator.next()
                }
                group.addTask {
                    try await Task.sleep(for: responseTimeout)
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let head = first else {
                    throw SandpiperError(
                        .timeout,
                        code: "ContainerTimeout",
                        "the container did not answer within \(responseTimeout)"
                    )
                }
                return head
            }
        } catch {
            connection.channel.close(promise: nil)
            pump.cancel()
            demandSink.finish()
            if let error = error as? SandpiperError { throw error }
            throw SandpiperError(
                .sandboxFailure,
                code: "ContainerResponseFailed",
                "the container's answer failed: \(Self.describe(error))"
            )
        }
        var fields = HTTPFields()
        var contentLength: Int?
        for header in response.headers {
            let name = header.name.lowercased()
            if name == "content-length" {
                contentLength = Int(header.value.trimmingCharacters(in: .whitespaces))
                continue
            }
            guard !Self.hopByHop.contains(name), let fieldName = HTTPField.Name(header.name) else { continue }
            fields.append(HTTPField(name: fieldName, value: header.value))
        }
        let channel = connection.channel
        let responseBody = ResponseBody(contentLength: contentLength) { writer in
            var iterator = chunks.makeAsyncIterator()
            do {
                while let chunk = try await iterator.next() {
                    try await writer.write(chunk)
                    demandSink.yield()
                }
                demandSink.finish()
                try await writer.finish(nil)
            } catch {
                demandSink.finish()
                channel.close(promise: nil)
                throw error
            }
        }
        return Response(
            status: HTTPResponse.Status(code: Int(response.status.code), reasonPhrase: response.status.reasonPhrase),
            headers: fields,
            body: responseBody
        )
    }

    /// The head sent to the container; `upgrade` (the client's `Upgrade` value) keeps the request
    /// an upgrade: `Connection: Upgrade` and `Upgrade` are sent, and no body framing.
    func requestHead(_ request: Request, target: String, clientAddress: String?, upgrade: String? = nil)
        -> HTTPRequestHead
    {
        var headers = HTTPHeaders()
        var forwardedFor: String?
        var hasLength = false
        var chunked = false
        for field in request.headers {
            let name = field.name.canonicalName
            switch name {
            case "authorization", "host", "x-forwarded-host", "x-forwarded-proto":
                continue
            case "x-forwarded-for":
                forwardedFor = forwardedFor.map { $0 + ", " + field.value } ?? field.value
                continue
            case "transfer-encoding":
                chunked = chunked || field.value.lowercased().contains("chunked")
                continue
            case "content-length":
                hasLength = true
            default:
                if Self.hopByHop.contains(name) { continue }
            }
            headers.add(name: field.name.rawName, value: field.value)
        }
        let host = request.head.authority ?? "localhost"
        headers.add(name: "Host", value: host)
        if let clientAddress {
            headers.add(name: "X-Forwarded-For", value: forwardedFor.map { $0 + ", " + clientAddress } ?? clientAddress)
        } else if let forwardedFor {
            headers.add(name: "X-Forwarded-For", value: forwardedFor)
        }
        headers.add(name: "X-Forwarded-Proto", value: scheme)
        headers.add(name: "X-Forwarded-Host", value: host)
        if let upgrade {
            headers.add(name: "Connection", value: "Upgrade")
            headers.add(name: "Upgrade", value: upgrade)
        } else if chunked && !hasLength {
            headers.add(name: "Transfer-Encoding", value: "chunked")
        } else if !hasLength {
            headers.add(name: "Content-Length", value: "0")
        }
        return HTTPRequestHead(
            version: .http1_1,
            method: HTTPMethod(rawValue: request.method.rawValue),
            uri: target,
            headers: headers
        )
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? SandpiperError { return error.message }
        if let error = error as? IOError { return error.description }
        return "\(error)"
    }

    /// `target`: the request's path after the pool prefix, and its query without `identifier` and
    /// `api-version` (Sandpiper's; the container never sees them).
    static func target(path: String, query: String?, prefixSegments: Int) -> String {
        let segments = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst(1 + prefixSegments)
        var target = "/" + segments.joined(separator: "/")
        let kept = (query ?? "").split(separator: "&").filter { item in
            let name = item.split(separator: "=", maxSplits: 1).first.map(String.init) ?? ""
            let decoded = (name.removingPercentEncoding ?? name).lowercased()
            return decoded != "identifier" && decoded != "api-version"
        }
        if !kept.isEmpty { target += "?" + kept.joined(separator: "&") }
        return target
    }
}
