import ArgumentParser

@main
struct Sandpiper: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sandpiper",
        abstract: "Self-hosted Azure Container Apps Dynamic Sessions: pools of isolated, pre-warmed sandboxes.",
        subcommands: [Serve.self, Doctor.self, Image.self],
        defaultSubcommand: Serve.self
    )
}
