/// A caller-chosen session identifier, validated per the Dynamic Sessions spec: 4 to 128
/// printable ASCII characters, no space and no backslash. It is only ever a map key: no host
/// path, process name or command line is built from it.
public struct SessionIdentifier: Hashable, Sendable, CustomStringConvertible, Comparable {
    public let value: String

    public static let minLength = 4
    public static let maxLength = 128

    public init(validating raw: String?) throws(SandpiperError) {
        guard let raw, !raw.isEmpty else {
            throw SandpiperError.invalid(
                "the 'identifier' query parameter is required: 4 to 128 printable ASCII characters",
                code: "InvalidSessionIdentifier"
            )
        }
        let bytes = Array(raw.utf8)
        guard bytes.count >= Self.minLength, bytes.count <= Self.maxLength else {
            throw SandpiperError.invalid(
                "identifier must be 4 to 128 characters long (got \(bytes.count) bytes)",
                code: "InvalidSessionIdentifier"
            )
        }
        for byte in bytes where !(0x21...0x7E).contains(byte) || byte == UInt8(ascii: "\\") {
            throw SandpiperError.invalid(
                "identifier may only contain printable ASCII without spaces or backslashes",
                code: "InvalidSessionIdentifier"
            )
        }
        self.value = raw
    }

    public var description: String { value }

    public static func < (lhs: SessionIdentifier, rhs: SessionIdentifier) -> Bool { lhs.value < rhs.value }
}
