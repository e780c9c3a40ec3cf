import Foundation
import Logging
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

extension NamespaceSandbox {
    /// A session forked from the pool's warm template (see `ForkTemplate`): its own host uid,
    /// cgroups, namespaces, /tmp and /mnt/data, with no mount on the host. The file API reaches
    /// /mnt/data through the session's mount namespace, opened once here.
    static func launchForked(
        spec: SandboxSpec,
        backend: NamespaceBackend,
        template: ForkTemplate
    ) async throws -> NamespaceSandbox {
        let id = spec.id
        let limits = spec.pool.limits
        var logger = backend.logger
        logger[metadataKey: "sandbox"] = "\(id)"
        let uid: (host: UInt32, inside: UInt32, block: UIDBlock)
        do {
            uid = try await template.claimUID()
        } catch {
            let message = (error as? SandpiperError)?.message ?? "\(error)"
            throw SandpiperError(.unavailable, code: ForkTemplate.unavailableCode, message)
        }
        let release: @Sendable () -> Void = { [block = uid.block, inside = uid.inside] in block.release(inside: inside)
        }
        let directory = backend.sessionsDirectory + "/" + id
        let record = SandboxRecord(
            id: id,
            pool: spec.pool.name,
            backend: NamespaceBackend.name,
            uid: uid.host,
            directory: directory,
            cgroupDirectories: backend.cgroups.directories(for: id),
            createdAt: Date()
        )
        var openFDs: [Int32] = []
        var tail: OutputTail?
        func undo() async {
            tail?.close()
            for fd in openFDs { close(fd) }
            backend.removeTraces(
                id: id,
                children: [],
                directory: directory,
                cgroupDirectories: record.cgroupDirectories
            )
            try? await backend.records.removeRecord(id: id)
            release()
        }
        do {
            try await backend.records.save(record)
            let procs = try backend.cgroups.create(sandboxID: id, limits: limits)
            let toAgent = try Pipe()
            let fromAgent = try Pipe()
            let stderrPipe = try Pipe()
            openFDs += [
                toAgent.read, toAgent.write, fromAgent.read, fromAgent.write, stderrPipe.read, stderrPipe.write,
            ]
            let first = try await template.fork(
                insideUID: uid.inside,
                limits: limits,
                cgroupProcs: procs,
                fds: [toAgent.read, fromAgent.write, stderrPipe.write]
            )
            // No second save with the pid: recovery kills by cgroup, and a commit per launch is
            // worth saving.
            for fd in [toAgent.read, fromAgent.write, stderrPipe.write] { close(fd) }
            openFDs = [toAgent.write, fromAgent.read]
            let stderrTail = try await OutputTail.drain(stderrPipe.read)
            tail = stderrTail
            let agent = try await AgentChannel.open(input: fromAgent.read, output: toAgent.write)
            openFDs = []
            do {
                _ = try await agent.waitUntilReady(timeout: backend.configuration.startupTimeout)
            } catch {
                agent.fail(SandpiperError(.sandboxFailure, code: "SessionEnded", "start failed"))
                let said = stderrTail.text
                let message = (error as? SandpiperError)?.message ?? "\(error)"
                throw SandpiperError(
                    .unavailable,
                    code: "SandboxStartFailed",
                    "could not start a forked session: \(message)"
                        + (said.isEmpty ? "" : "; it said: \(said.suffix(1500))")
                )
            }
            // /mnt/data as the session's init (pid 1, `first`) sees it: held open for the file API.
            let initPID = first
            let dataFD = open("/proc/\(initPID)/root/mnt/data", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard dataFD >= 0 else {
                throw SandpiperError(.unavailable, code: "SandboxStartFailed", "cannot open the session's /mnt/data")
            }
            let files = SafeDirectory(
                root: "/mnt/data of \(id)",
                owner: uid.host,
                group: uid.host,
                rootDescriptor: HeldDescriptor(dataFD)
            )
            let sandbox = NamespaceSandbox(
                id: id,
                uid: uid.host,
                pid: 0,
                networkPID: 0,
                namespaceHolderPID: 0,
                directory: directory,
                agent: agent,
                backend: backend,
                memoryLimit: limits.memoryBytes,
                stderrTail: stderrTail,
                logger: logger,
                files: files,
                releaseUID: release
            )
            logger.debug("sandbox ready", metadata: ["uid": "\(uid.host)", "forked": "true"])
            return sandbox
        } catch {
            await undo()
            if let error = error as? SandpiperError { throw error }
            throw SandpiperError(.unavailable, code: "SandboxStartFailed", "could not start a sandbox: \(error)")
        }
    }
}
