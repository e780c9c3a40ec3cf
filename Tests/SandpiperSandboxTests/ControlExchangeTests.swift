import CSandpiperShims
import Foundation
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// How a fork request's round trip ends when its forker is gone: over real SOCK_SEQPACKET
/// sockets, the peer standing in for the forker's end.
@Suite("Fork template control socket")
struct ControlExchangeTests {
    private static func pair() throws -> (ours: Int32, forker: Int32) {
        var fds: [Int32] = [0, 0]
        try #require(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0)
        return (fds[0], fds[1])
    }

    /// One round trip on `socket`: what was sent, and how it failed (nil: a reply came).
    private static func request(_ socket: Int32, timeout: Int32 = 10_000) -> (Int, ControlExchange.ReadFailure?) {
        let (sent, answer) = ControlExchange().roundTrip(
            socket,
            payload: Array(#"{"type":"fork"}"#.utf8),
            fds: [],
            timeout: timeout
        )
        guard case .failure(let failure) = answer else { return (sent, nil) }
        return (sent, failure)
    }

    /// Closes `forker` 200 ms from now, having read the queued request first when `reading`.
    private static func closeSoon(_ forker: Int32, reading: Bool) {
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(200)) {
            if reading {
                var buffer = [UInt8](repeating: 0, count: 256)
                _ = read(forker, &buffer, buffer.count)
            }
            close(forker)
        }
    }

    @Test("A reply brings the forker's pidfds, read as this process's pid namespace numbers them")
    func replyWithPidfds() throws {
        let (ours, forker) = try Self.pair()
        defer {
            close(ours)
            close(forker)
        }
        // A child that has exited and been reaped: its pidfd no longer names a pid.
        let child = fork()
        if child == 0 { _exit(0) }
        let gone = sandpiper_pidfd_open(child)
        try #require(gone >= 0)
        var status: Int32 = 0
        waitpid(child, &status, 0)
        let mine = sandpiper_pidfd_open(getpid())
        try #require(mine >= 0)
        let text = Array(#"{"type":"forked"}"#.utf8)
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(50)) {
            var buffer = [UInt8](repeating: 0, count: 256)
            _ = read(forker, &buffer, buffer.count)
            _ = sandpiper_send_with_fds(forker, text, UInt(text.count), [mine, gone], 2)
            close(mine)
            close(gone)
        }
        let (_, answer) = ControlExchange().roundTrip(
            ours,
            payload: Array(#"{"type":"fork"}"#.utf8),
            fds: [],
            timeout: 10_000
        )
        guard case .success(let reply) = answer else {
            Issue.record("no reply: \(answer)")
            return
        }
        defer { for fd in reply.descriptors { close(fd) } }
        #expect(reply.bytes == text)
        try #require(reply.descriptors.count == 2)
        #expect(sandpiper_pidfd_pid(reply.descriptors[0]) == getpid())
        #expect(sandpiper_pidfd_pid(reply.descriptors[1]) == -1, "an exited process still has a pid")
        #expect(fcntl(reply.descriptors[0], F_GETFD) & FD_CLOEXEC != 0, "a received pidfd leaks into children")
    }

    @Test("A forker that dies before it takes the request leaves it untaken (another forker can take it)")
    func untaken() throws {
        let (ours, forker) = try Self.pair()
        defer { close(ours) }
        Self.closeSoon(forker, reading: false)
        let (sent, answer) = Self.request(ours)
        #expect(sent == 15)
        let failure = try #require(answer, "a reply came from a closed socket")
        #expect(failure.count == -1 && failure.error == ECONNRESET)
        #expect(failure.untaken)
    }

    @Test("A forker that dies after taking the request, or never answers, does not leave it untaken")
    func takenOrSilent() throws {
        let (ours, forker) = try Self.pair()
        defer { close(ours) }
        Self.closeSoon(forker, reading: true)
        let afterTaking = try #require(Self.request(ours).1, "a reply came from a closed socket")
        #expect(afterTaking.count == 0 && !afterTaking.untaken)

        let (quiet, silentForker) = try Self.pair()
        defer {
            close(quiet)
            close(silentForker)
        }
        let timedOut = try #require(Self.request(quiet, timeout: 100).1, "a reply came from a silent forker")
        #expect(timedOut.count == -1 && timedOut.error == ETIMEDOUT && !timedOut.untaken)
    }
}
