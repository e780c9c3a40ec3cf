import Foundation
import SandpiperCore
import Testing

@testable import SandpiperSandbox

/// Node.js and Shell sandboxes: the same backend, isolation and lifecycle as Python, with their
/// own agents.
@Suite("Node and Shell sandboxes (real bubblewrap)", .enabled(if: integrationEnabled), .serialized)
struct LanguagePoolTests {
    static func pool(_ type: PoolType, tier: Tier = .namespaces) -> PoolConfiguration {
        var pool = Fixture.pool(name: type == .nodeLTS ? "node" : "shell", tier: tier)
        pool.type = type
        return pool
    }

    @Test("Node: declarations, top-level await, require and files persist across cells", arguments: execTiers)
    func nodeState(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Self.pool(.nodeLTS, tier: tier))
            defer { Task { await sandbox.destroy() } }
            _ = try await sandbox.run("const fs = require('fs'); let total = 40; function add(a, b) { return a + b }")
            let value = try await sandbox.run("await new Promise(r => setTimeout(r, 20)); add(total, 2)")
            #expect(value.result == .integer(42), "\(value)")
            let io = try await sandbox.run(
                "fs.writeFileSync('n.txt', 'node!'); console.log(process.cwd()); fs.readFileSync('n.txt', 'utf8')"
            )
            #expect(io.stdout == "/mnt/data\n")
            #expect(io.result == .string("node!"))
            let object = try await sandbox.run("({a: 1, b: [1, 2]})")
            #expect(object.result.stringValue?.contains("a: 1") == true)
            let thrown = try await sandbox.run("throw new TypeError('bad thing')")
            #expect(thrown.status == .failure)
            #expect(thrown.stderr.contains("TypeError: bad thing"))
            #expect(try await sandbox.listFiles(in: .root, recursive: false).map(\.path.name) == ["n.txt"])
        }
    }

    @Test("Node: an infinite loop is stopped at the timeout and the context survives", arguments: execTiers)
    func nodeTimeout(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Self.pool(.nodeLTS, tier: tier))
            defer { Task { await sandbox.destroy() } }
            _ = try await sandbox.run("var keep = 'kept'")
            let start = ContinuousClock.now
            let outcome = try await sandbox.run("while (true) {}", timeout: 1)
            #expect(ContinuousClock.now - start < .seconds(8))
            #expect(outcome.timedOut)
            #expect(outcome.status == .failure)
            #expect(try await sandbox.run("keep").result == .string("kept"))
        }
    }

    @Test("Shell: cwd, exported variables and files persist; exit codes and stdin come through", arguments: execTiers)
    func shellState(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Self.pool(.shell, tier: tier))
            defer { Task { await sandbox.destroy() } }
            let first = try await sandbox.run("mkdir -p work && cd work && export GREETING=hello && echo made > f.txt")
            #expect(first.exitCode == 0)
            let second = try await sandbox.run("echo $GREETING; pwd; cat f.txt; ls /nope")
            #expect(second.stdout == "hello\n/mnt/data/work\nmade\n")
            #expect(second.stderr.contains("/nope"))
            #expect(second.exitCode == 2)
            #expect(second.status == .failure)
            let input = try await sandbox.execute(
                ExecutionRequest(code: "tr a-z A-Z", timeoutSeconds: 10, outputLimit: 4096, stdin: "shout")
            )
            #expect(input.stdout == "SHOUT")
            let tools = try await sandbox.run("python3 -c 'print(6*7)' && node -e 'console.log(6*7)'")
            #expect(tools.stdout == "42\n42\n", "\(tools)")
        }
    }

    @Test(
        "Shell: a command that never ends is killed at the timeout; background jobs do not block",
        arguments: execTiers
    )
    func shellTimeouts(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Self.pool(.shell, tier: tier))
            defer { Task { await sandbox.destroy() } }
            let start = ContinuousClock.now
            let background = try await sandbox.run("sleep 1000 & echo started")
            #expect(background.stdout == "started\n")
            #expect(ContinuousClock.now - start < .seconds(3))
            let hung = try await sandbox.run("export KEEP=1; sleep 100", timeout: 1)
            #expect(hung.timedOut)
            #expect(hung.exitCode == 124)
            #expect(try await sandbox.run("echo ok").stdout == "ok\n")
            let capped = try await sandbox.execute(
                ExecutionRequest(code: "yes | head -c 100000", timeoutSeconds: 10, outputLimit: 4096)
            )
            #expect(capped.stdout.utf8.count == 4096)
            #expect(capped.stdoutTruncated)
        }
    }

    @Test(
        "Node and Shell sessions cannot read host files, see the network or other sessions",
        arguments: [PoolType.nodeLTS, .shell],
        execTiers
    )
    func isolation(type: PoolType, tier: Tier) async throws {
        try await withFixture { fixture in
            let server = try LoopbackServer()
            defer { server.close() }
            let other = try await fixture.launch(Self.pool(type, tier: tier))
            defer { Task { await other.destroy() } }
            _ = try await other.run(
                type == .shell
                    ? "echo secret > other-session.txt" : "require('fs').writeFileSync('other-session.txt', 'secret')"
            )
            let sandbox = try await fixture.launch(Self.pool(type, tier: tier))
            defer { Task { await sandbox.destroy() } }
            let probe: String
            if type == .shell {
                probe = """
                    for p in /etc/shadow /root \(fixture.stateDirectory); do test -r "$p" && echo "readable $p"; done
                    ls /mnt/data; ls /proc | grep -c '^[0-9]'
                    cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '
                    (exec 3<>/dev/tcp/127.0.0.1/\(server.port)) 2>/dev/null && echo connected || echo refused
                    """
            } else {
                probe = """
                    const fs = require('fs'); const net = require('net');
                    const out = [];
                    for (const p of ['/etc/shadow', '/root', '\(fixture.stateDirectory)']) { try { fs.readdirSync(p); out.push('readable ' + p) } catch (e) { try { fs.readFileSync(p); out.push('readable ' + p) } catch (e2) {} } }
                    out.push(fs.readdirSync('/mnt/data').join(','));
                    out.push(fs.readFileSync('/proc/net/dev', 'utf8').split('\\n').slice(2).filter(Boolean).map(l => l.split(':')[0].trim()).join(','));
                    out.push(await new Promise(r => { const s = net.connect(\(server.port), '127.0.0.1', () => r('connected')); s.on('error', () => r('refused')) }));
                    console.log(out.join('\\n'))
                    """
            }
            let outcome = try await sandbox.run(probe)
            #expect(!outcome.stdout.contains("readable"), "\(outcome)")
            #expect(!outcome.stdout.contains("other-session"), "\(outcome)")
            #expect(outcome.stdout.contains("lo\n"), "\(outcome)")
            #expect(!outcome.stdout.contains("eth"), "\(outcome)")
            #expect(outcome.stdout.contains("refused"), "\(outcome)")
            #expect(server.acceptedConnections() == 0)
            await sandbox.destroy()
            try await fixture.expectNoTraces(of: sandbox)
        }
    }
}
