import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

struct Sandpiper: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandpiper",
        abstract: "Self-hosted Azure Container Apps Dynamic Sessions: pools of isolated, pre-warmed sandboxes.",
        subcommands: [Serve.self, Doctor.self, Image.self],
        defaultSubcommand: Serve.self
    )
}

@main
enum Main {
    /// Swift concurrency runs on NIO's event loops (one thread per core), so a request that
    /// goes from its HTTP connection to a session's agent pipe and back does not hop between
    /// two thread pools at every step. `SANDPIPER_CONCURRENCY_ON_EVENT_LOOPS=0` keeps the
    /// default executor (for comparison).
    static func main() async {
        if ProcessInfo.processInfo.environment["SANDPIPER_CONCURRENCY_ON_EVENT_LOOPS"] != "0" {
            NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
        }
        await Sandpiper.main()
    }
}
