import ArgumentParser
import Foundation
import Logging
import SandpiperCore
import SandpiperImages

/// `sandpiper image …`: the OCI images custom container pools run.
struct Image: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manage the OCI images of custom container pools (pull, import, ls, inspect, rm).",
        subcommands: [Pull.self, Import.self, List.self, Inspect.self, Remove.self]
    )

    /// Where images live: `--data-dir`, else `SANDPIPER_DATA_DIR`, else the server's default.
    struct StoreOptions: ParsableArguments {
        @Option(name: .customLong("data-dir"), help: "State directory (default /var/lib/sandpiper as root).")
        var dataDirectory: String?

        func open(limits: ImageLimits = ImageLimits()) throws -> ImageStore {
            var settings = ServerConfiguration()
            settings.loadEnvironment()
            if let dataDirectory { settings.dataDirectory = dataDirectory }
            do {
                return try ImageStore(dataDirectory: settings.dataDirectory, limits: limits)
            } catch {
                throw ValidationError(error.message)
            }
        }
    }

    /// Runs `body`, printing a `SandpiperError` as one line and exiting 1.
    static func reporting<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as SandpiperError {
            FileHandle.standardError.write(Data("error: \(error.message)\n".utf8))
            throw ExitCode(1)
        }
    }

    static func bytes(_ count: Int64) -> String { ImageProgressDescriber.bytes(count) }

    /// Progress lines on stderr.
    static func progressPrinter() -> ImageProgressHandler {
        let describer = ImageProgressDescriber()
        return { event in FileHandle.standardError.write(Data((describer.line(for: event) + "\n").utf8)) }
    }

    struct Pull: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Pull an image from a registry (OCI distribution API).",
            discussion: """
                Credentials: --username with --password-stdin, or SANDPIPER_REGISTRY_USERNAME and \
                SANDPIPER_REGISTRY_PASSWORD. Anonymous, basic and bearer-token registries are supported.
                """
        )

        @Argument(help: "The image, e.g. 127.0.0.1:5000/tools/web:1.0 or …@sha256:<hex>.") var reference: String
        @Flag(help: "Talk plain HTTP to the registry (no TLS).") var insecure = false
        @Option(help: "Registry user name.") var username: String?
        @Flag(name: .customLong("password-stdin"), help: "Read the registry password from standard input.")
        var passwordStdin = false
        @Option(help: "The platform to pick from a multi-platform image (default linux/<this machine>).")
        var platform: String?
        @Option(
            name: .customLong("max-layer-size"),
            help: "Largest compressed layer accepted, in bytes (default 4 GiB)."
        )
        var maxLayerSize: Int64?
        @OptionGroup var store: StoreOptions

        func run() async throws {
            let reference: ImageReference
            do {
                reference = try ImageReference(parsing: self.reference)
            } catch {
                throw ValidationError(error.message)
            }
            let credentials = try readCredentials()
            let platform = try parsePlatform()
            var limits = ImageLimits()
            if let maxLayerSize { limits.maxLayerBytes = maxLayerSize }
            let images = try store.open(limits: limits)
            FileHandle.standardError.write(Data("pulling \(reference)\n".utf8))
            let record = try await Image.reporting {
                try await images.pull(
                    reference,
                    credentials: credentials,
                    insecure: insecure,
                    platform: platform,
                    progress: Image.progressPrinter()
                )
            }
            print("\(record.name) \(record.manifestDigest)")
        }

        func readCredentials() throws -> RegistryCredentials? {
            let environment = ProcessInfo.processInfo.environment
            let user = username ?? environment["SANDPIPER_REGISTRY_USERNAME"]
            var password = environment["SANDPIPER_REGISTRY_PASSWORD"]
            if passwordStdin {
                guard username != nil else { throw ValidationError("--password-stdin needs --username") }
                let data = FileHandle.standardInput.readDataToEndOfFile()
                password = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .newlines)
            }
            guard let user, !user.isEmpty else { return nil }
            guard let password else {
                throw ValidationError("a username needs a password (--password-stdin or SANDPIPER_REGISTRY_PASSWORD)")
            }
            return RegistryCredentials(username: user, password: password)
        }

        func parsePlatform() throws -> ImagePlatform {
            guard let platform else { return .host }
            let parts = platform.split(separator: "/").map(String.init)
            guard parts.count == 2 || parts.count == 3 else {
                throw ValidationError("--platform is os/architecture[/variant], e.g. linux/amd64")
            }
            return ImagePlatform(os: parts[0], architecture: parts[1], variant: parts.count == 3 ? parts[2] : nil)
        }
    }

    struct Import: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Import an OCI image layout (directory or tar) or a `docker save` archive.",
            discussion: "Archives may be gzip-compressed. Every image in the archive is imported."
        )

        @Argument(help: "The archive file or OCI layout directory.") var file: String
        @Option(help: "Store the (first) image under this name instead of the archive's own.") var tag: String?
        @OptionGroup var store: StoreOptions

        func run() async throws {
            let images = try store.open()
            let records = try await Image.reporting {
                try await images.importArchive(file, name: tag, progress: Image.progressPrinter())
            }
            for record in records { print("\(record.name) \(record.manifestDigest)") }
        }
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List the stored images.")

        @Flag(help: "Print JSON.") var json = false
        @OptionGroup var store: StoreOptions

        func run() async throws {
            let images = try store.open()
            let records = try await Image.reporting { try await images.list() }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                encoder.dateEncodingStrategy = .iso8601
                print(String(decoding: try encoder.encode(records), as: UTF8.self))
                return
            }
            let rows =
                [["NAME", "MANIFEST", "LAYERS", "SIZE", "SOURCE"]]
                + records.map {
                    [$0.name, $0.manifestDigest.short, "\($0.layers.count)", Image.bytes($0.size), $0.source]
                }
            let widths = (0..<5).map { column in rows.map { $0[column].count }.max() ?? 0 }
            for row in rows {
                let padded = row.enumerated().map { index, cell in
                    index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
                }
                print(padded.joined(separator: "  "))
            }
        }
    }

    struct Inspect: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a stored image's record, config and unpacked layer directories as JSON."
        )

        @Argument(help: "The image name or manifest digest.") var reference: String
        @OptionGroup var store: StoreOptions

        struct Output: Encodable {
            var image: ImageRecord
            var layerDirectories: [String]
            var overlayLowerDirectories: String
        }

        func run() async throws {
            let images = try store.open()
            let resolved = try await Image.reporting { try await images.resolve(reference) }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            encoder.dateEncodingStrategy = .iso8601
            let output = Output(
                image: resolved.record,
                layerDirectories: resolved.layerDirectories,
                overlayLowerDirectories: resolved.overlayLowerDirectories
            )
            print(String(decoding: try encoder.encode(output), as: UTF8.self))
        }
    }

    struct Remove: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Remove images, then every blob and layer no remaining image uses."
        )

        @Argument(help: "Image names or manifest digests.") var references: [String]
        @OptionGroup var store: StoreOptions

        func run() async throws {
            let images = try store.open()
            for reference in references {
                let record = try await Image.reporting { try await images.remove(reference) }
                print("removed \(record.name)")
            }
        }
    }
}
