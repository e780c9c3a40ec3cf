import Foundation

/// The container a `CustomContainer` pool runs per session (Azure's `customContainerTemplate`,
/// one container, plus `ingress.targetPort` and the lifecycle).
public struct ContainerTemplate: Sendable, Equatable {
    /// A name or digest of an image in the local image store (`sandpiper image pull`/`import`), or a
    /// registry reference the server pulls at start when the store does not have it.
    public var image: String
    /// How to reach the image's registry when it must be pulled (Azure's `registryCredentials`).
    public var registry: ContainerRegistrySettings?
    /// Replaces the image's Entrypoint (and then its Cmd too, as Kubernetes does).
    public var command: [String]?
    /// Replaces the image's Cmd.
    public var args: [String]?
    /// Added to (and overriding) the image's environment, in order.
    public var environment: [EnvironmentVariable]
    /// The HTTP port the container serves on; the pool proxies every request to it.
    public var targetPort: Int
    public var startupProbe: ContainerProbe?
    public var livenessProbe: ContainerProbe?
    public var lifecycle: ContainerLifecycle

    public init(
        image: String,
        command: [String]? = nil,
        args: [String]? = nil,
        environment: [EnvironmentVariable] = [],
        targetPort: Int,
        startupProbe: ContainerProbe? = nil,
        livenessProbe: ContainerProbe? = nil,
        lifecycle: ContainerLifecycle = ContainerLifecycle(),
        registry: ContainerRegistrySettings? = nil
    ) {
        self.image = image
        self.registry = registry
        self.command = command
        self.args = args
        self.environment = environment
        self.targetPort = targetPort
        self.startupProbe = startupProbe
        self.livenessProbe = livenessProbe
        self.lifecycle = lifecycle
    }

    public struct EnvironmentVariable: Sendable, Equatable {
        public var name: String
        public var value: String

        public init(name: String, value: String) {
            self.name = name
            self.value = value
        }
    }

    /// Checks every field; messages name the field (`container.probes[0].periodSeconds`).
    public func validate() throws(SandpiperError) {
        guard !image.trimmingCharacters(in: .whitespaces).isEmpty else {
            throw SandpiperError.invalid("container.image is required")
        }
        guard (1...65535).contains(targetPort) else {
            throw SandpiperError.invalid("container.targetPort must be between 1 and 65535")
        }
        if let command, command.isEmpty || command[0].isEmpty {
            throw SandpiperError.invalid("container.command must name a program when given")
        }
        for variable in environment {
            guard !variable.name.isEmpty, !variable.name.contains("="), !variable.name.contains("\0"),
                !variable.value.contains("\0")
            else {
                throw SandpiperError.invalid("container.env: '\(variable.name)' is not a valid variable name")
            }
        }
        try registry?.validate()
        try startupProbe?.validate(field: "container.probes (Startup)")
        try livenessProbe?.validate(field: "container.probes (Liveness)")
        if lifecycle.type == .onContainerExit {
            guard let alive = lifecycle.maxAlivePeriodInSeconds, alive >= 1, alive <= 86_400 * 7 else {
                throw SandpiperError.invalid(
                    "container.lifecycle.maxAlivePeriodInSeconds must be between 1 and 604800 for OnContainerExit"
                )
            }
        }
    }
}

/// Where a custom pool's image is pulled from when the local store lacks it (Azure's
/// `customContainerTemplate.registryCredentials`). The password is never in the configuration:
/// `passwordSecretRef` names the server's environment variable that holds it.
public struct ContainerRegistrySettings: Sendable, Equatable {
    /// The registry the credentials are for (`host[:port]`); when set, the image must name it.
    public var server: String?
    public var username: String?
    /// The environment variable holding the password (config key `passwordSecretRef`).
    public var passwordVariable: String?
    /// Plain HTTP instead of TLS (`sandpiper image pull --insecure`).
    public var insecure: Bool

    public init(server: String? = nil, username: String? = nil, passwordVariable: String? = nil, insecure: Bool = false)
    {
        self.server = server
        self.username = username
        self.passwordVariable = passwordVariable
        self.insecure = insecure
    }

    /// The user name and password to send, read from `environment`; nil for anonymous pulls.
    public func credentials(from environment: [String: String]) throws(SandpiperError) -> (String, String)? {
        guard let username, let passwordVariable else { return nil }
        guard let password = environment[passwordVariable], !password.isEmpty else {
            throw SandpiperError.invalid(
                "container.registryCredentials.passwordSecretRef names the environment variable '\(passwordVariable)', "
                    + "which is not set or empty in the server's environment"
            )
        }
        return (username, password)
    }

    func validate() throws(SandpiperError) {
        if let server, server.isEmpty || server.contains("/") || server.contains(where: \.isWhitespace) {
            throw SandpiperError.invalid(
                "container.registryCredentials.server must be a registry host[:port], without a scheme or path"
            )
        }
        if (username ?? "").isEmpty != (passwordVariable ?? "").isEmpty {
            throw SandpiperError.invalid(
                "container.registryCredentials needs both username and passwordSecretRef (the environment variable "
                    + "holding the password), or neither"
            )
        }
        if let passwordVariable,
            !passwordVariable.allSatisfy({ $0 == "_" || ($0.isASCII && ($0.isLetter || $0.isNumber)) })
                || passwordVariable.first?.isNumber == true
        {
            throw SandpiperError.invalid(
                "container.registryCredentials.passwordSecretRef '\(passwordVariable)' is not an environment variable "
                    + "name (letters, digits and _)"
            )
        }
    }
}

/// How a session of a custom pool ends.
public struct ContainerLifecycle: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        /// Idle for `cooldownPeriodInSeconds` (every proxied request resets it), or the container exits.
        case timed = "Timed"
        /// The container exits, or `maxAlivePeriodInSeconds` after the session was allocated.
        case onContainerExit = "OnContainerExit"

        public init(caseInsensitive raw: String) throws(SandpiperError) {
            guard let match = Self.allCases.first(where: { $0.rawValue.lowercased() == raw.lowercased() }) else {
                throw SandpiperError.invalid(
                    "unknown lifecycle type '\(raw)'; valid: \(Self.allCases.map(\.rawValue).joined(separator: ", "))"
                )
            }
            self = match
        }
    }

    public var type: Kind
    public var maxAlivePeriodInSeconds: Int?

    public init(type: Kind = .timed, maxAlivePeriodInSeconds: Int? = nil) {
        self.type = type
        self.maxAlivePeriodInSeconds = maxAlivePeriodInSeconds
    }
}

/// A startup or liveness probe, run by the host inside the session's network namespace.
public struct ContainerProbe: Sendable, Equatable {
    public enum Action: Sendable, Equatable {
        /// Success: a 2xx or 3xx answer to `GET path`.
        case httpGet(path: String, port: Int)
        /// Success: a TCP connection is accepted.
        case tcpSocket(port: Int)
    }

    public var action: Action
    public var initialDelaySeconds: Int
    public var periodSeconds: Int
    public var failureThreshold: Int
    public var timeoutSeconds: Int

    public init(
        action: Action,
        initialDelaySeconds: Int = 0,
        periodSeconds: Int = 10,
        failureThreshold: Int = 3,
        timeoutSeconds: Int = 1
    ) {
        self.action = action
        self.initialDelaySeconds = initialDelaySeconds
        self.periodSeconds = periodSeconds
        self.failureThreshold = failureThreshold
        self.timeoutSeconds = timeoutSeconds
    }

    public var port: Int {
        switch action {
        case .httpGet(_, let port), .tcpSocket(let port): port
        }
    }

    func validate(field: String) throws(SandpiperError) {
        func fail(_ text: String) -> SandpiperError { .invalid("\(field): \(text)") }
        guard (1...65535).contains(port) else { throw fail("port must be between 1 and 65535") }
        if case .httpGet(let path, _) = action {
            guard path.hasPrefix("/"), !path.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) else {
                throw fail("httpGet.path must start with '/' and contain no spaces or line breaks")
            }
        }
        // Azure's ranges.
        guard (0...60).contains(initialDelaySeconds) else { throw fail("initialDelaySeconds must be between 0 and 60") }
        guard (1...240).contains(periodSeconds) else { throw fail("periodSeconds must be between 1 and 240") }
        guard (1...10).contains(failureThreshold) else { throw fail("failureThreshold must be between 1 and 10") }
        guard (1...240).contains(timeoutSeconds) else { throw fail("timeoutSeconds must be between 1 and 240") }
    }
}
