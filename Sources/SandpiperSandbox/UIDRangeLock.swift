import Foundation
import SandpiperCore

#if canImport(Glibc)
    import Glibc
#endif

/// Claims a range of host uids for this server's sandboxes, so that two servers on one host
/// never hand the same uid to two sandboxes. The claim is an `flock` on a file in /run (a
/// tmpfs: it never outlives a boot), held for the life of the process.
public enum UIDRangeLock {
    public static let width: UInt32 = 10_000
    static let directory = "/run/sandpiper"

    /// Returns the claimed range. With `explicit`, only `base` is tried; otherwise the next free
    /// range above it is taken.
    public static func acquire(base: UInt32, explicit: Bool) throws(SandpiperError) -> ClosedRange<UInt32> {
        mkdir(directory, 0o755)
        let attempts = explicit ? 1 : 40
        for attempt in 0..<attempts {
            let candidate = base + UInt32(attempt) * width
            let fd = open(directory + "/uids-\(candidate).lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                throw SandpiperError(
                    .unavailable,
                    "cannot create \(directory)/uids-\(candidate).lock: \(String(cString: strerror(errno)))"
                )
            }
            if flock(fd, LOCK_EX | LOCK_NB) == 0 {
                // Deliberately never closed: the lock lives as long as the server.
                return candidate...(candidate + width - 1)
            }
            close(fd)
        }
        throw SandpiperError(
            .unavailable,
            code: "SandboxUidsInUse",
            explicit
                ? "sandbox uids \(base)...\(base + width - 1) are used by another Sandpiper server on this host; "
                    + "choose another server.sandboxUidBase"
                : "no free range of sandbox uids above \(base): too many Sandpiper servers on this host"
        )
    }
}
