import CSandpiperShims
import Logging
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Unpacks one layer tar into an empty directory, safely, in the form overlayfs reads:
///
/// - Member names are normalised: leading `/` and `.` components dropped; a `..` component
///   refuses the layer.
/// - Every path is walked one component at a time with `O_NOFOLLOW` from the layer root's
///   descriptor, so nothing is ever written through a symlink (a member under a symlink that an
///   earlier member made refuses the layer). Symlink targets are stored verbatim, absolute ones
///   included: they are resolved only inside the container.
/// - Hard links may only name a non-directory already extracted from this same layer.
/// - Device nodes, FIFOs and unknown member types are skipped (and counted); setuid and setgid
///   bits are dropped; files are owned by whoever unpacks (root in the store).
/// - Whiteouts become overlayfs whiteouts: `.wh.NAME` a 0/0 character device `NAME`, and
///   `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr on its directory. A whiteout never hides
///   something of its own layer (the OCI rule), and a directory that replaces a whiteout of its
///   own layer is made opaque.
struct LayerUnpacker {
    static let whiteoutPrefix: [UInt8] = Array(".wh.".utf8)
    static let opaqueMarker: [UInt8] = Array(".wh..wh..opq".utf8)
    static let opaqueXattr = "trusted.overlay.opaque"

    let root: Int32
    let limits: ImageLimits
    let logger: Logger
    let description: String

    /// Paths (joined with `/`) this layer created, and the kinds of those that are not directories.
    private var created: [[UInt8]: Bool] = [:]
    private var whiteouts: Set<[UInt8]> = []
    private(set) var skipped = 0
    private(set) var entries = 0
    private(set) var bytesWritten: Int64 = 0
    private var cachedParent: (key: [UInt8], fd: Int32)?

    /// `root` is a directory descriptor the unpacker does not own.
    init(root: Int32, limits: ImageLimits, logger: Logger, description: String) {
        self.root = root
        self.limits = limits
        self.logger = logger
        self.description = description
    }

    /// Unpacks every member of `reader`. The caller drains the reader afterwards for the diff id.
    mutating func unpack<Source: ByteSource>(_ reader: inout TarReader<Source>) throws(SandpiperError) {
        defer { dropCachedParent() }
        while let entry = try reader.next() {
            entries += 1
            guard entries <= limits.maxLayerEntries else {
                throw SandpiperError(
                    .payloadTooLarge,
                    code: "ImageTooLarge",
                    "\(description) has more than \(limits.maxLayerEntries) entries"
                )
            }
            try extract(entry, from: &reader)
        }
    }

    // MARK: - Members

    private mutating func extract<Source: ByteSource>(
        _ entry: TarEntry,
        from reader: inout TarReader<Source>
    ) throws(SandpiperError) {
        let components = try Self.normalise(entry.path, member: entry.path)
        guard let name = components.last else {
            // The layer root itself ("./"): its mode is not taken from the image.
            return
        }
        let parentComponents = Array(components.dropLast())
        let key = Self.join(components)

        if name.starts(with: Self.whiteoutPrefix) {
            try whiteout(name: name, parent: parentComponents, member: entry.path)
            return
        }
        switch entry.kind {
        case .regular:
            let parent = try openParent(parentComponents)
            try replaceExisting(parent: parent, name: name, key: key, withDirectory: false)
            try writeFile(entry, parent: parent, name: name, from: &reader)
            created[key] = true
        case .directory:
            let parent = try openParent(parentComponents)
            let replacedWhiteout = whiteouts.contains(key)
            try replaceExisting(parent: parent, name: name, key: key, withDirectory: true)
            try makeDirectory(parent: parent, name: name, mode: entry.mode, opaque: replacedWhiteout)
            created[key] = false
        case .symbolicLink:
            guard !entry.linkTarget.isEmpty, !entry.linkTarget.contains(0) else {
                throw invalid("symlink '\(entry.pathString)' has an empty or malformed target")
            }
            let parent = try openParent(parentComponents)
            try replaceExisting(parent: parent, name: name, key: key, withDirectory: false)
            let rc = Self.withCName(entry.linkTarget) { target in
                Self.withCName(name) { symlinkat(target, parent, $0) }
            }
            guard rc == 0 else { throw failure("cannot create symlink '\(entry.pathString)'") }
            Self.withCName(name) { setTime(parent, $0, entry.modified, flags: AT_SYMLINK_NOFOLLOW) }
            created[key] = true
        case .hardLink:
            try hardLink(entry, components: components, key: key)
        case .characterDevice, .blockDevice, .fifo, .other:
            skipped += 1
            logger.debug("skipping \(entry.kind) member", metadata: ["layer": "\(description)", "path": "\(key)"])
        }
    }

    private mutating func writeFile<Source: ByteSource>(
        _ entry: TarEntry,
        parent: Int32,
        name: [UInt8],
        from reader: inout TarReader<Source>
    ) throws(SandpiperError) {
        let fd = Self.withCName(name) {
            openat(parent, $0, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        }
        guard fd >= 0 else { throw failure("cannot create '\(entry.pathString)'") }
        defer { Glibc.close(fd) }
        bytesWritten += entry.size
        guard bytesWritten <= limits.maxUnpackedLayerBytes else {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "\(description) unpacks to more than \(limits.maxUnpackedLayerBytes) bytes"
            )
        }
        var writeError: Int32 = 0
        while true {
            let count = try reader.readData { bytes in
                var offset = 0
                while offset < bytes.count && writeError == 0 {
                    let written = Glibc.write(fd, bytes.baseAddress.map { $0 + offset }, bytes.count - offset)
                    if written < 0 {
                        if errno != EINTR { writeError = errno }
                    } else {
                        offset += written
                    }
                }
            }
            if writeError != 0 {
                throw failure("cannot write '\(entry.pathString)'", code: writeError)
            }
            if count == 0 { break }
        }
        // Regular files keep their permission bits and the sticky bit, never setuid or setgid.
        fchmod(fd, mode_t(entry.mode & 0o1777))
        let seconds = Int(clamping: entry.modified)
        var times = [timespec(tv_sec: seconds, tv_nsec: 0), timespec(tv_sec: seconds, tv_nsec: 0)]
        futimens(fd, &times)
    }

    private mutating func makeDirectory(
        parent: Int32,
        name: [UInt8],
        mode: UInt32,
        opaque: Bool
    ) throws(SandpiperError) {
        let rc = Self.withCName(name) { mkdirat(parent, $0, 0o700) }
        if rc != 0 && errno != EEXIST { throw failure("cannot create directory \(FileSystem.display(name))") }
        let fd = Self.withCName(name) { openat(parent, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        guard fd >= 0 else { throw failure("cannot open directory \(FileSystem.display(name))") }
        defer { Glibc.close(fd) }
        fchmod(fd, mode_t(mode & 0o1777))
        if opaque { try setOpaque(fd, name: name) }
    }

    private mutating func hardLink(_ entry: TarEntry, components: [[UInt8]], key: [UInt8]) throws(SandpiperError) {
        let targetComponents = try Self.normalise(entry.linkTarget, member: entry.path)
        let targetKey = Self.join(targetComponents)
        guard let targetName = targetComponents.last, created[targetKey] == true else {
            throw invalid(
                "hard link '\(entry.pathString)' names '\(entry.linkTargetString)', which is not an earlier "
                    + "non-directory member of the same layer"
            )
        }
        guard targetKey != key else { return }
        let targetParent = try openDirectory(Array(targetComponents.dropLast()), create: false)
        defer { Glibc.close(targetParent) }
        let parent = try openParent(Array(components.dropLast()))
        guard let name = components.last else { return }
        try replaceExisting(parent: parent, name: name, key: key, withDirectory: false)
        let rc = Self.withCName(targetName) { target in
            Self.withCName(name) { linkat(targetParent, target, parent, $0, 0) }
        }
        guard rc == 0 else { throw failure("cannot create hard link '\(entry.pathString)'") }
        created[key] = true
    }

    private mutating func whiteout(name: [UInt8], parent components: [[UInt8]], member: [UInt8]) throws(SandpiperError)
    {
        let parent = try openParent(components)
        if name == Self.opaqueMarker {
            let fd = openat(parent, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard fd >= 0 else { throw failure("cannot open the directory of an opaque marker") }
            defer { Glibc.close(fd) }
            try setOpaque(fd, name: Self.join(components))
            return
        }
        let hidden = Array(name.dropFirst(Self.whiteoutPrefix.count))
        if hidden.starts(with: Self.whiteoutPrefix) || hidden.isEmpty || hidden == [46] || hidden == [46, 46] {
            // `.wh..wh.*` (AUFS metadata such as `.wh..wh.plnk`) and malformed names: nothing to do.
            skipped += 1
            return
        }
        let key = Self.join(components + [hidden])
        // A whiteout only hides lower layers: an entry this layer made stays.
        if created[key] != nil { return }
        try replaceExisting(parent: parent, name: hidden, key: key, withDirectory: false)
        let rc = Self.withCName(hidden) { mknodat(parent, $0, S_IFCHR | 0o000, 0) }
        guard rc == 0 else {
            throw failure("cannot create the whiteout for '\(String(decoding: member, as: UTF8.self))' (needs root)")
        }
        whiteouts.insert(key)
    }

    private func setOpaque(_ fd: Int32, name: [UInt8]) throws(SandpiperError) {
        let rc = sandpiper_fsetxattr(fd, Self.opaqueXattr, "y", 1)
        guard rc == 0 else {
            throw failure("cannot mark directory \(FileSystem.display(name)) opaque (needs root and trusted xattrs)")
        }
    }

    /// Makes room for a new member at `name`: an existing directory stays when a directory comes,
    /// anything else is removed (the later member wins, as tar does).
    private mutating func replaceExisting(
        parent: Int32,
        name: [UInt8],
        key: [UInt8],
        withDirectory: Bool
    ) throws(SandpiperError) {
        var info = stat()
        let rc = Self.withCName(name) { fstatat(parent, $0, &info, AT_SYMLINK_NOFOLLOW) }
        guard rc == 0 else {
            if errno == ENOENT { return }
            throw failure("cannot inspect \(FileSystem.display(name))")
        }
        let isDirectory = info.st_mode & S_IFMT == S_IFDIR
        if isDirectory && withDirectory { return }
        if isDirectory {
            // The removed directory may be the cached parent or one of its ancestors (never `parent`).
            let prefix = key + [UInt8(ascii: "/")]
            if let cached = cachedParent?.key, cached == key || cached.starts(with: prefix) { dropCachedParent() }
            try FileSystem.removeTree(parent: parent, name: name)
            created = created.filter { !$0.key.starts(with: prefix) }
        } else {
            let removed = Self.withCName(name) { unlinkat(parent, $0, 0) }
            guard removed == 0 else { throw failure("cannot replace \(FileSystem.display(name))") }
        }
        created[key] = nil
        whiteouts.remove(key)
    }

    // MARK: - Walking

    /// The directory that holds a member, made (mode 0755) where missing. Owned by the cache.
    private mutating func openParent(_ components: [[UInt8]]) throws(SandpiperError) -> Int32 {
        let key = Self.join(components)
        if let cachedParent, cachedParent.key == key { return cachedParent.fd }
        let fd = try openDirectory(components, create: true)
        dropCachedParent()
        cachedParent = (key, fd)
        return fd
    }

    private mutating func dropCachedParent() {
        if let cachedParent { Glibc.close(cachedParent.fd) }
        cachedParent = nil
    }

    /// Walks `components` from the root with `O_NOFOLLOW`; the caller owns the returned descriptor.
    private mutating func openDirectory(_ components: [[UInt8]], create: Bool) throws(SandpiperError) -> Int32 {
        var fd = dup(root)
        guard fd >= 0 else { throw failure("cannot duplicate the layer root descriptor") }
        var walked: [[UInt8]] = []
        for component in components {
            walked.append(component)
            var next = Self.withCName(component) { openat(fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
            if next < 0 && errno == ENOENT && create {
                if Self.withCName(component, { mkdirat(fd, $0, 0o755) }) == 0 {
                    created[Self.join(walked)] = false
                }
                next = Self.withCName(component) { openat(fd, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
            }
            let saved = errno
            Glibc.close(fd)
            guard next >= 0 else {
                let path = String(decoding: Self.join(walked), as: UTF8.self)
                if saved == ELOOP || saved == ENOTDIR {
                    throw invalid("a member is under '\(path)', which is a symlink or not a directory")
                }
                throw failure("cannot open directory '\(path)'", code: saved)
            }
            fd = next
        }
        return fd
    }

    // MARK: - Helpers

    /// Splits a member name into components: empty and `.` ones dropped (a leading `/` too),
    /// `..` refused, NUL refused.
    static func normalise(_ path: [UInt8], member: [UInt8]) throws(SandpiperError) -> [[UInt8]] {
        var components: [[UInt8]] = []
        for component in path.split(separator: UInt8(ascii: "/"), omittingEmptySubsequences: true) {
            if component.elementsEqual([46]) { continue }
            if component.elementsEqual([46, 46]) {
                throw SandpiperError.invalid(
                    "layer member '\(String(decoding: member.prefix(200), as: UTF8.self))' has a '..' component",
                    code: "InvalidImageLayer"
                )
            }
            guard component.count <= 255 else {
                throw SandpiperError.invalid("a layer member's name component is too long", code: "InvalidImageLayer")
            }
            components.append(Array(component))
        }
        guard components.count <= 256 else {
            throw SandpiperError.invalid("a layer member is nested too deep", code: "InvalidImageLayer")
        }
        return components
    }

    static func join(_ components: [[UInt8]]) -> [UInt8] {
        Array(components.joined(separator: [UInt8(ascii: "/")]))
    }

    static func withCName<T>(_ name: [UInt8], _ body: (UnsafePointer<CChar>) -> T) -> T {
        let bytes = name.map { CChar(bitPattern: $0) } + [0]
        return bytes.withUnsafeBufferPointer { body($0.baseAddress.unsafelyUnwrapped) }
    }

    private func setTime(_ parent: Int32, _ name: UnsafePointer<CChar>, _ seconds: Int64, flags: Int32) {
        let seconds = Int(clamping: seconds)
        var times = [timespec(tv_sec: seconds, tv_nsec: 0), timespec(tv_sec: seconds, tv_nsec: 0)]
        utimensat(parent, name, &times, flags)
    }

    private func invalid(_ why: String) -> SandpiperError {
        .invalid("\(description): \(why)", code: "InvalidImageLayer")
    }

    private func failure(_ what: String, code: Int32 = errno) -> SandpiperError {
        .internalError("\(description): \(what): \(FileSystem.errorText(code))")
    }
}
