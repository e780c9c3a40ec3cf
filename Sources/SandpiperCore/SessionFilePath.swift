/// A path inside a session's `/mnt/data`, validated so that it can never name anything outside
/// it. Clients send names as `report.csv`, `sub/dir/x.txt` or `/mnt/data/x.txt`; the prefix is
/// stripped. `.`, `..`, empty segments, NUL and control characters are refused. Symlinks are a
/// separate concern handled where the file is opened (component by component, no following).
public struct SessionFilePath: Hashable, Sendable, CustomStringConvertible {
    /// Non-empty relative components, e.g. `["sub", "x.txt"]`. Empty means `/mnt/data` itself.
    public let components: [String]

    public static let mountPoint = "/mnt/data"
    public static let maxComponentBytes = 255
    public static let maxPathBytes = 1024

    /// The root of the session's data directory.
    public static let root = SessionFilePath(components: [])

    public init(components: [String]) {
        self.components = components
    }

    /// Parses a client-supplied name. `allowRoot` accepts "", "/" and "/mnt/data" as the root.
    public init(validating raw: String, allowRoot: Bool = false) throws(SandpiperError) {
        var path = raw
        if path.utf8.count > Self.maxPathBytes {
            throw SandpiperError.invalid("file path is longer than \(Self.maxPathBytes) bytes", code: "InvalidFilePath")
        }
        if path == Self.mountPoint || path == Self.mountPoint + "/" {
            path = ""
        } else if path.hasPrefix(Self.mountPoint + "/") {
            path.removeFirst(Self.mountPoint.count + 1)
        } else if path.hasPrefix("/") {
            if path.allSatisfy({ $0 == "/" }) {
                path = ""
            } else {
                throw SandpiperError.invalid(
                    "file path '\(Self.printable(raw))' is outside /mnt/data",
                    code: "InvalidFilePath"
                )
            }
        }
        // Tolerate a trailing slash on directories, nothing else.
        while path.hasSuffix("/") { path.removeLast() }
        if path.isEmpty {
            guard allowRoot else {
                throw SandpiperError.invalid("a file name is required", code: "InvalidFilePath")
            }
            self.components = []
            return
        }
        var parts: [String] = []
        for part in path.split(separator: "/", omittingEmptySubsequences: false) {
            let name = String(part)
            if name.isEmpty || name == "." || name == ".." {
                throw SandpiperError.invalid(
                    "file path '\(Self.printable(raw))' may not contain empty, '.' or '..' segments",
                    code: "InvalidFilePath"
                )
            }
            if name.utf8.count > Self.maxComponentBytes {
                throw SandpiperError.invalid(
                    "a file name segment is longer than \(Self.maxComponentBytes) bytes",
                    code: "InvalidFilePath"
                )
            }
            if name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) {
                throw SandpiperError.invalid(
                    "file names may not contain NUL or control characters",
                    code: "InvalidFilePath"
                )
            }
            parts.append(name)
        }
        self.components = parts
    }

    public var isRoot: Bool { components.isEmpty }
    public var name: String { components.last ?? "" }
    /// The relative path, e.g. `sub/x.txt` ("" for the root).
    public var relative: String { components.joined(separator: "/") }
    /// The parent directory's relative path ("" for top-level entries).
    public var parentRelative: String { components.dropLast().joined(separator: "/") }
    public var parent: SessionFilePath { SessionFilePath(components: Array(components.dropLast())) }

    public func appending(_ child: SessionFilePath) -> SessionFilePath {
        SessionFilePath(components: components + child.components)
    }

    public var description: String { relative }

    /// A form of untrusted text that is safe to put in an error message.
    static func printable(_ raw: String) -> String {
        let cleaned = String(raw.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? "?" : Character($0) })
        return cleaned.count > 200 ? String(cleaned.prefix(200)) + "..." : cleaned
    }
}
