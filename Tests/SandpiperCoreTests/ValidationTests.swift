import SandpiperCore
import Testing

@Suite("SessionIdentifier")
struct SessionIdentifierTests {
    @Test("Accepts 4 to 128 printable ASCII characters, symbols included")
    func accepts() throws {
        for raw in [
            "abcd", "a+b|c{}[]<>;&^%$#()", String(repeating: "x", count: 128), "6f1c7c8e-uuid-like", "a/b:c\"d'e",
        ] {
            #expect(try SessionIdentifier(validating: raw).value == raw)
        }
    }

    @Test("Refuses missing, short, long, spaces, backslashes, control and non-ASCII characters")
    func refuses() {
        let bad: [String?] = [
            nil, "", "abc", String(repeating: "x", count: 129), "has space", "back\\slash", "nul\0byte", "tab\tx",
            "héllo", "日本語です",
        ]
        for raw in bad {
            #expect(throws: SandpiperError.self) { try SessionIdentifier(validating: raw) }
            do {
                _ = try SessionIdentifier(validating: raw)
            } catch {
                #expect(error.kind == .invalidArgument)
                #expect(error.code == "InvalidSessionIdentifier")
            }
        }
    }
}

@Suite("SessionFilePath")
struct SessionFilePathTests {
    @Test("Strips the /mnt/data prefix and keeps subdirectories")
    func strips() throws {
        #expect(try SessionFilePath(validating: "/mnt/data/report.csv").relative == "report.csv")
        #expect(try SessionFilePath(validating: "sub/dir/x.txt").components == ["sub", "dir", "x.txt"])
        #expect(try SessionFilePath(validating: "dir/").components == ["dir"])
        #expect(try SessionFilePath(validating: "naïve 日本 (1) @$&=;,#%^.txt").name == "naïve 日本 (1) @$&=;,#%^.txt")
        #expect(try SessionFilePath(validating: "/mnt/data", allowRoot: true).isRoot)
        #expect(try SessionFilePath(validating: "", allowRoot: true).isRoot)
    }

    @Test("Refuses traversal, absolute escapes, NUL, control characters and oversized names")
    func refuses() {
        let bad = [
            "..", "../etc/passwd", "a/../../b", "./x", "a//b", "/etc/passwd", "/mnt/database/x", "/mnt/data/../x",
            "x\0y", "line\nbreak", String(repeating: "n", count: 256), String(repeating: "a/", count: 600) + "x", "",
        ]
        for raw in bad {
            #expect(throws: SandpiperError.self, "\(raw.debugDescription) must be refused") {
                try SessionFilePath(validating: raw)
            }
        }
    }
}

@Suite("PoolConfiguration")
struct PoolConfigurationTests {
    @Test("Defaults are valid and match Azure's limits")
    func defaults() throws {
        let pool = PoolConfiguration(name: "python")
        try pool.validate()
        #expect(pool.maxExecutionSeconds == 220)
        #expect(pool.maxUploadBytes == 128 * 1024 * 1024)
        #expect(pool.egressEnabled == false)
    }

    @Test("Rejects bad names and out-of-range values with the pool's name in the message")
    func rejects() {
        #expect(throws: SandpiperError.self) { try PoolConfiguration(name: "Bad Name").validate() }
        #expect(throws: SandpiperError.self) { try PoolConfiguration(name: "../x").validate() }
        var pool = PoolConfiguration(name: "p1")
        pool.maxConcurrentSessions = 0
        do {
            try pool.validate()
            Issue.record("expected a validation error")
        } catch {
            #expect(error.message.contains("p1"))
            #expect(error.message.contains("maxConcurrentSessions"))
        }
        pool = PoolConfiguration(name: "p1")
        pool.defaultExecutionSeconds = 500
        #expect(throws: SandpiperError.self) { try pool.validate() }
    }

    @Test("Pool types match case-insensitively")
    func types() throws {
        #expect(try PoolType(caseInsensitive: "pythonlts") == .pythonLTS)
        #expect(throws: SandpiperError.self) { try PoolType(caseInsensitive: "CobolLTS") }
    }
}
