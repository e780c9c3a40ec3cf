import CSandpiperShims
import Dispatch
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Starts a child (posix_spawn, in CSandpiperShims) with an exact file-descriptor table (`fds[n]` becomes the child's fd n; every
/// other descriptor is closed), default signal dispositions and its own session. Nothing runs
/// in the server between fork and exec: this is posix_spawn, and isolation is left to the
/// programs it execs (bubblewrap).
enum ChildProcess {
    static func spawn(
        executable: String,
        arguments: [String],
        environment: [String] = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        fds: [Int32]
    ) throws(SandpiperError) -> pid_t {
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let rc = fds.withUnsafeBufferPointer { table in
            sandpiper_spawn(&pid, executable, argv, envp, table.baseAddress, Int32(table.count))
        }
        guard rc == 0 else {
            throw SandpiperError(
                .unavailable,
                code: "SandboxStartFailed",
                "cannot start \(executable): \(String(cString: strerror(rc)))"
            )
        }
        return pid
    }

    /// Waits for the child to exit without blocking Swift's cooperative threads.
    static func waitForExit(_ pid: pid_t) async -> Int32 {
        await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                continuation.resume(returning: status)
            }
        }
    }

    /// Reaps the child if it has exited; never blocks.
    static func reapIfExited(_ pid: pid_t) -> Bool {
        var status: Int32 = 0
        let rc = waitpid(pid, &status, WNOHANG)
        return rc == pid || (rc < 0 && errno == ECHILD)
    }
}

/// A pipe whose ends are closed on exec unless handed to a child explicitly.
struct Pipe {
    let read: Int32
    let write: Int32

    init() throws(SandpiperError) {
        var fds: [Int32] = [0, 0]
        guard sandpiper_pipe_cloexec(&fds) == 0 else {
            throw SandpiperError(.unavailable, "cannot create a pipe: \(String(cString: strerror(errno)))")
        }
        read = fds[0]
        write = fds[1]
    }
}
