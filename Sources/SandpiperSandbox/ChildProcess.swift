import CSandpiperShims
import Dispatch
import Foundation
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
        // From the one thread that never exits: bubblewrap's --die-with-parent (PDEATHSIG) fires
        // when the *thread* that spawned it ends, and the cooperative pool's threads do end.
        let rc = SpawnerThread.shared.perform {
            fds.withUnsafeBufferPointer { table in
                sandpiper_spawn(&pid, executable, argv, envp, table.baseAddress, Int32(table.count))
            }
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

/// A thread that lives as long as the server and runs every spawn: a child's parent-death signal
/// is tied to the thread that created it, so no sandbox dies with a worker thread of the pool.
final class SpawnerThread: @unchecked Sendable {
    static let shared = SpawnerThread()

    private let condition = NSCondition()
    private var jobs: [() -> Void] = []

    private init() {
        let thread = Thread { [self] in
            while true {
                condition.lock()
                while jobs.isEmpty { condition.wait() }
                let job = jobs.removeFirst()
                condition.unlock()
                job()
            }
        }
        thread.name = "sandpiper-spawner"
        thread.start()
    }

    /// Runs `body` on the spawner thread and waits for it (spawning takes about a millisecond).
    /// The caller blocks meanwhile, so `body` may use the caller's state.
    func perform<T>(_ body: @escaping () -> T) -> T {
        let slot = ResultSlot<T>()
        let done = DispatchSemaphore(value: 0)
        condition.lock()
        jobs.append {
            slot.result = body()
            done.signal()
        }
        condition.signal()
        condition.unlock()
        done.wait()
        guard let result = slot.result else { preconditionFailure("the spawner thread did not run the job") }
        return result
    }
}

/// Carries a result from the spawner thread to its waiting caller (who reads it only after the
/// semaphore: no concurrent access).
private final class ResultSlot<T>: @unchecked Sendable {
    var result: T?
}
