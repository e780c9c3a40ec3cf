import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// Drains a sandbox's own stderr (bubblewrap's and the agent's messages, never user output of
/// a cell) for as long as the sandbox lives, keeping only the first few KiB: enough to explain
/// a failed start, never enough to let a chatty sandbox grow the server.
final class OutputTail: Sendable {
    static let limit = 8 << 10
    private let kept = Mutex<[UInt8]>([])
    private let channel = Mutex<(any Channel)?>(nil)

    /// Takes ownership of `fd`.
    static func drain(_ fd: Int32) async throws -> OutputTail {
        let tail = OutputTail()
        let channel = try await NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .takingOwnershipOfDescriptor(input: fd) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Collector(tail: tail))
                    return channel
                }
            }
        tail.channel.withLock { $0 = channel }
        return tail
    }

    /// What was kept, as text, trimmed.
    var text: String {
        let bytes = kept.withLock { $0 }
        return String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func close() {
        channel.withLock { $0?.close(promise: nil) }
    }

    fileprivate func append(_ buffer: ByteBuffer) {
        kept.withLock { bytes in
            let room = Self.limit - bytes.count
            if room > 0 { bytes += buffer.readableBytesView.prefix(room) }
        }
    }

    private final class Collector: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let tail: OutputTail

        init(tail: OutputTail) { self.tail = tail }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            tail.append(unwrapInboundIn(data))
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }
}
