import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import SandpiperCore
import Synchronization

/// Credentials for a registry: sent as HTTP basic auth, or to the token service of a bearer challenge.
public struct RegistryCredentials: Sendable, Equatable {
    public var username: String
    public var password: String

    public init(username: String, password: String) {
        self.username = username
        self.password = password
    }
}

/// The platform a pull picks from an image index.
public struct ImagePlatform: Sendable, Equatable, CustomStringConvertible {
    public var os: String
    public var architecture: String
    public var variant: String?

    public init(os: String = "linux", architecture: String, variant: String? = nil) {
        self.os = os
        self.architecture = architecture
        self.variant = variant
    }

    /// linux and this machine's architecture, in OCI words.
    public static var host: ImagePlatform {
        #if arch(arm64)
            ImagePlatform(architecture: "arm64", variant: "v8")
        #else
            ImagePlatform(architecture: "amd64")
        #endif
    }

    public var description: String { [os, architecture, variant].compactMap { $0 }.joined(separator: "/") }
}

/// An OCI distribution v2 client for one repository: manifests (index → platform manifest) and
/// blobs, anonymous / basic / bearer-token auth driven by the registry's `WWW-Authenticate`
/// challenge, and redirects followed by hand so credentials never go to another host.
final class RegistryClient: Sendable {
    let reference: ImageReference
    let scheme: String
    let credentials: RegistryCredentials?
    let limits: ImageLimits
    let logger: Logger
    private let http: HTTPClient
    /// The `Authorization` header value that worked (or was issued) for this repository.
    private let authorization = Mutex<String?>(nil)

    static let maxRedirects = 5
    static let headTimeout: TimeAmount = .seconds(60)

    init(
        reference: ImageReference,
        credentials: RegistryCredentials?,
        insecure: Bool,
        limits: ImageLimits,
        logger: Logger
    ) {
        self.reference = reference
        self.scheme = insecure ? "http" : "https"
        self.credentials = credentials
        self.limits = limits
        self.logger = logger
        var configuration = HTTPClient.Configuration(
            redirectConfiguration: .disallow,
            timeout: .init(connect: .seconds(15), read: .seconds(60))
        )
        configuration.httpVersion = .http1Only
        self.http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    func shutdown() async {
        try? await http.shutdown()
    }

    var repositoryURL: String { "\(scheme)://\(reference.apiHost)/v2/\(reference.repository)" }

    // MARK: - Manifests

    struct FetchedManifest: Sendable {
        var document: ManifestDocument
        var bytes: [UInt8]
        var digest: Digest
        var mediaType: String
    }

    /// The image manifest for `platform`: the reference's manifest, or the platform's entry of its index.
    func imageManifest(platform: ImagePlatform) async throws(SandpiperError) -> FetchedManifest {
        let top = try await manifest(reference.manifestReference, expected: reference.digest, size: nil)
        guard top.document.isIndex || MediaType.isIndex(top.mediaType) else { return try checked(top) }
        let entries = top.document.manifests ?? []
        let match =
            entries.first { entry in
                guard let candidate = entry.platform else { return false }
                return candidate.os == platform.os && candidate.architecture == platform.architecture
                    && (platform.variant == nil || candidate.variant == nil || candidate.variant == platform.variant)
            }
        guard let match else {
            let available = entries.compactMap { $0.platform.map { "\($0.os)/\($0.architecture)" } }
            throw SandpiperError.notFound(
                "\(reference) has no \(platform) image (it has: \(available.joined(separator: ", ")))",
                code: "ImagePlatformNotFound"
            )
        }
        let chosen = try await manifest(match.digest.description, expected: match.digest, size: match.size)
        guard !chosen.document.isIndex else {
            throw SandpiperError.invalid(
                "\(reference): an index inside an index is not supported",
                code: "InvalidImage"
            )
        }
        return try checked(chosen)
    }

    private func checked(_ manifest: FetchedManifest) throws(SandpiperError) -> FetchedManifest {
        guard manifest.document.config != nil, manifest.document.layers != nil else {
            throw SandpiperError.invalid(
                "\(reference): unsupported manifest (media type '\(manifest.mediaType)'; schema 1 manifests are "
                    + "not supported)",
                code: "InvalidImage"
            )
        }
        return manifest
    }

    func manifest(_ tagOrDigest: String, expected: Digest?, size: Int64?) async throws(SandpiperError)
        -> FetchedManifest
    {
        let response = try await send("\(repositoryURL)/manifests/\(tagOrDigest)", accept: MediaType.manifestAccept)
        let bytes = try await collect(response, limit: limits.maxManifestBytes, what: "the manifest")
        let digest = Digest.of(bytes)
        if let expected, digest != expected {
            throw Self.digestMismatch("manifest", expected: expected, actual: digest)
        }
        if let size, Int64(bytes.count) != size {
            throw SandpiperError.invalid(
                "\(reference): the manifest is \(bytes.count) bytes, its descriptor says \(size)",
                code: "ImageDigestMismatch"
            )
        }
        if expected == nil, let header = response.headers.first(name: "Docker-Content-Digest"),
            let announced = try? Digest(parsing: header), announced != digest
        {
            throw Self.digestMismatch("manifest", expected: announced, actual: digest)
        }
        let document: ManifestDocument
        do {
            document = try JSONDecoder().decode(ManifestDocument.self, from: Data(bytes))
        } catch {
            throw SandpiperError.invalid("\(reference): the manifest is not valid JSON: \(error)", code: "InvalidImage")
        }
        let contentType = response.headers.first(name: "Content-Type")?.split(separator: ";").first.map {
            String($0).trimmingWhitespace()
        }
        let mediaType = document.mediaType ?? contentType ?? MediaType.ociManifest
        return FetchedManifest(document: document, bytes: bytes, digest: digest, mediaType: mediaType)
    }

    // MARK: - Blobs

    /// Starts a blob download; the caller streams `body` and verifies it.
    func blob(_ descriptor: Descriptor) async throws(SandpiperError) -> HTTPClientResponse {
        let response = try await send("\(repositoryURL)/blobs/\(descriptor.digest)", accept: ["*/*"])
        if let length = response.headers.first(name: "Content-Length").flatMap(Int64.init), length != descriptor.size {
            throw SandpiperError.invalid(
                "\(reference): blob \(descriptor.digest.short) is \(length) bytes, its descriptor says \(descriptor.size)",
                code: "ImageDigestMismatch"
            )
        }
        return response
    }

    /// A small blob (the config) whole, verified.
    func smallBlob(_ descriptor: Descriptor, limit: Int) async throws(SandpiperError) -> [UInt8] {
        guard descriptor.size <= Int64(limit) else {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "\(reference): blob \(descriptor.digest.short) is \(descriptor.size) bytes, over the \(limit) limit"
            )
        }
        let response = try await blob(descriptor)
        let bytes = try await collect(response, limit: limit, what: "blob \(descriptor.digest.short)")
        let digest = Digest.of(bytes)
        guard digest == descriptor.digest, Int64(bytes.count) == descriptor.size else {
            throw Self.digestMismatch("blob", expected: descriptor.digest, actual: digest)
        }
        return bytes
    }

    static func digestMismatch(_ what: String, expected: Digest, actual: Digest) -> SandpiperError {
        .invalid("\(what) digest mismatch: expected \(expected), got \(actual)", code: "ImageDigestMismatch")
    }

    // MARK: - Requests

    private func collect(_ response: HTTPClientResponse, limit: Int, what: String) async throws(SandpiperError)
        -> [UInt8]
    {
        if let length = response.headers.first(name: "Content-Length").flatMap(Int.init), length > limit {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "\(reference): \(what) is \(length) bytes, over the \(limit) limit"
            )
        }
        do {
            var bytes: [UInt8] = []
            for try await chunk in response.body {
                guard bytes.count + chunk.readableBytes <= limit else {
                    throw SandpiperError(
                        .payloadTooLarge,
                        code: "ImageTooLarge",
                        "\(reference): \(what) is over the \(limit) byte limit"
                    )
                }
                bytes.append(contentsOf: chunk.readableBytesView)
            }
            return bytes
        } catch let error as SandpiperError {
            throw error
        } catch {
            throw Self.transport(error, reference.registry)
        }
    }

    /// GET `url` with auth and redirects handled; returns a 2xx response whose body is not yet read.
    private func send(_ url: String, accept: [String]) async throws(SandpiperError) -> HTTPClientResponse {
        guard let origin = Self.origin(url) else {
            throw SandpiperError.invalid("bad registry URL '\(url)'", code: "InvalidImageReference")
        }
        var url = url
        var challenged = false
        var redirects = 0
        while true {
            var request = HTTPClientRequest(url: url)
            request.headers.add(name: "Accept", value: accept.joined(separator: ", "))
            request.headers.add(name: "User-Agent", value: "sandpiper")
            let sameOrigin = Self.origin(url) == origin
            if sameOrigin, let value = authorization.withLock({ $0 }) {
                request.headers.add(name: "Authorization", value: value)
            }
            let response: HTTPClientResponse
            do {
                response = try await http.execute(request, timeout: Self.headTimeout, logger: logger)
            } catch {
                throw Self.transport(error, reference.registry)
            }
            let status = response.status.code
            switch status {
            case 200..<300:
                return response
            case 301, 302, 303, 307, 308:
                redirects += 1
                guard redirects <= Self.maxRedirects, let location = response.headers.first(name: "Location"),
                    let next = URL(string: location, relativeTo: URL(string: url))?.absoluteURL,
                    next.scheme == "http" || next.scheme == "https"
                else {
                    throw SandpiperError(.unavailable, code: "RegistryError", "\(reference): bad or too many redirects")
                }
                await discard(response)
                url = next.absoluteString
            case 401 where sameOrigin && !challenged:
                challenged = true
                await discard(response)
                try await authenticate(response.headers.first(name: "WWW-Authenticate"))
            default:
                let detail = await errorDetail(response)
                throw Self.statusError(status, reference: reference, detail: detail)
            }
        }
    }

    /// scheme://host:port, the port made explicit: a redirect to another port of the same host (a
    /// different server) must not receive the registry's `Authorization` header either.
    static func origin(_ url: String) -> String? {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
            let host = components.host?.lowercased(), !host.isEmpty
        else { return nil }
        let port = components.port ?? (scheme == "https" ? 443 : scheme == "http" ? 80 : -1)
        return "\(scheme)://\(host):\(port)"
    }

    static func statusError(_ status: UInt, reference: ImageReference, detail: String) -> SandpiperError {
        let suffix = detail.isEmpty ? "" : ": \(detail)"
        switch status {
        case 401:
            return SandpiperError(
                .unauthorized,
                code: "RegistryUnauthorized",
                "\(reference.registry) refused the credentials (HTTP 401)\(suffix)"
            )
        case 403:
            return SandpiperError(
                .unauthorized,
                code: "RegistryForbidden",
                "\(reference.registry) denied access to \(reference.repository) (HTTP 403)\(suffix)"
            )
        case 404:
            return .notFound("\(reference) was not found on \(reference.registry)\(suffix)", code: "ImageNotFound")
        case 429:
            return SandpiperError(
                .unavailable,
                code: "RegistryRateLimited",
                "\(reference.registry) rate-limits us\(suffix)"
            )
        default:
            return SandpiperError(
                .unavailable,
                code: "RegistryError",
                "\(reference.registry) answered HTTP \(status)\(suffix)"
            )
        }
    }

    private func discard(_ response: HTTPClientResponse) async {
        _ = try? await response.body.collect(upTo: 1 << 16)
    }

    private func errorDetail(_ response: HTTPClientResponse) async -> String {
        guard let body = try? await response.body.collect(upTo: 1 << 16) else { return "" }
        let text = String(buffer: body)
        return String(text.prefix(300)).trimmingWhitespace()
    }

    static func transport(_ error: any Error, _ registry: String) -> SandpiperError {
        SandpiperError(.unavailable, code: "RegistryUnreachable", "cannot talk to registry \(registry): \(error)")
    }

    // MARK: - Auth

    private func authenticate(_ header: String?) async throws(SandpiperError) {
        guard let header, let challenge = Self.parseChallenge(header) else {
            throw SandpiperError(
                .unauthorized,
                code: "RegistryUnauthorized",
                "\(reference.registry) requires authentication but sent no usable challenge"
            )
        }
        switch challenge.scheme {
        case "basic":
            guard let credentials else {
                throw SandpiperError(
                    .unauthorized,
                    code: "RegistryUnauthorized",
                    "\(reference.registry) requires a username and password (--username, --password-stdin)"
                )
            }
            authorization.withLock { $0 = Self.basic(credentials) }
        case "bearer":
            let token = try await fetchToken(challenge.parameters)
            authorization.withLock { $0 = "Bearer " + token }
        default:
            throw SandpiperError(
                .unauthorized,
                code: "RegistryUnauthorized",
                "\(reference.registry) asks for unsupported auth scheme '\(challenge.scheme)'"
            )
        }
    }

    static func basic(_ credentials: RegistryCredentials) -> String {
        "Basic " + Data("\(credentials.username):\(credentials.password)".utf8).base64EncodedString()
    }

    private func fetchToken(_ parameters: [String: String]) async throws(SandpiperError) -> String {
        guard let realm = parameters["realm"], var components = URLComponents(string: realm),
            components.scheme == "https" || components.scheme == "http"
        else {
            throw SandpiperError(.unauthorized, code: "RegistryUnauthorized", "bearer challenge without a usable realm")
        }
        var query = components.queryItems ?? []
        if let service = parameters["service"] { query.append(URLQueryItem(name: "service", value: service)) }
        query.append(
            URLQueryItem(name: "scope", value: parameters["scope"] ?? "repository:\(reference.repository):pull")
        )
        components.queryItems = query
        guard let url = components.url?.absoluteString else {
            throw SandpiperError(.unauthorized, code: "RegistryUnauthorized", "bad token realm '\(realm)'")
        }
        var request = HTTPClientRequest(url: url)
        request.headers.add(name: "User-Agent", value: "sandpiper")
        if let credentials { request.headers.add(name: "Authorization", value: Self.basic(credentials)) }
        let body: ByteBuffer
        let status: UInt
        do {
            let response = try await http.execute(request, timeout: Self.headTimeout, logger: logger)
            status = response.status.code
            body = try await response.body.collect(upTo: 1 << 20)
        } catch {
            throw Self.transport(error, components.host ?? realm)
        }
        guard status == 200 else {
            throw SandpiperError(
                .unauthorized,
                code: "RegistryUnauthorized",
                "the token service \(components.host ?? realm) refused us (HTTP \(status))"
            )
        }
        struct TokenResponse: Decodable {
            var token: String?
            var accessToken: String?
            enum CodingKeys: String, CodingKey {
                case token
                case accessToken = "access_token"
            }
        }
        guard let decoded = try? JSONDecoder().decode(TokenResponse.self, from: Data(body.readableBytesView)),
            let token = decoded.token ?? decoded.accessToken, !token.isEmpty
        else {
            throw SandpiperError(.unauthorized, code: "RegistryUnauthorized", "the token service sent no token")
        }
        return token
    }

    /// `Bearer realm="…",service="…",scope="…"` → ("bearer", [realm: …, …]). Quoted values may hold commas.
    static func parseChallenge(_ header: String) -> (scheme: String, parameters: [String: String])? {
        let text = Array(header.utf8)
        var index = 0
        while index < text.count && text[index] == UInt8(ascii: " ") { index += 1 }
        let schemeStart = index
        while index < text.count && text[index] != UInt8(ascii: " ") { index += 1 }
        guard index > schemeStart else { return nil }
        let scheme = String(decoding: text[schemeStart..<index], as: UTF8.self).lowercased()
        var parameters: [String: String] = [:]
        while index < text.count {
            while index < text.count && (text[index] == UInt8(ascii: " ") || text[index] == UInt8(ascii: ",")) {
                index += 1
            }
            let keyStart = index
            while index < text.count && text[index] != UInt8(ascii: "=") && text[index] != UInt8(ascii: ",") {
                index += 1
            }
            let key = String(decoding: text[keyStart..<index], as: UTF8.self).trimmingWhitespace().lowercased()
            guard index < text.count, text[index] == UInt8(ascii: "=") else { continue }
            index += 1
            var value: [UInt8] = []
            if index < text.count && text[index] == UInt8(ascii: "\"") {
                index += 1
                while index < text.count && text[index] != UInt8(ascii: "\"") {
                    if text[index] == UInt8(ascii: "\\") && index + 1 < text.count { index += 1 }
                    value.append(text[index])
                    index += 1
                }
                index += 1
            } else {
                while index < text.count && text[index] != UInt8(ascii: ",") {
                    value.append(text[index])
                    index += 1
                }
            }
            if !key.isEmpty {
                parameters[key] = String(decoding: value, as: UTF8.self).trimmingWhitespace()
            }
        }
        return (scheme, parameters)
    }
}
