import Foundation
import NIOCore
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// A streaming `multipart/form-data` parser (RFC 7578 / 2046) for hostile input: bounded header
/// sizes, strict header names, and a `memmem` search for the delimiter so large binary bodies go
/// through at memory speed. Feed it chunks; it returns what it found in them.
struct MultipartStreamParser {
    enum Event {
        case headers([(String, String)])
        case body(ByteBuffer)
        case partEnd
    }

    static let maxHeaderBytes = 16 << 10

    private enum State {
        case preamble
        case afterDelimiter
        case headers
        case body
        case epilogue
    }

    private let dashBoundary: [UInt8]
    /// CRLF + dash-boundary: what ends a part's body.
    private let delimiter: [UInt8]
    private var state = State.preamble
    private var pending = ByteBuffer()

    init(boundary: String) {
        dashBoundary = Array(("--" + boundary).utf8)
        delimiter = Array(("\r\n--" + boundary).utf8)
    }

    var isComplete: Bool {
        if case .epilogue = state { return true }
        return false
    }

    static func malformed(_ why: String) -> SandpiperError {
        SandpiperError.invalid("the multipart body is malformed: \(why)", code: "InvalidMultipartBody")
    }

    mutating func feed(_ chunk: ByteBuffer) throws(SandpiperError) -> [Event] {
        var chunk = chunk
        pending.writeBuffer(&chunk)
        var events: [Event] = []
        while true {
            switch state {
            case .preamble:
                // The first delimiter may sit at the very start (no CRLF before it).
                if pending.readableBytes >= dashBoundary.count,
                    pending.readableBytesView.starts(with: dashBoundary)
                {
                    pending.moveReaderIndex(forwardBy: dashBoundary.count)
                    state = .afterDelimiter
                    continue
                }
                guard let index = find(delimiter) else {
                    // Keep a possible partial delimiter; drop the rest of the preamble.
                    keepTail(delimiter.count - 1)
                    if pending.readableBytes > 0 && pending.readableBytes < dashBoundary.count { return events }
                    return events
                }
                pending.moveReaderIndex(forwardBy: index + delimiter.count)
                state = .afterDelimiter
            case .afterDelimiter:
                guard pending.readableBytes >= 2 else { return events }
                let view = pending.readableBytesView
                let first = view[view.startIndex]
                let second = view[view.startIndex + 1]
                if first == UInt8(ascii: "-") && second == UInt8(ascii: "-") {
                    state = .epilogue
                    pending.clear()
                    return events
                }
                // Transport padding (spaces, tabs) may precede the CRLF.
                if first == UInt8(ascii: " ") || first == UInt8(ascii: "\t") {
                    pending.moveReaderIndex(forwardBy: 1)
                    continue
                }
                guard first == UInt8(ascii: "\r") && second == UInt8(ascii: "\n") else {
                    throw Self.malformed("a boundary is not followed by CRLF")
                }
                pending.moveReaderIndex(forwardBy: 2)
                state = .headers
            case .headers:
                guard let end = find(Array("\r\n\r\n".utf8)) else {
                    if pending.readableBytes > Self.maxHeaderBytes { throw Self.malformed("part headers are too long") }
                    // A part with no headers at all starts with CRLF directly.
                    if pending.readableBytesView.starts(with: Array("\r\n".utf8)) {
                        pending.moveReaderIndex(forwardBy: 2)
                        events.append(.headers([]))
                        state = .body
                        continue
                    }
                    return events
                }
                guard end <= Self.maxHeaderBytes else { throw Self.malformed("part headers are too long") }
                let block = pending.readSlice(length: end) ?? ByteBuffer()
                pending.moveReaderIndex(forwardBy: 4)
                events.append(.headers(try Self.parseHeaders(block)))
                state = .body
            case .body:
                if let index = find(delimiter) {
                    if index > 0, let slice = pending.readSlice(length: index) { events.append(.body(slice)) }
                    pending.moveReaderIndex(forwardBy: delimiter.count)
                    events.append(.partEnd)
                    state = .afterDelimiter
                } else {
                    // Everything but a possible partial delimiter at the end is body.
                    let safe = pending.readableBytes - (delimiter.count - 1)
                    if safe > 0, let slice = pending.readSlice(length: safe) { events.append(.body(slice)) }
                    pending.discardReadBytes()
                    return events
                }
            case .epilogue:
                pending.clear()
                return events
            }
        }
    }

    private func find(_ needle: [UInt8]) -> Int? {
        pending.withUnsafeReadableBytes { haystack -> Int? in
            guard haystack.count >= needle.count, let base = haystack.baseAddress else { return nil }
            return needle.withUnsafeBytes { pattern -> Int? in
                guard let patternBase = pattern.baseAddress else { return nil }
                let first = Int32(needle[0])
                var offset = 0
                let last = haystack.count - needle.count
                // memchr to each candidate first byte, memcmp for the rest (memmem is a GNU extension).
                while offset <= last {
                    guard let hit = memchr(base + offset, first, last - offset + 1) else { return nil }
                    let position = base.distance(to: UnsafeRawPointer(hit))
                    if memcmp(base + position, patternBase, needle.count) == 0 { return position }
                    offset = position + 1
                }
                return nil
            }
        }
    }

    private mutating func keepTail(_ count: Int) {
        let drop = pending.readableBytes - count
        if drop > 0 { pending.moveReaderIndex(forwardBy: drop) }
        pending.discardReadBytes()
    }

    /// `Name: value` lines. Names are RFC 7230 tokens; values may carry UTF-8 (file names).
    static func parseHeaders(_ block: ByteBuffer) throws(SandpiperError) -> [(String, String)] {
        var headers: [(String, String)] = []
        let text = Array(block.readableBytesView)
        var lineStart = 0
        var index = 0
        func line(_ bytes: ArraySlice<UInt8>) throws(SandpiperError) {
            guard !bytes.isEmpty else { return }
            guard let colon = bytes.firstIndex(of: UInt8(ascii: ":")) else {
                throw malformed("a part header has no ':'")
            }
            let name = bytes[bytes.startIndex..<colon]
            let token = name.allSatisfy { byte in
                byte > 0x20 && byte < 0x7F && !"()<>@,;:\\\"/[]?={}".utf8.contains(byte)
            }
            guard !name.isEmpty, token else { throw malformed("a part header name is not a token") }
            guard let value = String(validating: bytes[(colon + 1)...], as: UTF8.self) else {
                throw malformed("a part header value is not UTF-8")
            }
            headers.append((String(decoding: name, as: UTF8.self), value.trimmingCharacters(in: .whitespaces)))
        }
        while index + 1 < text.count {
            if text[index] == UInt8(ascii: "\r") && text[index + 1] == UInt8(ascii: "\n") {
                try line(text[lineStart..<index])
                index += 2
                lineStart = index
            } else {
                index += 1
            }
        }
        try line(text[lineStart..<text.count])
        return headers
    }
}
