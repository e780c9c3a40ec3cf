import Foundation
import Logging
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

extension ImageStore {
    /// Imports every image of an OCI image layout (a directory, or a tar of one, as
    /// `skopeo copy … oci-archive:` writes) or of a `docker save` archive (`manifest.json`, as
    /// `docker save` and `skopeo copy … docker-archive:` write). Archives may be gzip-compressed.
    ///
    /// Names: `name` when given (the first image only); else the archive's own names
    /// (`RepoTags`, `io.containerd.image.name`, a full `org.opencontainers.image.ref.name`); else
    /// the file's base name with the ref name annotation (or `latest`) as tag.
    @discardableResult
    public func importArchive(
        _ path: String,
        name: String? = nil,
        platform: ImagePlatform = .host,
        progress: ImageProgressHandler? = nil
    ) async throws(SandpiperError) -> [ImageRecord] {
        let explicitName = try name.map { (text) throws(SandpiperError) in try ImageReference(parsing: text).description
        }
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw SandpiperError.notFound("cannot open \(path): \(FileSystem.errorText())", code: "ArchiveNotFound")
        }
        let lock = try await StoreLock.acquire(root + "/lock")
        defer { lock.release() }
        try cleanTemporary()
        do throws(SandpiperError) {
            var archive: ImageArchive
            if info.st_mode & S_IFMT == S_IFDIR {
                archive = ImageArchive(directory: path)
            } else {
                archive = try await ingestTar(path)
            }
            let base = Self.baseName(path)
            var records: [ImageRecord] = []
            if archive.has("manifest.json") {
                records = try await importDocker(&archive, base: base, explicitName: explicitName, progress: progress)
            } else if archive.has("index.json") {
                records = try await importOCI(
                    &archive,
                    base: base,
                    explicitName: explicitName,
                    platform: platform,
                    progress: progress
                )
            } else {
                throw SandpiperError.invalid(
                    "\(path) is neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
                    code: "InvalidImageArchive"
                )
            }
            for record in records {
                try save(record)
                progress?(.stored(name: record.name, manifest: record.manifestDigest))
            }
            // Archive members that are not part of an image (index.json, repositories, …) go again.
            try collectGarbage()
            return records
        } catch {
            try? collectGarbage()
            throw error
        }
    }

    // MARK: - docker save

    private struct DockerManifestEntry: Decodable {
        var config: String
        var repoTags: [String]?
        var layers: [String]

        enum CodingKeys: String, CodingKey {
            case config = "Config"
            case repoTags = "RepoTags"
            case layers = "Layers"
        }
    }

    private func importDocker(
        _ archive: inout ImageArchive,
        base: String,
        explicitName: String?,
        progress: ImageProgressHandler?
    ) async throws(SandpiperError) -> [ImageRecord] {
        let manifestFile = try await member(&archive, "manifest.json")
        let entries: [DockerManifestEntry]
        do {
            let bytes = try readSmallBlob(manifestFile.digest, limit: limits.maxManifestBytes)
            entries = try JSONDecoder().decode([DockerManifestEntry].self, from: Data(bytes))
        } catch let error as SandpiperError {
            throw error
        } catch {
            throw SandpiperError.invalid(
                "manifest.json is not a docker save manifest: \(error)",
                code: "InvalidImageArchive"
            )
        }
        var records: [ImageRecord] = []
        for entry in entries {
            let configFile = try await member(&archive, entry.config)
            let configBytes = try readSmallBlob(configFile.digest, limit: limits.maxConfigBytes)
            let names: [String]
            if let explicitName, records.isEmpty {
                names = [explicitName]
            } else if let tags = entry.repoTags, !tags.isEmpty {
                names = try tags.map { (tag) throws(SandpiperError) in try ImageReference(parsing: tag).description }
            } else {
                names = [try ImageReference(parsing: base + ":latest").description]
            }
            let config = try decodeConfig(configBytes, layerCount: entry.layers.count, name: names[0])
            var layers: [Descriptor] = []
            for layer in entry.layers {
                let file = try await member(&archive, layer)
                layers.append(Descriptor(mediaType: MediaType.ociLayer, digest: file.digest, size: file.size))
            }
            // A docker save archive has no manifest blob: one is written, so the image has a manifest digest.
            let manifest = ManifestDocument(
                schemaVersion: 2,
                mediaType: MediaType.ociManifest,
                config: Descriptor(mediaType: MediaType.ociConfig, digest: configFile.digest, size: configFile.size),
                layers: layers
            )
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            guard let manifestBytes = try? [UInt8](encoder.encode(manifest)) else {
                throw SandpiperError.internalError("cannot encode a manifest")
            }
            let manifestDigest = Digest.of(manifestBytes)
            try storeSmallBlob(manifestBytes, expected: manifestDigest, what: "the manifest")
            let record = try await finishImport(
                name: names[0],
                manifestDigest: manifestDigest,
                configDigest: configFile.digest,
                config: config,
                layers: layers,
                progress: progress
            )
            records.append(record)
            for other in names.dropFirst() {
                var copy = record
                copy.name = other
                records.append(copy)
            }
        }
        return records
    }

    // MARK: - OCI layout

    private func importOCI(
        _ archive: inout ImageArchive,
        base: String,
        explicitName: String?,
        platform: ImagePlatform,
        progress: ImageProgressHandler?
    ) async throws(SandpiperError) -> [ImageRecord] {
        let indexFile = try await member(&archive, "index.json")
        let index = try decodeManifest(
            try readSmallBlob(indexFile.digest, limit: limits.maxManifestBytes),
            "index.json"
        )
        var records: [ImageRecord] = []
        for descriptor in index.manifests ?? [] {
            var chosen = descriptor
            var document = try await verifiedManifest(descriptor, archive: &archive)
            if document.isIndex {
                // A multi-platform image: its entry for our platform.
                guard
                    let entry = document.manifests?.first(where: {
                        $0.platform?.os == platform.os && $0.platform?.architecture == platform.architecture
                    })
                else {
                    throw SandpiperError.notFound(
                        "the archive's image index has no \(platform) image",
                        code: "ImagePlatformNotFound"
                    )
                }
                chosen = entry
                document = try await verifiedManifest(entry, archive: &archive)
            }
            guard let configDescriptor = document.config, let layers = document.layers else {
                throw SandpiperError.invalid(
                    "manifest \(chosen.digest.short) has no config or layers",
                    code: "InvalidImage"
                )
            }
            let annotations = descriptor.annotations ?? [:]
            let name: String
            if let explicitName, records.isEmpty {
                name = explicitName
            } else if let full = annotations["io.containerd.image.name"] {
                name = try ImageReference(parsing: full).description
            } else if let refName = annotations["org.opencontainers.image.ref.name"], refName.contains("/") {
                name = try ImageReference(parsing: refName).description
            } else {
                let tag = annotations["org.opencontainers.image.ref.name"] ?? ImageReference.defaultTag
                name = try ImageReference(parsing: base + ":" + tag).description
            }
            let configFile = try await archiveBlob(&archive, configDescriptor)
            let configBytes = try readSmallBlob(configFile.digest, limit: limits.maxConfigBytes)
            let config = try decodeConfig(configBytes, layerCount: layers.count, name: name)
            for layer in layers { _ = try await archiveBlob(&archive, layer) }
            records.append(
                try await finishImport(
                    name: name,
                    manifestDigest: chosen.digest,
                    configDigest: configDescriptor.digest,
                    config: config,
                    layers: layers,
                    progress: progress
                )
            )
        }
        guard !records.isEmpty else {
            throw SandpiperError.invalid("the OCI layout's index.json lists no image", code: "InvalidImageArchive")
        }
        return records
    }

    private func verifiedManifest(_ descriptor: Descriptor, archive: inout ImageArchive) async throws(SandpiperError)
        -> ManifestDocument
    {
        guard descriptor.size <= Int64(limits.maxManifestBytes) else {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "manifest \(descriptor.digest.short) is too large"
            )
        }
        let file = try await archiveBlob(&archive, descriptor)
        return try decodeManifest(try readSmallBlob(file.digest, limit: limits.maxManifestBytes), "a manifest")
    }

    private func decodeManifest(_ bytes: [UInt8], _ what: String) throws(SandpiperError) -> ManifestDocument {
        do {
            return try JSONDecoder().decode(ManifestDocument.self, from: Data(bytes))
        } catch {
            throw SandpiperError.invalid("\(what) is not a valid OCI document: \(error)", code: "InvalidImageArchive")
        }
    }

    private func finishImport(
        name: String,
        manifestDigest: Digest,
        configDigest: Digest,
        config: ConfigDocument,
        layers: [Descriptor],
        progress: ImageProgressHandler?
    ) async throws(SandpiperError) -> ImageRecord {
        progress?(.resolved(manifest: manifestDigest, layers: layers.count, bytes: layers.reduce(0) { $0 + $1.size }))
        var records: [LayerRecord] = []
        for (index, layer) in layers.enumerated() {
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
        return ImageRecord(
            name: name,
            manifestDigest: manifestDigest,
            configDigest: configDigest,
            layers: records,
            config: ImageConfig(config),
            source: "import",
            storedAt: Date()
        )
    }

    // MARK: - Reading archives

    /// Streams a tar archive: every regular member becomes a verified blob of the store, named by
    /// its path in the archive; symlinks and hard links between members are remembered.
    private func ingestTar(_ path: String) async throws(SandpiperError) -> ImageArchive {
        let temporary = temporaryDirectory
        let blobs = blobDirectory
        let limit = limits.maxLayerBytes
        let (files, links) = try await FileSystem.blocking {
            () throws(SandpiperError) -> ([String: ArchiveFile], [String: String]) in
            let stream = try LayerStream(blobPath: path)
            defer { stream.close() }
            var reader = TarReader(FileDescriptorSource(fd: stream.fd))
            var files: [String: ArchiveFile] = [:]
            var links: [String: String] = [:]
            var members = 0
            while let entry = try reader.next() {
                members += 1
                guard members <= 100_000 else {
                    throw SandpiperError.invalid("the archive has too many members", code: "InvalidImageArchive")
                }
                let components = try LayerUnpacker.normalise(entry.path, member: entry.path)
                    .map { String(decoding: $0, as: UTF8.self) }
                let key = components.joined(separator: "/")
                switch entry.kind {
                case .regular:
                    let writer = try BlobWriter(
                        temporaryDirectory: temporary,
                        limit: limit,
                        expectedSize: entry.size,
                        what: "archive member '\(key)'"
                    )
                    while try reader.readData({ (bytes) throws(SandpiperError) in try writer.write(bytes) }) > 0 {}
                    let (digest, size) = try writer.commit(into: blobs, expected: nil)
                    files[key] = ArchiveFile(digest: digest, size: size)
                case .symbolicLink:
                    let target = entry.linkTargetString
                    if !target.hasPrefix("/") {
                        links[key] = ImageArchive.join(components.dropLast().joined(separator: "/"), target)
                    }
                case .hardLink:
                    links[key] = ImageArchive.join("", entry.linkTargetString)
                default:
                    break
                }
            }
            try reader.drain()
            try stream.finish()
            return (files, links)
        }
        return ImageArchive(files: files, links: links)
    }

    /// Copies one file of an OCI layout directory into the store (verified by the caller).
    func ingestFile(_ path: String, expectedSize: Int64?) async throws(SandpiperError) -> ArchiveFile {
        let temporary = temporaryDirectory
        let blobs = blobDirectory
        let limit = limits.maxLayerBytes
        return try await FileSystem.blocking { () throws(SandpiperError) -> ArchiveFile in
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw SandpiperError.notFound("cannot open \(path): \(FileSystem.errorText())", code: "BlobNotFound")
            }
            defer { Glibc.close(fd) }
            var info = stat()
            guard fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG else {
                throw SandpiperError.invalid("\(path) is not a regular file", code: "InvalidImageArchive")
            }
            let writer = try BlobWriter(
                temporaryDirectory: temporary,
                limit: limit,
                expectedSize: expectedSize,
                what: path
            )
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let count = Glibc.read(fd, &buffer, buffer.count)
                if count < 0 {
                    if errno == EINTR { continue }
                    throw SandpiperError.internalError("cannot read \(path): \(FileSystem.errorText())")
                }
                if count == 0 { break }
                try writer.write(Array(buffer[0..<count]))
            }
            let (digest, size) = try writer.commit(into: blobs, expected: nil)
            return ArchiveFile(digest: digest, size: size)
        }
    }

    /// The member at `path`, in the store.
    func member(_ archive: inout ImageArchive, _ path: String, expectedSize: Int64? = nil) async throws(SandpiperError)
        -> ArchiveFile
    {
        switch try archive.lookup(path) {
        case .stored(let file):
            return file
        case .copy(let source, let key):
            let file = try await ingestFile(source, expectedSize: expectedSize)
            archive.files[key] = file
            return file
        }
    }

    /// The blob a descriptor names, from `blobs/sha256/<hex>`, checked against the descriptor.
    func archiveBlob(_ archive: inout ImageArchive, _ descriptor: Descriptor) async throws(SandpiperError)
        -> ArchiveFile
    {
        let file = try await member(&archive, "blobs/sha256/" + descriptor.digest.hex, expectedSize: descriptor.size)
        guard file.digest == descriptor.digest else {
            throw RegistryClient.digestMismatch("archive blob", expected: descriptor.digest, actual: file.digest)
        }
        guard file.size == descriptor.size else {
            throw SandpiperError.invalid(
                "archive blob \(descriptor.digest.short) is \(file.size) bytes, its descriptor says \(descriptor.size)",
                code: "ImageDigestMismatch"
            )
        }
        return file
    }

    /// `busybox-1.36.oci.tar.gz` → `busybox-1.36`, lowercased, fit for a repository name.
    static func baseName(_ path: String) -> String {
        var name = URL(fileURLWithPath: path).lastPathComponent.lowercased()
        for suffix in [".gz", ".tgz", ".tar", ".oci", ".docker", ".archive"] where name.hasSuffix(suffix) {
            name = String(name.dropLast(suffix.count))
        }
        for suffix in [".tar", ".oci"] where name.hasSuffix(suffix) { name = String(name.dropLast(suffix.count)) }
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789._-")
        var cleaned = String(name.map { allowed.contains($0) ? $0 : "-" })
        while let first = cleaned.first, !first.isLetter && !first.isNumber { cleaned.removeFirst() }
        while let last = cleaned.last, !last.isLetter && !last.isNumber { cleaned.removeLast() }
        return cleaned.isEmpty ? "imported" : cleaned
    }
}

struct ArchiveFile: Sendable {
    var digest: Digest
    var size: Int64
}

/// The members of an image archive: blobs already in the store (a tar archive, streamed in
/// whole) or files of a directory, copied into the store when first asked for.
struct ImageArchive: Sendable {
    var files: [String: ArchiveFile]
    let links: [String: String]
    let directory: String?

    init(files: [String: ArchiveFile], links: [String: String]) {
        self.files = files
        self.links = links
        self.directory = nil
    }

    init(directory: String) {
        self.files = [:]
        self.links = [:]
        self.directory = directory
    }

    func has(_ path: String) -> Bool {
        if let directory { return FileSystem.exists(directory + "/" + path) }
        return files[path] != nil || links[path] != nil
    }

    enum Lookup {
        case stored(ArchiveFile)
        /// A directory's file, not yet in the store: the path to copy it from, and its key.
        case copy(String, key: String)
    }

    /// Where the member at `path` is (symlinks between members followed).
    func lookup(_ path: String) throws(SandpiperError) -> Lookup {
        var key = Self.join("", path)
        if let directory {
            guard !key.isEmpty, !key.split(separator: "/").contains("..") else {
                throw SandpiperError.invalid("archive path '\(path)' leaves the layout", code: "InvalidImageArchive")
            }
            if let known = files[key] { return .stored(known) }
            return .copy(directory + "/" + key, key: key)
        }
        for _ in 0..<8 {
            if let file = files[key] { return .stored(file) }
            guard let next = links[key] else { break }
            key = next
        }
        throw SandpiperError.notFound("the archive has no member '\(path)'", code: "InvalidImageArchive")
    }

    /// `directory` + `relative`, with `.` and `..` resolved; `..` never climbs above the top.
    static func join(_ directory: String, _ relative: String) -> String {
        var parts = directory.split(separator: "/").map(String.init)
        for part in relative.split(separator: "/") {
            if part == "." { continue }
            if part == ".." {
                if !parts.isEmpty { parts.removeLast() }
                continue
            }
            parts.append(String(part))
        }
        return parts.joined(separator: "/")
    }
}
