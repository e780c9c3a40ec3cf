import Foundation
import Logging
import NIOPosix
import SandpiperCore
import Synchronization

#if canImport(Glibc)
    import Glibc
    import CSandpiperShims
#endif

/// The warm template of one fork pool (docs/architecture.md, "Warm-fork sessions").
///
/// A Python interpreter that has imported and warmed the whole stack, run by bubblewrap inside
/// its own user namespace. That namespace maps its root to a host uid of its own, uids 1...n to
/// a block of host uids, one per session, and n+1 to the uid of its sessions' pid 1s; the
/// template keeps its capabilities there (and only there) to give each forked session new
/// mount, pid, net, ipc and uts namespaces and tmpfs mounts, then the session drops to its uid,
/// all capabilities, no_new_privs and the seccomp filter before any user code runs. The
/// template never runs user code.
///
/// After its warm-up the template forks into `forkerCount` forkers. The host speaks to each over
/// its own SOCK_SEQPACKET socket (fd 3, then 7 on, inside): a `fork` request carries the
/// session's agent pipes; the reply names the pids of the session's pid 1 and agent, which the
/// host moves into the session's cgroups before letting them go on.
actor ForkTemplate {
    let pool: PoolConfiguration
    private let backend: NamespaceBackend
    private let logger: Logger
    private var running: Running?
    private var starting: Task<Running, any Error>?
    /// Fork requests waiting or running per forker (by control socket), and the forkers found
    /// dead, of the running template: a request goes to the live forker with the fewest.
    private var load: [Int32: Int] = [:]
    private var deadForkers: Set<Int32> = []
    /// When the last start failed: no new attempt for `retryDelay` (the pool falls back to exec).
    private var failedAt: ContinuousClock.Instant?
    static let retryDelay: Duration = .seconds(30)
    /// Error codes: no template can run now (the caller falls back to exec); the template
    /// died under a fork request (the caller retries, which restarts it).
    static let unavailableCode = "TemplateUnavailable"
    static let goneCode = "TemplateGone"
    static let forkTimeoutMilliseconds: Int32 = 10_000

    private struct Running {
        let id: String
        let pid: pid_t
        /// One control socket per forker, each with its own request lock.
        let controls: [(socket: Int32, exchange: ControlExchange)]
        let uids: UIDBlock
        let stderrTail: OutputTail
    }

    /// How many forkers a template runs: one per core (a fork is serial work in its forker), at
    /// most four.
    static let forkerCount = max(1, min(ProcessInfo.processInfo.activeProcessorCount, 4))

    init(pool: PoolConfiguration, backend: NamespaceBackend) {
        self.pool = pool
        self.backend = backend
        var logger = backend.logger
        logger[metadataKey: "pool"] = "\(pool.name)"
        self.logger = logger
    }

    /// A forked session's first process, moved into `cgroupProcs` and released. The pipes are
    /// the agent's request read end, response write end and stderr write end; the caller keeps
    /// (and closes) its own copies.
    func fork(
        insideUID: UInt32,
        limits: SessionLimits,
        cgroupProcs: [String],
        fds: [Int32]
    ) async throws -> pid_t {
        guard let running else { throw SandpiperError(.unavailable, code: Self.unavailableCode, "no template") }
        let go = try Pipe()
        defer {
            close(go.read)
            close(go.write)
        }
        let request: JSONValue = .object([
            "type": .string("fork"),
            "uid": .integer(Int64(insideUID)),
            "tmpBytes": .integer(limits.tmpBytes),
            "diskBytes": .integer(limits.diskBytes),
            "initUid": .integer(Int64(running.uids.initUID)),
        ])
        let payload = request.serialized()
        // The template takes them as: requests, responses, go, stderr.
        let ordered = [fds[0], fds[1], go.read, fds[2]]
        // The round trip blocks (a forker forks one session at a time): on NIO's blocking pool,
        // never on a cooperative thread, and one request at a time on a forker's socket. A forker
        // the request could not even reach is dead: the next live one takes it.
        var reply = ControlExchange.Reply(bytes: [], descriptors: [])
        while reply.bytes.isEmpty {
            let live = running.controls.filter { !deadForkers.contains($0.socket) }
            guard let (control, exchange) = live.min(by: { load[$0.socket, default: 0] < load[$1.socket, default: 0] })
            else { throw templateDied("every forker of the template is gone", id: running.id) }
            load[control, default: 0] += 1
            let sent: Int
            let answer: Result<ControlExchange.Reply, ControlExchange.ReadFailure>
            do {
                (sent, answer) = try await NIOThreadPool.singleton.runIfActive {
                    exchange.roundTrip(control, payload: payload, fds: ordered, timeout: Self.forkTimeoutMilliseconds)
                }
                load[control] = max(0, load[control, default: 1] - 1)
            } catch {
                load[control] = max(0, load[control, default: 1] - 1)
                throw error
            }
            var untaken = sent != payload.count
            if case .failure(let failure) = answer, failure.untaken { untaken = true }
            if untaken {
                // The forker is gone and never took the request (the send failed, or the socket
                // was reset with the request unread: a forker killed, say, by the OOM killer):
                // the next live forker takes it; the template and its sessions go on.
                let error = forkerDied(control, of: running.id)
                if self.running?.id == running.id, !deadForkers.isSuperset(of: running.controls.map(\.socket)) {
                    continue
                }
                throw error
            }
            switch answer {
            case .success(let answered): reply = answered
            case .failure(let failure) where failure.count != 0:
                throw templateDied("the template did not answer in time", id: running.id)
            case .failure:
                // It died holding the request: the launch starts again (new pipes, new go).
                throw forkerDied(control, of: running.id)
            }
        }
        defer { for fd in reply.descriptors { close(fd) } }
        guard let message = try? JSONValue.parse(reply.bytes) else {
            throw templateDied("the template sent a malformed message", id: running.id)
        }
        guard case .object(let fields) = message, fields["type"] == .string("forked") else {
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "the template could not fork: \(message)")
        }
        // The session's init and its agent, from the pidfds the forker attached: pids as the
        // host numbers them, with no walk of the template's processes. Both are still in the
        // template's cgroups, held by the go pipe.
        let hostPIDs = reply.descriptors.prefix(2).map { pid_t(sandpiper_pidfd_pid($0)) }.filter { $0 > 0 }
        guard reply.descriptors.count == 2, hostPIDs.count == 2 else {
            for pid in hostPIDs { kill(pid, SIGKILL) }
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "the forked session vanished")
        }
        for procs in cgroupProcs {
            guard SystemFile.write(each: hostPIDs.map { "\($0)" }, to: procs) else {
                for pid in hostPIDs { kill(pid, SIGKILL) }
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxStartFailed",
                    "cannot move the session into \(procs)"
                )
            }
        }
        var byte = UInt8(ascii: "g")
        guard write(go.write, &byte, 1) == 1 else {
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "the forked session did not wait")
        }
        return hostPIDs[0]
    }

    /// What a session's init costs the template's memory cgroup (measured: 1-2.5 MiB: its page
    /// tables, task and namespaces, and the pages it writes before it is moved into its own).
    static let kernelMemoryPerSession: Int64 = 4 << 20

    /// A host uid for a new session, with its number inside the template's user namespace.
    func claimUID() async throws -> (host: UInt32, inside: UInt32, block: UIDBlock) {
        if running == nil { try await start() }
        guard let running else { throw SandpiperError(.unavailable, code: Self.unavailableCode, "no template") }
        guard let inside = running.uids.claim() else {
            throw SandpiperError(.unavailable, "every uid of the pool's template is in use")
        }
        return (running.uids.base + inside, inside, running.uids)
    }

    /// The template's own sandbox id (its cgroups and record), while it runs.
    var sandboxID: String? { running?.id }

    /// True when the template runs or may be started now.
    var available: Bool {
        if running != nil { return true }
        if let failedAt, ContinuousClock.now - failedAt < Self.retryDelay { return false }
        return true
    }

    // MARK: Start and stop

    /// Starts the template, once: concurrent callers wait for the same start.
    private func start() async throws {
        if let failedAt, ContinuousClock.now - failedAt < Self.retryDelay {
            throw SandpiperError(.unavailable, code: Self.unavailableCode, "the template failed to start recently")
        }
        let task: Task<Running, any Error>
        if let starting {
            task = starting
        } else {
            task = Task { try await self.launch() }
            starting = task
        }
        do {
            let started = try await task.value
            if starting != nil {
                starting = nil
                running = started
                load = [:]
                deadForkers = []
                failedAt = nil
            }
        } catch {
            starting = nil
            failedAt = .now
            throw error
        }
    }

    func stop() async {
        guard let running else { return }
        self.running = nil
        await Self.remove(running, backend: backend)
    }

    /// A forker whose socket failed: it leaves the rotation (the sessions it forked live on:
    /// they are their own pid 1s' now). The template goes when it was the last; the first
    /// forker's death ends the template anyway (bubblewrap exits with it).
    private func forkerDied(_ control: Int32, of template: String) -> SandpiperError {
        guard running?.id == template else {
            return SandpiperError(.unavailable, code: Self.goneCode, "the pool's template was replaced")
        }
        deadForkers.insert(control)
        if let running, running.controls.allSatisfy({ deadForkers.contains($0.socket) }) {
            return templateDied("the template's forkers exited", id: template)
        }
        logger.error(
            "a forker of the fork template exited; the others go on",
            metadata: ["said": "\((running?.stderrTail.text ?? "").suffix(500))"]
        )
        return SandpiperError(.unavailable, code: Self.goneCode, "a forker of the pool's template exited")
    }

    /// Removes the running template, when it is still `id` (nil: whichever runs): a caller that
    /// found its template dead after another had replaced it must not remove the new one.
    private func templateDied(_ what: String, id: String? = nil) -> SandpiperError {
        if let id, running?.id != id {
            return SandpiperError(.unavailable, code: Self.goneCode, "\(what): the pool's template was replaced")
        }
        let said = running?.stderrTail.text ?? ""
        logger.error(
            "the fork template died; it restarts on the next session",
            metadata: ["said": "\(said.suffix(500))"]
        )
        let error = SandpiperError(.unavailable, code: Self.goneCode, "\(what): the pool's template is gone")
        if let running {
            self.running = nil
            let backend = backend
            Task { await Self.remove(running, backend: backend) }
        }
        return error
    }

    /// Closes the control socket and removes the template's processes, cgroups and record.
    private static func remove(_ running: Running, backend: NamespaceBackend) async {
        for control in running.controls { close(control.socket) }
        running.stderrTail.close()
        let unreaped = backend.removeTraces(
            id: running.id,
            children: [running.pid],
            directory: backend.sessionsDirectory + "/" + running.id,
            cgroupDirectories: backend.cgroups.directories(for: running.id)
        )
        for child in unreaped { _ = await ChildProcess.waitForExit(child) }
        try? await backend.records.removeRecord(id: running.id)
        running.uids.retire()
    }

    private func launch() async throws -> Running {
        let started = ContinuousClock.now
        guard backend.hasSessionInit else {
            throw SandpiperError(
                .unavailable,
                code: Self.unavailableCode,
                "sandpiper-init or \(NamespaceBackend.forkerLibrary) is missing beside "
                    + "\(backend.configuration.sessionInit) (both are built with the server: `make build`)"
            )
        }
        let slots = UInt32(min(pool.maxConcurrentSessions + pool.readySessionInstances + 8, 4000))
        let base = try backend.allocateUIDBlock(count: slots + 2)
        let uids = UIDBlock(base: base, count: slots, backend: backend)
        let id = "tpl-\(pool.name)-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
        var record = SandboxRecord(
            id: id,
            pool: pool.name,
            backend: NamespaceBackend.name,
            uid: base,
            directory: backend.sessionsDirectory + "/" + id,
            cgroupDirectories: backend.cgroups.directories(for: id),
            createdAt: Date()
        )
        var pid: pid_t = 0
        var openFDs: [Int32] = []
        var tail: OutputTail?
        do {
            try await backend.records.save(record)
            var limits = pool.limits
            // The template clones each session's init, so the kernel charges that init's own
            // memory (page tables, task, the new namespaces, what it writes before it is moved:
            // fixed, never grown by user code) to the template's cgroup for the session's whole
            // life: room for each slot.
            limits.memoryBytes = max(limits.memoryBytes, 512 << 20) + Int64(slots) * Self.kernelMemoryPerSession
            limits.pids = 64
            let procs = try backend.cgroups.create(sandboxID: id, limits: limits)
            // One control socket per forker: ours, and theirs (fd 3, then 7 on).
            var ours: [Int32] = []
            var theirs: [Int32] = []
            for _ in 0..<Self.forkerCount {
                var pair: [Int32] = [0, 0]
                guard sandpiper_seqpacket_pair(&pair) == 0 else {
                    throw SandpiperError(.unavailable, "cannot create the template's socket")
                }
                openFDs += pair
                ours.append(pair[0])
                theirs.append(pair[1])
            }
            let ready = try Pipe()
            let go = try Pipe()
            let stderrPipe = try Pipe()
            openFDs += [ready.read, ready.write, go.read, go.write, stderrPipe.read, stderrPipe.write]
            let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
            openFDs.append(devNull)
            let stderrFD = backend.configuration.inheritAgentStderr ? STDERR_FILENO : stderrPipe.write
            // fd 3: the first forker's control socket; 4 and 5: the hand-shake for the uid maps,
            // closed before bubblewrap starts.
            let templateFilter = open(backend.templateSeccompPath, O_RDONLY | O_CLOEXEC)
            guard templateFilter >= 0 else { throw SandpiperError.internalError("cannot open the template's filter") }
            openFDs.append(templateFilter)
            // 6: the template's own seccomp filter, which bubblewrap installs; 7 on: the other
            // forkers' control sockets.
            let fds =
                [devNull, devNull, stderrFD, theirs[0], ready.write, go.read, templateFilter] + theirs.dropFirst()
            let forkerFDs = (0..<(theirs.count - 1)).map { Int32(7 + $0) }
            let handshake = #"echo r >&4 && read x <&5 && exec 4>&- 5<&- && exec "$@""#
            let launcher =
                [
                    backend.configuration.setpriv, "--reuid=\(base)", "--regid=\(base)", "--clear-groups",
                    "--inh-caps=-all", "--", "/usr/bin/unshare", "--user", "--", "/bin/sh", "-c", handshake,
                    "sandpiper-template", backend.configuration.bubblewrap,
                ] + Self.bubblewrapArguments(pool: pool, backend: backend, forkerFDs: forkerFDs)
            let script = "ulimit -n 4096 && ulimit -c 0 || exit 125; " + SlirpNetwork.joinCgroupsScript
            logger.trace("starting the fork template", metadata: ["command": "\(launcher.joined(separator: " "))"])
            pid = try ChildProcess.spawn(
                executable: "/bin/sh",
                arguments: ["-c", script, "sandpiper-launch"] + procs + ["--"] + launcher,
                fds: fds
            )
            record.pid = pid
            try? await backend.records.save(record)
            for fd in theirs + [ready.write, go.read, devNull, stderrPipe.write, templateFilter] { close(fd) }
            openFDs = ours + [ready.read, go.write]
            let stderrTail = try await OutputTail.drain(stderrPipe.read)
            tail = stderrTail
            var byte: UInt8 = 0
            guard sandpiper_read_timeout(ready.read, &byte, 1, 10_000) == 1 else {
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxStartFailed",
                    "the template's user namespace did not come up"
                )
            }
            // Inside root is the template's own uid; 1...slots are the sessions', slots+1 their
            // pid 1s'.
            let map = "0 \(base) 1\n1 \(base + 1) \(slots + 1)\n"
            for file in ["uid_map", "gid_map"] {
                guard (try? map.write(toFile: "/proc/\(pid)/\(file)", atomically: false, encoding: .utf8)) != nil else {
                    throw SandpiperError(
                        .unavailable,
                        code: "SandboxStartFailed",
                        "cannot write the template's \(file)"
                    )
                }
            }
            // A whole line: `read` fails on a line cut short by EOF.
            var line: [UInt8] = Array("go\n".utf8)
            _ = write(go.write, &line, line.count)
            close(ready.read)
            close(go.write)
            openFDs = ours
            let limit = backend.configuration.templateStartupTimeout.components
            let timeout = Int32(clamping: limit.seconds * 1000 + limit.attoseconds / 1_000_000_000_000_000)
            for control in ours {
                let hello = try readMessage(control, timeout: timeout, tail: stderrTail)
                guard case .object(let fields) = hello, fields["type"] == .string("ready") else {
                    throw SandpiperError(.unavailable, code: "SandboxStartFailed", "the template said \(hello)")
                }
            }
            logger.info(
                "fork template ready",
                metadata: [
                    "uids": "\(base)...\(base + slots + 1)", "forkers": "\(ours.count)",
                    "took": "\(ContinuousClock.now - started)",
                ]
            )
            return Running(
                id: id,
                pid: pid,
                controls: ours.map { ($0, ControlExchange()) },
                uids: uids,
                stderrTail: stderrTail
            )
        } catch {
            tail?.close()
            for fd in openFDs { close(fd) }
            let unreaped = backend.removeTraces(
                id: id,
                children: pid > 0 ? [pid] : [],
                directory: record.directory,
                cgroupDirectories: record.cgroupDirectories
            )
            for child in unreaped { _ = await ChildProcess.waitForExit(child) }
            try? await backend.records.removeRecord(id: id)
            uids.retire()
            let said = tail?.text ?? ""
            let message = (error as? SandpiperError)?.message ?? "\(error)"
            throw SandpiperError(
                .unavailable,
                code: "SandboxStartFailed",
                "the fork template did not start: \(message)" + (said.isEmpty ? "" : "; it said: \(said.suffix(1500))")
            )
        }
    }

    /// One JSON message from the control socket.
    private func readMessage(_ fd: Int32, timeout: Int32, tail: OutputTail? = nil) throws(SandpiperError) -> JSONValue {
        var buffer = [UInt8](repeating: 0, count: 65536)
        let count = buffer.withUnsafeMutableBytes { raw in
            sandpiper_read_timeout(fd, raw.baseAddress, UInt(raw.count), timeout)
        }
        guard count > 0 else {
            if tail != nil {
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxStartFailed",
                    count == 0 ? "the template exited" : "the template did not answer in time"
                )
            }
            throw templateDied(count == 0 ? "the template exited" : "the template did not answer in time")
        }
        guard let value = try? JSONValue.parse(buffer[0..<count]) else {
            throw templateDied("the template sent a malformed message")
        }
        return value
    }

    /// The template's sandbox: the same read-only view as an exec session, its capabilities kept
    /// inside its own user namespace, and the session filter less unshare, mount and sethostname
    /// (which it needs to set its sessions up; they install the full filter).
    static func bubblewrapArguments(pool: PoolConfiguration, backend: NamespaceBackend, forkerFDs: [Int32])
        -> [String]
    {
        let runtime = backend.configuration.pythonRuntime
        var arguments = [
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-add", "ALL",
        ]
        arguments += NamespaceSandbox.readOnlySystemBinds(backend: backend, egress: false)
        arguments += [
            "--size", "\(64 << 20)", "--perms", "1777", "--tmpfs", "/tmp",
            "--ro-bind", runtime, runtime,
            "--ro-bind", backend.installedAgentsDirectory, "/opt/sandpiper/agents",
            "--ro-bind", backend.seccompPath, "/opt/sandpiper/seccomp.bpf",
            "--proc", "/proc", "--dev", "/dev",
            "--dir", "/mnt", "--dir", "/mnt/data", "--chdir", "/mnt/data", "--hostname", "sandbox",
            "--clearenv",
        ]
        for (name, value) in NamespaceSandbox.sandboxEnvironment(runtime: runtime) {
            arguments += ["--setenv", name, value]
        }
        arguments += ["--remount-ro", "/", "--seccomp", "6", "--"]
        arguments +=
            NamespaceSandbox.agentCommand(for: .pythonLTS, runtime: runtime) + ["--template"]
            + forkerFDs.map { "\($0)" }
        return worldTraversableParents(arguments)
    }

    /// bubblewrap makes the missing parents of a bind target mode 0700, owned by the user it runs
    /// as: the template's root here, so its sessions (other uids) could not reach /etc, /opt or
    /// the runtime. Makes each such parent first, 0755.
    static func worldTraversableParents(_ arguments: [String]) -> [String] {
        var parents: [String] = []
        var index = 0
        while index + 2 < arguments.count {
            if ["--ro-bind", "--bind", "--symlink"].contains(arguments[index]) {
                var path = (arguments[index + 2] as NSString).deletingLastPathComponent
                var chain: [String] = []
                while path != "/" && !path.isEmpty {
                    chain.insert(path, at: 0)
                    path = (path as NSString).deletingLastPathComponent
                }
                for parent in chain where !parents.contains(parent) { parents.append(parent) }
                index += 3
            } else {
                index += 1
            }
        }
        let made = parents.flatMap { ["--perms", "0755", "--dir", $0] }
        guard let first = arguments.firstIndex(where: { $0 == "--ro-bind" }) else { return arguments }
        return Array(arguments[..<first]) + made + Array(arguments[first...])
    }
}

/// The host uids of one template: `base` is the template's own, base+1...base+count its
/// sessions', and base+count+1 (`initUID` inside) that of its sessions' pid 1s, which owns
/// nothing and never runs user code. Given back to the backend once the template is gone and
/// every session ended.
final class UIDBlock: Sendable {
    let base: UInt32
    let count: UInt32
    /// Every uid of the block: the template's, the sessions', the inits'.
    var size: UInt32 { count + 2 }
    /// The sessions' pid 1s' uid, as the template's user namespace numbers it.
    var initUID: UInt32 { count + 1 }
    private let state = Mutex<(used: Set<UInt32>, retired: Bool)>(([], false))
    private let backend: NamespaceBackend

    init(base: UInt32, count: UInt32, backend: NamespaceBackend) {
        self.base = base
        self.count = count
        self.backend = backend
    }

    /// A free inside uid (1...count), or nil.
    func claim() -> UInt32? {
        state.withLock { state in
            guard !state.retired, let free = (1...count).first(where: { !state.used.contains($0) }) else { return nil }
            state.used.insert(free)
            return free
        }
    }

    func release(inside: UInt32) {
        let done = state.withLock { state in
            state.used.remove(inside)
            return state.retired && state.used.isEmpty
        }
        if done { backend.releaseUIDBlock(base: base, count: size) }
    }

    func retire() {
        let done = state.withLock { state in
            state.retired = true
            return state.used.isEmpty
        }
        if done { backend.releaseUIDBlock(base: base, count: size) }
    }
}

/// One fork request and its reply on a template's control socket, atomically (a request's reply
/// must never be read by another request).
final class ControlExchange: Sendable {
    private let lock = Mutex(())

    struct ReadFailure: Error {
        /// What the read returned: 0 at end of file, -1 on an error or a timeout.
        let count: Int
        /// The read's errno (ETIMEDOUT when no reply came in time); 0 at end of file.
        var error: Int32 = 0

        /// The forker closed its socket before it took the request: the kernel reports
        /// ECONNRESET to the peer of a unix socket that closes with unread data. It died without
        /// starting a fork, so another forker can take the same request.
        var untaken: Bool { count < 0 && error == ECONNRESET }
    }

    /// A reply: its bytes and the descriptors attached to it (the caller closes them).
    struct Reply {
        var bytes: [UInt8]
        var descriptors: [Int32]
    }

    func roundTrip(_ socket: Int32, payload: [UInt8], fds: [Int32], timeout: Int32) -> (
        Int, Result<Reply, ReadFailure>
    ) {
        lock.withLock { _ in
            let sent = payload.withUnsafeBufferPointer { bytes in
                fds.withUnsafeBufferPointer { table in
                    sandpiper_send_with_fds(
                        socket,
                        bytes.baseAddress,
                        UInt(bytes.count),
                        table.baseAddress,
                        Int32(table.count)
                    )
                }
            }
            guard sent == payload.count else { return (sent, .failure(ReadFailure(count: -1))) }
            // A forker's replies are a line of JSON: at most 900 bytes (forker.c, answer_error).
            var buffer = [UInt8](repeating: 0, count: 4096)
            var descriptors = [Int32](repeating: -1, count: 4)
            var received: Int32 = 0
            // errno is taken right after the read, before anything else can overwrite it.
            let (count, error) = buffer.withUnsafeMutableBytes { raw in
                descriptors.withUnsafeMutableBufferPointer { table in
                    let count = sandpiper_receive_with_fds_timeout(
                        socket,
                        raw.baseAddress,
                        UInt(raw.count),
                        table.baseAddress,
                        Int32(table.count),
                        &received,
                        timeout
                    )
                    return (count, count < 0 ? errno : 0)
                }
            }
            let attached = Array(descriptors.prefix(Int(received)))
            guard count > 0 else {
                for fd in attached { close(fd) }
                return (sent, .failure(ReadFailure(count: count, error: error)))
            }
            return (sent, .success(Reply(bytes: Array(buffer[0..<count]), descriptors: attached)))
        }
    }
}
