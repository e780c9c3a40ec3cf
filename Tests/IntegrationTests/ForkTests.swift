import Foundation
import SandpiperCore
import Testing

@testable import SandpiperSandbox

#if canImport(Glibc)
    import Glibc
#endif

/// What forking adds to the isolation suites (which run on the forked tier too): siblings and
/// their template are out of each other's reach, each session is seeded anew, a dead template
/// is replaced, and a template that cannot start leaves the pool on exec.
@Suite("Warm-fork sessions (real template)", .enabled(if: integrationEnabled), .serialized)
struct ForkTests {
    static let probe = """
        import json, os, random, numpy
        processes = [p for p in os.listdir('/proc') if p.isdigit()]
        visible = sorted(int(t) for p in processes for t in os.listdir('/proc/%s/task' % p))
        reachable, refused = [], []
        for pid in range(1, 4097):
            try:
                os.kill(pid, 0)
                reachable.append(pid)
            except ProcessLookupError:
                pass
            except PermissionError:
                refused.append(pid)
        open('/tmp/mine-' + str(os.getuid()), 'w').write('x')
        json.dumps({
            'processes': len(processes), 'visible': visible, 'reachable': reachable, 'refused': refused,
            'ns': {n: os.readlink('/proc/self/ns/' + n) for n in ('pid', 'mnt', 'net', 'ipc', 'uts', 'user')},
            'uid': os.getuid(), 'random': random.random(), 'numpy': float(numpy.random.rand()),
            'urandom': os.urandom(8).hex(), 'tmp': sorted(os.listdir('/tmp')),
        })
        """

    struct Probe: Decodable {
        let processes: Int
        let visible: [Int32]
        let reachable: [Int32]
        let refused: [Int32]
        let ns: [String: String]
        let uid: UInt32
        let random: Double
        let numpy: Double
        let urandom: String
        let tmp: [String]
    }

    static func probe(_ sandbox: NamespaceSandbox) async throws -> Probe {
        let outcome = try await sandbox.run(probe)
        let text = try #require(outcome.result.stringValue, "\(outcome)")
        return try JSONDecoder().decode(Probe.self, from: Data(text.utf8))
    }

    @Test("Forked siblings cannot see or signal each other or their template, and are seeded anew")
    func siblings() async throws {
        try await withFixture { fixture in
            let pool = Fixture.pool(tier: .forked)
            let first = try await fixture.launch(pool)
            let second = try await fixture.launch(pool)
            let a = try await Self.probe(first)
            let b = try await Self.probe(second)
            for probe in [a, b] {
                // Only its own processes exist for it: nothing else can even be named, let alone
                // signalled. Its pid 1 (sandpiper-init, the init uid) is not the user's to signal.
                #expect(probe.refused == [1], "processes of others are visible: \(probe.refused)")
                #expect(Set(probe.reachable).isSubset(of: Set(probe.visible)))
                #expect(probe.visible.count <= 8, "threads of its init and agent only: \(probe.visible)")
                #expect(probe.uid != 0)
                #expect(probe.processes == 2, "an init and the agent, nothing else: \(probe.processes)")
            }
            #expect(a.uid != b.uid, "siblings share a uid")
            #expect(first.uid != second.uid)
            for name in ["pid", "mnt", "net", "ipc", "uts"] {
                #expect(a.ns[name] != b.ns[name], "siblings share a \(name) namespace")
            }
            #expect(a.random != b.random && a.numpy != b.numpy && a.urandom != b.urandom, "siblings replay randomness")
            #expect(!b.tmp.contains("mine-\(a.uid)"), "one sibling sees the other's /tmp")

            // Neither shares a namespace with its template, whose processes are the host's to see.
            let template = fixture.backend.template(for: pool)
            let templateID = try #require(await template.sandboxID)
            let templatePIDs = fixture.backend.cgroups.pids(sandboxID: templateID)
            #expect(!templatePIDs.isEmpty)
            for pid in templatePIDs {
                for name in ["pid", "mnt", "net", "ipc", "uts"] {
                    let theirs = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/\(name)"))
                    #expect(theirs != a.ns[name] && theirs != b.ns[name], "a session shares \(name) with its template")
                }
            }
            // The session's processes are in its own cgroups, none left in the template's.
            for sandbox in [first, second] {
                let own = fixture.backend.cgroups.pids(sandboxID: sandbox.id)
                #expect(own.count >= 2, "\(own)")
                #expect(Set(own).isDisjoint(with: Set(templatePIDs)))
            }
            await first.destroy()
            await second.destroy()
            try await fixture.expectNoTraces(of: first)
            try await fixture.expectNoTraces(of: second)
            // The template outlives its sessions and still forks.
            let third = try await fixture.launch(pool)
            #expect(try await third.run("6 * 7").result == .integer(42))
            await third.destroy()
        }
    }

    /// The session's pid 1 is the small static sandpiper-init, not a copy of the interpreter: it
    /// holds nothing of the template's, and is as confined as the agent before any user code runs.
    /// It runs as the template's init uid, which is no session's (it is spawned before its
    /// session is known).
    @Test("A forked session's pid 1 is sandpiper-init: init uid, no capability, no_new_privs, seccomp, nothing open")
    func sessionInit() async throws {
        try await withFixture { fixture in
            let pool = Fixture.pool(tier: .forked)
            let session = try await fixture.launch(pool)
            let pids = fixture.backend.cgroups.pids(sandboxID: session.id)
            func status(_ pid: pid_t) -> [String: String] {
                var fields: [String: String] = [:]
                for line in (SystemFile.read("/proc/\(pid)/status") ?? "").split(separator: "\n") {
                    let parts = line.split(separator: ":", maxSplits: 1)
                    if parts.count == 2 {
                        fields[String(parts[0])] = parts[1].trimmingCharacters(in: .whitespaces)
                    }
                }
                return fields
            }
            let initPID = try #require(pids.first { status($0)["NSpid"]?.hasSuffix("\t1") == true }, "\(pids)")
            let agentPID = try #require(pids.first { status($0)["NSpid"]?.hasSuffix("\t2") == true }, "\(pids)")
            let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(initPID)/exe")
            #expect(exe.hasSuffix("/sandpiper-init"), "\(exe)")
            let other = try await fixture.launch(pool)
            let otherInit = try #require(
                fixture.backend.cgroups.pids(sandboxID: other.id).first {
                    status($0)["NSpid"]?.hasSuffix("\t1") == true
                }
            )
            let initUID = try #require(status(initPID)["Uid"]?.split(separator: "\t").first.map(String.init))
            #expect(status(otherInit)["Uid"]?.split(separator: "\t").first.map(String.init) == initUID)
            for uid in ["0", "\(session.uid)", "\(other.uid)"] {
                #expect(initUID != uid, "pid 1 runs as \(uid)")
            }
            await other.destroy()
            for (pid, uid) in [(initPID, initUID), (agentPID, "\(session.uid)")] {
                let fields = status(pid)
                #expect(
                    fields["Uid"]?.split(separator: "\t").allSatisfy { String($0) == uid } == true,
                    "\(fields["Uid"] ?? "")"
                )
                #expect(
                    fields["Gid"]?.split(separator: "\t").allSatisfy { String($0) == uid } == true,
                    "\(fields["Gid"] ?? "")"
                )
                for capability in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                    #expect(
                        fields[capability] == "0000000000000000",
                        "\(pid) \(capability) \(fields[capability] ?? "")"
                    )
                }
                #expect(fields["NoNewPrivs"] == "1")
                #expect(fields["Seccomp"] == "2")
            }
            // Nothing but /dev/null open in pid 1: no pipe of the agent's, nothing of the template's.
            let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(initPID)/fd")
            for fd in fds {
                let target = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(initPID)/fd/\(fd)")
                #expect(target == "/dev/null", "pid 1 holds fd \(fd): \(target)")
            }
            #expect(fds.count == 3)
            // Not dumpable: its /proc files belong to its user namespace's root (the template's uid),
            // not to the session's, which therefore cannot ptrace it or read its memory.
            var info = stat()
            #expect(stat("/proc/\(initPID)/mem", &info) == 0)
            #expect(info.st_uid != session.uid)
            // Its mounts are the session's: /mnt/data a tmpfs, the session uid's alone.
            let mounts = SystemFile.read("/proc/\(initPID)/mountinfo") ?? ""
            #expect(mounts.contains(" /mnt/data ") && mounts.contains(" - tmpfs "), "\(mounts)")
            var data = stat()
            #expect(stat("/proc/\(initPID)/root/mnt/data", &data) == 0)
            #expect(data.st_uid == session.uid && data.st_gid == session.uid)
            #expect(data.st_mode & 0o777 == 0o700)
            // An orphan of the session is reaped by it (no zombie stays behind).
            _ = try await session.run(
                "import subprocess; subprocess.Popen(['/bin/sh', '-c', 'sleep 0.2 & exit 0']).wait()"
            )
            try await Task.sleep(for: .milliseconds(800))
            let zombies = fixture.backend.cgroups.pids(sandboxID: session.id).filter {
                status($0)["State"]?.hasPrefix("Z") == true
            }
            #expect(zombies.isEmpty, "\(zombies)")
            await session.destroy()
            try await fixture.expectNoTraces(of: session)
        }
    }

    /// A forked session is ready before its rehearsal cell; the pool prewarms it later. The
    /// rehearsal runs a real cell (its output and watchdog threads start) and leaves nothing:
    /// no variable, no history entry, no `_`.
    @Test("Prewarming a forked session runs a cell that leaves no trace")
    func prewarm() async throws {
        try await withFixture { fixture in
            let session = try await fixture.launch(Fixture.pool(tier: .forked))
            let agentPID = try #require(
                fixture.backend.cgroups.pids(sandboxID: session.id).first {
                    SystemFile.namespacePIDs(of: $0)?.last == 2
                }
            )
            func threads() -> Int {
                (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(agentPID)/task").count) ?? 0
            }
            #expect(threads() == 1, "a fresh forked agent has run no cell yet")
            await session.prewarm()
            #expect(threads() == 3, "the rehearsal started the output pump and the watchdog")
            // Exactly what a session that was never prewarmed shows.
            let control = try await fixture.launch(Fixture.pool(tier: .forked))
            let probe =
                "import json; json.dumps({'under': repr(_), 'history': len(In), 'out': len(Out), 'names': sorted(k for k in globals() if not k.startswith('_'))})"
            let seen = try await session.run(probe).result
            let expected = try await control.run(probe).result
            #expect(seen == expected)
            let text = try #require(seen.stringValue, "\(seen)")
            #expect(text.contains("\"under\": \"''\"") && text.contains("\"history\": 2"), "\(text)")
            await control.destroy()
            await session.destroy()
            try await fixture.expectNoTraces(of: session)
        }
    }

    /// The template forks sessions with the interpreter's at-fork hooks trimmed to `random`'s
    /// reseed (agent.py, `ForkHooks`); the session puts them all back before the user's code
    /// runs. Without that, a user's own fork (multiprocessing's default on Linux) would inherit
    /// the session's other threads as live ones, and `random` would repeat in it.
    @Test("A forked session's own forks run every at-fork hook")
    func userForksRunEveryHook() async throws {
        try await withFixture { fixture in
            let session = try await fixture.launch(Fixture.pool(tier: .forked))
            let code = """
                import json, os, random, threading, logging
                release = threading.Event()
                worker = threading.Thread(target=release.wait)
                worker.start()
                parent_threads = threading.active_count()
                lock_free = repr(logging._lock).startswith('<unlocked')
                state = random.getstate()
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    logging.getLogger('probe').warning('from the child')
                    os.write(w, json.dumps([threading.active_count(), random.getstate() == state]).encode())
                    os._exit(0)
                os.close(w)
                seen = json.loads(os.read(r, 1000))
                os.waitpid(pid, 0)
                release.set()
                worker.join()
                json.dumps({'parent': parent_threads, 'child': seen[0], 'sameRandom': seen[1], 'lockFree': lock_free})
                """
            let text = try #require(try await session.run(code).result.stringValue)
            struct Seen: Decodable {
                let parent: Int
                let child: Int
                let sameRandom: Bool
                let lockFree: Bool
            }
            let seen = try JSONDecoder().decode(Seen.self, from: Data(text.utf8))
            #expect(seen.parent >= 2, "\(text)")
            #expect(seen.child == 1, "the child of a fork in a session sees only its own thread: \(text)")
            #expect(!seen.sameRandom, "random was not reseeded in the child: \(text)")
            #expect(seen.lockFree, "the session starts with logging's lock held: \(text)")
            await session.destroy()
            try await fixture.expectNoTraces(of: session)
        }
    }

    /// The template clones every session's init, so the kernel charges each init's own memory to
    /// the template's cgroup: the template's limit must hold that for every slot, or a pool near
    /// its maximum gets its template OOM-killed (and every session with it). Measured on a batch
    /// of sessions, projected to all the template's slots.
    @Test("A template's memory cgroup holds the charge of a full pool's sessions")
    func templateCapacity() async throws {
        try await withFixture(wideUIDRange: true) { fixture in
            var pool = Fixture.pool(tier: .forked)
            pool.maxConcurrentSessions = 500
            let first = try await fixture.launch(pool)
            let template = fixture.backend.template(for: pool)
            let id = try #require(await template.sandboxID)
            let memory = try #require(
                fixture.backend.cgroups.directories(for: id).first { $0.contains("memory") || $0.contains("unified") }
            )
            func read(_ names: [String]) throws -> Int64 {
                for name in names {
                    guard let text = try? String(contentsOfFile: memory + "/" + name, encoding: .utf8) else { continue }
                    let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
                    if trimmed == "max" { return .max }
                    if let value = Int64(trimmed) { return value }
                }
                throw SandpiperError(.internalError, "no \(names) in \(memory)")
            }
            let usage = ["memory.usage_in_bytes", "memory.current"]
            let limit = try read(["memory.limit_in_bytes", "memory.max"])
            let before = try read(usage)
            var sessions = [first]
            for _ in 0..<24 { sessions.append(try await fixture.launch(pool)) }
            let after = try read(usage)
            let perSession = max(0, after - before) / 24
            let slots = Int64(pool.maxConcurrentSessions + pool.readySessionInstances + 8)
            let projected = after + perSession * (slots - Int64(sessions.count))
            #expect(perSession > 0, "the template's cgroup was not charged at all: \(before) -> \(after)")
            #expect(
                projected < limit,
                "\(slots) sessions would need \(projected >> 20) MiB in the template's cgroup (limit \(limit >> 20) MiB, \(perSession >> 10) KiB each)"
            )
            for session in sessions { await session.destroy() }
        }
    }

    @Test("A template that dies is replaced at the next session; its sessions end with a clear error")
    func templateRestart() async throws {
        try await withFixture { fixture in
            let pool = Fixture.pool(tier: .forked)
            let before = try await fixture.launch(pool)
            _ = try await before.run("x = 1")
            let template = fixture.backend.template(for: pool)
            let dead = try #require(await template.sandboxID)
            for pid in fixture.backend.cgroups.pids(sandboxID: dead) { kill(pid, SIGKILL) }
            // SIGKILL lands asynchronously: the session's processes go once the kernel tears the
            // template's pid namespace down (its sessions' namespaces are nested in it).
            let deadline = ContinuousClock.now + .seconds(10)
            while !fixture.backend.cgroups.pids(sandboxID: before.id).isEmpty, ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            #expect(fixture.backend.cgroups.pids(sandboxID: before.id).isEmpty, "the session outlived its template")
            do {
                _ = try await before.run("x")
                Issue.record("a session of a dead template still answered")
            } catch let error as SandpiperError {
                #expect(error.kind == .sandboxFailure, "\(error)")
            }
            let after = try await fixture.launch(pool)
            #expect(try await after.run("6 * 7").result == .integer(42))
            let replacement = try #require(await template.sandboxID)
            #expect(replacement != dead)
            await before.destroy()
            await after.destroy()
            try await fixture.expectNoTraces(of: before)
            try await fixture.expectNoTraces(of: after)
            for dir in fixture.backend.cgroups.directories(for: dead) {
                #expect(!FileManager.default.fileExists(atPath: dir), "the dead template's cgroup is left: \(dir)")
            }
        }
    }

    /// A template forks on one forker per core. Concurrent launches use them all; a forker that
    /// dies leaves the rotation (the sessions it forked live on) and the next launches fork on
    /// the others, without a new template.
    @Test("Concurrent launches fork on every forker; one that dies leaves its sessions and the template running")
    func forkers() async throws {
        try await withFixture { fixture in
            let pool = Fixture.pool(tier: .forked)
            let first = try await fixture.launch(pool)  // the template starts once
            let sessions = try await Self.launch(6, of: pool, in: fixture)
            let forkerOf = try Self.forkers(of: sessions, in: fixture)
            let forkers = Set(forkerOf.values)
            #expect(forkers.count >= min(ForkTemplate.forkerCount, 2), "forked by \(forkers) only")
            #expect(forkers.count <= ForkTemplate.forkerCount)
            // Not the first forker: bubblewrap's child, whose end is the template's (tested above).
            let others = forkers.filter { forker in forkers.contains { Self.parent(of: forker) == $0 } }
            guard ForkTemplate.forkerCount > 1 else {
                for session in [first] + sessions { await session.destroy() }
                return
            }
            let victim = try #require(others.first, "no session was forked by a forker other than the first")
            let template = try #require(await fixture.backend.template(for: pool).sandboxID)
            kill(victim, SIGKILL)
            while kill(victim, 0) == 0 { try await Task.sleep(for: .milliseconds(10)) }
            // Launches go on, on the forkers left, in the same template.
            let after = try await Self.launch(4, of: pool, in: fixture)
            for session in after {
                #expect(try await session.run("6 * 7").result == .integer(42))
            }
            #expect(await fixture.backend.template(for: pool).sandboxID == template)
            // What the dead forker forked still runs.
            for session in sessions where forkerOf[session.id] == victim {
                #expect(try await session.run("1 + 1").result == .integer(2))
            }
            for session in [first] + sessions + after {
                await session.destroy()
                try await fixture.expectNoTraces(of: session)
            }
        }
    }

    /// `count` sessions of `pool`, launched at once.
    static func launch(_ count: Int, of pool: PoolConfiguration, in fixture: Fixture) async throws -> [NamespaceSandbox]
    {
        try await withThrowingTaskGroup(of: NamespaceSandbox.self) { group in
            for _ in 0..<count { group.addTask { try await fixture.launch(pool) } }
            var all: [NamespaceSandbox] = []
            for try await session in group { all.append(session) }
            return all
        }
    }

    static func parent(of pid: pid_t) -> pid_t? {
        let line = (SystemFile.read("/proc/\(pid)/status") ?? "").split(separator: "\n").first {
            $0.hasPrefix("PPid:")
        }
        return line.flatMap { pid_t($0.dropFirst(5).trimmingCharacters(in: .whitespaces)) }
    }

    /// The forker (host pid) that forked each session: its agent's parent.
    static func forkers(of sessions: [NamespaceSandbox], in fixture: Fixture) throws -> [String: pid_t] {
        var forkerOf: [String: pid_t] = [:]
        for session in sessions {
            let agent = try #require(
                fixture.backend.cgroups.pids(sandboxID: session.id).first {
                    SystemFile.namespacePIDs(of: $0)?.last == 2
                }
            )
            forkerOf[session.id] = try #require(parent(of: agent))
        }
        return forkerOf
    }

    /// A forker killed with a request still unread in its socket (as the OOM killer might) never
    /// took it: the request goes to another forker, and the template and its sessions go on.
    @Test("A request left unread by a forker that dies is forked by another; the template goes on")
    func untakenRequest() async throws {
        guard ForkTemplate.forkerCount > 1 else { return }
        try await withFixture { fixture in
            let pool = Fixture.pool(tier: .forked)
            let sessions = try await Self.launch(6, of: pool, in: fixture)
            let forkers = Set(try Self.forkers(of: sessions, in: fixture).values)
            let first = try #require(forkers.first { forker in !forkers.contains { Self.parent(of: forker) == $0 } })
            let victim = try #require(forkers.first { Self.parent(of: $0) == first }, "one forker only: \(forkers)")
            let template = try #require(await fixture.backend.template(for: pool).sandboxID)
            // Both forkers stopped: the first launch waits on one, the second is sent to the other
            // (the fewest requests in flight), which is then killed with it unread.
            kill(first, SIGSTOP)
            kill(victim, SIGSTOP)
            let launches = Task {
                try await Self.launch(2, of: pool, in: fixture)
            }
            try await Task.sleep(for: .seconds(1))
            kill(victim, SIGKILL)
            try await Task.sleep(for: .milliseconds(300))
            kill(first, SIGCONT)
            let after = try await launches.value
            #expect(await fixture.backend.template(for: pool).sandboxID == template)
            for session in after {
                #expect(try await session.run("6 * 7").result == .integer(42))
            }
            for session in sessions {
                #expect(try await session.run("1 + 1").result == .integer(2))
            }
            for session in sessions + after {
                await session.destroy()
                try await fixture.expectNoTraces(of: session)
            }
        }
    }

    @Test("A pool whose template cannot start runs its sessions with exec")
    func fallback() async throws {
        try await withFixture(templateStartupTimeout: .milliseconds(1)) { fixture in
            let pool = Fixture.pool(tier: .forked)
            let sandbox = try await fixture.backend.launch(SandboxSpec(id: UUID().uuidString.lowercased(), pool: pool))
            let launched = try #require(sandbox as? NamespaceSandbox)
            #expect(!launched.forked)
            #expect(try await launched.run("6 * 7").result == .integer(42))
            #expect(await fixture.backend.template(for: pool).sandboxID == nil)
            // The template that timed out left nothing: no cgroup, no record.
            #expect(fixture.backend.cgroups.leftoverSandboxIDs().allSatisfy { !$0.hasPrefix("tpl-") })
            #expect(
                try await fixture.records.records(backend: NamespaceBackend.name).allSatisfy {
                    !$0.id.hasPrefix("tpl-")
                }
            )
            await launched.destroy()
            try await fixture.expectNoTraces(of: launched)
        }
    }
}
