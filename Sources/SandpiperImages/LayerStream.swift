import CSandpiperShims
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// A layer blob read as its uncompressed tar stream. The compression is told by the blob's first
/// bytes (not its media type, which registries get wrong): gzip and zstd blobs are decompressed
/// by a `gzip -dc` / `zstd -dc` child reading the blob file and writing a pipe; plain tar is read
/// from the file.
final class LayerStream {
    enum Compression: String, Sendable {
        case none
        case gzip
        case zstd
    }

    let fd: Int32
    let compression: Compression
    private var child: pid_t?
    private var closed = false

    static let gzipTools = ["/usr/bin/gzip", "/bin/gzip"]
    static let zstdTools = ["/usr/bin/zstd", "/bin/zstd"]

    init(blobPath: String) throws(SandpiperError) {
        let blob = Glibc.open(blobPath, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        guard blob >= 0 else {
            throw SandpiperError.internalError("cannot open layer blob \(blobPath): \(FileSystem.errorText())")
        }
        var magic = [UInt8](repeating: 0, count: 4)
        let count = magic.withUnsafeMutableBytes { pread(blob, $0.baseAddress, 4, 0) }
        if count >= 2 && magic[0] == 0x1f && magic[1] == 0x8b {
            compression = .gzip
        } else if count == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            compression = .zstd
        } else {
            compression = .none
        }
        if compression == .none {
            fd = blob
            return
        }
        defer { Glibc.close(blob) }
        let tools = compression == .gzip ? Self.gzipTools : Self.zstdTools
        guard let tool = tools.first(where: { access($0, X_OK) == 0 }) else {
            throw SandpiperError(
                .unsupported,
                code: "UnsupportedLayerCompression",
                "the layer is \(compression.rawValue)-compressed and \(tools[0]) is not installed"
            )
        }
        var pipe: [Int32] = [-1, -1]
        guard sandpiper_pipe_cloexec(&pipe) == 0 else {
            throw SandpiperError.internalError("pipe failed: \(FileSystem.errorText())")
        }
        let devNull = Glibc.open("/dev/null", O_WRONLY | O_CLOEXEC)
        defer { if devNull >= 0 { Glibc.close(devNull) } }
        let arguments = [tool, "-dc"]
        let argv = arguments.map { strdup($0) } + [nil]
        let environment: [String] = ["PATH=/usr/bin:/bin", "LC_ALL=C"]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let table: [Int32] = [blob, pipe[1], devNull >= 0 ? devNull : pipe[1]]
        let rc = table.withUnsafeBufferPointer {
            sandpiper_spawn(&pid, tool, argv, envp, $0.baseAddress, Int32($0.count))
        }
        Glibc.close(pipe[1])
        guard rc == 0 else {
            Glibc.close(pipe[0])
            throw SandpiperError.internalError("cannot start \(tool): \(FileSystem.errorText(rc))")
        }
        fd = pipe[0]
        child = pid
    }

    /// Closes the stream and checks the decompressor succeeded (it must have read the whole blob).
    func finish() throws(SandpiperError) {
        let status = close()
        guard let status else { return }
        guard status == 0 else {
            throw SandpiperError.invalid(
                "the layer's \(compression.rawValue) data is corrupt (the decompressor exited with status \(status))",
                code: "InvalidImageLayer"
            )
        }
    }

    /// Closes the stream, stopping a decompressor that is still writing. Returns its exit status.
    @discardableResult
    func close() -> Int32? {
        guard !closed else { return nil }
        closed = true
        Glibc.close(fd)
        guard let pid = child else { return nil }
        child = nil
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        // Exited normally: the exit code; killed (SIGPIPE after an early close): 128 + signal.
        if status & 0x7f == 0 { return (status >> 8) & 0xff }
        return 128 + (status & 0x7f)
    }

    deinit {
        close()
    }
}
