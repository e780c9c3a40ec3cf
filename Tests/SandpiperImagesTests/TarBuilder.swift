import Foundation

@testable import SandpiperImages

/// Writes tar archives member by member, hostile ones included (the test decides every header field).
struct TarBuilder {
    private(set) var bytes: [UInt8] = []

    enum Kind: UInt8 {
        case regular = 48  // "0"
        case hardLink = 49
        case symlink = 50
        case characterDevice = 51
        case blockDevice = 52
        case directory = 53
        case fifo = 54
        case pax = 120  // "x"
        case gnuLongName = 76  // "L"
        case gnuLongLink = 75  // "K"
    }

    mutating func file(_ name: String, _ content: String = "", mode: Int = 0o644) {
        add(name, kind: .regular, mode: mode, data: Array(content.utf8))
    }

    mutating func directory(_ name: String, mode: Int = 0o755) {
        add(name, kind: .directory, mode: mode)
    }

    mutating func symlink(_ name: String, to target: String) {
        add(name, kind: .symlink, mode: 0o777, link: target)
    }

    mutating func hardLink(_ name: String, to target: String) {
        add(name, kind: .hardLink, link: target)
    }

    /// A pax extended header for the next member.
    mutating func pax(_ records: [(String, String)]) {
        var data: [UInt8] = []
        for (key, value) in records {
            let body = " \(key)=\(value)\n"
            var length = body.utf8.count + 1
            while "\(length)".utf8.count + body.utf8.count != length { length += 1 }
            data += Array("\(length)\(body)".utf8)
        }
        add("././@PaxHeader", kind: .pax, data: data)
    }

    mutating func gnuLongName(_ name: String) {
        add("././@LongLink", kind: .gnuLongName, data: Array(name.utf8) + [0])
    }

    mutating func add(
        _ name: String,
        kind: Kind,
        mode: Int = 0o644,
        data: [UInt8] = [],
        link: String = "",
        deviceMajor: Int = 0,
        deviceMinor: Int = 0
    ) {
        var header = [UInt8](repeating: 0, count: 512)
        func put(_ text: String, _ offset: Int, _ length: Int) {
            for (index, byte) in text.utf8.prefix(length).enumerated() { header[offset + index] = byte }
        }
        func octal(_ value: Int, _ offset: Int, _ length: Int) {
            let digits = String(value, radix: 8)
            put(String(repeating: "0", count: max(0, length - 1 - digits.count)) + digits, offset, length - 1)
        }
        put(name, 0, 100)
        octal(mode, 100, 8)
        octal(0, 108, 8)
        octal(0, 116, 8)
        octal(data.count, 124, 12)
        octal(1_700_000_000, 136, 12)
        header[156] = kind.rawValue
        put(link, 157, 100)
        put("ustar", 257, 6)
        put("00", 263, 2)
        put("root", 265, 32)
        put("root", 297, 32)
        octal(deviceMajor, 329, 8)
        octal(deviceMinor, 337, 8)
        for index in 148..<156 { header[index] = 32 }
        let sum = header.reduce(0) { $0 + Int($1) }
        octal(sum, 148, 7)
        header[154] = 0
        header[155] = 32
        bytes += header
        bytes += data
        bytes += [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
    }

    func finish() -> [UInt8] {
        bytes + [UInt8](repeating: 0, count: 1024)
    }
}

/// A fresh directory under /tmp, removed by `cleanup`.
struct TemporaryDirectory {
    let path: String

    init() throws {
        path = NSTemporaryDirectory() + "sandpiper-images-test-" + UUID().uuidString.lowercased()
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    func cleanup() {
        try? FileSystem.removeTree(path: path)
    }
}
