import Dispatch
import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Small filesystem helpers that never follow a symlink.
enum FileSystem {
    /// Runs blocking work (file I/O, waiting on a child) off Swift's cooperative threads.
    static func blocking<T: Sendable>(_ body: @escaping @Sendable () throws(SandpiperError) -> T)
        async throws(SandpiperError) -> T
    {
        let result: Result<T, SandpiperError> = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                do throws(SandpiperError) {
                    continuation.resume(returning: .success(try body()))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get()
    }

    static func errorText(_ code: Int32 = errno) -> String { String(cString: strerror(code)) }

    /// Removes `name` in directory `parent`, recursively, never following a symlink.
    static func removeTree(parent: Int32, name: [UInt8]) throws(SandpiperError) {
        var info = stat()
        let statResult = LayerUnpacker.withCName(name) { fstatat(parent, $0, &info, AT_SYMLINK_NOFOLLOW) }
        guard statResult == 0 else {
            if errno == ENOENT { return }
            throw SandpiperError.internalError("cannot inspect \(display(name)): \(errorText())")
        }
        if info.st_mode & S_IFMT == S_IFDIR {
            let fd = LayerUnpacker.withCName(name) {
                openat(parent, $0, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            }
            guard fd >= 0 else { throw SandpiperError.internalError("cannot open \(display(name)): \(errorText())") }
            try removeContents(directory: fd)
        }
        let flags = info.st_mode & S_IFMT == S_IFDIR ? AT_REMOVEDIR : 0
        let rc = LayerUnpacker.withCName(name) { unlinkat(parent, $0, flags) }
        guard rc == 0 || errno == ENOENT else {
            throw SandpiperError.internalError("cannot remove \(display(name)): \(errorText())")
        }
    }

    /// Empties the directory `fd` (and closes it).
    static func removeContents(directory fd: Int32) throws(SandpiperError) {
        guard let dir = fdopendir(fd) else {
            Glibc.close(fd)
            throw SandpiperError.internalError("cannot read a directory: \(errorText())")
        }
        defer { closedir(dir) }
        var names: [[UInt8]] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                Array(raw.prefix { $0 != 0 })
            }
            if name == [46] || name == [46, 46] { continue }
            names.append(name)
        }
        for name in names { try removeTree(parent: dirfd(dir), name: name) }
    }

    /// Removes the file or tree at an absolute path (its parent directories are trusted).
    static func removeTree(path: String) throws(SandpiperError) {
        let url = URL(fileURLWithPath: path)
        let parent = Glibc.open(url.deletingLastPathComponent().path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard parent >= 0 else {
            if errno == ENOENT { return }
            throw SandpiperError.internalError("cannot open the parent of \(path): \(errorText())")
        }
        defer { Glibc.close(parent) }
        try removeTree(parent: parent, name: Array(url.lastPathComponent.utf8))
    }

    static func display(_ name: [UInt8]) -> String {
        "'" + String(decoding: name.prefix(200), as: UTF8.self) + "'"
    }

    /// Writes `data` to `path` through a temporary file, fsynced and renamed into place.
    static func writeAtomically(_ data: Data, to path: String) throws(SandpiperError) {
        let temporary = path + ".tmp-" + UUID().uuidString.lowercased()
        let fd = Glibc.open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SandpiperError.internalError("cannot write \(path): \(errorText())") }
        var ok = true
        data.withUnsafeBytes { bytes in
            var offset = 0
            while offset < bytes.count {
                let count = Glibc.write(fd, bytes.baseAddress.map { $0 + offset }, bytes.count - offset)
                if count < 0 {
                    if errno == EINTR { continue }
                    ok = false
                    return
                }
                offset += count
            }
        }
        ok = ok && fsync(fd) == 0
        Glibc.close(fd)
        guard ok, rename(temporary, path) == 0 else {
            let text = errorText()
            unlink(temporary)
            throw SandpiperError.internalError("cannot write \(path): \(text)")
        }
    }

    static func makeDirectory(_ path: String, mode: mode_t = 0o755) throws(SandpiperError) {
        do {
            try FileManager.default.createDirectory(
                atPath: path,
                withIntermediateDirectories: true,
                attributes: [.posixPermissions: Int(mode)]
            )
        } catch {
            throw SandpiperError.internalError("cannot create \(path): \(error)")
        }
    }

    static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }
}
