import Foundation
import SandpiperCore

/// Media types of the OCI image spec and their Docker schema 2 equivalents.
enum MediaType {
    static let ociIndex = "application/vnd.oci.image.index.v1+json"
    static let ociManifest = "application/vnd.oci.image.manifest.v1+json"
    static let ociConfig = "application/vnd.oci.image.config.v1+json"
    static let ociLayer = "application/vnd.oci.image.layer.v1.tar"
    static let dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
    static let dockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
    static let dockerConfig = "application/vnd.docker.container.image.v1+json"
    static let dockerLayer = "application/vnd.docker.image.rootfs.diff.tar.gzip"

    /// What a manifest request accepts, most preferred first.
    static let manifestAccept = [ociIndex, ociManifest, dockerManifestList, dockerManifest]

    static func isIndex(_ type: String) -> Bool { type == ociIndex || type == dockerManifestList }
    static func isManifest(_ type: String) -> Bool { type == ociManifest || type == dockerManifest }
}

/// The limits every pull and import is held to.
public struct ImageLimits: Sendable {
    public var maxManifestBytes = 4 << 20
    public var maxConfigBytes = 4 << 20
    /// One compressed layer blob.
    public var maxLayerBytes: Int64 = 4 << 30
    /// One layer once decompressed (what lands on disk, roughly).
    public var maxUnpackedLayerBytes: Int64 = 16 << 30
    public var maxLayers = 128
    /// Entries (files, directories, links) in one layer.
    public var maxLayerEntries = 1_000_000

    public init() {}
}

struct Descriptor: Codable, Sendable {
    var mediaType: String?
    var digest: Digest
    var size: Int64
    var platform: Platform?
    var annotations: [String: String]?
    var urls: [String]?
}

struct Platform: Codable, Sendable {
    var architecture: String
    var os: String
    var variant: String?
}

/// An image index (manifest list) or an image manifest: which one is told by `mediaType` or by
/// which of `manifests` / `layers` is present.
struct ManifestDocument: Codable, Sendable {
    var schemaVersion: Int?
    var mediaType: String?
    var config: Descriptor?
    var layers: [Descriptor]?
    var manifests: [Descriptor]?
    var annotations: [String: String]?

    var isIndex: Bool {
        if let mediaType { return MediaType.isIndex(mediaType) }
        return manifests != nil && config == nil
    }
}

/// The parts of an image configuration (OCI image config / Docker image JSON) Sandpiper uses.
struct ConfigDocument: Decodable, Sendable {
    struct Container: Decodable, Sendable {
        var user: String?
        var env: [String]?
        var entrypoint: [String]?
        var cmd: [String]?
        var workingDir: String?
        var exposedPorts: [String: IgnoredValue]?
        var stopSignal: String?

        enum CodingKeys: String, CodingKey {
            case user = "User"
            case env = "Env"
            case entrypoint = "Entrypoint"
            case cmd = "Cmd"
            case workingDir = "WorkingDir"
            case exposedPorts = "ExposedPorts"
            case stopSignal = "StopSignal"
        }
    }
    struct RootFS: Decodable, Sendable {
        var type: String
        var diffIDs: [Digest]

        enum CodingKeys: String, CodingKey {
            case type
            case diffIDs = "diff_ids"
        }
    }
    var architecture: String?
    var os: String?
    var config: Container?
    var rootfs: RootFS
}

/// Decodes anything and keeps nothing (the `{}` values of `ExposedPorts`).
struct IgnoredValue: Decodable, Sendable {
    init(from decoder: any Decoder) throws {}
}

/// How an image runs: what its config says, in Sandpiper's words.
public struct ImageConfig: Codable, Sendable, Equatable {
    public var entrypoint: [String]?
    public var cmd: [String]?
    public var env: [String]
    public var workingDir: String?
    public var user: String?
    /// `port/proto`, e.g. `8080/tcp`, sorted.
    public var exposedPorts: [String]
    public var stopSignal: String?
    public var architecture: String?
    public var os: String?

    public init(
        entrypoint: [String]? = nil,
        cmd: [String]? = nil,
        env: [String] = [],
        workingDir: String? = nil,
        user: String? = nil,
        exposedPorts: [String] = [],
        stopSignal: String? = nil,
        architecture: String? = nil,
        os: String? = nil
    ) {
        self.entrypoint = entrypoint
        self.cmd = cmd
        self.env = env
        self.workingDir = workingDir
        self.user = user
        self.exposedPorts = exposedPorts
        self.stopSignal = stopSignal
        self.architecture = architecture
        self.os = os
    }

    init(_ document: ConfigDocument) {
        let container = document.config
        self.init(
            entrypoint: container?.entrypoint,
            cmd: container?.cmd,
            env: container?.env ?? [],
            workingDir: container?.workingDir.flatMap { $0.isEmpty ? nil : $0 },
            user: container?.user.flatMap { $0.isEmpty ? nil : $0 },
            exposedPorts: (container?.exposedPorts?.keys).map { Array($0).sorted() } ?? [],
            stopSignal: container?.stopSignal,
            architecture: document.architecture,
            os: document.os
        )
    }

    /// The command line a container of this image runs: entrypoint then cmd.
    public var commandLine: [String] { (entrypoint ?? []) + (cmd ?? []) }
}

/// One layer of a stored image.
public struct LayerRecord: Codable, Sendable, Equatable {
    /// The blob as distributed (compressed or not).
    public var digest: Digest
    /// The digest of the uncompressed tar: names the unpacked directory.
    public var diffID: Digest
    public var size: Int64
    public var mediaType: String
}

/// A stored image: a name, what it was pulled or imported as, its config and its layers (bottom first).
public struct ImageRecord: Codable, Sendable, Equatable {
    /// The canonical reference string (`ImageReference.description`).
    public var name: String
    public var manifestDigest: Digest
    public var configDigest: Digest
    public var layers: [LayerRecord]
    public var config: ImageConfig
    /// `pull` or `import`.
    public var source: String
    public var storedAt: Date

    /// Compressed bytes of all layers.
    public var size: Int64 { layers.reduce(0) { $0 + $1.size } }
}

/// An image ready for the runtime: its config and the unpacked, read-only layer directories.
public struct ResolvedImage: Sendable, Equatable {
    public var record: ImageRecord
    /// Each layer's `rootfs` directory, bottom layer first.
    public var layerDirectories: [String]

    public var config: ImageConfig { record.config }
    /// overlayfs `lowerdir=` value: the top layer first, colon separated.
    public var overlayLowerDirectories: String { layerDirectories.reversed().joined(separator: ":") }
}

/// What a pull or import reports while it works.
public enum ImageProgress: Sendable, Equatable {
    /// The manifest was fetched: the image has `layers` layers, `bytes` compressed bytes in all.
    case resolved(manifest: Digest, layers: Int, bytes: Int64)
    /// Bytes of layer `index` (0-based) received so far.
    case downloading(index: Int, digest: Digest, received: Int64, total: Int64)
    /// Layer `index` is in the store (downloaded, verified, or already there when `cached`).
    case downloaded(index: Int, digest: Digest, cached: Bool)
    /// Layer `index` was unpacked (or was already, when `cached`).
    case unpacked(index: Int, diffID: Digest, cached: Bool, skippedEntries: Int)
    /// The image was stored under `name`.
    case stored(name: String, manifest: Digest)
}

public typealias ImageProgressHandler = @Sendable (ImageProgress) -> Void
