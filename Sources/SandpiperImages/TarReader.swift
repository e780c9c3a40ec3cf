import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Where a `TarReader` gets its bytes: blocking reads, 0 at the end.
protocol ByteSource {
    mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws(SandpiperError) -> Int
}

/// Reads a file descriptor (a blob file or a decompressor's pipe). Does not own it.
struct FileDescriptorSource: ByteSource {
    let fd: Int32

    mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws(SandpiperError) -> Int {
        while true {
            let count = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if count >= 0 { return count }
            if errno == EINTR { continue }
            throw SandpiperError.internalError("reading a layer failed: \(String(cString: strerror(errno)))")
        }
    }
}

/// Reads from an in-memory buffer (tests, small archives).
struct BytesSource: ByteSource {
    let bytes: [UInt8]
    var offset = 0

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
    }

    mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws(SandpiperError) -> Int {
        let count = min(buffer.count, bytes.count - offset)
        guard count > 0 else { return 0 }
        bytes.withUnsafeBytes { source in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[offset..<offset + count]))
        }
        offset += count
        return count
    }
}

/// One member of a tar archive, with the POSIX (pax) and GNU long-name extensions applied.
struct TarEntry: Sendable, Equatable {
    enum Kind: Sendable, Equatable {
        case regular
        case hardLink
        case symbolicLink
        case characterDevice
        case blockDevice
        case directory
        case fifo
        /// Anything else (sparse files, vendor types): skipped by the unpacker.
        case other(UInt8)
    }

    var kind: Kind
    /// The member name as raw bytes (not normalised; may be absolute or hold `..`).
    var path: [UInt8]
    var linkTarget: [UInt8]
    var mode: UInt32
    var uid: Int64
    var gid: Int64
    /// Bytes of data that follow the header (0 for every kind but `regular`).
    var size: Int64
    var modified: Int64
    var deviceMajor: Int64
    var deviceMinor: Int64

    var pathString: String { String(decoding: path, as: UTF8.self) }
    var linkTargetString: String { String(decoding: linkTarget, as: UTF8.self) }
}

/// A streaming tar parser: ustar, GNU (`L`/`K` long names, base-256 numbers) and pax (`path`,
/// `linkpath`, `size`, `uid`, `gid`, `mtime`). It hashes every byte it reads from its source, so
/// after `drain()` the digest is that of the whole (uncompressed) stream: a layer's diff id.
struct TarReader<Source: ByteSource> {
    static var blockSize: Int { 512 }
    /// Longest pax header or GNU long name accepted.
    static var maxExtendedHeaderBytes: Int { 1 << 20 }

    private var source: Source
    private var buffer: [UInt8]
    private var start = 0
    private var end = 0
    private var sourceEnded = false
    private var hasher = DigestHasher()
    /// Data bytes of the current entry not yet consumed, and the padding after them.
    private var remaining: Int64 = 0
    private var padding: Int64 = 0
    private var finished = false

    init(_ source: Source, bufferSize: Int = 1 << 16) {
        self.source = source
        self.buffer = [UInt8](repeating: 0, count: max(bufferSize, Self.blockSize))
    }

    /// Every byte read from the source so far.
    var bytesRead: Int64 { hasher.count }
    /// The digest of everything read; call after `drain()`.
    var digest: Digest { hasher.finalize() }

    // MARK: - Entries

    /// The next member, or nil at the end of the archive. Unread data of the previous member is skipped.
    mutating func next() throws(SandpiperError) -> TarEntry? {
        guard !finished else { return nil }
        try skip(remaining + padding)
        remaining = 0
        padding = 0
        var paxPath: [UInt8]?
        var paxLinkPath: [UInt8]?
        var paxSize: Int64?
        var paxUID: Int64?
        var paxGID: Int64?
        var paxTime: Int64?
        var longName: [UInt8]?
        var longLink: [UInt8]?
        while true {
            guard let header = try readBlock() else {
                // EOF without the two zero blocks: accepted as the end (many writers stop early).
                finished = true
                return nil
            }
            if header.allSatisfy({ $0 == 0 }) {
                finished = true
                return nil
            }
            try Self.verifyChecksum(header)
            let type = header[156]
            let headerSize = try Self.number(header[124..<136], "size")
            guard headerSize >= 0 else { throw Self.corrupt("negative member size") }
            switch type {
            case UInt8(ascii: "x"):
                let records = try readExtended(headerSize)
                let fields = try Self.paxRecords(records)
                for (key, value) in fields {
                    switch key {
                    case "path": paxPath = value
                    case "linkpath": paxLinkPath = value
                    case "size": paxSize = try Self.decimal(value, "pax size")
                    case "uid": paxUID = try Self.decimal(value, "pax uid")
                    case "gid": paxGID = try Self.decimal(value, "pax gid")
                    case "mtime":
                        let seconds = value.split(separator: UInt8(ascii: ".")).first.map(Array.init) ?? []
                        paxTime = try? Self.decimal(seconds, "pax mtime")
                    default: break
                    }
                }
                continue
            case UInt8(ascii: "g"):
                // Global pax headers (commit ids from git archive and the like): nothing we use.
                _ = try readExtended(headerSize)
                continue
            case UInt8(ascii: "L"):
                longName = Self.cString(try readExtended(headerSize)[...])
                continue
            case UInt8(ascii: "K"):
                longLink = Self.cString(try readExtended(headerSize)[...])
                continue
            default:
                break
            }
            let kind: TarEntry.Kind
            switch type {
            case 0, UInt8(ascii: "0"), UInt8(ascii: "7"): kind = .regular
            case UInt8(ascii: "1"): kind = .hardLink
            case UInt8(ascii: "2"): kind = .symbolicLink
            case UInt8(ascii: "3"): kind = .characterDevice
            case UInt8(ascii: "4"): kind = .blockDevice
            case UInt8(ascii: "5"): kind = .directory
            case UInt8(ascii: "6"): kind = .fifo
            default: kind = .other(type)
            }
            var name = Self.cString(header[0..<100])
            let magic = Array(header[257..<263])
            if magic == Array("ustar".utf8) + [0] {
                let prefix = Self.cString(header[345..<500])
                if !prefix.isEmpty { name = prefix + [UInt8(ascii: "/")] + name }
            }
            let size = paxSize ?? headerSize
            guard size >= 0 else { throw Self.corrupt("negative member size") }
            // Header-only kinds carry no data whatever their size field says (as GNU tar and Go read them).
            let dataSize: Int64
            switch kind {
            case .regular, .other: dataSize = size
            default: dataSize = 0
            }
            let entry = TarEntry(
                kind: kind,
                path: paxPath ?? longName ?? name,
                linkTarget: paxLinkPath ?? longLink ?? Self.cString(header[157..<257]),
                mode: UInt32(truncatingIfNeeded: (try? Self.number(header[100..<108], "mode")) ?? 0o644),
                uid: paxUID ?? (try? Self.number(header[108..<116], "uid")) ?? 0,
                gid: paxGID ?? (try? Self.number(header[116..<124], "gid")) ?? 0,
                size: dataSize,
                modified: paxTime ?? (try? Self.number(header[136..<148], "mtime")) ?? 0,
                deviceMajor: (try? Self.number(header[329..<337], "devmajor")) ?? 0,
                deviceMinor: (try? Self.number(header[337..<345], "devminor")) ?? 0
            )
            remaining = dataSize
            padding = Self.paddingAfter(dataSize)
            return entry
        }
    }

    /// Reads up to `maxCount` bytes of the current member's data into `body`; 0 at its end.
    mutating func readData(maxCount: Int = 1 << 16, _ body: (UnsafeRawBufferPointer) throws(SandpiperError) -> Void)
        throws(SandpiperError) -> Int
    {
        guard remaining > 0 else { return 0 }
        if start == end { try refill() }
        guard start < end else { throw Self.corrupt("the archive ends inside a member's data") }
        let count = Int(min(Int64(end - start), remaining, Int64(maxCount)))
        let from = start
        // withUnsafeBytes rethrows untyped errors: the typed one goes through a Result.
        let result = buffer.withUnsafeBytes { bytes -> Result<Void, SandpiperError> in
            do throws(SandpiperError) {
                return .success(try body(UnsafeRawBufferPointer(rebasing: bytes[from..<from + count])))
            } catch {
                return .failure(error)
            }
        }
        try result.get()
        start += count
        remaining -= Int64(count)
        return count
    }

    /// The whole data of the current member, refused past `limit` bytes.
    mutating func readAllData(limit: Int) throws(SandpiperError) -> [UInt8] {
        guard remaining <= Int64(limit) else {
            throw SandpiperError(.payloadTooLarge, code: "ImageTooLarge", "an archive member is over \(limit) bytes")
        }
        var data: [UInt8] = []
        data.reserveCapacity(Int(remaining))
        while try readData({ data.append(contentsOf: $0) }) > 0 {}
        return data
    }

    /// Reads the rest of the stream (after the end-of-archive blocks) so `digest` covers all of it.
    mutating func drain() throws(SandpiperError) {
        start = end
        while !sourceEnded {
            try refill()
            start = end
        }
    }

    // MARK: - Buffering

    private mutating func refill() throws(SandpiperError) {
        if start > 0 && start == end {
            start = 0
            end = 0
        }
        guard !sourceEnded else { return }
        if start > 0 {
            let (from, count) = (start, end - start)
            buffer.withUnsafeMutableBytes { bytes in
                guard let base = bytes.baseAddress else { return }
                memmove(base, base + from, count)
            }
            end -= start
            start = 0
        }
        let from = end
        let result = buffer.withUnsafeMutableBytes { bytes -> Result<Int, SandpiperError> in
            let free = UnsafeMutableRawBufferPointer(rebasing: bytes[from...])
            do throws(SandpiperError) {
                let count = try source.read(into: free)
                hasher.update(UnsafeRawBufferPointer(rebasing: free[0..<count]))
                return .success(count)
            } catch {
                return .failure(error)
            }
        }
        let count = try result.get()
        if count == 0 { sourceEnded = true }
        end += count
    }

    private mutating func readBlock() throws(SandpiperError) -> [UInt8]? {
        while end - start < Self.blockSize && !sourceEnded { try refill() }
        if end - start == 0 { return nil }
        guard end - start >= Self.blockSize else { throw Self.corrupt("the archive ends inside a header") }
        let block = Array(buffer[start..<start + Self.blockSize])
        start += Self.blockSize
        return block
    }

    private mutating func skip(_ count: Int64) throws(SandpiperError) {
        var left = count
        while left > 0 {
            if start == end { try refill() }
            guard start < end else { throw Self.corrupt("the archive ends inside a member") }
            let step = Int(min(Int64(end - start), left))
            start += step
            left -= Int64(step)
        }
    }

    private mutating func readExtended(_ size: Int64) throws(SandpiperError) -> [UInt8] {
        guard size <= Int64(Self.maxExtendedHeaderBytes) else {
            throw Self.corrupt("an extended header is over \(Self.maxExtendedHeaderBytes) bytes")
        }
        remaining = size
        padding = Self.paddingAfter(size)
        var data: [UInt8] = []
        while try readData({ data.append(contentsOf: $0) }) > 0 {}
        guard data.count == Int(size) else { throw Self.corrupt("the archive ends inside an extended header") }
        try skip(padding)
        remaining = 0
        padding = 0
        return data
    }

    // MARK: - Field parsing

    static func paddingAfter(_ size: Int64) -> Int64 {
        let block = Int64(blockSize)
        return (block - size % block) % block
    }

    static func corrupt(_ why: String) -> SandpiperError {
        .invalid("malformed tar archive: \(why)", code: "InvalidImageLayer")
    }

    static func cString(_ field: ArraySlice<UInt8>) -> [UInt8] {
        if let nul = field.firstIndex(of: 0) { return Array(field[field.startIndex..<nul]) }
        return Array(field)
    }

    /// An octal field (NUL/space padded) or a GNU base-256 one (high bit of the first byte set).
    static func number(_ field: ArraySlice<UInt8>, _ name: String) throws(SandpiperError) -> Int64 {
        guard let first = field.first else { return 0 }
        if first & 0x80 != 0 {
            guard first == 0x80 else { throw corrupt("negative or oversized base-256 \(name)") }
            var value: Int64 = 0
            for byte in field.dropFirst() {
                guard value <= (Int64.max >> 8) else { throw corrupt("\(name) overflows") }
                value = value << 8 | Int64(byte)
            }
            return value
        }
        var value: Int64 = 0
        var seenDigit = false
        for byte in field {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "7"):
                guard value <= (Int64.max >> 3) else { throw corrupt("\(name) overflows") }
                value = value << 3 | Int64(byte - UInt8(ascii: "0"))
                seenDigit = true
            case 0, UInt8(ascii: " "):
                if seenDigit { return value }
            default:
                throw corrupt("bad octal digit in the \(name) field")
            }
        }
        return value
    }

    static func decimal(_ text: [UInt8], _ name: String) throws(SandpiperError) -> Int64 {
        guard !text.isEmpty, text.count <= 18, text.allSatisfy({ $0 >= 48 && $0 <= 57 }) else {
            throw corrupt("bad \(name) '\(String(decoding: text.prefix(40), as: UTF8.self))'")
        }
        return text.reduce(0) { $0 * 10 + Int64($1 - 48) }
    }

    static func verifyChecksum(_ header: [UInt8]) throws(SandpiperError) {
        let stored = try number(header[148..<156], "checksum")
        var unsigned: Int64 = 0
        var signed: Int64 = 0
        for (index, byte) in header.enumerated() {
            let value = (148..<156).contains(index) ? UInt8(ascii: " ") : byte
            unsigned += Int64(value)
            signed += Int64(Int8(bitPattern: value))
        }
        guard stored == unsigned || stored == signed else { throw corrupt("header checksum mismatch") }
    }

    /// `"%d %s=%s\n"` records of a pax extended header.
    static func paxRecords(_ data: [UInt8]) throws(SandpiperError) -> [(String, [UInt8])] {
        var records: [(String, [UInt8])] = []
        var index = 0
        while index < data.count {
            guard let space = data[index...].firstIndex(of: UInt8(ascii: " ")) else {
                throw corrupt("bad pax record")
            }
            let length = Int(try decimal(Array(data[index..<space]), "pax record length"))
            let recordEnd = index + length
            guard length > 0, recordEnd <= data.count, data[recordEnd - 1] == UInt8(ascii: "\n"),
                let equals = data[(space + 1)..<recordEnd].firstIndex(of: UInt8(ascii: "="))
            else { throw corrupt("bad pax record") }
            let key = String(decoding: data[(space + 1)..<equals], as: UTF8.self)
            records.append((key, Array(data[(equals + 1)..<(recordEnd - 1)])))
            index = recordEnd
        }
        return records
    }
}
