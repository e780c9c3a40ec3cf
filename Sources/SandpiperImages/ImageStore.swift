import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// The image store under `<data>/images`:
///
/// ```
/// blobs/sha256/<hex>        content-addressed blobs (manifests, configs, layers), verified on the way in
/// layers/<diff id hex>/     one unpacked layer: rootfs/ (read-only lowerdir for overlayfs) and `layer.json`
/// images.json               name → manifest, config, layers (replaced atomically)
/// tmp/                      blobs and layers being written (emptied by every mutation)
/// lock                      flock: one pull, import or removal at a time, across processes
/// ```
///
/// A layer is unpacked once, into `tmp/`, checked against its diff id, then renamed into
/// `layers/`: a directory there is always complete. Removing an image collects every blob and
/// layer no remaining image uses.
public actor ImageStore {
    public nonisolated let root: String
    public nonisolated let limits: ImageLimits
    let logger: Logger

    nonisolated var blobDirectory: String { root + "/blobs/sha256" }
    nonisolated var layerDirectory: String { root + "/layers" }
    nonisolated var temporaryDirectory: String { root + "/tmp" }
    nonisolated var indexPath: String { root + "/images.json" }

    public init(
        dataDirectory: String,
        limits: ImageLimits = ImageLimits(),
        logger: Logger = Logger(label: "sandpiper.images")
    ) throws(SandpiperError) {
        self.root = dataDirectory + "/images"
        self.limits = limits
        self.logger = logger
        try FileSystem.makeDirectory(dataDirectory, mode: 0o711)
        try FileSystem.makeDirectory(root, mode: 0o711)
        try FileSystem.makeDirectory(blobDirectory, mode: 0o700)
        try FileSystem.makeDirectory(layerDirectory, mode: 0o711)
        try FileSystem.makeDirectory(temporaryDirectory, mode: 0o700)
    }

    nonisolated public func blobPath(_ digest: Digest) -> String { blobDirectory + "/" + digest.hex }
    nonisolated public func layerRoot(_ diffID: Digest) -> String { layerDirectory + "/" + diffID.hex + "/rootfs" }

    // MARK: - Queries

    /// Every stored image, by name.
    public func list() throws(SandpiperError) -> [ImageRecord] {
        try loadIndex().sorted { $0.name < $1.name }
    }

    /// The stored image `reference` names (a reference, or a manifest digest or its hex prefix of
    /// at least 12 digits), with its layer directories for the runtime.
    public func resolve(_ reference: String) throws(SandpiperError) -> ResolvedImage {
        let record = try find(reference, in: loadIndex(), sameImageIsAmbiguous: false)
        var directories: [String] = []
        for layer in record.layers {
            let path = layerRoot(layer.diffID)
            guard FileSystem.exists(path) else {
                throw SandpiperError.notFound(
                    "image \(record.name): layer \(layer.diffID.short) is missing from the store; pull it again",
                    code: "ImageLayerMissing"
                )
            }
            directories.append(path)
        }
        return ResolvedImage(record: record, layerDirectories: directories)
    }

    /// The one record `text` names. A digest that several names share is ambiguous for removal
    /// but not for resolving (they are the same image).
    func find(_ text: String, in records: [ImageRecord], sameImageIsAmbiguous: Bool = true) throws(SandpiperError)
        -> ImageRecord
    {
        let matches = try matching(text, in: records)
        guard let first = matches.first else {
            throw SandpiperError.notFound("no image '\(text)' in the store", code: "ImageNotFound")
        }
        let sameImage = matches.allSatisfy { $0.manifestDigest == first.manifestDigest }
        guard matches.count == 1 || (sameImage && !sameImageIsAmbiguous) else {
            throw SandpiperError(
                .conflict,
                code: "AmbiguousImage",
                "'\(text)' names several images: \(matches.map(\.name).joined(separator: ", "))"
            )
        }
        return first
    }

    private func matching(_ text: String, in records: [ImageRecord]) throws(SandpiperError) -> [ImageRecord] {
        let trimmed = text.trimmingWhitespace()
        if let hex = Self.digestPrefix(trimmed) {
            let byDigest = records.filter { $0.manifestDigest.hex.hasPrefix(hex) }
            if !byDigest.isEmpty { return byDigest }
        }
        let name = try ImageReference(parsing: trimmed).description
        return records.filter { $0.name == name }
    }

    // MARK: - Pull

    /// Pulls `reference` from its registry: manifest (the platform's, from an index), config and
    /// layers, each verified, then unpacks the layers not yet unpacked and records the image.
    @discardableResult
    public func pull(
        _ reference: ImageReference,
        credentials: RegistryCredentials? = nil,
        insecure: Bool = false,
        platform: ImagePlatform = .host,
        progress: ImageProgressHandler? = nil
    ) async throws(SandpiperError) -> ImageRecord {
        let lock = try await StoreLock.acquire(root + "/lock")
        defer { lock.release() }
        try cleanTemporary()
        let client = RegistryClient(
            reference: reference,
            credentials: credentials,
            insecure: insecure,
            limits: limits,
            logger: logger
        )
        do throws(SandpiperError) {
            let record = try await pull(reference, client: client, platform: platform, progress: progress)
            await client.shutdown()
            return record
        } catch {
            await client.shutdown()
            try? cleanTemporary()
            throw error
        }
    }

    private func pull(
        _ reference: ImageReference,
        client: RegistryClient,
        platform: ImagePlatform,
        progress: ImageProgressHandler?
    ) async throws(SandpiperError) -> ImageRecord {
        let manifest = try await client.imageManifest(platform: platform)
        guard let configDescriptor = manifest.document.config, let layers = manifest.document.layers else {
            throw SandpiperError.invalid("\(reference): the manifest has no config or layers", code: "InvalidImage")
        }
        try storeSmallBlob(manifest.bytes, expected: manifest.digest, what: "the manifest")
        let configBytes: [UInt8]
        if let stored = try? readSmallBlob(configDescriptor.digest, limit: limits.maxConfigBytes) {
            configBytes = stored
        } else {
            configBytes = try await client.smallBlob(configDescriptor, limit: limits.maxConfigBytes)
            try storeSmallBlob(configBytes, expected: configDescriptor.digest, what: "the config")
        }
        let config = try decodeConfig(configBytes, layerCount: layers.count, name: reference.description)
        progress?(.resolved(manifest: manifest.digest, layers: layers.count, bytes: layers.reduce(0) { $0 + $1.size }))

        var records: [LayerRecord] = []
        for (index, layer) in layers.enumerated() {
            if layer.urls?.isEmpty == false && !FileSystem.exists(blobPath(layer.digest)) {
                logger.debug("layer has foreign URLs; fetching it from the registry", metadata: ["layer": "\(index)"])
            }
            if FileSystem.exists(blobPath(layer.digest)) {
                progress?(.downloaded(index: index, digest: layer.digest, cached: true))
            } else {
                try await download(layer, index: index, client: client, progress: progress)
                progress?(.downloaded(index: index, digest: layer.digest, cached: false))
            }
            let diffID = config.rootfs.diffIDs[index]
            let (cached, skipped) = try await unpack(blob: layer.digest, diffID: diffID, index: index)
            progress?(.unpacked(index: index, diffID: diffID, cached: cached, skippedEntries: skipped))
            records.append(
                LayerRecord(
                    digest: layer.digest,
                    diffID: diffID,
                    size: layer.size,
                    mediaType: layer.mediaType ?? MediaType.ociLayer
                )
            )
        }
        let record = ImageRecord(
            name: reference.description,
            manifestDigest: manifest.digest,
            configDigest: configDescriptor.digest,
            layers: records,
            config: ImageConfig(config),
            source: "pull",
            storedAt: Date()
        )
        try save(record)
        progress?(.stored(name: record.name, manifest: record.manifestDigest))
        return record
    }

    private func download(
        _ layer: Descriptor,
        index: Int,
        client: RegistryClient,
        progress: ImageProgressHandler?
    ) async throws(SandpiperError) {
        let writer = try BlobWriter(
            temporaryDirectory: temporaryDirectory,
            limit: limits.maxLayerBytes,
            expectedSize: layer.size,
            what: "layer \(index) (\(layer.digest.short))"
        )
        let response = try await client.blob(layer)
        let clock = ContinuousClock()
        var lastReport = clock.now
        do {
            for try await chunk in response.body {
                try chunk.withUnsafeReadableBytes { (bytes) throws(SandpiperError) in try writer.write(bytes) }
                if clock.now - lastReport > .milliseconds(500) {
                    lastReport = clock.now
                    progress?(
                        .downloading(index: index, digest: layer.digest, received: writer.count, total: layer.size)
                    )
                }
            }
        } catch let error as SandpiperError {
            throw error
        } catch {
            throw RegistryClient.transport(error, client.reference.registry)
        }
        progress?(.downloading(index: index, digest: layer.digest, received: writer.count, total: layer.size))
        try writer.commit(into: blobDirectory, expected: layer.digest)
    }

    // MARK: - Blobs and layers

    func storeSmallBlob(_ bytes: [UInt8], expected: Digest?, what: String) throws(SandpiperError) {
        if let expected, FileSystem.exists(blobPath(expected)) { return }
        let writer = try BlobWriter(
            temporaryDirectory: temporaryDirectory,
            limit: Int64(limits.maxManifestBytes),
            expectedSize: nil,
            what: what
        )
        try writer.write(bytes)
        try writer.commit(into: blobDirectory, expected: expected)
    }

    /// A stored blob, read whole and verified again.
    func readSmallBlob(_ digest: Digest, limit: Int) throws(SandpiperError) -> [UInt8] {
        let path = blobPath(digest)
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw SandpiperError.notFound("blob \(digest) is not in the store", code: "BlobNotFound")
        }
        defer { try? handle.close() }
        let data: Data
        do {
            data = try handle.read(upToCount: limit + 1) ?? Data()
        } catch {
            throw SandpiperError.internalError("cannot read blob \(digest): \(error)")
        }
        guard data.count <= limit else {
            throw SandpiperError(.payloadTooLarge, code: "ImageTooLarge", "blob \(digest.short) is over \(limit) bytes")
        }
        let bytes = [UInt8](data)
        let actual = Digest.of(bytes)
        guard actual == digest else {
            throw RegistryClient.digestMismatch("stored blob", expected: digest, actual: actual)
        }
        return bytes
    }

    func decodeConfig(_ bytes: [UInt8], layerCount: Int, name: String) throws(SandpiperError) -> ConfigDocument {
        let config: ConfigDocument
        do {
            config = try JSONDecoder().decode(ConfigDocument.self, from: Data(bytes))
        } catch {
            throw SandpiperError.invalid("\(name): the image config is not valid: \(error)", code: "InvalidImage")
        }
        guard config.rootfs.diffIDs.count == layerCount else {
            throw SandpiperError.invalid(
                "\(name): the manifest has \(layerCount) layers but the config lists \(config.rootfs.diffIDs.count)",
                code: "InvalidImage"
            )
        }
        guard layerCount <= limits.maxLayers else {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "\(name) has \(layerCount) layers, over the \(limits.maxLayers) limit"
            )
        }
        if let os = config.os, os != "linux" {
            throw SandpiperError(.unsupported, code: "UnsupportedImage", "\(name) is a '\(os)' image, not linux")
        }
        return config
    }

    /// Unpacks the blob into `layers/<diffID>` unless it is there. Returns whether it was, and
    /// how many members were skipped (devices, FIFOs).
    func unpack(blob: Digest, diffID: Digest, index: Int) async throws(SandpiperError) -> (cached: Bool, skipped: Int) {
        let final = layerDirectory + "/" + diffID.hex
        if FileSystem.exists(final + "/layer.json") { return (true, 0) }
        let blobPath = blobPath(blob)
        let work = temporaryDirectory + "/layer-" + UUID().uuidString.lowercased()
        let limits = limits
        let logger = logger
        let skipped = try await FileSystem.blocking { () throws(SandpiperError) -> Int in
            try FileSystem.makeDirectory(work + "/rootfs", mode: 0o755)
            do throws(SandpiperError) {
                let skipped = try Self.unpackBlocking(
                    blobPath: blobPath,
                    into: work + "/rootfs",
                    diffID: diffID,
                    limits: limits,
                    logger: logger,
                    description: "layer \(index) (\(blob.short))"
                )
                let marker = #"{"diffID":"\#(diffID)","blob":"\#(blob)"}"# + "\n"
                try FileSystem.writeAtomically(Data(marker.utf8), to: work + "/layer.json")
                chmod(work, 0o755)
                if FileSystem.exists(final) { try FileSystem.removeTree(path: final) }
                guard rename(work, final) == 0 else {
                    throw SandpiperError.internalError("cannot move the layer into place: \(FileSystem.errorText())")
                }
                return skipped
            } catch {
                try? FileSystem.removeTree(path: work)
                throw error
            }
        }
        return (false, skipped)
    }

    static func unpackBlocking(
        blobPath: String,
        into directory: String,
        diffID: Digest,
        limits: ImageLimits,
        logger: Logger,
        description: String
    ) throws(SandpiperError) -> Int {
        let rootFD = Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard rootFD >= 0 else {
            throw SandpiperError.internalError("cannot open \(directory): \(FileSystem.errorText())")
        }
        defer { Glibc.close(rootFD) }
        let stream = try LayerStream(blobPath: blobPath)
        defer { stream.close() }
        var reader = TarReader(FileDescriptorSource(fd: stream.fd))
        var unpacker = LayerUnpacker(root: rootFD, limits: limits, logger: logger, description: description)
        try unpacker.unpack(&reader)
        try reader.drain()
        try stream.finish()
        guard reader.bytesRead <= limits.maxUnpackedLayerBytes + (64 << 20) else {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "\(description) is over \(limits.maxUnpackedLayerBytes) bytes uncompressed"
            )
        }
        guard reader.digest == diffID else {
            throw SandpiperError.invalid(
                "\(description): the uncompressed layer is \(reader.digest), the config says \(diffID)",
                code: "ImageDigestMismatch"
            )
        }
        if unpacker.skipped > 0 {
            logger.info(
                "skipped device nodes, FIFOs or unknown members",
                metadata: ["layer": "\(description)", "count": "\(unpacker.skipped)"]
            )
        }
        return unpacker.skipped
    }

    // MARK: - Index

    func loadIndex() throws(SandpiperError) -> [ImageRecord] {
        guard let data = FileManager.default.contents(atPath: indexPath) else { return [] }
        struct Index: Decodable { var images: [ImageRecord] }
        do {
            let decoder = JSONDecoder()
            decoder.dateDecodingStrategy = .iso8601
            return try decoder.decode(Index.self, from: data).images
        } catch {
            throw SandpiperError.internalError("\(indexPath) is corrupt: \(error)")
        }
    }

    func writeIndex(_ records: [ImageRecord]) throws(SandpiperError) {
        struct Index: Encodable {
            var version = 1
            var images: [ImageRecord]
        }
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        do {
            let data = try encoder.encode(Index(images: records.sorted { $0.name < $1.name }))
            try FileSystem.writeAtomically(data, to: indexPath)
        } catch let error as SandpiperError {
            throw error
        } catch {
            throw SandpiperError.internalError("cannot encode the image index: \(error)")
        }
    }

    /// Adds or replaces the record with the same name.
    func save(_ record: ImageRecord) throws(SandpiperError) {
        var records = try loadIndex().filter { $0.name != record.name }
        records.append(record)
        try writeIndex(records)
    }

    // MARK: - Removal

    /// Removes the image `reference` names, then every blob and layer no remaining image uses.
    /// Returns the removed record.
    @discardableResult
    public func remove(_ reference: String) async throws(SandpiperError) -> ImageRecord {
        let lock = try await StoreLock.acquire(root + "/lock")
        defer { lock.release() }
        let records = try loadIndex()
        let record = try find(reference, in: records)
        try writeIndex(records.filter { $0.name != record.name })
        try collectGarbage()
        return record
    }

    /// Deletes unreferenced blobs and layers and everything in `tmp/`. The caller holds the lock.
    func collectGarbage() throws(SandpiperError) {
        let records = try loadIndex()
        var blobs = Set<String>()
        var layers = Set<String>()
        for record in records {
            blobs.insert(record.manifestDigest.hex)
            blobs.insert(record.configDigest.hex)
            for layer in record.layers {
                blobs.insert(layer.digest.hex)
                layers.insert(layer.diffID.hex)
            }
        }
        let files = FileManager.default
        for name in (try? files.contentsOfDirectory(atPath: blobDirectory)) ?? [] where !blobs.contains(name) {
            try FileSystem.removeTree(path: blobDirectory + "/" + name)
        }
        for name in (try? files.contentsOfDirectory(atPath: layerDirectory)) ?? [] where !layers.contains(name) {
            try FileSystem.removeTree(path: layerDirectory + "/" + name)
        }
        try cleanTemporary()
    }

    func cleanTemporary() throws(SandpiperError) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: temporaryDirectory)) ?? [] {
            try FileSystem.removeTree(path: temporaryDirectory + "/" + name)
        }
    }
}

/// An exclusive `flock` on the store's lock file, held by one mutation at a time (in this process
/// or another `sandpiper` process).
struct StoreLock: Sendable {
    let fd: Int32

    static func acquire(_ path: String) async throws(SandpiperError) -> StoreLock {
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw SandpiperError.internalError("cannot open \(path): \(FileSystem.errorText())") }
        if flock(fd, LOCK_EX | LOCK_NB) == 0 { return StoreLock(fd: fd) }
        let locked = try await FileSystem.blocking { () throws(SandpiperError) -> Bool in
            while flock(fd, LOCK_EX) != 0 {
                if errno != EINTR { return false }
            }
            return true
        }
        guard locked else {
            Glibc.close(fd)
            throw SandpiperError.internalError("cannot lock \(path): \(FileSystem.errorText())")
        }
        return StoreLock(fd: fd)
    }

    func release() {
        Glibc.close(fd)
    }
}
