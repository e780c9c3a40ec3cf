import Foundation
import Hummingbird
import NIOCore
import SandpiperCore

/// Query parameters by name, percent-decoded without turning `+` into a space (identifiers may
/// contain `+`, and clients send them raw or encoded). Order does not matter; the first wins.
struct QueryParameters: Sendable {
    private var values: [String: String] = [:]

    init(_ query: String?) {
        guard let query, !query.isEmpty else { return }
        for pair in query.split(separator: "&", omittingEmptySubsequences: true) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            let name = Self.decode(String(parts[0]))
            let value = parts.count > 1 ? Self.decode(String(parts[1])) : ""
            if values[name] == nil { values[name] = value }
        }
    }

    static func decode(_ raw: String) -> String {
        raw.removingPercentEncoding ?? raw
    }

    subscript(_ name: String) -> String? {
        if let exact = values[name] { return exact }
        let lowered = name.lowercased()
        return values.first { $0.key.lowercased() == lowered }?.value
    }

    func bool(_ name: String) -> Bool {
        guard let value = self[name]?.lowercased() else { return false }
        return value == "true" || value == "1" || value == "yes"
    }

    /// `2024-10-02-preview` and later speak the modern shapes; older or absent versions the legacy ones.
    var isModernAPI: Bool {
        guard let version = self["api-version"], version.count >= 10 else { return false }
        return version >= "2024-10-02"
    }
}

/// Decoding of the JSON bodies clients send: any unknown field is ignored, names are matched
/// case-insensitively, and a `properties` wrapper is accepted everywhere.
enum RequestBody {
    static let maxJSONBytes = 16 << 20

    static func json(_ request: Request) async throws -> [String: JSONValue] {
        var request = request
        let buffer: ByteBuffer
        do {
            buffer = try await request.collectBody(upTo: maxJSONBytes)
        } catch let error as HTTPError where error.status == .contentTooLarge {
            throw SandpiperError(
                .payloadTooLarge,
                code: "RequestBodyTooLarge",
                "request bodies are limited to \(maxJSONBytes >> 20) MiB"
            )
        } catch is NIOTooManyBytesError {
            throw SandpiperError(
                .payloadTooLarge,
                code: "RequestBodyTooLarge",
                "request bodies are limited to \(maxJSONBytes >> 20) MiB"
            )
        }
        guard buffer.readableBytes > 0 else {
            throw SandpiperError.invalid(
                "the request body is empty; a JSON object is required",
                code: "InvalidRequestBody"
            )
        }
        let value: JSONValue
        do {
            value = try JSONValue.parse(buffer.readableBytesView)
        } catch {
            throw SandpiperError.invalid("the request body is not valid JSON: \(error)", code: "InvalidRequestBody")
        }
        guard case .object(var object) = value else {
            throw SandpiperError.invalid("the request body must be a JSON object", code: "InvalidRequestBody")
        }
        if case .object(let properties)? = lookup(object, "properties") {
            object = properties
        }
        return object
    }

    static func lookup(_ object: [String: JSONValue], _ name: String) -> JSONValue? {
        if let exact = object[name] { return exact }
        let lowered = name.lowercased()
        return object.first { $0.key.lowercased() == lowered }?.value
    }

    static func string(_ object: [String: JSONValue], _ name: String) throws(SandpiperError) -> String? {
        switch lookup(object, name) {
        case nil, .null?: return nil
        case .string(let value)?: return value
        default: throw SandpiperError.invalid("'\(name)' must be a string", code: "InvalidRequestBody")
        }
    }

    static func integer(_ object: [String: JSONValue], _ name: String) throws(SandpiperError) -> Int? {
        switch lookup(object, name) {
        case nil, .null?: return nil
        case .integer(let value)?: return Int(clamping: value)
        case .number(let value)? where value.isFinite && value.rounded() == value && abs(value) < 1e15:
            return Int(value)
        case .string(let text)? where Int(text) != nil: return Int(text)
        default: throw SandpiperError.invalid("'\(name)' must be an integer", code: "InvalidRequestBody")
        }
    }
}
