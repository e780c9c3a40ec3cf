import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Writes one blob into the store: to a temporary file, hashing and counting as it goes, refused
/// past its limit (or past the size its descriptor announced), then verified and renamed to
/// `blobs/sha256/<hex>`. A writer dropped without `commit` removes its temporary file.
final class BlobWriter {
    let temporaryPath: String
    let limit: Int64
    let expectedSize: Int64?
    let what: String
    private var fd: Int32
    private var hasher = DigestHasher()
    private var committed = false

    init(temporaryDirectory: String, limit: Int64, expectedSize: Int64?, what: String) throws(SandpiperError) {
        self.temporaryPath = temporaryDirectory + "/blob-" + UUID().uuidString.lowercased()
        self.limit = limit
        self.expectedSize = expectedSize
        self.what = what
        if let expectedSize, expectedSize > limit {
            throw SandpiperError(
                .payloadTooLarge,
                code: "ImageTooLarge",
                "\(what) is \(expectedSize) bytes, over the \(limit) byte limit"
            )
        }
        fd = Glibc.open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw SandpiperError.internalError("cannot create \(temporaryPath): \(FileSystem.errorText())")
        }
    }

    var count: Int64 { hasher.count }

    func write(_ bytes: UnsafeRawBufferPointer) throws(SandpiperError) {
        let total = hasher.count + Int64(bytes.count)
        if let expectedSize, total > expectedSize {
            throw SandpiperError.invalid(
                "\(what) is longer than the \(expectedSize) bytes its descriptor says",
                code: "ImageDigestMismatch"
            )
        }
        guard total <= limit else {
            throw SandpiperError(.payloadTooLarge, code: "ImageTooLarge", "\(what) is over the \(limit) byte limit")
        }
        hasher.update(bytes)
        var offset = 0
        while offset < bytes.count {
            let written = Glibc.write(fd, bytes.baseAddress.map { $0 + offset }, bytes.count - offset)
            if written < 0 {
                if errno == EINTR { continue }
                throw SandpiperError.internalError("cannot write \(what): \(FileSystem.errorText())")
            }
            offset += written
        }
    }

    func write(_ bytes: [UInt8]) throws(SandpiperError) {
        let result = bytes.withUnsafeBytes { raw -> Result<Void, SandpiperError> in
            do throws(SandpiperError) {
                return .success(try write(raw))
            } catch {
                return .failure(error)
            }
        }
        try result.get()
    }

    /// Verifies (digest and size when given), syncs and moves the blob into `blobDirectory`.
    @discardableResult
    func commit(into blobDirectory: String, expected: Digest?) throws(SandpiperError) -> (digest: Digest, size: Int64) {
        let digest = hasher.finalize()
        let size = hasher.count
        defer { discard() }
        if let expectedSize, size != expectedSize {
            throw SandpiperError.invalid(
                "\(what) is \(size) bytes, its descriptor says \(expectedSize)",
                code: "ImageDigestMismatch"
            )
        }
        if let expected, expected != digest {
            throw RegistryClient.digestMismatch(what, expected: expected, actual: digest)
        }
        guard fsync(fd) == 0 else {
            throw SandpiperError.internalError("cannot sync \(what): \(FileSystem.errorText())")
        }
        let final = blobDirectory + "/" + digest.hex
        guard rename(temporaryPath, final) == 0 else {
            throw SandpiperError.internalError("cannot store \(what): \(FileSystem.errorText())")
        }
        committed = true
        return (digest, size)
    }

    func discard() {
        if fd >= 0 {
            Glibc.close(fd)
            fd = -1
        }
        if !committed { unlink(temporaryPath) }
    }

    deinit {
        discard()
    }
}
