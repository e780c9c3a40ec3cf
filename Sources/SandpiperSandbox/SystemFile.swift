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
        bytes(path, limit: limit).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The file's bytes, or nil when it cannot be opened or read.
    static func bytes(_ path: String, limit: Int = 1 << 20) -> [UInt8]? {
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
        return bytes
    }

    /// The non-negative decimal numbers in `bytes`, in order (any other byte separates them).
    static func numbers(in bytes: some Collection<UInt8>) -> [Int] {
        var numbers: [Int] = []
        var current = 0
        var inNumber = false
        for byte in bytes {
            if byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
                let (times, overflow) = current.multipliedReportingOverflow(by: 10)
                current = overflow ? Int.max : times.addingReportingOverflow(Int(byte - UInt8(ascii: "0"))).partialValue
                inNumber = true
            } else if inNumber {
                numbers.append(current)
                current = 0
                inNumber = false
            }
        }
        if inNumber { numbers.append(current) }
        return numbers
    }

    /// The pids of a cgroup.procs file (or any file of one number per line).
    static func pids(_ path: String) -> [pid_t] {
        guard let bytes = bytes(path) else { return [] }
        return numbers(in: bytes).compactMap { $0 > 0 && $0 <= Int(Int32.max) ? pid_t($0) : nil }
    }

    /// `NSpid` of /proc/<pid>/status: the process's pid in its pid namespace and each one above
    /// it, the host's first. Nil when the process is gone.
    static func namespacePIDs(of pid: pid_t) -> [pid_t]? {
        guard let bytes = bytes("/proc/\(pid)/status") else { return nil }
        let key = Array("\nNSpid:".utf8)
        guard bytes.count > key.count else { return nil }
        var index = 0
        while index + key.count <= bytes.count {
            if bytes[index] == key[0] && bytes[index..<(index + key.count)].elementsEqual(key) {
                let start = index + key.count
                let end = bytes[start...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.count
                return numbers(in: bytes[start..<end]).map { pid_t(truncatingIfNeeded: $0) }
            }
            index += 1
        }
        return nil
    }

    /// Writes `text` to an existing file (cgroupfs, /proc) in one write(2); false on failure.
    static func write(_ text: String, to path: String) -> Bool {
        write(each: [text], to: path)
    }

    /// Writes each text with a write(2) of its own on one open of `path` (cgroup.procs takes one
    /// pid a write). False at the first that fails.
    static func write(each texts: [String], to path: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        for text in texts {
            let bytes = Array(text.utf8)
            guard bytes.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
                return false
            }
        }
        return true
    }
}
