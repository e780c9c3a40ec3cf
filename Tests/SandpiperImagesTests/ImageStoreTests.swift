import Foundation
import SandpiperCore
import Synchronization
import Testing

@testable import SandpiperImages

/// The store with archives built here: `docker save` tars and OCI layout directories.
@Suite struct ImageStoreTests {
    static let configJSON = """
        {"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/app"],"Cmd":["--port","8080"],\
        "Env":["PATH=/bin","MODE=test"],"WorkingDir":"/srv","User":"1000:1000","ExposedPorts":{"8080/tcp":{}}},\
        "rootfs":{"type":"layers","diff_ids":[DIFFIDS]}}
        """

    static func config(diffIDs: [Digest]) -> [UInt8] {
        Array(
            configJSON.replacingOccurrences(of: "DIFFIDS", with: diffIDs.map { "\"\($0)\"" }.joined(separator: ","))
                .utf8
        )
    }

    static func layer(_ files: [(String, String)]) -> [UInt8] {
        var tar = TarBuilder()
        for (name, content) in files { tar.file(name, content) }
        return tar.finish()
    }

    static let base = layer([("bin/app", "#!/bin/sh\n"), ("etc/os-release", "ID=test\n")])
    static let top = layer([("srv/index.html", "hello\n")])
    static let other = layer([("srv/other.html", "other\n")])

    /// A `docker save` archive (layers are plain tars; `manifest.json` names them).
    static func dockerArchive(layers: [[UInt8]], diffIDs: [Digest]? = nil, tags: [String]) throws -> [UInt8] {
        let config = config(diffIDs: diffIDs ?? layers.map { Digest.of($0) })
        let configName = Digest.of(config).hex + ".json"
        var tar = TarBuilder()
        var layerNames: [String] = []
        for (index, layer) in layers.enumerated() {
            tar.directory("layer\(index)/")
            tar.add("layer\(index)/layer.tar", kind: .regular, data: layer)
            layerNames.append("layer\(index)/layer.tar")
        }
        tar.add(configName, kind: .regular, data: config)
        let manifest: [[String: Any]] = [["Config": configName, "RepoTags": tags, "Layers": layerNames]]
        tar.add("manifest.json", kind: .regular, data: Array(try JSONSerialization.data(withJSONObject: manifest)))
        tar.add("repositories", kind: .regular, data: Array("{}".utf8))
        return tar.finish()
    }

    /// Writes an OCI image layout directory; returns the manifest digest.
    @discardableResult
    static func ociLayout(at path: String, layers: [[UInt8]], refName: String?) throws -> Digest {
        let blobs = path + "/blobs/sha256"
        try FileManager.default.createDirectory(atPath: blobs, withIntermediateDirectories: true)
        func put(_ bytes: [UInt8]) throws -> (Digest, Int) {
            let digest = Digest.of(bytes)
            try Data(bytes).write(to: URL(fileURLWithPath: blobs + "/" + digest.hex))
            return (digest, bytes.count)
        }
        let (configDigest, configSize) = try put(config(diffIDs: layers.map { Digest.of($0) }))
        var layerDescriptors: [String] = []
        for layer in layers {
            let (digest, size) = try put(layer)
            layerDescriptors.append(
                #"{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"\#(digest)","size":\#(size)}"#
            )
        }
        let manifest = """
            {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",\
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"\(configDigest)",\
            "size":\(configSize)},"layers":[\(layerDescriptors.joined(separator: ","))]}
            """
        let (manifestDigest, manifestSize) = try put(Array(manifest.utf8))
        let annotations = refName.map { #","annotations":{"org.opencontainers.image.ref.name":"\#($0)"}"# } ?? ""
        let index = """
            {"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",\
            "digest":"\(manifestDigest)","size":\(manifestSize)\(annotations)}]}
            """
        try Data(index.utf8).write(to: URL(fileURLWithPath: path + "/index.json"))
        try Data(#"{"imageLayoutVersion":"1.0.0"}"#.utf8).write(to: URL(fileURLWithPath: path + "/oci-layout"))
        return manifestDigest
    }

    func listing(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
    }

    @Test func importDockerAndOCIShareLayersAndRemovalCollectsGarbage() async throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let archive = dir.path + "/web.tar"
        try Data(try Self.dockerArchive(layers: [Self.base, Self.top], tags: ["web:1", "127.0.0.1:5000/web:1"]))
            .write(to: URL(fileURLWithPath: archive))

        let events = Mutex<[ImageProgress]>([])
        let imported = try await store.importArchive(archive) { event in events.withLock { $0.append(event) } }
        #expect(imported.map(\.name) == ["docker.io/library/web:1", "127.0.0.1:5000/web:1"])
        #expect(
            events.withLock { $0 }.contains(
                .stored(name: "docker.io/library/web:1", manifest: imported[0].manifestDigest)
            )
        )

        let resolved = try await store.resolve("web:1")
        #expect(resolved.config.entrypoint == ["/bin/app"])
        #expect(resolved.config.cmd == ["--port", "8080"])
        #expect(resolved.config.env == ["PATH=/bin", "MODE=test"])
        #expect(resolved.config.workingDir == "/srv")
        #expect(resolved.config.user == "1000:1000")
        #expect(resolved.config.exposedPorts == ["8080/tcp"])
        #expect(resolved.layerDirectories.count == 2)
        let baseDirectory = resolved.layerDirectories[0]
        let topDirectory = resolved.layerDirectories[1]
        #expect(baseDirectory.hasSuffix(Digest.of(Self.base).hex + "/rootfs"))
        #expect(resolved.overlayLowerDirectories == topDirectory + ":" + baseDirectory)
        #expect(FileManager.default.contents(atPath: baseDirectory + "/etc/os-release") == Data("ID=test\n".utf8))
        #expect(FileManager.default.contents(atPath: topDirectory + "/srv/index.html") == Data("hello\n".utf8))
        // By manifest digest too (both names are the same image, so that is not ambiguous here).
        let byDigest = try await store.resolve(String(imported[0].manifestDigest.hex.prefix(16)))
        #expect(byDigest.record.manifestDigest == imported[0].manifestDigest)
        let ambiguous = await #expect(throws: SandpiperError.self) {
            try await store.remove(imported[0].manifestDigest.description)
        }
        #expect(ambiguous?.code == "AmbiguousImage")

        // An OCI layout sharing the base layer: unpacked once.
        let layout = dir.path + "/layout"
        try Self.ociLayout(at: layout, layers: [Self.base, Self.other], refName: "2")
        events.withLock { $0 = [] }
        let oci = try await store.importArchive(layout) { event in events.withLock { $0.append(event) } }
        #expect(oci.map(\.name) == ["docker.io/library/layout:2"])
        let unpacked = events.withLock { $0 }.compactMap { event -> Bool? in
            if case .unpacked(_, _, let cached, _) = event { return cached }
            return nil
        }
        #expect(unpacked == [true, false])
        #expect(try await store.list().count == 3)

        let layers = dir.path + "/data/images/layers"
        #expect(listing(layers).count == 3)
        try await store.remove("web:1")
        try await store.remove("127.0.0.1:5000/web:1")
        // The top layer of web is gone; the base stays for the OCI image.
        #expect(listing(layers) == [Digest.of(Self.base).hex, Digest.of(Self.other).hex].sorted())
        try await store.remove("layout:2")
        #expect(listing(layers).isEmpty)
        #expect(listing(dir.path + "/data/images/blobs/sha256").isEmpty)
        #expect(listing(dir.path + "/data/images/tmp").isEmpty)
        #expect(try await store.list().isEmpty)
        await #expect(throws: SandpiperError.self) { try await store.resolve("web:1") }
        await #expect(throws: SandpiperError.self) { try await store.remove("web:1") }
    }

    @Test func diffIDMismatchIsRefusedAndLeavesNothing() async throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let archive = dir.path + "/bad.tar"
        let wrong = Digest.of(Array("not the layer".utf8))
        try Data(try Self.dockerArchive(layers: [Self.base], diffIDs: [wrong], tags: ["bad:1"]))
            .write(to: URL(fileURLWithPath: archive))
        let error = await #expect(throws: SandpiperError.self) { try await store.importArchive(archive) }
        #expect(error?.code == "ImageDigestMismatch")
        #expect(try await store.list().isEmpty)
        #expect(listing(dir.path + "/data/images/layers").isEmpty)
        #expect(listing(dir.path + "/data/images/tmp").isEmpty)
        #expect(listing(dir.path + "/data/images/blobs/sha256").isEmpty)
    }

    @Test func tamperedOCIBlobIsRefused() async throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let layout = dir.path + "/layout"
        try Self.ociLayout(at: layout, layers: [Self.base], refName: "1")
        // Same size, other content: the digest check must catch it.
        let blob = layout + "/blobs/sha256/" + Digest.of(Self.base).hex
        var bytes = Self.base
        bytes[600] ^= 0x01
        try Data(bytes).write(to: URL(fileURLWithPath: blob))
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let error = await #expect(throws: SandpiperError.self) { try await store.importArchive(layout) }
        #expect(error?.code == "ImageDigestMismatch")
        #expect(try await store.list().isEmpty)
    }

    @Test func gzipArchiveWithExplicitName() async throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let archive = dir.path + "/web.tar"
        try Data(try Self.dockerArchive(layers: [Self.base], tags: [])).write(to: URL(fileURLWithPath: archive))
        let gzip = Process()
        gzip.executableURL = URL(fileURLWithPath: "/bin/gzip")
        gzip.arguments = ["-f", archive]
        try gzip.run()
        gzip.waitUntilExit()
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let records = try await store.importArchive(archive + ".gz", name: "127.0.0.1:5000/named:v2")
        #expect(records.map(\.name) == ["127.0.0.1:5000/named:v2"])
        let unnamed = try await store.importArchive(archive + ".gz")
        #expect(unnamed.map(\.name) == ["docker.io/library/web:latest"])
    }

    @Test func blobWriterVerifiesDigestAndSize() throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let data = Array("blob content".utf8)
        let writer = try BlobWriter(temporaryDirectory: dir.path, limit: 1024, expectedSize: nil, what: "test blob")
        try writer.write(data)
        let error = #expect(throws: SandpiperError.self) {
            try writer.commit(into: dir.path, expected: Digest.of(Array("other".utf8)))
        }
        #expect(error?.code == "ImageDigestMismatch")
        #expect(listing(dir.path).isEmpty)

        let sized = try BlobWriter(temporaryDirectory: dir.path, limit: 1024, expectedSize: 4, what: "sized")
        #expect(throws: SandpiperError.self) { try sized.write(data) }
        sized.discard()
        let limited = try BlobWriter(temporaryDirectory: dir.path, limit: 4, expectedSize: nil, what: "limited")
        let tooLarge = #expect(throws: SandpiperError.self) { try limited.write(data) }
        #expect(tooLarge?.kind == .payloadTooLarge)
        limited.discard()

        let good = try BlobWriter(temporaryDirectory: dir.path, limit: 1024, expectedSize: 12, what: "good")
        try good.write(data)
        let (digest, size) = try good.commit(into: dir.path, expected: Digest.of(data))
        #expect(size == 12)
        #expect(listing(dir.path) == [digest.hex])
    }
}
