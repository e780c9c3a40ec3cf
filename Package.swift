// swift-tools-version: 6.1
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "Sandpiper",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "sandpiper", targets: ["sandpiper"]),
        .executable(name: "sandpiper-init", targets: ["sandpiper-init"]),
        .library(name: "SandpiperForker", type: .dynamic, targets: ["SandpiperForker"]),
    ],
    dependencies: [
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
    ],
    targets: [
        // Domain model shared by every layer: errors, pool configuration, identifiers,
        // file names, the Sandbox protocol and the agent wire messages. Foundation only.
        .target(
            name: "SandpiperCore",
            dependencies: [.product(name: "Logging", package: "swift-log")],
            swiftSettings: swiftSettings
        ),
        // C bridges: the libseccomp filter and the GNU libc calls the Glibc module does not expose.
        .target(
            name: "CSandpiperShims",
            linkerSettings: [.linkedLibrary("seccomp")]
        ),
        // The first process of each forked Python session (C, static: exec'd by the pool's
        // fork template inside its sandbox, where no Swift runtime is bound).
        .executableTarget(
            name: "sandpiper-init",
            dependencies: ["CNoSwiftRuntime", "SandpiperConfine"],
            linkerSettings: [.unsafeFlags(["-static-stdlib", "-Xclang-linker", "-static", "-Xlinker", "-s"])]
        ),
        // Stand-ins for the Swift runtime in sandpiper-init and SandpiperForker, plain C (stubs.c).
        .target(name: "CNoSwiftRuntime"),
        // How both confine a process to its session (uid, capabilities, seccomp).
        .target(name: "SandpiperConfine"),
        // The fork loop of a Python fork template (C, loaded there with ctypes; no Swift runtime).
        .target(
            name: "SandpiperForker",
            dependencies: ["CNoSwiftRuntime", "SandpiperConfine"],
            linkerSettings: [.unsafeFlags(["-static-stdlib", "-Xlinker", "--as-needed", "-Xlinker", "-s"])]
        ),
        // The namespace sandbox backend (bubblewrap + seccomp + cgroups + tmpfs /mnt/data).
        .target(
            name: "SandpiperSandbox",
            dependencies: [
                "SandpiperCore",
                "CSandpiperShims",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOExtras", package: "swift-nio-extras"),
                .product(name: "Logging", package: "swift-log"),
            ],
            resources: [.copy("Agents")],
            swiftSettings: swiftSettings
        ),
        // Pools, sessions, refill and reaping. No HTTP, no bubblewrap.
        .target(
            name: "SandpiperSessions",
            dependencies: [
                "SandpiperCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // SQLite state (sessions index, sandbox records for crash cleanup).
        .target(
            name: "SandpiperStore",
            dependencies: [
                "SandpiperCore",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            swiftSettings: swiftSettings
        ),
        // The HTTP layer: Azure data-plane shapes, auth, error mapping.
        .target(
            name: "SandpiperAPI",
            dependencies: [
                "SandpiperCore",
                "SandpiperSessions",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "Logging", package: "swift-log"),
            ],
            resources: [.copy("Resources/openapi.json")],
            swiftSettings: swiftSettings
        ),
        // OCI images for custom container pools: references, the registry client (distribution v2,
        // basic and bearer auth), the content-addressed store and safe layer unpacking.
        .target(
            name: "SandpiperImages",
            dependencies: [
                "SandpiperCore",
                "CSandpiperShims",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "sandpiper",
            dependencies: [
                "SandpiperCore",
                "SandpiperSessions",
                "SandpiperSandbox",
                "SandpiperStore",
                "SandpiperAPI",
                "SandpiperImages",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // Fakes for unit tests: an in-memory sandbox backend. Never linked into the server.
        .target(
            name: "SandpiperTestSupport",
            dependencies: ["SandpiperCore"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SandpiperCoreTests",
            dependencies: ["SandpiperCore"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SandpiperSessionsTests",
            dependencies: ["SandpiperCore", "SandpiperSessions", "SandpiperTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SandpiperSandboxTests",
            dependencies: ["SandpiperCore", "SandpiperSandbox"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SandpiperAPITests",
            dependencies: [
                "SandpiperCore", "SandpiperSessions", "SandpiperAPI", "SandpiperStore", "SandpiperTestSupport",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SandpiperImagesTests",
            dependencies: [
                "SandpiperCore", "SandpiperImages", "CSandpiperShims",
                .product(name: "Logging", package: "swift-log"),
                // The bearer-token front of the registry integration test, and its proxying client.
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // Real sandboxes: bubblewrap, cgroups, the Python runtime. Needs root and `make setup`.
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "SandpiperCore", "SandpiperSessions", "SandpiperSandbox", "SandpiperStore", "SandpiperImages",
                "SandpiperAPI",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ],
            // Sources of programs the tests build into container images.
            exclude: ["Fixtures"],
            swiftSettings: swiftSettings
        ),
    ]
)
