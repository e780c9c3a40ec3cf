import Foundation
import Logging
import SandpiperCore
import Synchronization

extension ImageStore {
    /// The image a custom pool runs, as `sandpiper serve` finds it at start: from the store, or,
    /// when the store lacks it and `template.image` is a registry reference, pulled first (with
    /// `template.registry`'s credentials and `insecure` flag, the password read from `environment`).
    /// Progress goes to `logger` at info level. Every error names the pool and the image; a failed
    /// pull carries the registry's error code (`RegistryUnauthorized`, `ImageNotFound`, …).
    public func resolveOrPull(
        pool: String,
        template: ContainerTemplate,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        platform: ImagePlatform = .host,
        logger: Logger
    ) async throws(SandpiperError) -> ResolvedImage {
        let image = template.image
        do {
            return try resolve(image)
        } catch  where error.code != "ImageNotFound" && error.code != "ImageLayerMissing" {
            throw SandpiperError(error.kind, code: error.code, "pool '\(pool)': image '\(image)': \(error.message)")
        } catch {
            // Not in the store (or incomplete): pull it when the reference names a registry image.
        }
        let reference: ImageReference
        do throws(SandpiperError) {
            guard Self.digestPrefix(image) == nil else {
                throw SandpiperError.invalid("a digest prefix names no registry")
            }
            reference = try ImageReference(parsing: image)
        } catch {
            throw SandpiperError(
                .unavailable,
                code: "ContainerImageNotFound",
                "pool '\(pool)': image '\(image)' is not in the local image store and is not a registry reference "
                    + "(\(error.message)); fetch it first with `sandpiper image import FILE --tag NAME` "
                    + "(same --data-dir as the server)"
            )
        }
        let settings = template.registry ?? ContainerRegistrySettings()
        let credentials = try Self.credentials(settings, for: reference, pool: pool, environment: environment)
        try await pullForPool(
            pool,
            reference,
            credentials: credentials,
            insecure: settings.insecure,
            platform: platform,
            logger: logger
        )
        do {
            return try resolve(reference.description)
        } catch {
            throw SandpiperError(error.kind, code: error.code, "pool '\(pool)': image '\(image)': \(error.message)")
        }
    }

    private func pullForPool(
        _ pool: String,
        _ reference: ImageReference,
        credentials: RegistryCredentials?,
        insecure: Bool,
        platform: ImagePlatform,
        logger: Logger
    ) async throws(SandpiperError) {
        var metadata: Logger.Metadata = [
            "pool": "\(pool)", "image": "\(reference)", "registry": "\(reference.registry)",
            "authenticated": "\(credentials != nil)", "insecure": "\(insecure)",
        ]
        logger.info("pulling custom container pool image (not in the local store)", metadata: metadata)
        let started = ContinuousClock.now
        let describer = ImageProgressDescriber()
        let record: ImageRecord
        do {
            record = try await pull(reference, credentials: credentials, insecure: insecure, platform: platform) {
                event in
                let line = describer.line(for: event)
                switch event {
                case .resolved, .downloaded(_, _, false):
                    logger.info("image pull: \(line)", metadata: ["pool": "\(pool)", "image": "\(reference)"])
                default:
                    logger.debug("image pull: \(line)", metadata: ["pool": "\(pool)", "image": "\(reference)"])
                }
            }
        } catch {
            throw SandpiperError(
                error.kind,
                code: error.code,
                "pool '\(pool)': cannot pull image '\(reference)' from registry \(reference.registry): "
                    + "\(error.code): \(error.message)"
            )
        }
        let elapsed = ContinuousClock.now - started
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        metadata["manifest"] = "\(record.manifestDigest)"
        metadata["layers"] = "\(record.layers.count)"
        metadata["bytes"] = "\(record.size)"
        metadata["seconds"] = "\(String(format: "%.2f", seconds))"
        let summary =
            "\(record.layers.count) layer(s), \(ImageProgressDescriber.bytes(record.size)) in "
            + String(format: "%.1f s", seconds)
        logger.info("pulled custom container pool image: \(summary)", metadata: metadata)
    }

    /// The hex digits when `text` is a manifest digest or a prefix of one (12 digits at least).
    static func digestPrefix(_ text: String) -> String? {
        let trimmed = text.trimmingWhitespace()
        let hex = trimmed.hasPrefix("sha256:") ? String(trimmed.dropFirst(7)) : trimmed
        return hex.count >= 12 && hex.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) ? hex : nil
    }

    /// The pool's registry credentials, checked against the image's registry (credentials for one
    /// registry are never sent to another).
    static func credentials(
        _ settings: ContainerRegistrySettings,
        for reference: ImageReference,
        pool: String,
        environment: [String: String]
    ) throws(SandpiperError) -> RegistryCredentials? {
        if let server = settings.server?.lowercased(), server != reference.registry, server != reference.apiHost {
            throw SandpiperError.invalid(
                "pool '\(pool)': container.registryCredentials.server is '\(server)' but image '\(reference)' is on "
                    + "registry '\(reference.registry)'; name the registry in the image (\(server)/…)"
            )
        }
        do {
            return try settings.credentials(from: environment).map { RegistryCredentials(username: $0, password: $1) }
        } catch {
            throw SandpiperError(error.kind, code: error.code, "pool '\(pool)': \(error.message)")
        }
    }
}

/// One line per pull or import progress event, for the CLI's stderr and the server's log.
public final class ImageProgressDescriber: Sendable {
    private let layers = Mutex(0)

    public init() {}

    public func line(for event: ImageProgress) -> String {
        let bytes = Self.bytes
        switch event {
        case .resolved(let manifest, let count, let total):
            layers.withLock { $0 = count }
            return "manifest \(manifest): \(count) layer(s), \(bytes(total))"
        case .downloading(let index, let digest, let received, let total):
            return "layer \(index + 1)/\(layerCount) \(digest.short): \(bytes(received)) / \(bytes(total))"
        case .downloaded(let index, let digest, let cached):
            return "layer \(index + 1)/\(layerCount) \(digest.short): \(cached ? "already present" : "downloaded")"
        case .unpacked(let index, let diffID, let cached, let skipped):
            let note = skipped > 0 ? " (\(skipped) device/FIFO member(s) skipped)" : ""
            return
                "layer \(index + 1)/\(layerCount) \(diffID.short): \(cached ? "already unpacked" : "unpacked")\(note)"
        case .stored(let name, let manifest):
            return "stored \(name) (\(manifest.short))"
        }
    }

    private var layerCount: Int { layers.withLock { $0 } }

    /// `512 B`, `1.5 MiB`, …
    public static func bytes(_ count: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : String(format: "%.1f ", value) + units[unit]
    }
}
