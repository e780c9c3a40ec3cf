import CSandpiperShims
import Dispatch
import Foundation
import Logging
import SandpiperCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One session of a `CustomContainer` pool: the pool's image on an overlayfs (the image's layers
/// read-only below, the session's own upper layer), run by crun as the session's unprivileged
/// host uid (root of its own user namespace), in its own pid/net/mount/ipc/uts/cgroup
/// namespaces and cgroups, with a seccomp profile; or, with `isolation: gvisor`, by runsc on
/// gVisor's user-space kernel. Its network namespace has only `lo` (or a slirp4netns tap with
/// egress); the host reaches its port from inside that namespace.
final class ContainerSandbox: Sandbox, ContainerEndpoint {
    let id: String
    let uid: UInt32
    let targetPort: Int
    let directory: String
    /// `crun run` or `runsc run` (foreground; it exits when the container does).
    let runtimePID: pid_t
    /// The container's pid 1, as seen from the host.
    let containerPID: pid_t
    let networkPIDs: [pid_t]
    /// The namespace the host connects from, and the container's address there: its own
    /// namespace and 127.0.0.1 (crun), or the far end of its veth link (gVisor).
    private let netns: Int32
    private let address: UInt32
    private let backend: NamespaceBackend
    private let output: OutputTail
    private let logger: Logger
    private let image: ContainerImage

    private struct State {
        var destroyed = false
        var exitStatus: Int32?
        var livenessFailed = false
        /// `onDestroy` actions, by registration number.
        var destroyActions: [Int: @Sendable () -> Void] = [:]
        var nextAction = 0
    }
    private let state = Mutex(State())
    private let exitWatcher: Mutex<Task<Void, Never>?> = Mutex(nil)
    private let livenessTask: Mutex<Task<Void, Never>?> = Mutex(nil)

    private init(
        id: String,
        uid: UInt32,
        targetPort: Int,
        directory: String,
        runtimePID: pid_t,
        containerPID: pid_t,
        networkPIDs: [pid_t],
        netns: Int32,
        address: UInt32,
        backend: NamespaceBackend,
        output: OutputTail,
        logger: Logger,
        image: ContainerImage
    ) {
        self.id = id
        self.uid = uid
        self.targetPort = targetPort
        self.directory = directory
        self.runtimePID = runtimePID
        self.containerPID = containerPID
        self.networkPIDs = networkPIDs
        self.netns = netns
        self.address = address
        self.backend = backend
        self.output = output
        self.logger = logger
        self.image = image
    }

    deinit { close(netns) }

    var isAlive: Bool {
        state.withLock { !$0.destroyed && $0.exitStatus == nil && !$0.livenessFailed }
    }

    /// What the container printed first (stdout and stderr), for error messages.
    var outputText: String { output.text }

    // MARK: Launch

    static func launch(spec: SandboxSpec, backend: NamespaceBackend) async throws -> ContainerSandbox {
        guard let template = spec.pool.container else {
            throw SandpiperError.internalError("pool '\(spec.pool.name)' has no container template")
        }
        guard let image = backend.image(forPool: spec.pool.name) else {
            throw SandpiperError(
                .unavailable,
                code: "ContainerImageNotFound",
                "pool '\(spec.pool.name)': image \(template.image) is not resolved; run `sandpiper image pull` or "
                    + "`sandpiper image import`, then restart"
            )
        }
        let id = spec.id
        let config = backend.configuration
        var logger = backend.logger
        logger[metadataKey: "sandbox"] = "\(id)"
        let uid = try backend.allocateUID()
        let directory = backend.sessionsDirectory + "/" + id
        let rootfs = directory + "/rootfs"
        var record = SandboxRecord(
            id: id,
            pool: spec.pool.name,
            backend: NamespaceBackend.name,
            uid: uid,
            directory: directory,
            cgroupDirectories: backend.cgroups.directories(for: id),
            createdAt: Date()
        )
        var children: [pid_t] = []
        var runtimePID: pid_t = 0
        var netns: Int32 = -1
        var tail: OutputTail?
        func undo() async {
            tail?.close()
            if netns >= 0 { close(netns) }
            let unreaped = backend.removeTraces(
                id: id,
                children: children + (runtimePID > 0 ? [runtimePID] : []),
                directory: directory,
                cgroupDirectories: record.cgroupDirectories
            )
            for child in unreaped { _ = await ChildProcess.waitForExit(child) }
            try? await backend.records.removeRecord(id: id)
            backend.releaseUID(uid)
        }
        do {
            try await backend.records.save(record)
            try makeRootfs(directory: directory, rootfs: rootfs, uid: uid, image: image)
            let gvisor = spec.pool.isolation == .gvisor
            var cgroupLimits = spec.pool.limits
            // gVisor's sentry and gofer run many threads of their own in the session's pids group.
            if gvisor { cgroupLimits.pids += 512 }
            let procs = try backend.cgroups.create(sandboxID: id, limits: cgroupLimits)

            var networkNamespace: String?
            if spec.pool.egressEnabled {
                let network = try await SlirpNetwork.makeNamespace(
                    cgroupProcs: procs,
                    uid: uid,
                    slirp: config.slirp4netns,
                    setpriv: config.setpriv,
                    loopbackUp: true
                )
                children += [network.holder, network.slirp]
                networkNamespace = "/proc/\(network.holder)/ns/net"
            }
            var proxyNamespace: String?
            if gvisor {
                let network = try await ContainerNetwork.make(
                    cgroupProcs: procs,
                    containerHolder: spec.pool.egressEnabled ? children.first : nil
                )
                children += network.holders
                networkNamespace = network.container
                proxyNamespace = network.proxy
            }
            let arguments = image.commandLine(for: template)
            guard !arguments.isEmpty else {
                throw SandpiperError(
                    .invalidArgument,
                    code: "ContainerCommandMissing",
                    "image \(image.name) has no Entrypoint or Cmd; set container.command in the pool"
                )
            }
            if let user = image.user, !user.isEmpty, user != "0", user != "root", !user.hasPrefix("0:") {
                logger.debug(
                    "the image's User is ignored: the container runs as its namespace's root",
                    metadata: ["user": "\(user)"]
                )
            }
            let bundle = directory + "/bundle"
            try ContainerBundle.write(
                bundle: bundle,
                rootfs: rootfs,
                uid: uid,
                arguments: arguments,
                environment: image.environment(for: template),
                workingDirectory: image.workingDirectory.flatMap { $0.isEmpty ? nil : $0 } ?? "/",
                limits: spec.pool.limits,
                networkNamespace: networkNamespace,
                gvisor: gvisor
            )

            let outputPipe = try Pipe()
            let devNull = open("/dev/null", O_RDWR | O_CLOEXEC)
            defer { close(devNull) }
            let pidFile = directory + "/container.pid"
            let launcher =
                gvisor
                ? runscLauncher(
                    runsc: config.runsc,
                    directory: directory,
                    bundle: bundle,
                    pidFile: pidFile,
                    id: id,
                    networkNamespace: networkNamespace ?? ""
                )
                : crunLauncher(crun: config.crun, directory: directory, bundle: bundle, pidFile: pidFile, id: id)
            let script = "cd / && ulimit -c 0 || exit 125; " + SlirpNetwork.joinCgroupsScript
            do {
                runtimePID = try ChildProcess.spawn(
                    executable: "/bin/sh",
                    arguments: ["-c", script, "sandpiper-container"] + procs + ["--"] + launcher,
                    fds: [devNull, outputPipe.write, outputPipe.write]
                )
            } catch {
                close(outputPipe.read)
                close(outputPipe.write)
                throw error
            }
            close(outputPipe.write)
            record.pid = runtimePID
            try? await backend.records.save(record)
            let output = try await OutputTail.drain(outputPipe.read)
            tail = output

            // The container's pid: the runtime writes it once the container runs.
            let deadline = ContinuousClock.now + config.startupTimeout
            var containerPID: pid_t = 0
            while containerPID == 0 {
                if let text = SystemFile.read(pidFile),
                    let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 0
                {
                    containerPID = pid
                    break
                }
                var status: Int32 = 0
                if waitpid(runtimePID, &status, WNOHANG) == runtimePID {
                    runtimePID = 0
                    try await Task.sleep(for: .milliseconds(50))
                    throw SandpiperError(
                        .unavailable,
                        code: "SandboxStartFailed",
                        "the container did not start (\(gvisor ? "runsc" : "crun") exited with status \(status >> 8)): "
                            + String(output.text.suffix(1500))
                    )
                }
                guard ContinuousClock.now < deadline else {
                    throw SandpiperError(
                        .unavailable,
                        code: "SandboxStartFailed",
                        "\(gvisor ? "runsc" : "crun") did not start the container in time"
                    )
                }
                try await Task.sleep(for: .milliseconds(5))
            }
            netns = open(proxyNamespace ?? networkNamespace ?? "/proc/\(containerPID)/ns/net", O_RDONLY | O_CLOEXEC)
            guard netns >= 0 else {
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxStartFailed",
                    "the container exited at once: \(output.text.suffix(1500))"
                )
            }
            let sandbox = ContainerSandbox(
                id: id,
                uid: uid,
                targetPort: template.targetPort,
                directory: directory,
                runtimePID: runtimePID,
                containerPID: containerPID,
                networkPIDs: children,
                netns: netns,
                address: gvisor ? ContainerNetwork.containerAddress : ContainerNetwork.loopback,
                backend: backend,
                output: output,
                logger: logger,
                image: image
            )
            // From here on the sandbox owns everything; destroy() undoes it.
            netns = -1
            tail = nil
            sandbox.watchExit()
            do {
                try await sandbox.waitUntilStarted(template: template, timeout: config.startupTimeout)
            } catch {
                await sandbox.destroy()
                throw error
            }
            sandbox.startLiveness(template.livenessProbe)
            logger.debug("container ready", metadata: ["uid": "\(uid)", "pid": "\(containerPID)"])
            return sandbox
        } catch {
            await undo()
            if let error = error as? SandpiperError { throw error }
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "could not start a container: \(error)")
        }
    }

    /// crun in the foreground (it exits when the container does), in a private mount namespace
    /// without the empty cgroup v2 mount of hybrid hosts (crun refuses "hybrid mode").
    private static func crunLauncher(crun: String, directory: String, bundle: String, pidFile: String, id: String)
        -> [String]
    {
        [
            "/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
            #"if [ -d /sys/fs/cgroup/memory ]; then umount /sys/fs/cgroup/unified 2>/dev/null; fi; exec "$@""#,
            "sandpiper-crun", crun, "--cgroup-manager=disabled", "--root", directory + "/crun", "run", "--bundle",
            bundle, "--pid-file", pidFile, "sp-" + id,
        ]
    }

    /// runsc (gVisor, ptrace platform) in the foreground, started as root inside the container's
    /// network namespace (see `ContainerNetwork`), whose interfaces gVisor's network stack takes
    /// over (`--network=sandbox`). runsc tells the root namespace by
    /// /proc/sys/net/core/rmem_default existing, which newer kernels show in every namespace:
    /// hide it in a private mount namespace. `--ignore-cgroups`: runsc and its sentry and gofer
    /// stay in the session's cgroups, which carry the pool's limits.
    private static func runscLauncher(
        runsc: String,
        directory: String,
        bundle: String,
        pidFile: String,
        id: String,
        networkNamespace: String
    ) -> [String] {
        [
            "/usr/bin/nsenter", "--net=\(networkNamespace)", "--", "/usr/bin/unshare", "--mount", "--propagation",
            "private", "--", "/bin/sh", "-c",
            #"mount -t tmpfs -o size=4k,mode=0555 none /proc/sys/net/core && exec "$@""#, "sandpiper-runsc",
            runsc, "--root", directory + "/runsc", "--platform=ptrace", "--network=sandbox", "--ignore-cgroups", "run",
            "--bundle", bundle, "--pid-file", pidFile, "sp-" + id,
        ]
    }

    /// The session directory: `upper/` and `work/` (overlayfs), `rootfs/` (the merged tree). The
    /// upper root belongs to the session uid, so the container's root may create top-level
    /// entries; image files stay owned by the host's root (read-only to the container unless
    /// world-writable).
    private static func makeRootfs(directory: String, rootfs: String, uid: UInt32, image: ContainerImage) throws {
        guard mkdir(directory, 0o711) == 0 else {
            throw SandpiperError.internalError("cannot create \(directory): \(String(cString: strerror(errno)))")
        }
        for (name, mode) in [("upper", 0o755), ("work", 0o700), ("rootfs", 0o755)] {
            guard mkdir(directory + "/" + name, mode_t(mode)) == 0 else {
                throw SandpiperError.internalError(
                    "cannot create \(directory)/\(name): \(String(cString: strerror(errno)))"
                )
            }
        }
        chown(directory + "/upper", uid, uid)
        let options =
            "lowerdir=\(image.lowerDirectories.joined(separator: ":")),upperdir=\(directory)/upper,workdir=\(directory)/work"
        guard options.utf8.count < 4000 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxStartFailed",
                "image \(image.name) has too many layers to mount"
            )
        }
        guard mount("overlay", rootfs, "overlay", UInt(MS_NODEV), options) == 0 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxStartFailed",
                "cannot mount the container's overlay root: \(String(cString: strerror(errno)))"
            )
        }
        // Mount points crun needs, made as the host's root (the image's directories are not the
        // container's to write).
        for path in ["proc", "dev", "sys", "tmp"] {
            var info = stat()
            if lstat(rootfs + "/" + path, &info) != 0 { mkdir(rootfs + "/" + path, 0o755) }
        }
    }

    // MARK: Exit, probes

    private func watchExit() {
        let pid = runtimePID
        let task = Task.detached { [weak self] in
            let status = await ChildProcess.waitForExit(pid)
            guard let self else { return }
            let wasDestroyed = self.state.withLock { state in
                state.exitStatus = status
                return state.destroyed
            }
            if !wasDestroyed {
                self.logger.info(
                    "container exited; its session ends",
                    metadata: ["status": "\(status >> 8)", "output": "\(self.output.text.suffix(300))"]
                )
            }
        }
        exitWatcher.withLock { $0 = task }
    }

    var hasExited: Bool { state.withLock { $0.exitStatus != nil } }

    /// One probe attempt, from the host, inside the session's network namespace.
    func probeOnce(_ probe: ContainerProbe) async -> Bool {
        let netns = netns
        let address = address
        return await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(returning: Self.probeBlocking(probe, netns: netns, address: address))
            }
        }
    }

    static func probeBlocking(_ probe: ContainerProbe, netns: Int32, address: UInt32) -> Bool {
        let timeoutMilliseconds = Int32(probe.timeoutSeconds * 1000)
        let fd = sandpiper_connect_in_netns(netns, address, Int32(probe.port), timeoutMilliseconds)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard case .httpGet(let path, let port) = probe.action else { return true }
        var timeout = timeval(tv_sec: probe.timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let request = Array(
            "GET \(path) HTTP/1.0\r\nHost: localhost:\(port)\r\nUser-Agent: sandpiper-probe\r\nConnection: close\r\n\r\n"
                .utf8
        )
        guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == request.count
        else { return false }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 512)
        while received.count < 512, !received.contains(UInt8(ascii: "\n")) {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            received += buffer[0..<count]
        }
        let line = String(
            decoding: received.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") },
            as: UTF8.self
        )
        let fields = line.split(separator: " ")
        guard fields.count >= 2, fields[0].hasPrefix("HTTP/"), let status = Int(fields[1]) else { return false }
        return (200..<400).contains(status)
    }

    /// Runs the startup probe (the pool's, or a TCP connect to targetPort every 100 ms) until it
    /// succeeds; fails when it runs out of attempts, the container exits, or `timeout` passes.
    private func waitUntilStarted(template: ContainerTemplate, timeout: Duration) async throws {
        let probe = template.startupProbe ?? ContainerProbe(action: .tcpSocket(port: template.targetPort))
        let period: Duration = template.startupProbe.map { .seconds($0.periodSeconds) } ?? .milliseconds(100)
        let deadline = ContinuousClock.now + (template.startupProbe == nil ? timeout : .seconds(3600))
        if let delay = template.startupProbe?.initialDelaySeconds, delay > 0 {
            try await Task.sleep(for: .seconds(delay))
        }
        var failures = 0
        while true {
            if hasExited {
                try await Task.sleep(for: .milliseconds(50))
                throw SandpiperError(
                    .unavailable,
                    code: "ContainerExited",
                    "the container exited during startup: \(output.text.suffix(1500))"
                )
            }
            if await probeOnce(probe) { return }
            failures += 1
            if let configured = template.startupProbe, failures >= configured.failureThreshold {
                throw SandpiperError(
                    .unavailable,
                    code: "ContainerStartupProbeFailed",
                    "the container's startup probe (\(Self.describe(configured))) failed \(failures) times"
                        + (output.text.isEmpty ? "" : "; it said: \(output.text.suffix(1000))")
                )
            }
            if ContinuousClock.now >= deadline {
                throw SandpiperError(
                    .unavailable,
                    code: "ContainerStartupProbeFailed",
                    "nothing accepted connections on the container's targetPort \(template.targetPort) within "
                        + "\(timeout)" + (output.text.isEmpty ? "" : "; it said: \(output.text.suffix(1000))")
                )
            }
            try await Task.sleep(for: period)
        }
    }

    static func describe(_ probe: ContainerProbe) -> String {
        switch probe.action {
        case .httpGet(let path, let port): "httpGet \(path) on port \(port)"
        case .tcpSocket(let port): "tcpSocket on port \(port)"
        }
    }

    private func startLiveness(_ probe: ContainerProbe?) {
        guard let probe else { return }
        let task = Task.detached { [weak self] in
            var failures = 0
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(probe.periodSeconds))
                guard let self, self.isAlive else { return }
                if await self.probeOnce(probe) {
                    failures = 0
                    continue
                }
                failures += 1
                if failures >= probe.failureThreshold {
                    self.logger.warning(
                        "liveness probe failed; the session ends",
                        metadata: ["probe": "\(Self.describe(probe))", "failures": "\(failures)"]
                    )
                    self.state.withLock { $0.livenessFailed = true }
                    return
                }
            }
        }
        livenessTask.withLock { $0 = task }
    }

    // MARK: ContainerEndpoint

    func connect(timeout: Duration) async throws -> Int32 {
        guard isAlive else {
            throw SandpiperError(
                .sandboxFailure,
                code: "ContainerUnreachable",
                "the session's container is no longer running; the next request gets a fresh session"
            )
        }
        let netns = netns
        let address = address
        let port = targetPort
        let milliseconds = Int32(
            clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000
        )
        let result = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(
                    returning: sandpiper_connect_in_netns(netns, address, Int32(port), max(milliseconds, 1))
                )
            }
        }
        if result >= 0 { return result }
        if -result == ETIMEDOUT {
            throw SandpiperError(
                .timeout,
                code: "ContainerTimeout",
                "the container did not accept a connection on port \(port) within \(timeout)"
            )
        }
        throw SandpiperError(
            .sandboxFailure,
            code: "ContainerUnreachable",
            "cannot connect to the container's port \(port): \(String(cString: strerror(-result)))"
        )
    }

    // MARK: Sandbox

    private func unsupported() -> SandpiperError {
        SandpiperError(
            .unsupported,
            code: "NotSupportedForCustomContainer",
            "this operation is not supported for custom container sessions; send your requests to the pool "
                + "endpoint and they reach the container"
        )
    }

    func execute(_ request: ExecutionRequest) async throws -> ExecutionOutcome { throw unsupported() }
    func listFiles(in directory: SessionFilePath, recursive: Bool) async throws -> [FileEntry] { throw unsupported() }
    func fileInfo(_ path: SessionFilePath) async throws -> FileEntry { throw unsupported() }
    func openFile(_ path: SessionFilePath) async throws -> any SandboxFileReader { throw unsupported() }
    func createFile(_ path: SessionFilePath) async throws -> any SandboxFileWriter { throw unsupported() }
    func deleteFile(_ path: SessionFilePath) async throws { throw unsupported() }

    func describeRuntime() async throws -> RuntimeDescription {
        RuntimeDescription(runtime: .init(name: image.name, version: image.digest), packages: [])
    }

    func onDestroy(_ action: @escaping @Sendable () -> Void) -> @Sendable () -> Void {
        let number: Int? = state.withLock { state in
            guard !state.destroyed else { return nil }
            state.nextAction += 1
            state.destroyActions[state.nextAction] = action
            return state.nextAction
        }
        guard let number else {
            action()
            return {}
        }
        return { [weak self] in _ = self?.state.withLock { $0.destroyActions.removeValue(forKey: number) } }
    }

    func destroy() async {
        let (already, actions) = state.withLock { state in
            defer {
                state.destroyed = true
                state.destroyActions = [:]
            }
            return (state.destroyed, Array(state.destroyActions.values))
        }
        guard !already else { return }
        for action in actions { action() }
        livenessTask.withLock { $0?.cancel() }
        output.close()
        // Everything (crun or runsc, the container, slirp4netns) lives in the session's cgroups.
        let unreaped = backend.removeTraces(
            id: id,
            children: networkPIDs,
            directory: directory,
            cgroupDirectories: backend.cgroups.directories(for: id)
        )
        kill(runtimePID, SIGKILL)
        for child in unreaped { _ = await ChildProcess.waitForExit(child) }
        await exitWatcher.withLock { $0 }?.value
        try? await backend.records.removeRecord(id: id)
        backend.releaseUID(uid)
        logger.debug("container destroyed")
    }
}
