import Foundation
import Logging
import SandpiperCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One bubblewrap sandbox running the Python agent. See `NamespaceBackend`.
final class NamespaceSandbox: Sandbox {
    let id: String
    let uid: UInt32
    let pid: pid_t
    /// slirp4netns, when the pool has egress.
    let networkPID: pid_t
    /// gVisor with egress: the process holding the network namespace runsc joins.
    let namespaceHolderPID: pid_t
    let directory: String
    let files: SafeDirectory
    private let agent: AgentChannel
    private let backend: NamespaceBackend
    private let destroyed = Mutex(false)
    private let prewarmDone = Atomic(false)
    private let logger: Logger
    private let memoryLimit: Int64
    private let stderrTail: OutputTail
    /// Gives the session's host uid back (to the backend, or to its fork template's block).
    private let releaseUID: @Sendable () -> Void
    /// A forked session's pid 1 (its processes are the template's descendants, not ours).
    var forked: Bool { pid == 0 }

    /// Time the host grants past the execution timeout for the agent to interrupt the code and
    /// answer before it is declared hung and the sandbox is killed.
    static let interruptGrace: Duration = .seconds(10)

    init(
        id: String,
        uid: UInt32,
        pid: pid_t,
        networkPID: pid_t,
        namespaceHolderPID: pid_t,
        directory: String,
        agent: AgentChannel,
        backend: NamespaceBackend,
        memoryLimit: Int64,
        stderrTail: OutputTail,
        logger: Logger,
        files: SafeDirectory? = nil,
        releaseUID: (@Sendable () -> Void)? = nil
    ) {
        self.memoryLimit = memoryLimit
        self.stderrTail = stderrTail
        self.id = id
        self.uid = uid
        self.pid = pid
        self.networkPID = networkPID
        self.namespaceHolderPID = namespaceHolderPID
        self.directory = directory
        self.files = files ?? SafeDirectory(root: directory + "/data", owner: uid, group: uid)
        self.agent = agent
        self.backend = backend
        self.logger = logger
        self.releaseUID = releaseUID ?? { [backend] in backend.releaseUID(uid) }
    }

    var isAlive: Bool {
        !destroyed.withLock { $0 } && agent.isOpen
    }

    // MARK: Launch

    static func launch(spec: SandboxSpec, backend: NamespaceBackend) async throws -> NamespaceSandbox {
        let id = spec.id
        let limits = spec.pool.limits
        let config = backend.configuration
        var logger = backend.logger
        logger[metadataKey: "sandbox"] = "\(id)"
        let uid = try backend.allocateUID()
        let directory = backend.sessionsDirectory + "/" + id
        let data = directory + "/data"
        var record = SandboxRecord(
            id: id,
            pool: spec.pool.name,
            backend: NamespaceBackend.name,
            uid: uid,
            directory: directory,
            cgroupDirectories: backend.cgroups.directories(for: id),
            createdAt: Date()
        )
        var pid: pid_t = 0
        var networkPID: pid_t = 0
        var holderPID: pid_t = 0
        var openFDs: [Int32] = []
        var tail: OutputTail?
        func undo() async {
            tail?.close()
            for fd in openFDs { close(fd) }
            let children = [pid, networkPID, holderPID].filter { $0 > 0 }
            let unreaped = backend.removeTraces(
                id: id,
                children: children,
                directory: directory,
                cgroupDirectories: record.cgroupDirectories
            )
            for child in unreaped { _ = await ChildProcess.waitForExit(child) }
            try? await backend.records.removeRecord(id: id)
            backend.releaseUID(uid)
        }
        do {
            try await backend.records.save(record)
            try makeDataMount(directory: directory, data: data, uid: uid, limits: limits)
            var cgroupLimits = limits
            // gVisor's sentry and gofer run many threads of their own in the sandbox's pids group.
            if spec.pool.isolation == .gvisor { cgroupLimits.pids += 512 }
            let procs = try backend.cgroups.create(sandboxID: id, limits: cgroupLimits)

            let toAgent = try Pipe()
            let fromAgent = try Pipe()
            openFDs += [toAgent.read, toAgent.write, fromAgent.read, fromAgent.write]
            let seccomp = open(backend.seccompPath, O_RDONLY | O_CLOEXEC)
            guard seccomp >= 0 else { throw SandpiperError.internalError("cannot open the seccomp program") }
            openFDs.append(seccomp)
            let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
            openFDs.append(devNull)
            let stderrPipe = try Pipe()
            openFDs += [stderrPipe.read, stderrPipe.write]
            let stderrFD = config.inheritAgentStderr ? STDERR_FILENO : stderrPipe.write

            var fds = [devNull, devNull, stderrFD, toAgent.read, fromAgent.write, seccomp]
            var egressPipes: (info: Pipe, block: Pipe)?
            if spec.pool.egressEnabled && spec.pool.isolation == .namespaces {
                let pipes = (info: try Pipe(), block: try Pipe())
                openFDs += [pipes.info.read, pipes.info.write, pipes.block.read, pipes.block.write]
                fds += [pipes.info.write, pipes.block.read]
                egressPipes = pipes
            }
            // The shell joins the cgroups before anything else runs; the launcher it execs does all
            // isolation before the agent starts.
            // A namespace sandbox gets its own descriptor cap (the server raises its own for
            // connections) and no core dumps: a crashing guest must not write one through the
            // host's handler. (gVisor: the same rlimits are in the OCI config; runsc needs more.)
            // `cd /`: the sandbox's pid 1 is bubblewrap, whose environment (PWD) code can read.
            let script =
                spec.pool.isolation == .namespaces
                ? "cd / && unset OLDPWD && ulimit -n 4096 && ulimit -c 0 || exit 125; " + SlirpNetwork.joinCgroupsScript
                : SlirpNetwork.joinCgroupsScript
            let launcher: [String]
            var closeAfterSpawn: [Int32] = []
            switch spec.pool.isolation {
            case .namespaces:
                // Drop to the session uid, then bubblewrap. Its arguments (host paths) come from a
                // pipe, not argv: code inside reads pid 1's command line.
                let arguments = bubblewrapArguments(
                    spec: spec,
                    backend: backend,
                    data: data,
                    seccompFD: 5,
                    networkFDs: egressPipes == nil ? nil : (info: 6, block: 7)
                )
                let argumentsPipe = try Pipe()
                openFDs += [argumentsPipe.read, argumentsPipe.write]
                // bubblewrap takes options from the pipe; the command stays on its command line.
                guard let separator = arguments.lastIndex(of: "--") else {
                    throw SandpiperError.internalError("bubblewrap arguments without a command")
                }
                let options = arguments[..<separator]
                let command = arguments[separator...]
                let payload = Array(options.map { $0 + "\0" }.joined().utf8)
                guard payload.count < 60_000,
                    payload.withUnsafeBytes({ Glibc.write(argumentsPipe.write, $0.baseAddress, $0.count) })
                        == payload.count
                else { throw SandpiperError.internalError("cannot pass bubblewrap its arguments") }
                close(argumentsPipe.write)
                openFDs.removeAll { $0 == argumentsPipe.write }
                fds.append(argumentsPipe.read)
                closeAfterSpawn.append(argumentsPipe.read)
                launcher =
                    [
                        config.setpriv, "--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", "--bounding-set=-all",
                        "--inh-caps=-all", "--", config.bubblewrap, "--args", "\(fds.count - 1)",
                    ] + command
            case .gvisor:
                // Egress: a network namespace with slirp4netns, made before runsc joins it.
                var networkNamespace: String?
                if spec.pool.egressEnabled {
                    let network = try await SlirpNetwork.makeNamespace(
                        cgroupProcs: procs,
                        uid: uid,
                        slirp: config.slirp4netns,
                        setpriv: config.setpriv
                    )
                    holderPID = network.holder
                    networkPID = network.slirp
                    networkNamespace = "/proc/\(network.holder)/ns/net"
                }
                // runsc must start as root; the agent runs as the session uid inside gVisor.
                let bundle = try GVisorBundle.write(
                    spec: spec,
                    backend: backend,
                    directory: directory,
                    data: data,
                    uid: uid,
                    environment: sandboxEnvironment(runtime: config.pythonRuntime),
                    command: agentCommand(for: spec.pool.type, runtime: config.pythonRuntime),
                    networkNamespace: networkNamespace
                )
                // runsc copies the interfaces of the namespace it runs in: start it inside. This
                // runsc tells the root namespace by /proc/sys/net/core/rmem_default existing,
                // which newer kernels show in every namespace: hide it in a private mount namespace.
                launcher =
                    (networkNamespace.map {
                        [
                            "/usr/bin/nsenter", "--net=\($0)", "--", "/usr/bin/unshare", "--mount", "--propagation",
                            "private",
                            "--", "/bin/sh", "-c",
                            #"mount -t tmpfs -o size=4k,mode=0555 none /proc/sys/net/core && exec "$@""#,
                            "sandpiper-runsc",
                        ]
                    } ?? [])
                    + GVisorBundle.arguments(
                        runsc: config.runsc,
                        directory: directory,
                        bundle: bundle,
                        id: id,
                        network: networkNamespace == nil ? "none" : "sandbox"
                    )
                fds = [toAgent.read, fromAgent.write, stderrFD]
            }
            let arguments = ["-c", script, "sandpiper-launch"] + procs + ["--"] + launcher
            pid = try ChildProcess.spawn(executable: "/bin/sh", arguments: arguments, fds: fds)
            record.pid = pid
            try? await backend.records.save(record)
            // The child has its copies; keep only the host ends.
            for fd in [toAgent.read, fromAgent.write, seccomp, devNull, stderrPipe.write] + closeAfterSpawn {
                close(fd)
            }
            openFDs = [toAgent.write, fromAgent.read]
            let stderrTail = try await OutputTail.drain(stderrPipe.read)
            tail = stderrTail
            if let egressPipes {
                close(egressPipes.info.write)
                close(egressPipes.block.read)
                defer {
                    close(egressPipes.info.read)
                    close(egressPipes.block.write)
                }
                networkPID = try await SlirpNetwork.attach(
                    infoFD: egressPipes.info.read,
                    blockFD: egressPipes.block.write,
                    cgroupProcs: procs,
                    uid: uid,
                    slirp: config.slirp4netns,
                    setpriv: config.setpriv
                )
            }
            let agent = try await AgentChannel.open(input: fromAgent.read, output: toAgent.write)
            openFDs = []
            let sandbox = NamespaceSandbox(
                id: id,
                uid: uid,
                pid: pid,
                networkPID: networkPID,
                namespaceHolderPID: holderPID,
                directory: directory,
                agent: agent,
                backend: backend,
                memoryLimit: limits.memoryBytes,
                stderrTail: stderrTail,
                logger: logger
            )
            do {
                _ = try await agent.waitUntilReady(timeout: config.startupTimeout)
            } catch {
                await sandbox.destroy()
                let said = stderrTail.text
                guard !said.isEmpty else { throw error }
                let message = (error as? SandpiperError)?.message ?? "\(error)"
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxStartFailed",
                    "could not start a sandbox: \(message); it said: \(said.suffix(1500))"
                )
            }
            logger.debug("sandbox ready", metadata: ["uid": "\(uid)", "pid": "\(pid)"])
            return sandbox
        } catch {
            await undo()
            if let error = error as? SandpiperError { throw error }
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "could not start a sandbox: \(error)")
        }
    }

    private static func makeDataMount(directory: String, data: String, uid: UInt32, limits: SessionLimits) throws {
        // 0711: the sandbox uid must traverse it to bind `data`, and may list nothing.
        guard mkdir(directory, 0o711) == 0 else {
            throw SandpiperError.internalError("cannot create \(directory): \(String(cString: strerror(errno)))")
        }
        guard mkdir(data, 0o700) == 0 else {
            throw SandpiperError.internalError("cannot create \(data): \(String(cString: strerror(errno)))")
        }
        let options = "size=\(limits.diskBytes),mode=0700,uid=\(uid),gid=\(uid)"
        guard mount("tmpfs", data, "tmpfs", UInt(MS_NOSUID | MS_NODEV), options) == 0 else {
            throw SandpiperError.internalError(
                "cannot mount the session's /mnt/data: \(String(cString: strerror(errno)))"
            )
        }
    }

    static func bubblewrapArguments(
        spec: SandboxSpec,
        backend: NamespaceBackend,
        data: String,
        seccompFD: Int,
        networkFDs: (info: Int, block: Int)?
    ) -> [String] {
        let config = backend.configuration
        let runtime = config.pythonRuntime
        var arguments = ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        arguments += readOnlySystemBinds(backend: backend, egress: spec.pool.egressEnabled)
        arguments += [
            // /tmp first, so that binds below it (a runtime under /tmp) stay visible.
            "--size", "\(spec.pool.limits.tmpBytes)", "--perms", "1777", "--tmpfs", "/tmp",
            "--ro-bind", runtime, runtime,
            "--ro-bind", backend.installedAgentsDirectory, "/opt/sandpiper/agents",
            "--proc", "/proc", "--dev", "/dev",
            "--dir", "/mnt", "--bind", data, "/mnt/data", "--chdir", "/mnt/data",
            "--uid", "1000", "--gid", "1000", "--hostname", "sandbox",
            "--clearenv",
        ]
        for (name, value) in sandboxEnvironment(runtime: runtime) {
            arguments += ["--setenv", name, value]
        }
        if let networkFDs {
            arguments += ["--info-fd", "\(networkFDs.info)", "--block-fd", "\(networkFDs.block)"]
        }
        arguments +=
            ["--remount-ro", "/", "--seccomp", "\(seccompFD)", "--"]
            + agentCommand(for: spec.pool.type, runtime: runtime)
        return arguments
    }

    /// `/usr` and the few `/etc` files a sandbox sees, read-only (exec sandboxes and templates).
    static func readOnlySystemBinds(backend: NamespaceBackend, egress: Bool) -> [String] {
        var arguments = [
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        ]
        for path in [
            "/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/ssl", "/etc/ca-certificates",
            "/etc/mime.types", "/etc/fonts",
        ]
        where access(path, F_OK) == 0 {
            arguments += ["--ro-bind", path, path]
        }
        for name in ["passwd", "group", "hosts"] {
            arguments += ["--ro-bind", backend.etcDirectory + "/" + name, "/etc/" + name]
        }
        if egress {
            arguments += ["--ro-bind", backend.etcDirectory + "/resolv.conf", "/etc/resolv.conf"]
        }
        return arguments
    }

    /// The environment every agent starts with (both tiers).
    static func sandboxEnvironment(runtime: String) -> [(String, String)] {
        var environment = [
            ("PATH", runtime + "/bin:/usr/local/bin:/usr/bin:/bin"),
            ("HOME", "/tmp"),
            ("USER", "user"),
            ("LANG", "C.UTF-8"),
            ("MPLBACKEND", "Agg"),
            ("MPLCONFIGDIR", "/tmp/.matplotlib"),
            ("IPYTHONDIR", "/tmp/.ipython"),
            ("XDG_CACHE_HOME", "/tmp/.cache"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("PYTHONUNBUFFERED", "1"),
            ("OPENBLAS_NUM_THREADS", "1"),
            ("OMP_NUM_THREADS", "1"),
        ]
        // Older OpenBLAS builds need these on some processors (see the machine notes).
        for name in ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"] {
            if let value = ProcessInfo.processInfo.environment[name] { environment.append((name, value)) }
        }
        return environment
    }

    /// The guest agent each pool type runs, as seen inside the sandbox.
    static func agentCommand(for type: PoolType, runtime: String) -> [String] {
        switch type {
        case .pythonLTS:
            [runtime + "/bin/python", "-I", "-X", "frozen_modules=on", "/opt/sandpiper/agents/python/agent.py"]
        case .nodeLTS:
            ["/usr/bin/node", "/opt/sandpiper/agents/node/agent.js"]
        case .shell, .customContainer:
            [runtime + "/bin/python", "-I", "/opt/sandpiper/agents/shell/agent.py"]
        }
    }

    // MARK: Sandbox

    func execute(_ request: ExecutionRequest) async throws -> ExecutionOutcome {
        guard isAlive else {
            throw SandpiperError(
                .sandboxFailure,
                code: "SessionAgentFailure",
                "the session's sandbox is no longer running"
            )
        }
        var fields: [String: JSONValue] = [
            "type": .string("execute"),
            "code": .string(request.code),
            "timeoutSeconds": .number(request.timeoutSeconds),
            "outputLimit": .integer(Int64(request.outputLimit)),
        ]
        if let stdin = request.stdin { fields["stdin"] = .string(stdin) }
        let reply: AgentChannel.Reply
        do {
            reply = try await agent.request(
                fields,
                timeout: .milliseconds(Int64(request.timeoutSeconds * 1000)) + Self.interruptGrace
            )
        } catch let error as SandpiperError {
            logger.warning(
                "agent failed; destroying the sandbox",
                metadata: ["error": "\(error.message)", "said": "\(stderrTail.text.suffix(800))"]
            )
            let outOfMemory = backend.cgroups.oomKills(sandboxID: id) > 0
            await destroy()
            if outOfMemory {
                throw SandpiperError(
                    .sandboxFailure,
                    code: "SessionOutOfMemory",
                    "the session ran out of memory (limit \(memoryLimit >> 20) MiB) and was terminated; the next call "
                        + "gets a fresh session"
                )
            }
            if error.kind == .timeout {
                throw SandpiperError(
                    .sandboxFailure,
                    code: "SessionAgentTimeout",
                    "the code did not stop \(Int(request.timeoutSeconds))s after its timeout; the session was "
                        + "terminated and the next call gets a fresh one"
                )
            }
            throw SandpiperError(
                .sandboxFailure,
                code: error.code,
                "\(error.message); the session was terminated and the next call gets a fresh one"
            )
        }
        guard reply.type == "result" else {
            // An agent that cannot run a cell (no thread, no descriptor left: the session's own
            // limits, exhausted by its code) will not recover: end it, like a dead agent.
            logger.warning(
                "agent refused an execution; destroying the sandbox",
                metadata: ["reply": "\(reply.message ?? reply.type)"]
            )
            await destroy()
            throw SandpiperError(
                .sandboxFailure,
                code: "SessionAgentFailure",
                "the agent could not run the code: \(reply.message ?? reply.type); the session was terminated and the "
                    + "next call gets a fresh one"
            )
        }
        return ExecutionOutcome(
            status: reply.status == "Success" ? .success : .failure,
            stdout: reply.stdout ?? "",
            stderr: reply.stderr ?? "",
            result: reply.result ?? .string(""),
            jupyterResult: reply.jupyterResult ?? "",
            timedOut: reply.timedOut ?? false,
            durationMilliseconds: reply.durationMs ?? 0,
            stdoutTruncated: reply.stdoutTruncated ?? false,
            stderrTruncated: reply.stderrTruncated ?? false,
            exitCode: reply.exitCode
        )
    }

    func listFiles(in directory: SessionFilePath, recursive: Bool) async throws -> [FileEntry] {
        try checkFilesAvailable()
        return try files.list(directory, recursive: recursive)
    }

    func fileInfo(_ path: SessionFilePath) async throws -> FileEntry {
        try checkFilesAvailable()
        return try files.info(path)
    }

    func openFile(_ path: SessionFilePath) async throws -> any SandboxFileReader {
        try checkFilesAvailable()
        return try files.openForReading(path)
    }

    func createFile(_ path: SessionFilePath) async throws -> any SandboxFileWriter {
        try checkFilesAvailable()
        return try files.create(path)
    }

    func deleteFile(_ path: SessionFilePath) async throws {
        try checkFilesAvailable()
        try files.delete(path)
    }

    /// A forked session rehearses a `1+1` cell once (its first cell's copy-on-write faults and
    /// the start of its output and watchdog threads), when its pool has nothing to launch. An
    /// exec session did all that while starting. A failure here is the next call's to report.
    func prewarm() async {
        guard forked, isAlive, !prewarmDone.exchange(true, ordering: .relaxed) else { return }
        do {
            _ = try await agent.request(["type": .string("warm")], timeout: .seconds(60))
        } catch {
            logger.debug("prewarm failed", metadata: ["error": "\(error)"])
        }
    }

    func describeRuntime() async throws -> RuntimeDescription {
        let reply = try await agent.request(["type": .string("packages")], timeout: .seconds(60))
        guard reply.type == "packages" else {
            throw SandpiperError(.sandboxFailure, code: "SessionAgentFailure", "the agent did not list its packages")
        }
        let runtime = reply.runtime ?? .init(name: "unknown", version: "")
        return RuntimeDescription(
            runtime: .init(name: runtime.name, version: runtime.version),
            packages: (reply.packages ?? []).map { .init(name: $0.name, version: $0.version) }
        )
    }

    private func checkFilesAvailable() throws(SandpiperError) {
        if destroyed.withLock({ $0 }) {
            throw SandpiperError(
                .sandboxFailure,
                code: "SessionAgentFailure",
                "the session's sandbox is no longer running"
            )
        }
    }

    func destroy() async {
        let already = destroyed.withLock { done in
            defer { done = true }
            return done
        }
        guard !already else { return }
        agent.fail(SandpiperError(.sandboxFailure, code: "SessionEnded", "the session was ended"))
        stderrTail.close()
        let cgroupDirectories = backend.cgroups.directories(for: id)
        let unreaped = backend.removeTraces(
            id: id,
            children: [pid, networkPID, namespaceHolderPID].filter { $0 > 0 },
            directory: directory,
            cgroupDirectories: cgroupDirectories
        )
        for child in unreaped { _ = await ChildProcess.waitForExit(child) }
        try? await backend.records.removeRecord(id: id)
        releaseUID()
        logger.debug("sandbox destroyed")
    }
}
