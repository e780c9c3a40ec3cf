import Foundation
import Logging
import SandpiperCore
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Namespace sandbox (real bubblewrap + Python)", .enabled(if: integrationEnabled), .serialized)
struct NamespaceSandboxTests {
    @Test("State persists across cells; cwd is /mnt/data; values come back typed", arguments: tiers)
    func statePersists(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await sandbox.destroy() } }
            let first = try await sandbox.run("import math\nx = 41\nprint('hello')")
            #expect(first.status == .success)
            #expect(first.stdout == "hello\n")
            #expect(first.result == .string(""))
            let second = try await sandbox.run("x + 1")
            #expect(second.result == .integer(42))
            let cwd = try await sandbox.run("import os; os.getcwd()")
            #expect(cwd.result == .string("/mnt/data"))
            let repr = try await sandbox.run("[math.pi, {'a': 1}]")
            #expect(repr.result.stringValue?.contains("3.14159") == true)
            let failure = try await sandbox.run("raise ValueError('nope')")
            #expect(failure.status == .failure)
            #expect(failure.stderr.contains("ValueError"))
            #expect(failure.stderr.contains("nope"))
        }
    }

    @Test("Code in a gVisor session sees gVisor's kernel, not the host's", .enabled(if: tiers.contains(.gvisor)))
    func gvisorKernel() async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: .gvisor))
            defer { Task { await sandbox.destroy() } }
            let host = try String(contentsOfFile: "/proc/version", encoding: .utf8)
            let outcome = try await sandbox.run("open('/proc/version').read()")
            let guest = try #require(outcome.result.stringValue)
            #expect(guest != host)
            #expect(guest.contains("4.4.0"), "gVisor's sentry reports Linux 4.4.0: \(guest)")
            let namespaces = try await fixture.launch(Fixture.pool(tier: .namespaces))
            defer { Task { await namespaces.destroy() } }
            #expect(try await namespaces.run("open('/proc/version').read()").result.stringValue == host)
        }
    }

    @Test("A matplotlib plot comes back as a PNG image result", arguments: tiers)
    func plot(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await sandbox.destroy() } }
            let outcome = try await sandbox.run("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()")
            #expect(outcome.status == .success)
            #expect(outcome.result["type"] == .string("image"))
            #expect(outcome.result["format"] == .string("png"))
            let data = try #require(outcome.result["base64_data"]?.stringValue.flatMap { Data(base64Encoded: $0) })
            #expect(Array(data.prefix(8)) == [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A])
            #expect(data.count > 1000)
        }
    }

    @Test("A cell over its timeout is interrupted and the session keeps its state", arguments: tiers)
    func timeout(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await sandbox.destroy() } }
            _ = try await sandbox.run("kept = 'still here'")
            let start = ContinuousClock.now
            let outcome = try await sandbox.run("import time\nwhile True: time.sleep(0.1)", timeout: 1)
            #expect(ContinuousClock.now - start < .seconds(8))
            #expect(outcome.status == .failure)
            #expect(outcome.timedOut)
            #expect(outcome.stderr.contains("KeyboardInterrupt") || outcome.stderr.contains("TimeoutError"))
            #expect(try await sandbox.run("kept").result == .string("still here"))
        }
    }

    @Test("A guest that ignores interrupts is killed after the grace period with a clear error", arguments: tiers)
    func hungGuestIsKilled(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            let code = """
                import signal, time
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                import threading
                while True:
                    try:
                        time.sleep(0.05)
                    except BaseException:
                        pass
                """
            let start = ContinuousClock.now
            await #expect(throws: SandpiperError.self) { try await sandbox.run(code, timeout: 1) }
            #expect(ContinuousClock.now - start < NamespaceSandbox.interruptGrace + .seconds(6))
            #expect(!sandbox.isAlive)
            try await fixture.expectNoTraces(of: sandbox)
        }
    }

    @Test("The agent killed mid-execution gives a clear error and leaves nothing behind", arguments: tiers)
    func agentKilled(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            do {
                _ = try await sandbox.run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
                Issue.record("expected a sandbox failure")
            } catch let error as SandpiperError {
                #expect(error.kind == .sandboxFailure)
                #expect(error.message.contains("fresh"))
            }
            #expect(!sandbox.isAlive)
            try await fixture.expectNoTraces(of: sandbox)
        }
    }

    @Test("Host files, the state directory and other users' homes are out of reach", arguments: tiers)
    func hostFilesUnreachable(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await sandbox.destroy() } }
            let probe = """
                import os
                results = {}
                for path in ['/etc/shadow', '/root', '/home', '\(fixture.stateDirectory)', '\(fixture.stateDirectory)/sessions',
                             '/proc/1/root/etc/shadow', '/sys/class/net', '/work', '/var/lib/sandpiper/api-key']:
                    try:
                        if os.path.isdir(path):
                            results[path] = 'listed:' + ','.join(os.listdir(path))
                        else:
                            with open(path, 'rb') as f:
                                results[path] = 'read:' + str(len(f.read()))
                    except Exception as e:
                        results[path] = type(e).__name__
                for path in ['/usr/x', '/etc/x', '/opt/x', '/x']:
                    try:
                        open(path, 'w').write('x')
                        results[path] = 'written'
                    except Exception as e:
                        results[path] = type(e).__name__
                status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
                results['caps'] = status.get('CapEff', '?').strip()
                results['nnp'] = status.get('NoNewPrivs', '?').strip()
                results['seccomp'] = status.get('Seccomp', '?').strip()
                results['uid'] = os.getuid()
                results['pids'] = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
                results
                """
            let outcome = try await sandbox.run(probe)
            let text = try #require(outcome.result.stringValue, "\(outcome)")
            // gVisor serves a /sys of its own: its network view lists only the sandbox's loopback.
            if tier == .gvisor { #expect(text.contains("'/sys/class/net': 'listed:lo'"), "\(text)") }
            let hidden =
                ["/etc/shadow", "/root", "/home", fixture.stateDirectory, "/proc/1/root/etc/shadow", "/work"]
                + (tier.isolation == .namespaces ? ["/sys/class/net"] : [])
            for path in hidden {
                #expect(
                    text.contains("'\(path)': 'FileNotFoundError'") || text.contains("'\(path)': 'PermissionError'"),
                    "\(path) in \(text)"
                )
            }
            for path in ["/usr/x", "/etc/x", "/opt/x", "/x"] {
                #expect(!text.contains("'\(path)': 'written'"), "\(path) in \(text)")
            }
            #expect(text.contains("'caps': '0000000000000000'"))
            if tier.isolation == .namespaces {
                // gVisor reports its own view; the host side of these is runsc's business.
                #expect(text.contains("'nnp': '1'"))
                #expect(text.contains("'seccomp': '2'"))
                // A forked session runs as its own uid of the template's user namespace.
                #expect(tier.launch == .fork ? !text.contains("'uid': 0,") : text.contains("'uid': 1000"), "\(text)")
            }
        }
    }

    @Test("The seccomp filter refuses namespaces, mounts, ptrace, bpf and keyrings")
    func seccomp() async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch()
            defer { Task { await sandbox.destroy() } }
            let probe = """
                import ctypes, errno
                libc = ctypes.CDLL(None, use_errno=True)
                def attempt(call):
                    rc = call()
                    return 'ok' if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), '?')
                {
                    'unshare_user': attempt(lambda: libc.unshare(0x10000000)),
                    'unshare_net': attempt(lambda: libc.unshare(0x40000000)),
                    'mount': attempt(lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)),
                    'ptrace': attempt(lambda: libc.ptrace(0, 0, 0, 0)),
                    'bpf': attempt(lambda: libc.syscall(321, 0, 0, 0)),
                    'keyctl': attempt(lambda: libc.syscall(250, 0, 0, 0, 0, 0)),
                    'settime': attempt(lambda: libc.syscall(227, 0, ctypes.byref((ctypes.c_long * 2)(0, 0)))),
                }
                """
            let outcome = try await sandbox.run(probe)
            let text = try #require(outcome.result.stringValue, "\(outcome)")
            for call in ["unshare_user", "unshare_net", "mount", "ptrace", "bpf", "keyctl", "settime"] {
                #expect(text.contains("'\(call)': 'EPERM'"), "\(call) in \(text)")
            }
        }
    }

    @Test("Sessions cannot see each other's files or processes", arguments: tiers)
    func sessionsIsolated(tier: Tier) async throws {
        try await withFixture { fixture in
            let a = try await fixture.launch(Fixture.pool(tier: tier))
            let b = try await fixture.launch(Fixture.pool(tier: tier))
            defer {
                Task {
                    await a.destroy()
                    await b.destroy()
                }
            }
            _ = try await a.run("open('secret-a.txt', 'w').write('A'); import time; marker = 'a-proc'")
            let fromB = try await b.run(
                "import os\n(os.listdir('/mnt/data'), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
            )
            let text = try #require(fromB.result.stringValue)
            #expect(!text.contains("secret-a"))
            #expect(a.uid != b.uid)
            // Only bubblewrap's init and the agent (plus any child of the probe) are visible.
            let pidCount = text.components(separatedBy: ",").count
            #expect(pidCount <= 6, "\(text)")
            #expect(try await a.listFiles(in: .root, recursive: true).map(\.path.relative) == ["secret-a.txt"])
            #expect(try await b.listFiles(in: .root, recursive: true).isEmpty)
        }
    }

    @Test(
        "With egress off there is no interface but lo, no route, and a host loopback server is unreachable",
        arguments: tiers
    )
    func noEgress(tier: Tier) async throws {
        try await withFixture { fixture in
            let server = try LoopbackServer()
            defer { server.close() }
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await sandbox.destroy() } }
            let probe = """
                import socket
                out = {'ifaces': sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]),
                       'routes': open('/proc/net/route').read().splitlines()[1:]}
                for family, host in [(socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')]:
                    s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(2)
                    try:
                        s.connect((host, \(server.port))); out[host] = 'connected'
                    except Exception as e:
                        out[host] = type(e).__name__
                    finally:
                        s.close()
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    u.sendto(b'x', ('127.0.0.1', \(server.port))); out['udp'] = 'sent-locally'
                except Exception as e:
                    out['udp'] = type(e).__name__
                try:
                    socket.getaddrinfo('example.invalid', 80); out['dns'] = 'resolved'
                except Exception as e:
                    out['dns'] = type(e).__name__
                out
                """
            let outcome = try await sandbox.run(probe)
            let text = try #require(outcome.result.stringValue, "\(outcome)")
            #expect(text.contains("'ifaces': ['lo']"), "\(text)")
            #expect(text.contains("'routes': []"), "\(text)")
            #expect(text.contains("'127.0.0.1': 'ConnectionRefusedError'"), "\(text)")
            #expect(!text.contains("connected"))
            #expect(!text.contains("'dns': 'resolved'"))
            #expect(server.acceptedConnections() == 0, "the host's loopback server saw a connection")
        }
    }

    @Test(
        "With egress on the sandbox gets a NATed tap0 and a default route, but never the host's loopback",
        arguments: tiers
    )
    func egressOn(tier: Tier) async throws {
        try await withFixture { fixture in
            let server = try LoopbackServer()
            defer { server.close() }
            let sandbox = try await fixture.launch(Fixture.pool(egress: true, tier: tier))
            // Only the sandbox's own gateway (slirp's 10.0.2.2, which would land on host loopback)
            // is contacted: no traffic leaves this machine.
            let probe = """
                import socket
                out = {'ifaces': sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]),
                       'default_route': any(l.split()[1] == '00000000' for l in open('/proc/net/route').read().splitlines()[1:]),
                       'resolv': open('/etc/resolv.conf').read().strip()}
                s = socket.socket(); s.settimeout(3)
                try:
                    s.connect(('10.0.2.2', \(server.port))); out['gateway'] = 'connected'
                except Exception as e:
                    out['gateway'] = type(e).__name__
                out
                """
            let outcome = try await sandbox.run(probe)
            let text = try #require(outcome.result.stringValue, "\(outcome)")
            #expect(text.contains("'ifaces': ['lo', 'tap0']"), "\(text)")
            #expect(text.contains("'default_route': True"), "\(text)")
            #expect(text.contains("nameserver 10.0.2.3"), "\(text)")
            #expect(!text.contains("'gateway': 'connected'"), "\(text)")
            #expect(server.acceptedConnections() == 0)
            #expect(sandbox.networkPID > 0)
            await sandbox.destroy()
            try await fixture.expectNoTraces(of: sandbox)
            #expect(kill(sandbox.networkPID, 0) != 0, "slirp4netns must be gone")
            if tier == .gvisor {
                #expect(sandbox.namespaceHolderPID > 0)
                #expect(kill(sandbox.namespaceHolderPID, 0) != 0, "the namespace holder must be gone")
            }
        }
    }

    @Test("A memory hog is OOM-killed inside its cgroup with a clear error; the host stays healthy", arguments: tiers)
    func memoryHog(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(memory: 192 << 20, tier: tier))
            let other = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await other.destroy() } }
            do {
                let outcome = try await sandbox.run(
                    "blocks = []\nwhile True: blocks.append(bytearray(32 << 20))",
                    timeout: 60
                )
                // Python may also see MemoryError first: a failure result is fine.
                #expect(outcome.status == .failure)
            } catch let error as SandpiperError {
                #expect(error.code == "SessionOutOfMemory", "\(error)")
                #expect(error.message.contains("192 MiB"))
            }
            #expect(try await other.run("21 * 2").result == .integer(42))
            await sandbox.destroy()
            try await fixture.expectNoTraces(of: sandbox)
        }
    }

    @Test("A fork bomb hits the pids limit; the session is destroyed cleanly and others keep working", arguments: tiers)
    func forkBomb(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(pids: 48, tier: tier))
            let other = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await other.destroy() } }
            let code =
                "import subprocess\nsubprocess.run(['bash', '-c', ':(){ :|:& };:; sleep 2'], timeout=5)\n'survived'"
            switch tier.isolation {
            case .namespaces:
                // The bomb's leftovers keep the pids group full: the agent may then be unable to
                // start the threads of its next step. Either the cell returns, or the session ends
                // with a clear error; the limit holds in both cases.
                do {
                    let outcome = try await sandbox.run(code, timeout: 15)
                    #expect(outcome.status == .success || outcome.status == .failure)
                    let current = try String(
                        contentsOfFile: fixture.backend.cgroups.bases["pids", default: ""] + "/" + sandbox.id
                            + "/pids.current",
                        encoding: .utf8
                    )
                    #expect(Int(current.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 9999 <= 48)
                } catch let error as SandpiperError {
                    #expect(error.kind == .sandboxFailure, "\(error)")
                }
            case .gvisor:
                // Under ptrace every guest process is a host stub process: the bomb exhausts the
                // sandbox's pids (pool limit + 512 for gVisor itself) and takes the sentry down with
                // it. Contained: a clear error for this session, nothing for the others.
                do {
                    _ = try await sandbox.run(code, timeout: 15)
                } catch let error as SandpiperError {
                    #expect(error.kind == .sandboxFailure, "\(error)")
                }
            }
            #expect(try await other.run("6 * 7").result == .integer(42))
            await sandbox.destroy()
            try await fixture.expectNoTraces(of: sandbox)
        }
    }

    @Test(
        "/mnt/data has a size limit: a cell that fills it gets ENOSPC and an upload gets SessionDiskFull",
        arguments: tiers
    )
    func diskQuota(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(disk: 8 << 20, tier: tier))
            defer { Task { await sandbox.destroy() } }
            let outcome = try await sandbox.run(
                "try:\n    open('fill.bin', 'wb').write(b'x' * (16 << 20))\n    r = 'wrote'\nexcept OSError as e:\n    r = e.errno\nr"
            )
            #expect(outcome.result == .integer(28), "ENOSPC expected: \(outcome)")
            let writer = try await sandbox.createFile(SessionFilePath(validating: "upload.bin"))
            do {
                for _ in 0..<20 { try await writer.write([UInt8](repeating: 1, count: 1 << 20)) }
                Issue.record("the upload should have hit the quota")
            } catch let error as SandpiperError {
                #expect(error.code == "SessionDiskFull")
                await writer.abort()
            }
            #expect(
                try await sandbox.listFiles(in: .root, recursive: true).allSatisfy {
                    !$0.path.name.hasPrefix(".sandpiper-upload")
                }
            )
        }
    }

    @Test("The file API never follows symlinks or serves hard links out of /mnt/data", arguments: tiers)
    func hostileFiles(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            defer { Task { await sandbox.destroy() } }
            _ = try await sandbox.run(
                """
                import os
                os.symlink('/etc/passwd', 'link.txt')
                os.makedirs('real', exist_ok=True)
                open('real/ok.txt', 'w').write('fine')
                os.symlink('/etc', 'dirlink')
                os.mkfifo('pipe')
                open('a.txt', 'w').write('a')
                os.link('a.txt', 'hard.txt')
                """
            )
            let names = try await sandbox.listFiles(in: .root, recursive: true).map(\.path.relative)
            #expect(names.contains("real/ok.txt"))
            #expect(!names.contains("link.txt") && !names.contains("dirlink") && !names.contains("pipe"))
            for name in ["link.txt", "dirlink/passwd", "pipe", "hard.txt"] {
                await #expect(throws: SandpiperError.self, "\(name)") {
                    _ = try await sandbox.openFile(SessionFilePath(validating: name))
                }
            }
            // Writing through a symlinked directory is refused too.
            await #expect(throws: SandpiperError.self) {
                _ = try await sandbox.createFile(SessionFilePath(validating: "dirlink/evil"))
            }
            #expect(!FileManager.default.fileExists(atPath: "/etc/evil"))
            let reader = try await sandbox.openFile(SessionFilePath(validating: "real/ok.txt"))
            #expect(try await reader.read(maxBytes: 100) == Array("fine".utf8))
            reader.close()
        }
    }

    @Test("Destroy leaves no process, mount, cgroup, directory or record behind", arguments: tiers)
    func destroyCleans(tier: Tier) async throws {
        try await withFixture { fixture in
            let sandbox = try await fixture.launch(Fixture.pool(tier: tier))
            _ = try await sandbox.run(
                "import subprocess; subprocess.Popen(['sleep', '1000']); open('f', 'w').write('x')"
            )
            let contained = Set(fixture.backend.cgroups.pids(sandboxID: sandbox.id))
            #expect(!contained.isEmpty)
            // Every process of the sandbox (gVisor's sentry and gofer included) is in its cgroups,
            // which carry the limits.
            let all = Set(fixture.processes(uid: sandbox.uid) + fixture.processes(commandContaining: sandbox.id))
            #expect(all.isSubset(of: contained), "outside the sandbox's cgroups: \(all.subtracting(contained))")
            // A forked session mounts nothing on the host: its tmpfs live in its own namespace.
            // An exec session's /mnt/data is a tmpfs mounted on the host; a forked session mounts
            // nothing on the host (its tmpfs live in its own namespace).
            var data = stat()
            var session = stat()
            let mounted =
                stat(sandbox.directory + "/data", &data) == 0 && stat(sandbox.directory, &session) == 0
                && data.st_dev != session.st_dev
            #expect(mounted == (tier.launch == .exec), "\(sandbox.directory)/data")
            await sandbox.destroy()
            await sandbox.destroy()  // idempotent
            try await fixture.expectNoTraces(of: sandbox)
        }
    }

    @Test("A sandbox that cannot start says why, and leaves nothing behind")
    func startFailureExplained() async throws {
        let runtime = "/tmp/sandpiper-broken-runtime-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: runtime + "/bin", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: runtime) }
        try "#!/bin/sh\necho 'interpreter exploded on start' >&2\nexit 3\n".write(
            toFile: runtime + "/bin/python",
            atomically: true,
            encoding: .utf8
        )
        chmod(runtime + "/bin/python", 0o755)
        chmod(runtime, 0o755)
        chmod(runtime + "/bin", 0o755)
        let state = "/tmp/sandpiper-it-" + UUID().uuidString.prefix(8).lowercased()
        let backend = try NamespaceBackend(
            configuration: .init(
                stateDirectory: state,
                pythonRuntime: runtime,
                agentsDirectory: NamespaceBackend.bundledAgentsDirectory,
                uidRange: 299_000...299_099
            ),
            records: InMemorySandboxRecordStore(),
            logger: Logger(label: "it", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        defer { try? FileManager.default.removeItem(atPath: state) }
        do {
            _ = try await backend.launch(SandboxSpec(id: "broken-\(UUID().uuidString.prefix(8))", pool: Fixture.pool()))
            Issue.record("the launch should fail")
        } catch let error as SandpiperError {
            #expect(error.code == "SandboxStartFailed", "\(error)")
            #expect(error.message.contains("interpreter exploded on start"), "\(error)")
        }
        #expect(backend.cgroups.leftoverSandboxIDs().isEmpty)
        #expect((try? FileManager.default.contentsOfDirectory(atPath: state + "/sessions"))?.isEmpty == true)
        for base in backend.cgroups.bases.values { rmdir(base) }
    }

    @Test("A restarted server removes the sandboxes a crashed one left behind", arguments: tiers)
    func restartCleanup(tier: Tier) async throws {
        let records = InMemorySandboxRecordStore()
        let crashed = try Fixture(records: records)
        let orphan = try await crashed.launch(Fixture.pool(tier: tier))
        _ = try await orphan.run("import subprocess; subprocess.Popen(['sleep', '1000'])")
        #expect(!crashed.backend.cgroups.pids(sandboxID: orphan.id).isEmpty)
        // A new backend on the same state directory, as after a restart; the old one is never told.
        let restarted = try Fixture(records: records, stateDirectory: crashed.stateDirectory)
        await restarted.backend.cleanupLeftovers()
        // In a real restart the dead server's children are reaped by init; here we are their parent.
        _ = await ChildProcess.waitForExit(orphan.pid)
        try await restarted.expectNoTraces(of: orphan)
        await restarted.tearDown()
    }
}

/// A TCP server on 127.0.0.1 that counts connections without ever reading them.
final class LoopbackServer: Sendable {
    let fd: Int32
    let port: Int

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0, listen(fd, 16) == 0 else { throw SandpiperError.internalError("cannot listen on loopback") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    func acceptedConnections() -> Int {
        var count = 0
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 { break }
            Glibc.close(client)
            count += 1
        }
        return count
    }

    func close() { Glibc.close(fd) }
}
