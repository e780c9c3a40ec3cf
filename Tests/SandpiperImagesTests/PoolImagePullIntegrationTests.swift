import Foundation
import Logging
import SandpiperCore
import Synchronization
import Testing

@testable import SandpiperImages

/// Log lines a test can look at.
final class CapturedLog: Sendable {
    let lines = Mutex<[(Logger.Level, String)]>([])

    var logger: Logger { Logger(label: "test") { _ in Handler(log: self) } }

    func messages(at level: Logger.Level) -> [String] { lines.withLock { $0 }.filter { $0.0 == level }.map(\.1) }

    struct Handler: LogHandler {
        let log: CapturedLog
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            log.lines.withLock { $0.append((event.level, "\(event.message)")) }
        }
    }
}

/// What `sandpiper serve` does at start for a custom pool whose image is only in a registry
/// (`ImageStore.resolveOrPull`), against Debian's docker-registry on 127.0.0.1 with the image
/// RegistryIntegrationTests builds. SANDPIPER_INTEGRATION=1 only.
@Suite(
    "Pool images pulled at start",
    .enabled(if: ProcessInfo.processInfo.environment["SANDPIPER_INTEGRATION"] == "1"),
    .serialized
)
struct PoolImagePullIntegrationTests {
    typealias Fixture = RegistryIntegrationTests

    @Test func pullsAMissingImageOnceThenResolvesFromTheStore() async throws {
        try Fixture.requireTools()
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let (registry, _) = try Fixture.registryWithImage(in: dir.path, as: "test/web:1")
        defer { registry.stop() }
        let host = "127.0.0.1:\(registry.port)"
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let template = ContainerTemplate(
            image: "\(host)/test/web:1",
            targetPort: 8080,
            registry: ContainerRegistrySettings(insecure: true)
        )
        #expect(try await store.list().isEmpty)

        let log = CapturedLog()
        let resolved = try await store.resolveOrPull(pool: "web", template: template, logger: log.logger)
        #expect(resolved.record.name == "\(host)/test/web:1")
        try Fixture.checkLayers(resolved)
        #expect(try await store.list().map(\.name) == ["\(host)/test/web:1"])
        let info = log.messages(at: .info)
        #expect(info.contains { $0.hasPrefix("pulling custom container pool image") })
        #expect(info.contains { $0.contains("2 layer(s)") && $0.hasPrefix("image pull: manifest") })
        #expect(info.contains { $0.hasPrefix("pulled custom container pool image: 2 layer(s),") && $0.hasSuffix(" s") })

        // Already in the store: resolved without a registry request (the registry is gone).
        registry.stop()
        let again = CapturedLog()
        let second = try await store.resolveOrPull(pool: "web", template: template, logger: again.logger)
        #expect(second == resolved)
        #expect(again.messages(at: .info).isEmpty)
        // The same holds for a reference by digest prefix.
        let byDigest = ContainerTemplate(image: String(resolved.record.manifestDigest.hex.prefix(16)), targetPort: 8080)
        #expect(try await store.resolveOrPull(pool: "web", template: byDigest, logger: again.logger) == resolved)

        // A missing image with the registry down fails within the connect timeout, naming the pool, the image and the cause.
        let down = ContainerTemplate(
            image: "\(host)/test/other:1",
            targetPort: 8080,
            registry: ContainerRegistrySettings(insecure: true)
        )
        let started = ContinuousClock.now
        let error = await #expect(throws: SandpiperError.self) {
            try await store.resolveOrPull(pool: "other", template: down, logger: again.logger)
        }
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(error?.code == "RegistryUnreachable")
        #expect(error?.message.contains("pool 'other'") == true)
        #expect(error?.message.contains("\(host)/test/other:1") == true)
    }

    @Test func basicAuthPasswordFromTheEnvironment() async throws {
        try Fixture.requireTools()
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let (registry, _) = try Fixture.registryWithImage(in: dir.path, as: "private/web:1", basicAuth: true)
        defer { registry.stop() }
        let host = "127.0.0.1:\(registry.port)"
        let store = try ImageStore(dataDirectory: dir.path + "/data")
        let logger = CapturedLog().logger
        func template(server: String? = host, username: String? = "sandpiper") -> ContainerTemplate {
            ContainerTemplate(
                image: "\(host)/private/web:1",
                targetPort: 8080,
                registry: ContainerRegistrySettings(
                    server: server,
                    username: username,
                    passwordVariable: username == nil ? nil : "SP_TEST_REGISTRY_PASSWORD",
                    insecure: true
                )
            )
        }
        func attempt(_ template: ContainerTemplate, _ environment: [String: String]) async -> SandpiperError? {
            await #expect(throws: SandpiperError.self) {
                try await store.resolveOrPull(
                    pool: "private",
                    template: template,
                    environment: environment,
                    logger: logger
                )
            }
        }

        let wrong = await attempt(template(), ["SP_TEST_REGISTRY_PASSWORD": "wrong"])
        #expect(wrong?.code == "RegistryUnauthorized")
        #expect(wrong?.kind == .unauthorized)
        let message = wrong?.message ?? ""
        #expect(message.hasPrefix("pool 'private': cannot pull image '\(host)/private/web:1' from registry \(host): "))
        #expect(message.contains("RegistryUnauthorized"))
        #expect(!message.contains("wrong"), "the password never appears in the error")

        let anonymous = await attempt(template(username: nil), [:])
        #expect(anonymous?.code == "RegistryUnauthorized")
        let unset = await attempt(template(), [:])
        #expect(unset?.message.contains("'SP_TEST_REGISTRY_PASSWORD'") == true)
        #expect(unset?.message.contains("pool 'private'") == true)
        let otherServer = await attempt(
            template(server: "registry.example.com"),
            ["SP_TEST_REGISTRY_PASSWORD": "s3cret"]
        )
        #expect(otherServer?.message.contains("registryCredentials.server is 'registry.example.com'") == true)
        #expect(try await store.list().isEmpty)

        let resolved = try await store.resolveOrPull(
            pool: "private",
            template: template(),
            environment: ["SP_TEST_REGISTRY_PASSWORD": "s3cret"],
            logger: logger
        )
        try Fixture.checkLayers(resolved)
        #expect(try await store.resolve("\(host)/private/web:1") == resolved)
    }
}

@Suite("Pool images without a registry")
struct PoolImageTests {
    @Test func aDigestPrefixNotInTheStoreIsNotPulled() async throws {
        let dir = try TemporaryDirectory()
        defer { dir.cleanup() }
        let store = try ImageStore(dataDirectory: dir.path)
        let log = CapturedLog()
        let template = ContainerTemplate(image: "0123456789abcdef0123", targetPort: 8080)
        let error = await #expect(throws: SandpiperError.self) {
            try await store.resolveOrPull(pool: "p", template: template, logger: log.logger)
        }
        #expect(error?.code == "ContainerImageNotFound")
        #expect(error?.message.contains("pool 'p'") == true)
        #expect(log.messages(at: .info).isEmpty)
    }

    @Test func progressLines() {
        let describer = ImageProgressDescriber()
        let digest = Digest(hex: String(repeating: "a", count: 64))
        #expect(
            describer.line(for: .resolved(manifest: digest, layers: 3, bytes: 3 << 20)).hasSuffix("3 layer(s), 3.0 MiB")
        )
        #expect(describer.line(for: .downloaded(index: 1, digest: digest, cached: false)).hasPrefix("layer 2/3 "))
        #expect(ImageProgressDescriber.bytes(512) == "512 B")
    }
}
