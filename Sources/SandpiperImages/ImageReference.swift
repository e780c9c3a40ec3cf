import SandpiperCore

/// A parsed image reference: `[registry[:port]/]repository[:tag][@sha256:<hex>]`, with Docker's
/// defaults (`docker.io`, `library/` for single-component names on Docker Hub, tag `latest`).
///
/// The first component is a registry host when it contains `.` or `:` or is `localhost`, as
/// Docker decides. `127.0.0.1:5000/tools/web:1.0` is registry `127.0.0.1:5000`, repository
/// `tools/web`, tag `1.0`.
public struct ImageReference: Hashable, Sendable, CustomStringConvertible {
    public static let defaultRegistry = "docker.io"
    public static let defaultTag = "latest"

    /// `host` or `host:port` (IPv6 in brackets), as written (lowercased).
    public var registry: String
    /// Slash-separated path components, lowercase.
    public var repository: String
    /// The tag; `nil` when only a digest was given.
    public var tag: String?
    public var digest: Digest?

    public init(registry: String, repository: String, tag: String? = nil, digest: Digest? = nil) {
        self.registry = registry
        self.repository = repository
        self.tag = tag ?? (digest == nil ? Self.defaultTag : nil)
        self.digest = digest
    }

    public init(parsing text: String) throws(SandpiperError) {
        let text = text.trimmingWhitespace()
        guard !text.isEmpty else { throw Self.invalid(text, "it is empty") }
        guard text.utf8.count <= 512 else { throw Self.invalid(text, "it is longer than 512 bytes") }
        var rest = Substring(text)
        var digest: Digest?
        if let at = rest.firstIndex(of: "@") {
            digest = try Digest(parsing: String(rest[rest.index(after: at)...]))
            rest = rest[..<at]
        }
        var registry = Self.defaultRegistry
        if let slash = rest.firstIndex(of: "/") {
            let first = rest[..<slash]
            if first.contains(".") || first.contains(":") || first == "localhost" {
                registry = String(first)
                rest = rest[rest.index(after: slash)...]
            }
        }
        var tag: String?
        // A tag is after the last ':' of the last path component (a port lives in the host part).
        if let colon = rest.lastIndex(of: ":"), !rest[colon...].contains("/") {
            tag = String(rest[rest.index(after: colon)...])
            rest = rest[..<colon]
        }
        var repository = String(rest)
        try Self.validateRegistry(registry, text)
        if registry == Self.defaultRegistry && !repository.contains("/") {
            repository = "library/" + repository
        }
        try Self.validateRepository(repository, text)
        if let tag { try Self.validateTag(tag, text) }
        self.init(registry: registry.lowercased(), repository: repository, tag: tag, digest: digest)
    }

    /// `registry/repository:tag`, `registry/repository@digest` or both: the name images are stored under.
    public var description: String {
        var text = registry + "/" + repository
        if let tag { text += ":" + tag }
        if let digest { text += "@" + digest.description }
        return text
    }

    /// What the manifest is fetched by: the digest when there is one, else the tag.
    public var manifestReference: String { digest?.description ?? tag ?? Self.defaultTag }

    /// The host the distribution API is served from (Docker Hub's API host differs from its name).
    public var apiHost: String { registry == Self.defaultRegistry ? "registry-1.docker.io" : registry }

    static func invalid(_ text: String, _ why: String) -> SandpiperError {
        .invalid("invalid image reference '\(text.prefix(200))': \(why)", code: "InvalidImageReference")
    }

    private static func validateRegistry(_ registry: String, _ text: String) throws(SandpiperError) {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")
        guard !registry.isEmpty, registry.allSatisfy({ allowed.contains($0) }) else {
            throw invalid(text, "bad registry host '\(registry)'")
        }
        if let colon = registry.lastIndex(of: ":"), !registry.hasSuffix("]") {
            let port = registry[registry.index(after: colon)...]
            guard let number = Int(port), (1...65_535).contains(number) else {
                throw invalid(text, "bad registry port '\(port)'")
            }
        }
    }

    private static func validateRepository(_ repository: String, _ text: String) throws(SandpiperError) {
        guard !repository.isEmpty, repository.utf8.count <= 255 else {
            throw invalid(text, "the repository name must be 1 to 255 characters")
        }
        let alphanumeric = Set("abcdefghijklmnopqrstuvwxyz0123456789")
        let separators = Set("._-")
        for component in repository.split(separator: "/", omittingEmptySubsequences: false) {
            guard let first = component.first, let last = component.last,
                alphanumeric.contains(first), alphanumeric.contains(last),
                component.allSatisfy({ alphanumeric.contains($0) || separators.contains($0) })
            else {
                throw invalid(
                    text,
                    "repository component '\(component)' must be lowercase letters, digits and . _ - separators"
                )
            }
        }
    }

    private static func validateTag(_ tag: String, _ text: String) throws(SandpiperError) {
        let word = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
        guard let first = tag.first, word.contains(first), tag.count <= 128,
            tag.allSatisfy({ word.contains($0) || $0 == "." || $0 == "-" })
        else {
            throw invalid(text, "bad tag '\(tag)'")
        }
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var view = Substring(self)
        while let first = view.first, first.isWhitespace { view = view.dropFirst() }
        while let last = view.last, last.isWhitespace { view = view.dropLast() }
        return String(view)
    }
}
