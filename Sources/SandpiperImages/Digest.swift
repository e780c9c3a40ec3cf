import Crypto
import SandpiperCore

/// A content digest, `sha256:<64 lowercase hex>`. Only SHA-256 is supported (as every registry
/// and tool writes today); other algorithms are refused with a clear error.
public struct Digest: Hashable, Sendable, Codable, Comparable, CustomStringConvertible {
    public let hex: String

    public init(parsing text: String) throws(SandpiperError) {
        guard text.hasPrefix("sha256:") else {
            throw SandpiperError.invalid(
                "unsupported digest '\(text.prefix(80))': only sha256:<hex> is supported",
                code: "InvalidDigest"
            )
        }
        let hex = String(text.dropFirst("sha256:".count))
        guard hex.utf8.count == 64, hex.utf8.allSatisfy({ ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) }) else {
            throw SandpiperError.invalid("malformed sha256 digest '\(text.prefix(80))'", code: "InvalidDigest")
        }
        self.hex = hex
    }

    init(hex: String) {
        self.hex = hex
    }

    /// The digest of `bytes`.
    public static func of(_ bytes: some Sequence<UInt8>) -> Digest {
        var hasher = DigestHasher()
        hasher.update(Array(bytes))
        return hasher.finalize()
    }

    public var description: String { "sha256:" + hex }
    /// The first 12 hex digits, for progress lines and listings.
    public var short: String { String(hex.prefix(12)) }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do {
            self = try Digest(parsing: text)
        } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.message))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    public static func < (lhs: Digest, rhs: Digest) -> Bool { lhs.hex < rhs.hex }
}

/// Streaming SHA-256 that also counts bytes.
struct DigestHasher {
    private var hasher = SHA256()
    private(set) var count: Int64 = 0

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        hasher.update(bufferPointer: bytes)
        count += Int64(bytes.count)
    }

    mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    func finalize() -> Digest {
        let hexDigits = Array("0123456789abcdef".utf8)
        var hex: [UInt8] = []
        hex.reserveCapacity(64)
        for byte in hasher.finalize() {
            hex.append(hexDigits[Int(byte >> 4)])
            hex.append(hexDigits[Int(byte & 0x0f)])
        }
        return Digest(hex: String(decoding: hex, as: UTF8.self))
    }
}
