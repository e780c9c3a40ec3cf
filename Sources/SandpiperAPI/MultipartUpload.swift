import Foundation
import Hummingbird
import SandpiperCore

/// Receives a `multipart/form-data` upload and streams its `file` part straight into the
/// session, never holding the file in memory. Tolerates Semantic Kernel's quirk of sending a
/// multipart body labelled `application/json` by reading the boundary off the body itself.
enum MultipartUpload {
    struct Part {
        var headers: [(String, String)] = []
        var isFile = false
        var fileName: String?
    }

    /// - Parameters:
    ///   - open: creates the destination for the part's file name (as the client sent it).
    static func receive(
        _ request: Request,
        maxBytes: Int64,
        open: (String) async throws -> any SandboxFileWriter
    ) async throws -> FileEntry {
        if let length = request.headers[.contentLength].flatMap({ Int64($0) }), length > maxBytes + 65_536 {
            throw tooLarge(maxBytes)
        }
        var boundary = headerBoundary(request.headers[.contentType])
        var parser: MultipartStreamParser?
        var part: Part?
        var writer: (any SandboxFileWriter)?
        var written: Int64 = 0
        var result: FileEntry?
        var sawAnyPart = false
        // Small chunks are gathered and written in larger batches.
        var pendingBytes: [UInt8] = []

        do {
            for try await chunk in request.body {
                if parser == nil {
                    if boundary == nil { boundary = sniffBoundary(chunk) }
                    guard let boundary else {
                        throw SandpiperError.invalid(
                            "expected a multipart/form-data body with a 'file' part",
                            code: "InvalidMultipartBody"
                        )
                    }
                    parser = MultipartStreamParser(boundary: boundary)
                }
                guard var current = parser else { break }
                let events = try current.feed(chunk)
                parser = current
                for event in events {
                    switch event {
                    case .headers(let headers):
                        sawAnyPart = true
                        part = classify(Part(headers: headers))
                        if result == nil, let part, part.isFile {
                            writer = try await open(part.fileName ?? "")
                        }
                    case .body(let buffer):
                        guard let target = writer else { continue }
                        written += Int64(buffer.readableBytes)
                        if written > maxBytes { throw tooLarge(maxBytes) }
                        pendingBytes.append(contentsOf: buffer.readableBytesView)
                        if pendingBytes.count >= 256 << 10 {
                            try await target.write(pendingBytes)
                            pendingBytes.removeAll(keepingCapacity: true)
                        }
                    case .partEnd:
                        if let target = writer {
                            if !pendingBytes.isEmpty {
                                try await target.write(pendingBytes)
                                pendingBytes.removeAll()
                            }
                            writer = nil
                            result = try await target.finish()
                        }
                        part = nil
                    }
                }
            }
        } catch {
            await writer?.abort()
            if let error = error as? SandpiperError { throw error }
            if let error = error as? HTTPError, error.status == .contentTooLarge { throw tooLarge(maxBytes) }
            throw SandpiperError.invalid("the upload could not be read: \(error)", code: "InvalidMultipartBody")
        }
        if let writer {
            await writer.abort()
            throw SandpiperError.invalid("the multipart body ended inside the file part", code: "InvalidMultipartBody")
        }
        guard let result else {
            throw SandpiperError.invalid(
                sawAnyPart
                    ? "the multipart body has no 'file' part"
                    : "expected a multipart/form-data body with a 'file' part",
                code: "InvalidMultipartBody"
            )
        }
        return result
    }

    static func tooLarge(_ maxBytes: Int64) -> SandpiperError {
        SandpiperError(
            .payloadTooLarge,
            code: "FileTooLarge",
            "the uploaded file is larger than this pool's limit of \(maxBytes) bytes"
        )
    }

    /// Decides from the part's headers whether it carries the file and under which name.
    static func classify(_ part: Part) -> Part {
        var part = part
        guard let disposition = part.headers.first(where: { $0.0.lowercased() == "content-disposition" })?.1 else {
            return part
        }
        let parameters = dispositionParameters(disposition)
        part.fileName = parameters["filename*"].flatMap(decodeExtendedValue) ?? parameters["filename"]
        part.isFile = parameters["name"] == "file" || (parameters["name"] == nil && part.fileName != nil)
        return part
    }

    /// `form-data; name="file"; filename="a b.txt"` → ["name": "file", "filename": "a b.txt"].
    static func dispositionParameters(_ value: String) -> [String: String] {
        var result: [String: String] = [:]
        var rest = Substring(value)
        // Skip the disposition type.
        if let semicolon = rest.firstIndex(of: ";") {
            rest = rest[rest.index(after: semicolon)...]
        } else {
            return result
        }
        while !rest.isEmpty {
            rest = rest.drop { $0 == " " || $0 == "\t" || $0 == ";" }
            guard let equals = rest.firstIndex(of: "=") else { break }
            let key = rest[..<equals].trimmingCharacters(in: .whitespaces).lowercased()
            rest = rest[rest.index(after: equals)...]
            var value = ""
            if rest.first == "\"" {
                rest = rest.dropFirst()
                var escaped = false
                var end = rest.endIndex
                for index in rest.indices {
                    let character = rest[index]
                    if escaped {
                        value.append(character)
                        escaped = false
                    } else if character == "\\" {
                        escaped = true
                    } else if character == "\"" {
                        end = index
                        break
                    } else {
                        value.append(character)
                    }
                }
                rest = end < rest.endIndex ? rest[rest.index(after: end)...] : ""
            } else {
                let end = rest.firstIndex(of: ";") ?? rest.endIndex
                value = rest[..<end].trimmingCharacters(in: .whitespaces)
                rest = rest[end...]
            }
            if result[key] == nil { result[key] = value }
        }
        return result
    }

    /// RFC 5987 `UTF-8''na%C3%AFve.txt`.
    static func decodeExtendedValue(_ value: String) -> String? {
        guard let range = value.range(of: "''") else { return nil }
        return String(value[range.upperBound...]).removingPercentEncoding
    }

    static func headerBoundary(_ contentType: String?) -> String? {
        guard let contentType, contentType.lowercased().hasPrefix("multipart/") else { return nil }
        for parameter in contentType.split(separator: ";").dropFirst() {
            let pair = parameter.split(separator: "=", maxSplits: 1)
            guard pair.count == 2, pair[0].trimmingCharacters(in: .whitespaces).lowercased() == "boundary" else {
                continue
            }
            var value = pair[1].trimmingCharacters(in: .whitespaces)
            if value.hasPrefix("\""), value.hasSuffix("\""), value.count >= 2 {
                value = String(value.dropFirst().dropLast())
            }
            return value.isEmpty || value.utf8.count > 200 ? nil : value
        }
        return nil
    }

    /// The boundary from a body's first line `--<boundary>\r\n`.
    static func sniffBoundary(_ chunk: ByteBuffer) -> String? {
        let bytes = chunk.readableBytesView.prefix(260)
        guard bytes.starts(with: Array("--".utf8)) else { return nil }
        guard let end = bytes.firstIndex(of: UInt8(ascii: "\r")) else { return nil }
        let boundary = String(decoding: bytes[(bytes.startIndex + 2)..<end], as: UTF8.self)
        let valid = !boundary.isEmpty && boundary.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F }
        return valid ? boundary : nil
    }
}
