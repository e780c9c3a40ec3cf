import SandpiperCore
import Testing

@Suite("container.registryCredentials")
struct ContainerRegistrySettingsTests {
    func template(_ settings: ContainerRegistrySettings) -> ContainerTemplate {
        ContainerTemplate(image: "127.0.0.1:5000/web:1", targetPort: 8080, registry: settings)
    }

    @Test func validSettings() throws {
        try template(ContainerRegistrySettings()).validate()
        try template(ContainerRegistrySettings(server: "127.0.0.1:5000", insecure: true)).validate()
        try template(ContainerRegistrySettings(username: "u", passwordVariable: "REGISTRY_PASSWORD")).validate()
    }

    @Test func invalidSettings() {
        for settings in [
            ContainerRegistrySettings(username: "u"),
            ContainerRegistrySettings(passwordVariable: "P"),
            ContainerRegistrySettings(username: "u", passwordVariable: "NOT A NAME"),
            ContainerRegistrySettings(username: "u", passwordVariable: "1P"),
            ContainerRegistrySettings(server: "https://registry.example.com"),
            ContainerRegistrySettings(server: ""),
        ] {
            #expect(throws: SandpiperError.self) { try template(settings).validate() }
        }
    }

    @Test func credentialsComeFromTheNamedVariable() throws {
        let settings = ContainerRegistrySettings(username: "u", passwordVariable: "P")
        let pair = try settings.credentials(from: ["P": "secret"])
        #expect(pair?.0 == "u" && pair?.1 == "secret")
        #expect(try ContainerRegistrySettings().credentials(from: ["P": "secret"]) == nil)
        let error = #expect(throws: SandpiperError.self) { try settings.credentials(from: [:]) }
        #expect(error?.message.contains("'P'") == true)
        #expect(throws: SandpiperError.self) { try settings.credentials(from: ["P": ""]) }
    }
}
