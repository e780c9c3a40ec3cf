import CSandpiperShims
import Foundation
import SandpiperCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// File operations on a directory that hostile code can write to, done by a privileged server.
/// Every path is walked one component at a time with `O_NOFOLLOW`, relative to the previous
/// directory's descriptor, so a symlink (or a directory swapped for one mid-walk) can never lead
/// outside the root. Files read must be regular, single-link files; files written are created
/// under a temporary name, owned by the sandbox user, and renamed into place.
struct SafeDirectory: Sendable {
    let root: String
    let owner: uid_t
    let group: gid_t
    /// When set, the root is this open directory (a forked session's /mnt/data, reached through
    /// its mount namespace once at start) and `root` is only its name in messages.
    let rootDescriptor: HeldDescriptor?

    init(root: String, owner: uid_t, group: gid_t, rootDescriptor: HeldDescriptor? = nil) {
        self.root = root
        self.owner = owner
        self.group = group
        self.rootDescriptor = rootDescriptor
    }

    /// Runs `body` (no suspension inside) with this thread's filesystem identity set to the
    /// owner, when the root lives in a forked session's mount namespace: its tmpfs belongs to
    /// the template's user namespace, where host root is unmapped and may not create inodes
    /// (EOVERFLOW). The thread's filesystem capabilities drop meanwhile, which is all the better.
    private func asOwner<T>(_ body: () -> T) -> T {
        Self.withIdentity(creatorIdentity, body)
    }

    /// Who creates and renames entries: the owner for a forked session's tmpfs, else the server.
    var creatorIdentity: (uid: uid_t, gid: gid_t)? { rootDescriptor == nil ? nil : (owner, group) }

    static func withIdentity<T>(_ identity: (uid: uid_t, gid: gid_t)?, _ body: () -> T) -> T {
        guard let identity else { return body() }
        sandpiper_set_fs_identity(identity.uid, identity.gid)
        defer { sandpiper_set_fs_identity(0, 0) }
        return body()
    }

    private func openRoot() -> Int32 {
        if let rootDescriptor {
            return openat(rootDescriptor.fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        }
        return Glibc.open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    }

    static let maxListedEntries = 10_000
    static let maxDepth = 32

    func openDirectory(_ path: SessionFilePath, create: Bool = false) throws(SandpiperError) -> Int32 {
        var fd = openRoot()
        guard fd >= 0 else { throw SandpiperError.internalError("session directory is missing") }
        for component in path.components {
            var next = openat(fd, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            if next < 0 && errno == ENOENT && create {
                if asOwner({ mkdirat(fd, component, 0o755) }) == 0 {
                    fchownat(fd, component, owner, group, AT_SYMLINK_NOFOLLOW)
                }
                next = openat(fd, component, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            }
            let savedErrno = errno
            Glibc.close(fd)
            guard next >= 0 else { throw Self.error(savedErrno, path) }
            fd = next
        }
        return fd
    }

    func list(_ directory: SessionFilePath, recursive: Bool) throws(SandpiperError) -> [FileEntry] {
        let fd = try openDirectory(directory)
        var entries: [FileEntry] = []
        try collect(fd: fd, prefix: directory, recursive: recursive, depth: 0, into: &entries)
        return entries.sorted { $0.path.relative < $1.path.relative }
    }

    private func collect(
        fd: Int32,
        prefix: SessionFilePath,
        recursive: Bool,
        depth: Int,
        into entries: inout [FileEntry]
    ) throws(SandpiperError) {
        // fdopendir takes ownership of fd; closedir closes it.
        guard let dir = fdopendir(fd) else {
            Glibc.close(fd)
            throw Self.error(errno, prefix)
        }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name == "." || name == ".." { continue }
            guard entries.count < Self.maxListedEntries else { return }
            var info = stat()
            guard fstatat(fd, name, &info, AT_SYMLINK_NOFOLLOW) == 0 else { continue }
            let kind = info.st_mode & S_IFMT
            // Symlinks, FIFOs, sockets and devices are not files a caller can fetch.
            guard kind == S_IFREG || kind == S_IFDIR else { continue }
            let path = prefix.appending(SessionFilePath(components: [name]))
            entries.append(Self.entry(path, info))
            if recursive && kind == S_IFDIR && depth < Self.maxDepth {
                let child = openat(fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
                if child >= 0 {
                    try collect(fd: child, prefix: path, recursive: true, depth: depth + 1, into: &entries)
                }
            }
        }
    }

    func info(_ path: SessionFilePath) throws(SandpiperError) -> FileEntry {
        if path.isRoot {
            var info = stat()
            let fd = openRoot()
            guard fd >= 0 else { throw Self.error(errno, path) }
            defer { Glibc.close(fd) }
            guard fstat(fd, &info) == 0 else { throw Self.error(errno, path) }
            return Self.entry(path, info)
        }
        let parent = try openDirectory(path.parent)
        defer { Glibc.close(parent) }
        var info = stat()
        guard fstatat(parent, path.name, &info, AT_SYMLINK_NOFOLLOW) == 0 else { throw Self.error(errno, path) }
        let kind = info.st_mode & S_IFMT
        guard kind == S_IFREG || kind == S_IFDIR else { throw Self.error(ENOENT, path) }
        return Self.entry(path, info)
    }

    func openForReading(_ path: SessionFilePath) throws(SandpiperError) -> FileReader {
        let parent = try openDirectory(path.parent)
        defer { Glibc.close(parent) }
        // O_NONBLOCK: opening a FIFO must not hang the server; it is refused just below.
        let fd = openat(parent, path.name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw Self.error(errno, path) }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
            Glibc.close(fd)
            throw SandpiperError.notFound("'\(path)' is not a regular file", code: "FileNotFound")
        }
        // A second link may point at a file the sandbox could never read itself.
        guard info.st_nlink == 1 else {
            Glibc.close(fd)
            throw SandpiperError.invalid(
                "'\(path)' has several hard links and will not be served",
                code: "InvalidFilePath"
            )
        }
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        return FileReader(fd: fd, size: Int64(info.st_size))
    }

    func create(_ path: SessionFilePath) throws(SandpiperError) -> FileWriter {
        guard !path.isRoot else { throw SandpiperError.invalid("a file name is required", code: "InvalidFilePath") }
        let parent = try openDirectory(path.parent, create: true)
        let temporary = ".sandpiper-upload-" + UUID().uuidString.lowercased()
        let fd = asOwner { openat(parent, temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644) }
        guard fd >= 0 else {
            let saved = errno
            Glibc.close(parent)
            throw Self.error(saved, path)
        }
        fchown(fd, owner, group)
        return FileWriter(fd: fd, parent: parent, temporaryName: temporary, path: path, identity: creatorIdentity)
    }

    func delete(_ path: SessionFilePath) throws(SandpiperError) {
        guard !path.isRoot else {
            throw SandpiperError.invalid("cannot delete /mnt/data itself", code: "InvalidFilePath")
        }
        let parent = try openDirectory(path.parent)
        defer { Glibc.close(parent) }
        if unlinkat(parent, path.name, 0) == 0 { return }
        if errno == EISDIR, unlinkat(parent, path.name, AT_REMOVEDIR) == 0 { return }
        throw Self.error(errno, path)
    }

    static func entry(_ path: SessionFilePath, _ info: stat) -> FileEntry {
        let seconds = Double(info.st_mtim.tv_sec) + Double(info.st_mtim.tv_nsec) / 1e9
        let isDirectory = info.st_mode & S_IFMT == S_IFDIR
        return FileEntry(
            path: path,
            isDirectory: isDirectory,
            size: isDirectory ? 4096 : Int64(info.st_size),
            modified: Date(timeIntervalSince1970: seconds)
        )
    }

    static func error(_ code: Int32, _ path: SessionFilePath) -> SandpiperError {
        switch code {
        case ENOENT:
            return .notFound("file '\(path)' was not found in /mnt/data", code: "FileNotFound")
        case ELOOP, ENOTDIR:
            return .invalid("'\(path)' crosses a symlink or a non-directory", code: "InvalidFilePath")
        case ENOSPC, EDQUOT:
            return SandpiperError(.payloadTooLarge, code: "SessionDiskFull", "the session's /mnt/data is full")
        case EISDIR:
            return .invalid("'\(path)' is a directory", code: "InvalidFilePath")
        case ENOTEMPTY:
            return SandpiperError(.conflict, code: "DirectoryNotEmpty", "directory '\(path)' is not empty")
        case ENAMETOOLONG:
            return .invalid("file name is too long", code: "InvalidFilePath")
        default:
            return .internalError("file operation on '\(path)' failed: \(String(cString: strerror(code)))")
        }
    }
}

final class FileReader: SandboxFileReader {
    let size: Int64
    private let fd: Mutex<Int32>

    init(fd: Int32, size: Int64) {
        self.fd = Mutex(fd)
        self.size = size
    }

    func read(maxBytes: Int) async throws -> [UInt8] {
        try fd.withLock { fd in
            guard fd >= 0 else { return [] }
            var buffer = [UInt8](repeating: 0, count: maxBytes)
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, maxBytes) }
            guard count >= 0 else {
                throw SandpiperError.internalError("read failed: \(String(cString: strerror(errno)))")
            }
            buffer.removeLast(maxBytes - count)
            return buffer
        }
    }

    func close() {
        fd.withLock { fd in
            if fd >= 0 { Glibc.close(fd) }
            fd = -1
        }
    }

    deinit { close() }
}

final class FileWriter: SandboxFileWriter {
    private struct State {
        var fd: Int32
        var parent: Int32
        var done = false
    }

    private let state: Mutex<State>
    private let temporaryName: String
    private let path: SessionFilePath

    /// The filesystem identity renames and removals run under (see `SafeDirectory.creatorIdentity`).
    private let identity: (uid: uid_t, gid: gid_t)?

    init(fd: Int32, parent: Int32, temporaryName: String, path: SessionFilePath, identity: (uid: uid_t, gid: gid_t)?) {
        self.state = Mutex(State(fd: fd, parent: parent))
        self.temporaryName = temporaryName
        self.path = path
        self.identity = identity
    }

    func write(_ bytes: [UInt8]) async throws {
        try state.withLock { state in
            guard !state.done else { throw SandpiperError.internalError("write after finish") }
            var offset = 0
            while offset < bytes.count {
                let written = bytes.withUnsafeBytes { buffer -> Int in
                    guard let base = buffer.baseAddress else { return 0 }
                    return Glibc.write(state.fd, base + offset, bytes.count - offset)
                }
                if written < 0 {
                    if errno == EINTR { continue }
                    throw SafeDirectory.error(errno, path)
                }
                offset += written
            }
        }
    }

    func finish() async throws -> FileEntry {
        try state.withLock { state in
            guard !state.done else { throw SandpiperError.internalError("finish called twice") }
            state.done = true
            defer {
                Glibc.close(state.fd)
                Glibc.close(state.parent)
            }
            var info = stat()
            fstat(state.fd, &info)
            let renamed = SafeDirectory.withIdentity(identity) {
                renameat(state.parent, temporaryName, state.parent, path.name)
            }
            guard renamed == 0 else {
                let saved = errno
                _ = SafeDirectory.withIdentity(identity) { unlinkat(state.parent, temporaryName, 0) }
                throw SafeDirectory.error(saved, path)
            }
            return SafeDirectory.entry(path, info)
        }
    }

    func abort() async {
        cleanup()
    }

    private func cleanup() {
        state.withLock { state in
            guard !state.done else { return }
            state.done = true
            _ = SafeDirectory.withIdentity(identity) { unlinkat(state.parent, temporaryName, 0) }
            Glibc.close(state.fd)
            Glibc.close(state.parent)
        }
    }

    deinit { cleanup() }
}

/// A descriptor closed when the last holder goes away (never while an operation may use it).
final class HeldDescriptor: Sendable {
    let fd: Int32
    init(_ fd: Int32) { self.fd = fd }
    deinit { Glibc.close(fd) }
}
