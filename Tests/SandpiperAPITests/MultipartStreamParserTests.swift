import NIOCore
import SandpiperCore
import Testing

@testable import SandpiperAPI

@Suite("MultipartStreamParser")
struct MultipartStreamParserTests {
    /// Feeds `body` in chunks of `size` and returns (headers, body bytes) per part.
    func parse(_ body: [UInt8], boundary: String, chunk size: Int) throws -> ([[(String, String)]], [[UInt8]], Bool) {
        var parser = MultipartStreamParser(boundary: boundary)
        var headers: [[(String, String)]] = []
        var bodies: [[UInt8]] = []
        var current: [UInt8] = []
        var offset = 0
        while offset < body.count {
            let end = min(offset + size, body.count)
            for event in try parser.feed(ByteBuffer(bytes: body[offset..<end])) {
                switch event {
                case .headers(let part): headers.append(part)
                case .body(let buffer): current += buffer.readableBytesView
                case .partEnd:
                    bodies.append(current)
                    current = []
                }
            }
            offset = end
        }
        return (headers, bodies, parser.isComplete)
    }

    @Test("Binary bodies with CR, LF and dashes survive every chunking")
    func chunking() throws {
        var payload: [UInt8] = Array("\r\n--not-the-boundary\r\n-\r\r\n".utf8)
        for value in 0..<600 { payload.append(UInt8(value % 256)) }
        let body =
            Array(
                "preamble\r\n--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.bin\"\r\n\r\n".utf8
            )
            + payload
            + Array(
                "\r\n--b0und\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--b0und--\r\nepilogue".utf8
            )
        for size in [1, 2, 3, 7, 64, 1000, body.count] {
            let (headers, bodies, complete) = try parse(body, boundary: "b0und", chunk: size)
            #expect(complete, "chunk \(size)")
            #expect(headers.count == 2)
            #expect(headers.first?.first?.1 == "form-data; name=\"file\"; filename=\"x.bin\"")
            #expect(bodies == [payload, Array("hi".utf8)], "chunk \(size)")
        }
    }

    @Test("Hostile headers are a 400, never a crash: non-ASCII names, no colon, endless headers")
    func hostileHeaders() {
        let cases: [[UInt8]] = [
            Array("--XyZ\r\n".utf8) + [0xC3, 0xA9] + Array(": x\r\n\r\nhello\r\n--XyZ--\r\n".utf8),
            Array("--XyZ\r\nno colon here\r\n\r\nhello\r\n--XyZ--\r\n".utf8),
            Array("--XyZ\r\nX-Long: ".utf8) + [UInt8](repeating: 0x61, count: 20_000),
            Array("--XyZ garbage".utf8),
        ]
        for body in cases {
            #expect(throws: SandpiperError.self) { _ = try parse(body, boundary: "XyZ", chunk: 4096) }
        }
    }

    @Test("UTF-8 file names in header values are kept")
    func utf8Values() throws {
        let body = Array(
            "--q\r\nContent-Disposition: form-data; name=\"file\"; filename=\"naïve 日本.txt\"\r\n\r\nok\r\n--q--\r\n"
                .utf8
        )
        let (headers, bodies, _) = try parse(body, boundary: "q", chunk: 5)
        #expect(headers.first?.first?.1.contains("naïve 日本.txt") == true)
        #expect(bodies == [Array("ok".utf8)])
    }

    @Test("A body that ends early is not complete")
    func truncated() throws {
        let body = Array("--q\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\npartial data".utf8)
        let (_, bodies, complete) = try parse(body, boundary: "q", chunk: 3)
        #expect(!complete)
        #expect(bodies.isEmpty)
    }
}
