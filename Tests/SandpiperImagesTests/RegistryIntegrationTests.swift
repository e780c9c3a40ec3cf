import Foundation
import SandpiperCore
import Synchronization
import Testing

@testable import SandpiperImages

#if canImport(Glibc)
    import Glibc
#endif

/// Real parts only: an image built with umoci from busybox-static (a `busybox httpd` server),
/// pushed with skopeo to Debian's `docker-registry` on 127.0.0.1 (anonymous, htpasswd basic auth,
/// and behind a bearer-token front: BearerTokenFront.swift), pulled, run from an overlayfs of its layers, exported with skopeo as oci-archive and
/// docker-archive and imported, then removed. Runs with SANDPIPER_INTEGRATION=1 as root; then a
/// missing tool fails the test (`make setup` installs them).
@Suite(
    "Images against a real registry",
    .enabled(if: ProcessInfo.processInfo.environment["SANDPIPER_INTEGRATION"] == "1"),
    .serialized
)
struct RegistryIntegrationTests {
    static let tools = [
        "/usr/bin/docker-registry", "/usr/bin/umoci", "/usr/bin/skopeo", "/bin/busybox", "/usr/bin/htpasswd",
    ]

    /// A missing tool fails the test: with SANDPIPER_INTEGRATION=1 they are expected (`make setup`).
    static func requireTools() throws {
        for tool in tools {
            try #require(FileManager.default.isExecutableFile(atPath: tool), "\(tool) is missing (make setup)")
        }
    }

    @discardableResult
    static func run(_ tool: String, _ arguments: [String], input: String? = nil) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        let stdin = Pipe()
        process.standardInput = stdin
        try process.run()
        if let input { stdin.fileHandleForWriting.write(Data(input.utf8)) }
        try stdin.fileHandleForWriting.close()
        let out = output.fileHandleForReading.readDataToEndOfFile()
        let err = errors.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let text = String(decoding: out, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw SandpiperError.internalError(
                "\(tool) \(arguments.joined(separator: " ")) exited \(process.terminationStatus): "
                    + String(decoding: err, as: UTF8.self) + text
            )
        }
        return text
    }

    /// SIGKILL: children of the test runner inherit its blocked signals, so SIGTERM may never arrive.
    static func kill(_ process: Process) {
        if process.isRunning { Glibc.kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                bind(fd, address, length) == 0 && getsockname(fd, address, &length) == 0
            }
        }
        guard bound else { throw SandpiperError.internalError("no free port") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// A GET on 127.0.0.1:port with a raw socket: the status line and body, or nil if nobody listens.
    static func httpGet(port: Int, path: String) -> String? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let connected = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        guard connected else { return nil }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let request = Array("GET \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            response += buffer[0..<count]
        }
        return String(decoding: response, as: UTF8.self)
    }

    static func waitForHTTP(port: Int, path: String = "/v2/") throws {
        for _ in 0..<100 {
            if httpGet(port: port, path: path) != nil { return }
            usleep(100_000)
        }
        throw SandpiperError.internalError("nothing answers on 127.0.0.1:\(port)")
    }

    /// `docker-registry` on a free loopback port with its storage in `directory`.
    final class Registry {
        let port: Int
        let process: Process

        init(directory: String, htpasswd: String? = nil) throws {
            port = try RegistryIntegrationTests.freePort()
            try FileManager.default.createDirectory(atPath: directory + "/storage", withIntermediateDirectories: true)
            var config = """
                version: 0.1
                log:
                  level: error
                storage:
                  filesystem:
                    rootdirectory: \(directory)/storage
                http:
                  addr: 127.0.0.1:\(port)
                  secret: sandpiper-test-secret

                """
            if let htpasswd {
                config += """
                    auth:
                      htpasswd:
                        realm: sandpiper-test
                        path: \(htpasswd)

                    """
            }
            try config.write(toFile: directory + "/config.yml", atomically: true, encoding: .utf8)
            process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/docker-registry")
            process.arguments = ["serve", directory + "/config.yml"]
            process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
            process.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try process.run()
            try RegistryIntegrationTests.waitForHTTP(port: port)
        }

        func stop() {
            RegistryIntegrationTests.kill(process)
        }
    }

    /// Builds `oci:web` in `layout` with umoci: layer 1 busybox + /www (index.html, old.html),
    /// layer 2 deletes old.html (a whiteout) and adds new.html; config runs `busybox httpd`.
    static func buildImage(in directory: String) throws -> String {
        let layout = directory + "/oci"
        let bundle = directory + "/bundle"
        try run("/usr/bin/umoci", ["init", "--layout", layout])
        try run("/usr/bin/umoci", ["new", "--image", layout + ":web"])
        try run("/usr/bin/umoci", ["unpack", "--image", layout + ":web", bundle])
        let rootfs = bundle + "/rootfs"
        let files = FileManager.default
        for path in ["/bin", "/www", "/etc", "/tmp"] {
            try files.createDirectory(atPath: rootfs + path, withIntermediateDirectories: true)
        }
        try files.copyItem(atPath: "/bin/busybox", toPath: rootfs + "/bin/busybox")
        try files.createSymbolicLink(atPath: rootfs + "/bin/sh", withDestinationPath: "busybox")
        try "hello from the image\n".write(toFile: rootfs + "/www/index.html", atomically: true, encoding: .utf8)
        try "old\n".write(toFile: rootfs + "/www/old.html", atomically: true, encoding: .utf8)
        try "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
            .write(toFile: rootfs + "/etc/passwd", atomically: true, encoding: .utf8)
        try run("/usr/bin/umoci", ["repack", "--image", layout + ":web", bundle])
        try run(
            "/usr/bin/umoci",
            [
                "config", "--image", layout + ":web", "--config.entrypoint", "/bin/busybox",
                "--config.cmd", "httpd", "--config.cmd", "-f", "--config.cmd", "-p", "--config.cmd", "8080",
                "--config.exposedports", "8080/tcp", "--config.workingdir", "/www", "--config.env", "MODE=test",
                "--config.user", "65534",
            ]
        )
        try files.removeItem(atPath: bundle)
        try run("/usr/bin/umoci", ["unpack", "--image", layout + ":web", bundle])
        try files.removeItem(atPath: rootfs + "/www/old.html")
        try "new\n".write(toFile: rootfs + "/www/new.html", atomically: true, encoding: .utf8)
        try run("/usr/bin/umoci", ["repack", "--image", layout + ":web", bundle])
        try files.removeItem(atPath: bundle)
        return layout
    }

    /// The test image (`buildImage`) pushed by skopeo as `repository` to a new registry on
    /// 127.0.0.1, which asks for htpasswd basic auth (`sandpiper` / `s3cret`) when `basicAuth`.
    /// Returns the running registry and the image's OCI layout.
    static func registryWithImage(in directory: String, as repository: String, basicAuth: Bool = false) throws
        -> (Registry, String)
    {
        let layout = try buildImage(in: directory)
        var htpasswd: String?
        if basicAuth {
            htpasswd = directory + "/htpasswd"
            try run("/usr/bin/htpasswd", ["-Bbn", "sandpiper", "s3cret"])
                .write(toFile: directory + "/htpasswd", atomically: true, encoding: .utf8)
        }
        let registry = try Registry(directory: directory + "/registry", htpasswd: htpasswd)
        let credentials = basicAuth ? ["--dest-creds", "sandpiper:s3cret"] : []
        do {
            try run(
                "/usr/bin/skopeo",
                ["copy", "--quiet", "--dest-tls-verify=false"] + credentials
                    + ["oci:\(layout):web", "docker://127.0.0.1:\(registry.port)/\(repository)"]
            )
        } catch {
            registry.stop()
            throw error
        }
        return (registry, layout)
    }

    static func checkLayers(_ resolved: ResolvedImage) throws {
        #expect(resolved.layerDirectories.count == 2)
        let bottom = resolved.layerDirectories[0]
        let top = resolved.layerDirectories[1]
        #expect(FileManager.default.isExecutableFile(atPath: bottom + "/bin/busybox"))
        #expect(try FileManager.default.destinationOfSymbolicLink(atPath: bottom + "/bin/sh") == "busybox")
        #expect(FileManager.default.contents(atPath: bottom + "/www/old.html") == Data("old\n".utf8))
        #expect(FileManager.default.contents(atPath: top + "/www/new.html") == Data("new\n".utf8))
        // The whiteout: a 0/0 character device. (FileManager rather than lstat: with NIO linked into
        // this target, `struct stat` resolves to NIO's C module, which member import visibility hides.)
        let whiteout = try FileManager.default.attributesOfItem(atPath: top + "/www/old.html")
        #expect(whiteout[.type] as? FileAttributeType == .typeCharacterSpecial)
        #expect((whiteout[.deviceIdentifier] as? NSNumber)?.uint64Value == 0)
        let config = resolved.config
        #expect(config.entrypoint == ["/bin/busybox"])
        #expect(config.cmd == ["httpd", "-f", "-p", "8080"])
        #expect(config.exposedPorts == ["8080/tcp"])
        #expect(config.workingDir == "/www")
        #expect(config.user == "65534")
        #expect(config.env.contains("MODE=test"))
    }

    /// Mounts the layers as overlayfs (as the runtime will, with a private upper layer) and
    /// serves /www with the image's busybox httpd, chrooted into the merged tree.
    static func serveFromOverlay(_ resolved: ResolvedImage, scratch: String) throws {
        for name in ["upper", "work", "merged"] {
            try FileManager.default.createDirectory(atPath: scratch + "/" + name, withIntermediateDirectories: true)
        }
        let merged = scratch + "/merged"
        try run(
            "/bin/mount",
            [
                "-t", "overlay", "overlay", "-o",
                "lowerdir=\(resolved.overlayLowerDirectories),upperdir=\(scratch)/upper,workdir=\(scratch)/work",
                merged,
            ]
        )
        defer { _ = try? run("/bin/umount", [merged]) }
        #expect(!FileManager.default.fileExists(atPath: merged + "/www/old.html"))
        #expect(FileManager.default.contents(atPath: merged + "/www/new.html") == Data("new\n".utf8))
        let port = try freePort()
        let server = Process()
        server.executableURL = URL(fileURLWithPath: "/usr/sbin/chroot")
        server.arguments = [merged, "/bin/busybox", "httpd", "-f", "-p", "127.0.0.1:\(port)", "-h", "/www"]
        try server.run()
        defer { kill(server) }
        try waitForHTTP(port: port, path: "/index.html")
        let page = httpGet(port: port, path: "/index.html") ?? ""
        #expect(page.hasPrefix("HTTP/1.") && page.contains(" 200 "))
        #expect(page.hasSuffix("hello from the image\n"))
        let gone = httpGet(port: port, path: "/old.html") ?? ""
        #expect(gone.contains(" 404 "))
        // The session's writes land in its own upper layer, never in the shared layers.
        try "scratch\n".write(toFile: merged + "/www/written.html", atomically: false, encoding: .utf8)
        #expect(FileManager.default.fileExists(atPath: scratch + "/upper/www/written.html"))
        #expect(
            resolved.layerDirectories.allSatisfy { !FileManager.default.fileExists(atPath: $0 + "/www/written.html") }
        )
    }

    @Test func pullRunImportAndRemove() async throws {
        try Self.requireTools()
        try #require(geteuid() == 0, "image integration tests need root (whiteouts, overlayfs)")
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let (registry, layout) = try Self.registryWithImage(in: dir.path, as: "test/web:1")
        defer { registry.stop() }
        let host = "127.0.0.1:\(registry.port)"

        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let events = Mutex<[ImageProgress]>([])
        let reference = try ImageReference(parsing: "\(host)/test/web:1")
        let record = try await store.pull(reference, insecure: true) { event in events.withLock { $0.append(event) } }
        #expect(record.name == "\(host)/test/web:1")
        #expect(record.layers.count == 2)
        #expect(record.source == "pull")
        let received = events.withLock { $0 }
        #expect(received.contains { if case .downloaded(0, _, false) = $0 { true } else { false } })
        #expect(received.contains { if case .unpacked(1, _, false, _) = $0 { true } else { false } })
        let resolved = try await store.resolve(reference.description)
        try Self.checkLayers(resolved)
        try Self.serveFromOverlay(resolved, scratch: dir.path + "/session")

        // A second pull finds everything in place; so does a pull by digest.
        events.withLock { $0 = [] }
        let again = try await store.pull(reference, insecure: true) { event in events.withLock { $0.append(event) } }
        #expect(again.manifestDigest == record.manifestDigest)
        #expect(
            events.withLock { $0 }.filter { if case .unpacked(_, _, true, _) = $0 { true } else { false } }.count == 2
        )
        let byDigest = try ImageReference(parsing: "\(host)/test/web@\(record.manifestDigest)")
        #expect(try await store.pull(byDigest, insecure: true).layers == record.layers)

        // Unknown images and wrong digests are clear errors.
        let missing = await #expect(throws: SandpiperError.self) {
            try await store.pull(try ImageReference(parsing: "\(host)/test/nope:1"), insecure: true)
        }
        #expect(missing?.kind == .notFound)
        let wrongDigest = try ImageReference(parsing: "\(host)/test/web@sha256:" + String(repeating: "0", count: 64))
        await #expect(throws: SandpiperError.self) { try await store.pull(wrongDigest, insecure: true) }

        // skopeo's oci-archive and docker-archive exports import to the same layers.
        try Self.run(
            "/usr/bin/skopeo",
            ["copy", "--quiet", "oci:\(layout):web", "oci-archive:\(dir.path)/web-oci.tar:2"]
        )
        try Self.run(
            "/usr/bin/skopeo",
            ["copy", "--quiet", "oci:\(layout):web", "docker-archive:\(dir.path)/web-docker.tar:web:3"]
        )
        let oci = try await store.importArchive(dir.path + "/web-oci.tar")
        #expect(oci.map(\.name) == ["docker.io/library/web-oci:2"])
        #expect(oci.first?.layers.map(\.diffID) == record.layers.map(\.diffID))
        let docker = try await store.importArchive(dir.path + "/web-docker.tar")
        #expect(docker.map(\.name) == ["docker.io/library/web:3"])
        #expect(docker.first?.layers.map(\.diffID) == record.layers.map(\.diffID))
        try Self.checkLayers(try await store.resolve("web:3"))
        let directory = try await store.importArchive(layout, name: "local/web:dir")
        #expect(directory.map(\.name) == ["docker.io/local/web:dir"])

        #expect(try await store.list().count == 5)
        for name in ["\(host)/test/web:1", byDigest.description, "web-oci:2", "web:3", "local/web:dir"] {
            try await store.remove(name)
        }
        #expect(try await store.list().isEmpty)
        let layers = (try? FileManager.default.contentsOfDirectory(atPath: dir.path + "/data/images/layers")) ?? []
        #expect(layers.isEmpty)
    }

    @Test func basicAuthRegistry() async throws {
        try Self.requireTools()
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let (registry, _) = try Self.registryWithImage(in: dir.path, as: "private/web:1", basicAuth: true)
        defer { registry.stop() }
        let host = "127.0.0.1:\(registry.port)"
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let reference = try ImageReference(parsing: "\(host)/private/web:1")
        let anonymous = await #expect(throws: SandpiperError.self) { try await store.pull(reference, insecure: true) }
        #expect(anonymous?.kind == .unauthorized)
        let wrong = await #expect(throws: SandpiperError.self) {
            try await store.pull(
                reference,
                credentials: RegistryCredentials(username: "sandpiper", password: "wrong"),
                insecure: true
            )
        }
        #expect(wrong?.code == "RegistryUnauthorized")
        let record = try await store.pull(
            reference,
            credentials: RegistryCredentials(username: "sandpiper", password: "s3cret"),
            insecure: true
        )
        #expect(record.layers.count == 2)
        try Self.checkLayers(try await store.resolve(reference.description))

        // The CLI, when the debug binary sits next to the test bundle.
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            .appendingPathComponent("sandpiper").path
        if FileManager.default.isExecutableFile(atPath: binary) {
            let data = dir.path + "/cli-data"
            try Self.run(
                binary,
                [
                    "image", "pull", "--insecure", "--username", "sandpiper", "--password-stdin", "--data-dir", data,
                    reference.description,
                ],
                input: "s3cret\n"
            )
            let listing = try Self.run(binary, ["image", "ls", "--data-dir", data])
            #expect(listing.contains(reference.description))
            let inspect = try Self.run(binary, ["image", "inspect", "--data-dir", data, reference.description])
            #expect(inspect.contains("\"overlayLowerDirectories\""))
            try Self.run(binary, ["image", "rm", "--data-dir", data, reference.description])
            #expect(!(try Self.run(binary, ["image", "ls", "--data-dir", data])).contains(reference.description))
        }
    }
}
