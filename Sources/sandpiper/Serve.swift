import ArgumentParser
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOSSL
import SandpiperAPI
import SandpiperCore
import SandpiperImages
import SandpiperSandbox
import SandpiperSessions
import SandpiperStore

#if canImport(Glibc)
    import Glibc
#endif

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the server: the data-plane API on HOST:PORT and one pool per configured pool."
    )

    @Option(help: "Address to listen on (default 127.0.0.1).") var host: String?
    @Option(help: "Port to listen on (default 8080; 0 picks a free port).") var port: Int?
    @Option(help: "JSON config file with server settings and pools (see docs/configuration.md).") var config: String?
    @Option(name: .customLong("data-dir"), help: "State directory (default /var/lib/sandpiper as root).")
    var dataDirectory: String?
    @Option(name: .customLong("python-runtime"), help: "The sandbox Python venv made by `make setup`.")
    var pythonRuntime: String?
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error.") var logLevel: String?
    @Option(name: .customLong("tls-cert"), help: "PEM certificate (chain) file: serve HTTPS.") var tlsCertificate:
        String?
    @Option(name: .customLong("tls-key"), help: "PEM private key file for --tls-cert.") var tlsKey: String?
    @Option(name: .customLong("port-file"), help: "Write the bound port to this file once listening (for tests).")
    var portFile: String?

    func run() async throws {
        var settings = ServerConfiguration()
        do {
            let configPath = config ?? ProcessInfo.processInfo.environment["SANDPIPER_CONFIG"]
            if let configPath { try settings.load(file: configPath) }
            settings.loadEnvironment()
            if let host { settings.host = host }
            if let port { settings.port = port }
            if let dataDirectory { settings.dataDirectory = dataDirectory }
            if let pythonRuntime { settings.pythonRuntime = pythonRuntime }
            if let logLevel { settings.logLevel = logLevel }
            if let tlsCertificate { settings.tlsCertificate = tlsCertificate }
            if let tlsKey { settings.tlsKey = tlsKey }
            try settings.validate()
        } catch let error as SandpiperError {
            throw ValidationError(error.message)
        }
        guard let level = Logger.Level(rawValue: settings.logLevel) else {
            throw ValidationError("unknown log level '\(settings.logLevel)'")
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "sandpiper")
        do {
            try await serve(settings, logger: logger)
        } catch let error as SandpiperError {
            logger.critical("cannot start: \(error.message)")
            throw ExitCode(1)
        }
    }

    func serve(_ settings: ServerConfiguration, logger: Logger) async throws {
        try FileManager.default.createDirectory(atPath: settings.dataDirectory, withIntermediateDirectories: true)
        chmod(settings.dataDirectory, 0o711)
        FileDescriptorLimit.raise(toServe: settings.http.maxConnections, logger: logger)
        let apiKey = try settings.apiKey ?? APIKeyFile.loadOrCreate(in: settings.dataDirectory)
        let store = try SQLiteStore(path: settings.dataDirectory + "/sandpiper.sqlite")
        let backend = try NamespaceBackend(
            configuration: .init(
                stateDirectory: settings.dataDirectory,
                pythonRuntime: settings.pythonRuntime,
                agentsDirectory: NamespaceBackend.bundledAgentsDirectory,
                uidRange: try UIDRangeLock.acquire(base: settings.uidBase, explicit: settings.uidBaseExplicit),
                inheritAgentStderr: settings.logLevel == "trace"
            ),
            records: store,
            logger: logger
        )
        try await resolveImages(settings, backend: backend, logger: logger)
        for pool in settings.pools { try backend.validate(pool) }
        let pools = settings.pools.map { SessionPool(configuration: $0, backend: backend, logger: logger) }
        let sessions = SessionManager(pools: pools, backends: [backend], logger: logger)
        // Before the port opens: a request could otherwise start a sandbox that this then removes.
        await sessions.removeLeftovers()
        let router = buildRouter(
            sessions: sessions,
            apiKey: apiKey,
            scheme: settings.tlsCertificate == nil ? "http" : "https"
        )
        let host = settings.host
        let portFile = portFile
        let poolNames = settings.pools.map(\.name)
        let limits = settings.http
        let connections = ClientConnectionRegistry(logger: logger)
        let http1 = limits.http1Server(registry: connections)
        let server =
            try settings.tlsCertificate.map { _ in
                try HTTPServerBuilder.tls(http1, tlsConfiguration: tlsConfiguration(settings))
            } ?? http1
        let scheme = settings.tlsCertificate == nil ? "http" : "https"
        let app = Application(
            router: router,
            server: server,
            configuration: .init(
                address: .hostname(host, port: settings.port),
                serverName: "Sandpiper",
                availableConnectionsDelegate: MaximumAvailableConnections(limits.maxConnections, logger: logger)
            ),
            services: [sessions],
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? settings.port
                let base = "\(scheme)://\(host.contains(":") ? "[\(host)]" : host):\(port)"
                var lines = ["Sandpiper is listening on \(base)"]
                for name in poolNames { lines.append("  pool endpoint: \(base)/pools/\(name)") }
                lines.append("  API key:       \(apiKey)")
                lines.append(
                    "  try: curl -s -X POST '\(base)/pools/\(poolNames[0])/code/execute?identifier=demo-1' "
                        + "-H 'Authorization: Bearer \(apiKey)' -H 'Content-Type: application/json' "
                        + "-d '{\"properties\":{\"code\":\"1+1\"}}'"
                )
                print(lines.joined(separator: "\n"))
                fflush(nil)
                if let portFile { try? "\(port)\n".write(toFile: portFile, atomically: true, encoding: .utf8) }
            },
            logger: logger
        )
        try await app.runService()
    }
}

/// Custom container pools run images of the local store: each pool's image is resolved once, at
/// start, and pulled first when the store lacks it and it names a registry image
/// (`ImageStore.resolveOrPull`); a failed pull stops the server with the registry's error.
func resolveImages(_ settings: ServerConfiguration, backend: NamespaceBackend, logger: Logger) async throws {
    let custom = settings.pools.filter { $0.type == .customContainer }
    guard !custom.isEmpty else { return }
    let store = try ImageStore(dataDirectory: settings.dataDirectory, logger: logger)
    for pool in custom {
        guard let template = pool.container else { continue }
        let resolved = try await store.resolveOrPull(pool: pool.name, template: template, logger: logger)
        let config = resolved.config
        backend.register(
            image: ContainerImage(
                name: resolved.record.name,
                digest: resolved.record.manifestDigest.description,
                lowerDirectories: resolved.layerDirectories.reversed(),
                entrypoint: config.entrypoint ?? [],
                cmd: config.cmd ?? [],
                environment: config.env,
                workingDirectory: config.workingDir,
                user: config.user
            ),
            forPool: pool.name
        )
        logger.info(
            "custom container pool image resolved",
            metadata: [
                "pool": "\(pool.name)", "image": "\(resolved.record.name)",
                "layers": "\(resolved.layerDirectories.count)",
            ]
        )
    }
}

func tlsConfiguration(_ settings: ServerConfiguration) throws -> TLSConfiguration {
    guard let certificatePath = settings.tlsCertificate, let keyPath = settings.tlsKey else {
        throw SandpiperError.invalid("TLS needs both a certificate and a key")
    }
    do {
        let chain = try NIOSSLCertificate.fromPEMFile(certificatePath)
        let key = try NIOSSLPrivateKey(file: keyPath, format: .pem)
        return TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) },
            privateKey: .privateKey(key)
        )
    } catch {
        throw SandpiperError.invalid("cannot load the TLS certificate \(certificatePath) or key \(keyPath): \(error)")
    }
}

/// The generated API key, kept (mode 0600) in the data directory so restarts keep it.
enum APIKeyFile {
    static func loadOrCreate(in directory: String) throws -> String {
        let path = directory + "/api-key"
        if let existing = try? String(contentsOfFile: path, encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines), existing.utf8.count >= 16
        {
            return existing
        }
        var generator = SystemRandomNumberGenerator()  // getrandom(2)
        let bytes = (0..<24).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        let key = "sp-" + bytes.map { String(format: "%02x", $0) }.joined()
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SandpiperError.internalError("cannot write \(path)") }
        defer { close(fd) }
        let line = Array((key + "\n").utf8)
        _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        return key
    }
}

/// Connections and sandboxes both hold descriptors: take the whole hard limit, and say so when
/// it is too small for the connection cap (sandboxes inherit nothing of it: they get their own).
enum FileDescriptorLimit {
    static func raise(toServe connections: Int, logger: Logger) {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        let wanted = rlim_t(connections) * 2 + 1024
        if limit.rlim_cur < wanted {
            logger.warning(
                "the open-file limit is low for server.maxConnections",
                metadata: ["nofile": "\(limit.rlim_cur)", "maxConnections": "\(connections)", "wanted": "\(wanted)"]
            )
        }
    }
}
