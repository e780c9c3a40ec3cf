import Foundation
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// The byte-level readers the launch path uses for cgroup.procs and /proc/<pid>/status.
@Suite("Kernel file readers")
struct SystemFileTests {
    @Test("Numbers are read from any separators; an overflowing one saturates instead of trapping")
    func numbers() {
        #expect(SystemFile.numbers(in: Array("12\n345\n\n6".utf8)) == [12, 345, 6])
        #expect(SystemFile.numbers(in: Array("\t7 8\t".utf8)) == [7, 8])
        #expect(SystemFile.numbers(in: Array("".utf8)).isEmpty)
        #expect(SystemFile.numbers(in: Array("99999999999999999999999".utf8)) == [Int.max])
    }

    @Test("cgroup.procs lists pids; zero, huge and junk are not pids")
    func pids() throws {
        let path = NSTemporaryDirectory() + "procs-\(UInt32.random(in: 0...UInt32.max))"
        try "17\n0\n4294967296\n23\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { unlink(path) }
        #expect(SystemFile.pids(path) == [17, 23])
        #expect(SystemFile.pids(path + ".missing").isEmpty)
    }

    @Test("NSpid of a live process ends with its own pid; a gone one has none")
    func namespacePIDs() throws {
        let ids = try #require(SystemFile.namespacePIDs(of: getpid()))
        #expect(ids.first == getpid())
        #expect(SystemFile.namespacePIDs(of: Int32.max) == nil)
    }

    @Test("write reaches an existing file in one call and reports a missing one")
    func write() throws {
        let path = NSTemporaryDirectory() + "write-\(UInt32.random(in: 0...UInt32.max))"
        FileManager.default.createFile(atPath: path, contents: nil)
        defer { unlink(path) }
        #expect(SystemFile.write("1234", to: path))
        #expect(SystemFile.read(path) == "1234")
        #expect(!SystemFile.write("1", to: path + ".missing"))
        // Several texts go through one open, one write each (cgroup.procs takes a pid a write).
        #expect(SystemFile.write(each: ["56", "78"], to: path))
        #expect(SystemFile.read(path) == "5678")
    }
}
