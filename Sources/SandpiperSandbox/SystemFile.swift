#if canImport(Glibc)
    import Glibc
#endif

/// Reads small kernel files (/proc, cgroupfs) with plain open/read/close.
///
/// Foundation's `String(contentsOfFile:)` keeps about 4 KiB each time it reads an empty file,
/// and the server reads empty `cgroup.procs` files in every sandbox teardown: that was a leak of
/// ~10 KiB per session (found by tests/reliability/test_leaks.py).
enum SystemFile {
    /// The file's text (UTF-8, invalid bytes replaced), or nil when it cannot be opened or read.
    static func read(_ path: String, limit: Int = 1 << 20) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while bytes.count < limit {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                return nil
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
