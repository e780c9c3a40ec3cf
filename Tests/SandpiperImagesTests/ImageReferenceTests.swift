import SandpiperCore
import Testing

@testable import SandpiperImages

@Suite struct ImageReferenceTests {
    let hex = String(repeating: "ab", count: 32)

    @Test func registryPortRepositoryAndTag() throws {
        let reference = try ImageReference(parsing: "127.0.0.1:5000/tools/web:1.0")
        #expect(reference.registry == "127.0.0.1:5000")
        #expect(reference.repository == "tools/web")
        #expect(reference.tag == "1.0")
        #expect(reference.digest == nil)
        #expect(reference.description == "127.0.0.1:5000/tools/web:1.0")
        #expect(reference.manifestReference == "1.0")
        #expect(reference.apiHost == "127.0.0.1:5000")
    }

    @Test func defaultsToLatestAndDockerHub() throws {
        let plain = try ImageReference(parsing: "busybox")
        #expect(plain.description == "docker.io/library/busybox:latest")
        #expect(plain.apiHost == "registry-1.docker.io")
        let user = try ImageReference(parsing: "someone/tool:2")
        #expect(user.description == "docker.io/someone/tool:2")
        let local = try ImageReference(parsing: "localhost/app")
        #expect(local.registry == "localhost")
        #expect(local.repository == "app")
        #expect(local.tag == "latest")
    }

    @Test func portWithoutTagIsNotATag() throws {
        let reference = try ImageReference(parsing: "127.0.0.1:5000/app")
        #expect(reference.registry == "127.0.0.1:5000")
        #expect(reference.repository == "app")
        #expect(reference.tag == "latest")
    }

    @Test func digestReferences() throws {
        let byDigest = try ImageReference(parsing: "127.0.0.1:5000/app@sha256:\(hex)")
        #expect(byDigest.tag == nil)
        #expect(byDigest.digest?.hex == hex)
        #expect(byDigest.manifestReference == "sha256:\(hex)")
        #expect(byDigest.description == "127.0.0.1:5000/app@sha256:\(hex)")
        let both = try ImageReference(parsing: "127.0.0.1:5000/app:1@sha256:\(hex)")
        #expect(both.tag == "1")
        #expect(both.manifestReference == "sha256:\(hex)")
    }

    @Test(arguments: [
        "", "UPPER/case", "app:", "app:-bad", "a//b", "127.0.0.1:99999/app", "app@sha256:short",
        "app@md5:0123", "-app", "bad host!/app", "app:tag/extra",
    ])
    func refusesMalformed(_ text: String) {
        #expect(throws: SandpiperError.self) { try ImageReference(parsing: text) }
    }

    @Test func digestParsing() throws {
        #expect(try Digest(parsing: "sha256:\(hex)").description == "sha256:\(hex)")
        #expect(throws: SandpiperError.self) { try Digest(parsing: "sha256:\(hex.uppercased())") }
        #expect(throws: SandpiperError.self) { try Digest(parsing: "sha512:\(hex)") }
        #expect(
            Digest.of(Array("hello".utf8)).hex == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        )
    }

    @Test func bearerChallenge() throws {
        let header =
            #"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
        let challenge = try #require(RegistryClient.parseChallenge(header))
        #expect(challenge.scheme == "bearer")
        #expect(challenge.parameters["realm"] == "https://auth.example/token")
        #expect(challenge.parameters["service"] == "registry.example")
        #expect(challenge.parameters["scope"] == "repository:a/b:pull,push")
        let basic = try #require(RegistryClient.parseChallenge(#"Basic realm="Registry Realm""#))
        #expect(basic.scheme == "basic")
        #expect(basic.parameters["realm"] == "Registry Realm")
    }

    @Test func credentialOriginIncludesSchemeAndPort() {
        #expect(RegistryClient.origin("https://Registry.example/v2/a") == "https://registry.example:443")
        #expect(
            RegistryClient.origin("https://registry.example:443/x")
                == RegistryClient.origin("https://registry.example/y")
        )
        #expect(
            RegistryClient.origin("http://127.0.0.1:5000/v2/") != RegistryClient.origin("http://127.0.0.1:5001/v2/")
        )
        #expect(RegistryClient.origin("http://127.0.0.1:5000/") != RegistryClient.origin("https://127.0.0.1:5000/"))
        #expect(RegistryClient.origin("not a url") == nil)
    }

    @Test func archiveBaseNames() {
        #expect(ImageStore.baseName("/tmp/Busybox-1.36.oci.tar.gz") == "busybox-1.36")
        #expect(ImageStore.baseName("/tmp/web.tar") == "web")
        #expect(ImageStore.baseName("/tmp/__.tar") == "imported")
    }
}
