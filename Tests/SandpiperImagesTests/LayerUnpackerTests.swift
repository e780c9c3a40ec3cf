import CSandpiperShims
import Foundation
import Logging
import SandpiperCore
import Testing

@testable import SandpiperImages

#if canImport(Glibc)
    import Glibc
#endif

/// Hostile and ordinary layers, unpacked into a temporary directory. Whiteouts need root.
@Suite struct LayerUnpackerTests {
    struct Result {
        var skipped: Int
        var digest: Digest
    }

    @discardableResult
    func unpack(_ tar: [UInt8], into directory: String) throws -> Result {
        let root = open(directory, O_RDONLY | O_DIRECTORY)
        #expect(root >= 0)
        defer { close(root) }
        var reader = TarReader(BytesSource(tar), bufferSize: 700)
        var unpacker = LayerUnpacker(
            root: root,
            limits: ImageLimits(),
            logger: Logger(label: "test"),
            description: "test layer"
        )
        try unpacker.unpack(&reader)
        try reader.drain()
        return Result(skipped: unpacker.skipped, digest: reader.digest)
    }

    func contents(_ path: String) -> String? {
        FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) }
    }

    func lstatMode(_ path: String) -> mode_t? {
        var info = stat()
        return lstat(path, &info) == 0 ? info.st_mode : nil
    }

    static var isRoot: Bool { geteuid() == 0 }

    @Test func ordinaryLayer() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        var tar = TarBuilder()
        tar.directory("./")
        tar.directory("./usr/", mode: 0o755)
        tar.directory("./usr/bin/")
        tar.file("./usr/bin/tool", "#!/bin/sh\necho hi\n", mode: 0o755)
        tar.symlink("./bin", to: "usr/bin")
        tar.hardLink("./usr/bin/tool2", to: "./usr/bin/tool")
        tar.file("etc/hostname", "box\n")  // implicit parent directory
        tar.file("/abs/file", "leading slash stripped")
        let bytes = tar.finish()
        let result = try unpack(bytes, into: dir.path)
        #expect(result.digest == Digest.of(bytes))
        #expect(contents(dir.path + "/usr/bin/tool") == "#!/bin/sh\necho hi\n")
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: dir.path + "/bin") == "usr/bin")
        #expect(contents(dir.path + "/etc/hostname") == "box\n")
        #expect(contents(dir.path + "/abs/file") == "leading slash stripped")
        var first = stat()
        var second = stat()
        stat(dir.path + "/usr/bin/tool", &first)
        stat(dir.path + "/usr/bin/tool2", &second)
        #expect(first.st_ino == second.st_ino)
        #expect(first.st_mode & 0o7777 == 0o755)
        #expect(first.st_mtim.tv_sec == 1_700_000_000)
    }

    @Test func dotDotIsRefused() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let victim = dir.path + "/outside"
        try FileManager.default.createDirectory(atPath: dir.path + "/root", withIntermediateDirectories: true)
        var tar = TarBuilder()
        tar.file("../outside", "escaped")
        let error = #expect(throws: SandpiperError.self) { try unpack(tar.finish(), into: dir.path + "/root") }
        #expect(error?.code == "InvalidImageLayer")
        #expect(!FileManager.default.fileExists(atPath: victim))

        var deep = TarBuilder()
        deep.file("a/b/../../../outside", "escaped")
        #expect(throws: SandpiperError.self) { try unpack(deep.finish(), into: dir.path + "/root") }
        #expect(!FileManager.default.fileExists(atPath: victim))
    }

    @Test func writingThroughAnAbsoluteSymlinkIsRefused() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let outside = dir.path + "/outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir.path + "/root", withIntermediateDirectories: true)
        var tar = TarBuilder()
        tar.symlink("escape", to: outside)
        tar.file("escape/pwned", "written through a symlink")
        let error = #expect(throws: SandpiperError.self) { try unpack(tar.finish(), into: dir.path + "/root") }
        #expect(error?.code == "InvalidImageLayer")
        #expect(!FileManager.default.fileExists(atPath: outside + "/pwned"))
        // The symlink itself is kept verbatim: it is resolved only inside the container.
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: dir.path + "/root/escape") == outside)

        var relative = TarBuilder()
        relative.symlink("up", to: "../../..")
        relative.directory("up/etc")
        #expect(throws: SandpiperError.self) { try unpack(relative.finish(), into: dir.path + "/root") }
    }

    @Test func symlinkReplacingAFileIsNotFollowedByALaterFile() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let outside = dir.path + "/outside.txt"
        try "original".write(toFile: outside, atomically: true, encoding: .utf8)
        try FileManager.default.createDirectory(atPath: dir.path + "/root", withIntermediateDirectories: true)
        var tar = TarBuilder()
        tar.symlink("target", to: outside)
        tar.file("target", "replaced the link, not the file it names")
        try unpack(tar.finish(), into: dir.path + "/root")
        #expect(contents(outside) == "original")
        #expect(lstatMode(dir.path + "/root/target").map { $0 & S_IFMT } == S_IFREG)
    }

    @Test func hardLinksOutsideTheLayerAreRefused() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        for target in ["/etc/passwd", "../../etc/passwd", "never-extracted"] {
            var tar = TarBuilder()
            tar.hardLink("passwd", to: target)
            #expect(throws: SandpiperError.self) { try unpack(tar.finish(), into: dir.path) }
            #expect(!FileManager.default.fileExists(atPath: dir.path + "/passwd"))
        }
        // Nor to an entry reached through a symlink of the layer.
        var tar = TarBuilder()
        tar.symlink("etc", to: "/etc")
        tar.hardLink("passwd", to: "etc/passwd")
        #expect(throws: SandpiperError.self) { try unpack(tar.finish(), into: dir.path) }
    }

    @Test func devicesAndFIFOsAreSkipped() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        var tar = TarBuilder()
        tar.add("dev/null", kind: .characterDevice, mode: 0o666, deviceMajor: 1, deviceMinor: 3)
        tar.add("dev/sda", kind: .blockDevice, mode: 0o660, deviceMajor: 8, deviceMinor: 0)
        tar.add("run/fifo", kind: .fifo, mode: 0o644)
        tar.file("dev/.keep")
        let result = try unpack(tar.finish(), into: dir.path)
        #expect(result.skipped == 3)
        #expect(lstatMode(dir.path + "/dev/null") == nil)
        #expect(lstatMode(dir.path + "/dev/sda") == nil)
        #expect(lstatMode(dir.path + "/run/fifo") == nil)
        #expect(FileManager.default.fileExists(atPath: dir.path + "/dev/.keep"))
    }

    @Test func setuidAndSetgidAreStripped() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        var tar = TarBuilder()
        tar.file("bin/su", "x", mode: 0o4755)
        tar.file("bin/wall", "x", mode: 0o2755)
        tar.directory("tmp", mode: 0o1777)
        try unpack(tar.finish(), into: dir.path)
        #expect(lstatMode(dir.path + "/bin/su").map { $0 & 0o7777 } == 0o755)
        #expect(lstatMode(dir.path + "/bin/wall").map { $0 & 0o7777 } == 0o755)
        #expect(lstatMode(dir.path + "/tmp").map { $0 & 0o7777 } == 0o1777)
    }

    @Test(.enabled(if: LayerUnpackerTests.isRoot, "whiteouts are device nodes and trusted xattrs: root only"))
    func whiteoutsAndOpaqueDirectories() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        var tar = TarBuilder()
        tar.file("etc/.wh.motd")
        tar.directory("var/cache")
        tar.file("var/cache/.wh..wh..opq")
        tar.file("var/cache/new", "fresh")
        // A whiteout never hides what its own layer adds, in either order.
        tar.file("keep/.wh.a")
        tar.file("keep/a", "kept")
        tar.file("keep/b", "kept")
        tar.file("keep/.wh.b")
        // A directory replacing a whiteout of its own layer is opaque.
        tar.file(".wh.opt")
        tar.directory("opt")
        tar.file(".wh..wh.plnk")
        let result = try unpack(tar.finish(), into: dir.path)
        #expect(result.skipped == 1)

        var info = stat()
        #expect(lstat(dir.path + "/etc/motd", &info) == 0)
        #expect(info.st_mode & S_IFMT == S_IFCHR)
        #expect(info.st_rdev == 0)
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/etc/.wh.motd"))
        #expect(opaque(dir.path + "/var/cache"))
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/var/cache/.wh..wh..opq"))
        #expect(contents(dir.path + "/var/cache/new") == "fresh")
        #expect(contents(dir.path + "/keep/a") == "kept")
        #expect(contents(dir.path + "/keep/b") == "kept")
        #expect(lstatMode(dir.path + "/opt").map { $0 & S_IFMT } == S_IFDIR)
        #expect(opaque(dir.path + "/opt"))
        #expect(!opaque(dir.path + "/keep"))
    }

    func opaque(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var value: UInt8 = 0
        return sandpiper_fgetxattr(fd, "trusted.overlay.opaque", &value, 1) == 1 && value == UInt8(ascii: "y")
    }

    @Test func paxAndGNULongNames() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let longDirectory = String(repeating: "d", count: 120)
        let paxName = longDirectory + "/" + String(repeating: "p", count: 130)
        let gnuName = longDirectory + "/" + String(repeating: "g", count: 140)
        var tar = TarBuilder()
        tar.pax([("path", paxName), ("mtime", "1600000000.5")])
        tar.file("truncated-name-ignored", "pax")
        tar.gnuLongName(gnuName)
        tar.file("also-ignored", "gnu")
        tar.pax([("linkpath", "/" + String(repeating: "t", count: 150))])
        tar.symlink("longlink", to: "short")
        try unpack(tar.finish(), into: dir.path)
        #expect(contents(dir.path + "/" + paxName) == "pax")
        #expect(contents(dir.path + "/" + gnuName) == "gnu")
        #expect(
            try FileManager.default.destinationOfSymbolicLink(atPath: dir.path + "/longlink")
                == "/" + String(repeating: "t", count: 150)
        )
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/truncated-name-ignored"))
    }

    @Test func corruptHeadersAreRefused() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        var tar = TarBuilder()
        tar.file("a", "content")
        var bytes = tar.finish()
        bytes[0] = UInt8(ascii: "b")  // checksum no longer matches
        #expect(throws: SandpiperError.self) { try unpack(bytes, into: dir.path) }
        var truncated = TarBuilder()
        truncated.file("big", String(repeating: "x", count: 2000))
        #expect(throws: SandpiperError.self) { try unpack(Array(truncated.bytes.prefix(1024)), into: dir.path) }
    }

    @Test func laterMembersReplaceEarlierOnes() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        var tar = TarBuilder()
        tar.directory("thing")
        tar.file("thing/inner", "inner")
        tar.file("thing", "now a file")
        tar.file("twice", "one")
        tar.file("twice", "two")
        try unpack(tar.finish(), into: dir.path)
        #expect(contents(dir.path + "/thing") == "now a file")
        #expect(contents(dir.path + "/twice") == "two")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")))
    func pythonTarfileLayer() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let script = """
            import io, sys, tarfile
            out = io.BytesIO()
            with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                def add(name, data=b"", **kw):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    for k, v in kw.items(): setattr(info, k, v)
                    tar.addfile(info, io.BytesIO(data))
                add("app/", type=tarfile.DIRTYPE, mode=0o755)
                add("app/" + "n" * 200, b"long", mode=0o600)
                add("app/unicode-\\u00e9", b"utf8")
                add("app/link", type=tarfile.SYMTYPE, linkname="/etc/passwd")
                add("../evil", b"x")
            sys.stdout.buffer.write(out.getvalue())
            """
        let archive = dir.path + "/layer.tar.gz"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", script]
        FileManager.default.createFile(atPath: archive, contents: nil)
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: archive))
        try process.run()
        process.waitUntilExit()
        #expect(process.terminationStatus == 0)
        try FileManager.default.createDirectory(atPath: dir.path + "/root", withIntermediateDirectories: true)
        let stream = try LayerStream(blobPath: archive)
        #expect(stream.compression == .gzip)
        defer { stream.close() }
        let root = open(dir.path + "/root", O_RDONLY | O_DIRECTORY)
        defer { close(root) }
        var reader = TarReader(FileDescriptorSource(fd: stream.fd))
        var unpacker = LayerUnpacker(root: root, limits: ImageLimits(), logger: Logger(label: "t"), description: "py")
        let error = #expect(throws: SandpiperError.self) { try unpacker.unpack(&reader) }
        #expect(error?.message.contains("'..'") == true)
        #expect(contents(dir.path + "/root/app/" + String(repeating: "n", count: 200)) == "long")
        #expect(contents(dir.path + "/root/app/unicode-\u{e9}") == "utf8")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/evil"))
    }
}
