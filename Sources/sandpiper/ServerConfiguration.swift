import Foundation
import SandpiperAPI
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Everything `sandpiper serve` needs, from defaults, then the config file, then the
/// environment, then flags (later wins). The file is JSON; every key is documented in
/// docs/configuration.md and unknown keys are refused so that a typo never goes unnoticed.
struct ServerConfiguration: Sendable {
    var host = "127.0.0.1"
    var port = 8080
    var dataDirectory = ServerConfiguration.defaultDataDirectory
    var apiKey: String?
    var logLevel = "info"
    var pythonRuntime =
        ProcessInfo.processInfo.environment["SANDPIPER_PYTHON_RUNTIME"]
        ?? "/var/lib/sandpiper/runtimes/python"
    var uidBase: UInt32 = 230_000
    /// Set in the config file: then only that range is acceptable.
    var uidBaseExplicit = false
    /// PEM files; both set means HTTPS.
    var tlsCertificate: String?
    var tlsKey: String?
    var pools: [PoolConfiguration] = [PoolConfiguration(name: "python")]
    /// Timeouts and connection caps against slow or hostile HTTP clients.
    var http = HTTPLimits()

    static var defaultDataDirectory: String {
        if geteuid() == 0 { return "/var/lib/sandpiper" }
        let home = ProcessInfo.processInfo.environment["HOME"] ?? "/tmp"
        return home + "/.local/share/sandpiper"
    }

    /// Applies a JSON config file.
    mutating func load(file path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SandpiperError.invalid("cannot read config file \(path)")
        }
        let root: JSONValue
        do {
            root = try JSONDecoder().decode(JSONValue.self, from: data)
        } catch {
            throw SandpiperError.invalid("config file \(path) is not valid JSON: \(error)")
        }
        guard case .object(let object) = root else {
            throw SandpiperError.invalid("config file \(path) must hold a JSON object")
        }
        var reader = ConfigObject(object, path: "")
        if let server = try reader.object("server") {
            var server = server
            host = try server.string("host") ?? host
            port = try server.integer("port") ?? port
            dataDirectory = try server.string("dataDirectory") ?? dataDirectory
            apiKey = try server.string("apiKey") ?? apiKey
            logLevel = try server.string("logLevel") ?? logLevel
            if let base = try server.integer("sandboxUidBase") {
                guard base >= 1000, base <= 4_000_000_000 else {
                    throw SandpiperError.invalid("config: server.sandboxUidBase must be between 1000 and 4000000000")
                }
                uidBase = UInt32(base)
                uidBaseExplicit = true
            }
            tlsCertificate = try server.string("tlsCertificate") ?? tlsCertificate
            tlsKey = try server.string("tlsKey") ?? tlsKey
            try Self.httpLimits(&server, into: &http)
            try server.finish()
        }
        if let runtimes = try reader.object("runtimes") {
            var runtimes = runtimes
            pythonRuntime = try runtimes.string("python") ?? pythonRuntime
            try runtimes.finish()
        }
        if let list = try reader.array("pools") {
            pools = []
            for (index, item) in list.enumerated() {
                guard case .object(let fields) = item else {
                    throw SandpiperError.invalid("config: pools[\(index)] must be an object")
                }
                var pool = ConfigObject(fields, path: "pools[\(index)].")
                pools.append(try Self.pool(&pool))
                try pool.finish()
            }
        }
        try reader.finish()
    }

    static func httpLimits(_ server: inout ConfigObject, into limits: inout HTTPLimits) throws {
        func seconds(_ key: String) throws -> Duration? {
            guard let value = try server.double(key) else { return nil }
            guard value > 0, value <= 3600 else {
                throw SandpiperError.invalid("config: server.\(key) must be more than 0 and at most 3600 seconds")
            }
            return .milliseconds(Int64(value * 1000))
        }
        func count(_ key: String, _ range: ClosedRange<Int>) throws -> Int? {
            guard let value = try server.integer(key) else { return nil }
            guard range.contains(value) else {
                throw SandpiperError.invalid(
                    "config: server.\(key) must be between \(range.lowerBound) and \(range.upperBound)"
                )
            }
            return value
        }
        limits.requestHeadTimeout = try seconds("requestHeadTimeoutSeconds") ?? limits.requestHeadTimeout
        limits.requestBodyTimeout = try seconds("requestBodyTimeoutSeconds") ?? limits.requestBodyTimeout
        limits.maxConnections = try count("maxConnections", 1...1_000_000) ?? limits.maxConnections
        limits.maxConnectionsPerClient =
            try count("maxConnectionsPerClient", 1...1_000_000) ?? limits.maxConnectionsPerClient
        limits.maxHeaderBytes = try count("maxHeaderBytes", 1024...1_048_576) ?? limits.maxHeaderBytes
        limits.maxHeaderCount = try count("maxHeaderCount", 8...10_000) ?? limits.maxHeaderCount
    }

    static func pool(_ reader: inout ConfigObject) throws -> PoolConfiguration {
        guard let name = try reader.string("name") else {
            throw SandpiperError.invalid("config: \(reader.path)name is required")
        }
        var pool = PoolConfiguration(name: name)
        if let type = try reader.string("type") { pool.type = try PoolType(caseInsensitive: type) }
        pool.readySessionInstances = try reader.integer("readySessionInstances") ?? pool.readySessionInstances
        pool.maxConcurrentSessions = try reader.integer("maxConcurrentSessions") ?? pool.maxConcurrentSessions
        pool.cooldownPeriodInSeconds = try reader.integer("cooldownPeriodInSeconds") ?? pool.cooldownPeriodInSeconds
        pool.egressEnabled = try reader.bool("egressEnabled") ?? pool.egressEnabled
        if let isolation = try reader.string("isolation") {
            pool.isolation = try IsolationTier(caseInsensitive: isolation)
        }
        if let launch = try reader.string("launch") {
            do {
                pool.launch = try LaunchMode(caseInsensitive: launch)
            } catch {
                throw SandpiperError.invalid("config: \(reader.path)launch: \(error.message)")
            }
        }
        pool.maxExecutionSeconds = try reader.integer("maxExecutionSeconds") ?? pool.maxExecutionSeconds
        pool.defaultExecutionSeconds =
            try reader.integer("defaultExecutionSeconds") ?? min(pool.defaultExecutionSeconds, pool.maxExecutionSeconds)
        pool.maxUploadBytes = try reader.size("maxUploadSize") ?? pool.maxUploadBytes
        if let limits = try reader.object("limits") {
            var limits = limits
            pool.limits.memoryBytes = try limits.size("memory") ?? pool.limits.memoryBytes
            pool.limits.cpus = try limits.double("cpus") ?? pool.limits.cpus
            pool.limits.pids = try limits.integer("pids") ?? pool.limits.pids
            pool.limits.diskBytes = try limits.size("disk") ?? pool.limits.diskBytes
            pool.limits.tmpBytes = try limits.size("tmp") ?? pool.limits.tmpBytes
            try limits.finish()
        }
        if let container = try reader.object("container") {
            var container = container
            pool.container = try Self.container(&container, limits: &pool.limits)
            try container.finish()
        }
        try pool.validate()
        return pool
    }

    /// A `CustomContainer` pool's `container` object (Azure's container template, flattened).
    static func container(_ reader: inout ConfigObject, limits: inout SessionLimits) throws -> ContainerTemplate {
        guard let image = try reader.string("image") else {
            throw SandpiperError.invalid("config: \(reader.path)image is required")
        }
        guard let port = try reader.integer("targetPort") else {
            throw SandpiperError.invalid(
                "config: \(reader.path)targetPort is required (the port the container serves HTTP on)"
            )
        }
        var template = ContainerTemplate(image: image, targetPort: port)
        template.command = try reader.stringArray("command")
        template.args = try reader.stringArray("args")
        if let list = try reader.array("env") {
            for (index, item) in list.enumerated() {
                guard case .object(let fields) = item else {
                    throw SandpiperError.invalid("config: \(reader.path)env[\(index)] must be an object {name, value}")
                }
                var variable = ConfigObject(fields, path: reader.path + "env[\(index)].")
                guard let name = try variable.string("name") else {
                    throw SandpiperError.invalid("config: \(variable.path)name is required")
                }
                template.environment.append(.init(name: name, value: try variable.string("value") ?? ""))
                try variable.finish()
            }
        }
        if let resources = try reader.object("resources") {
            var resources = resources
            limits.cpus = try resources.double("cpu") ?? limits.cpus
            limits.memoryBytes = try resources.size("memory") ?? limits.memoryBytes
            try resources.finish()
        }
        if let list = try reader.array("probes") {
            for (index, item) in list.enumerated() {
                guard case .object(let fields) = item else {
                    throw SandpiperError.invalid("config: \(reader.path)probes[\(index)] must be an object")
                }
                var probe = ConfigObject(fields, path: reader.path + "probes[\(index)].")
                let (kind, parsed) = try Self.probe(&probe)
                try probe.finish()
                switch kind {
                case "startup":
                    guard template.startupProbe == nil else {
                        throw SandpiperError.invalid("config: \(reader.path)probes has two Startup probes")
                    }
                    template.startupProbe = parsed
                default:
                    guard template.livenessProbe == nil else {
                        throw SandpiperError.invalid("config: \(reader.path)probes has two Liveness probes")
                    }
                    template.livenessProbe = parsed
                }
            }
        }
        if let credentials = try reader.object("registryCredentials") {
            var credentials = credentials
            template.registry = try Self.registry(&credentials)
            try credentials.finish()
        }
        if let lifecycle = try reader.object("lifecycle") {
            var lifecycle = lifecycle
            if let type = try lifecycle.string("type") {
                template.lifecycle.type = try ContainerLifecycle.Kind(caseInsensitive: type)
            }
            template.lifecycle.maxAlivePeriodInSeconds = try lifecycle.integer("maxAlivePeriodInSeconds")
            try lifecycle.finish()
        }
        return template
    }

    /// `container.registryCredentials`: Azure's keys, with `passwordSecretRef` naming the server's
    /// environment variable that holds the password (a password never sits in the file).
    static func registry(_ reader: inout ConfigObject) throws -> ContainerRegistrySettings {
        if reader.fields["password"] != nil {
            throw SandpiperError.invalid(
                "config: \(reader.path)password is not accepted: put the password in an environment variable of the "
                    + "server and name that variable in \(reader.path)passwordSecretRef"
            )
        }
        return ContainerRegistrySettings(
            server: try reader.string("server"),
            username: try reader.string("username"),
            passwordVariable: try reader.string("passwordSecretRef"),
            insecure: try reader.bool("insecure") ?? false
        )
    }

    static func probe(_ reader: inout ConfigObject) throws -> (String, ContainerProbe) {
        let path = reader.path
        guard let type = try reader.string("type")?.lowercased(), ["startup", "liveness"].contains(type) else {
            throw SandpiperError.invalid(
                "config: \(path)type must be Startup or Liveness (readiness probes are not supported)"
            )
        }
        let http = try reader.object("httpGet")
        let tcp = try reader.object("tcpSocket")
        let action: ContainerProbe.Action
        switch (http, tcp) {
        case (var http?, nil):
            let probePath = try http.string("path") ?? "/"
            guard let port = try http.integer("port") else {
                throw SandpiperError.invalid("config: \(path)httpGet.port is required")
            }
            try http.finish()
            action = .httpGet(path: probePath, port: port)
        case (nil, var tcp?):
            guard let port = try tcp.integer("port") else {
                throw SandpiperError.invalid("config: \(path)tcpSocket.port is required")
            }
            try tcp.finish()
            action = .tcpSocket(port: port)
        default:
            throw SandpiperError.invalid("config: \(path) needs exactly one of httpGet or tcpSocket")
        }
        var probe = ContainerProbe(action: action)
        probe.initialDelaySeconds = try reader.integer("initialDelaySeconds") ?? probe.initialDelaySeconds
        probe.periodSeconds = try reader.integer("periodSeconds") ?? probe.periodSeconds
        probe.failureThreshold = try reader.integer("failureThreshold") ?? probe.failureThreshold
        probe.timeoutSeconds = try reader.integer("timeoutSeconds") ?? probe.timeoutSeconds
        return (type, probe)
    }

    /// Applies `SANDPIPER_*` environment variables.
    mutating func loadEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment) {
        if let key = environment["SANDPIPER_API_KEY"], !key.isEmpty { apiKey = key }
        if let dir = environment["SANDPIPER_DATA_DIR"], !dir.isEmpty { dataDirectory = dir }
        if let level = environment["SANDPIPER_LOG_LEVEL"], !level.isEmpty { logLevel = level }
    }

    func validate() throws {
        guard (0...65535).contains(port) else { throw SandpiperError.invalid("port must be between 0 and 65535") }
        guard !pools.isEmpty else { throw SandpiperError.invalid("config: at least one pool is required") }
        var seen = Set<String>()
        for pool in pools {
            try pool.validate()
            guard seen.insert(pool.name).inserted else {
                throw SandpiperError.invalid("config: pool '\(pool.name)' is defined twice")
            }
        }
        if (tlsCertificate == nil) != (tlsKey == nil) {
            throw SandpiperError.invalid("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        }
        if let apiKey, apiKey.utf8.count < 16 {
            throw SandpiperError.invalid("the API key must be at least 16 characters")
        }
    }
}

/// Reads one JSON object of the config file, remembering which keys were used.
struct ConfigObject {
    let fields: [String: JSONValue]
    private var used: Set<String> = []
    let path: String

    init(_ fields: [String: JSONValue], path: String) {
        self.fields = fields
        self.path = path
    }

    private mutating func take(_ key: String) -> JSONValue? {
        used.insert(key)
        if case .null? = fields[key] { return nil }
        return fields[key]
    }

    private func wrong(_ key: String, _ expected: String) -> SandpiperError {
        SandpiperError.invalid("config: \(path)\(key) must be \(expected)")
    }

    mutating func string(_ key: String) throws -> String? {
        switch take(key) {
        case nil: return nil
        case .string(let value)?: return value
        default: throw wrong(key, "a string")
        }
    }

    mutating func integer(_ key: String) throws -> Int? {
        switch take(key) {
        case nil: return nil
        case .integer(let value)?: return Int(clamping: value)
        case .number(let value)? where value.rounded() == value && abs(value) < 1e15: return Int(value)
        default: throw wrong(key, "an integer")
        }
    }

    mutating func double(_ key: String) throws -> Double? {
        switch take(key) {
        case nil: return nil
        case .integer(let value)?: return Double(value)
        case .number(let value)?: return value
        default: throw wrong(key, "a number")
        }
    }

    mutating func bool(_ key: String) throws -> Bool? {
        switch take(key) {
        case nil: return nil
        case .bool(let value)?: return value
        default: throw wrong(key, "true or false")
        }
    }

    /// Bytes as a number or a string with a unit: "512Mi", "1Gi", "128MB", "64k".
    mutating func size(_ key: String) throws -> Int64? {
        switch take(key) {
        case nil: return nil
        case .integer(let value)?: return value
        case .string(let text)?:
            guard let bytes = Self.parseSize(text) else {
                throw wrong(key, "a size like 512Mi, 1Gi or a number of bytes")
            }
            return bytes
        default: throw wrong(key, "a size like 512Mi, 1Gi or a number of bytes")
        }
    }

    mutating func stringArray(_ key: String) throws -> [String]? {
        switch take(key) {
        case nil: return nil
        case .array(let items)?:
            return try items.map { item in
                guard case .string(let text) = item else { throw wrong(key, "an array of strings") }
                return text
            }
        default: throw wrong(key, "an array of strings")
        }
    }

    mutating func object(_ key: String) throws -> ConfigObject? {
        switch take(key) {
        case nil: return nil
        case .object(let value)?: return ConfigObject(value, path: path + key + ".")
        default: throw wrong(key, "an object")
        }
    }

    mutating func array(_ key: String) throws -> [JSONValue]? {
        switch take(key) {
        case nil: return nil
        case .array(let value)?: return value
        default: throw wrong(key, "an array")
        }
    }

    func finish() throws {
        let unknown = Set(fields.keys).subtracting(used).sorted()
        if let first = unknown.first {
            throw SandpiperError.invalid("config: unknown key '\(path)\(first)'")
        }
    }

    static func parseSize(_ text: String) -> Int64? {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let digits = trimmed.prefix { $0.isNumber || $0 == "." }
        let unit = trimmed.dropFirst(digits.count).trimmingCharacters(in: .whitespaces).lowercased()
        guard let number = Double(digits), number >= 0 else { return nil }
        let multipliers: [String: Double] = [
            "": 1, "b": 1, "k": 1e3, "kb": 1e3, "ki": 1024, "kib": 1024, "m": 1e6, "mb": 1e6, "mi": 1_048_576,
            "mib": 1_048_576, "g": 1e9, "gb": 1e9, "gi": 1_073_741_824, "gib": 1_073_741_824,
        ]
        guard let multiplier = multipliers[unit] else { return nil }
        let value = number * multiplier
        guard value < 9e18 else { return nil }
        return Int64(value)
    }
}
