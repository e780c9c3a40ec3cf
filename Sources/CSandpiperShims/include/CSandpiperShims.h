#ifndef C_SANDPIPER_SHIMS_H
#define C_SANDPIPER_SHIMS_H
#include <stdint.h>
#include <sys/types.h>

/// Writes the sandbox's seccomp filter, as raw BPF, to `fd`. Returns 0 or a negative errno.
int sandpiper_seccomp_export_bpf(int fd);

/// The fork template's filter: the sandbox filter, but unshare, mount and sethostname allowed (the
/// template sets up each session's namespaces; its sessions then install the full filter).
int sandpiper_seccomp_export_template_bpf(int fd);

/// pipe2(fds, O_CLOEXEC). Returns 0 or -1 with errno set.
int sandpiper_pipe_cloexec(int fds[2]);

/// posix_spawn with an exact descriptor table: the child's fd i is `fds[i]` for i < count, every
/// other descriptor is closed, all signals are reset to their defaults and unblocked, and the
/// child starts a new session. Returns 0 or an errno value.
int sandpiper_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                    const int *fds, int count);

/// The filesystem magic number of `path` (statfs f_type), or -1.
long sandpiper_fs_type(const char *path);

/// ioctl(fd, NS_GET_USERNS): a new descriptor for the user namespace owning namespace `fd`.
int sandpiper_ns_get_userns(int fd);

/// Waits up to `timeout_ms` for `fd` to be readable, then reads up to `count` bytes.
/// Returns the byte count, 0 at EOF, -1 with errno (ETIMEDOUT on timeout).
long sandpiper_read_timeout(int fd, void *buffer, unsigned long count, int timeout_ms);

/// Sends one datagram `buffer` with `count` descriptors attached (SCM_RIGHTS) on a Unix socket.
/// Returns the bytes sent or -1 with errno set.
long sandpiper_send_with_fds(int socket, const void *buffer, unsigned long length, const int *fds, int count);

/// Waits up to `timeout_ms` for `socket` to be readable, then receives one datagram of up to
/// `count` bytes and the descriptors attached to it (SCM_RIGHTS, close-on-exec): up to `max_fds`
/// into `fds` (any more are closed), their number into `*received`. Returns what
/// sandpiper_read_timeout does.
long sandpiper_receive_with_fds_timeout(int socket, void *buffer, unsigned long count, int *fds, int max_fds,
                                        int *received, int timeout_ms);

/// pidfd_open(pid, 0): a close-on-exec descriptor for the process, or -1 with errno set.
int sandpiper_pidfd_open(pid_t pid);

/// The pid, in the caller's pid namespace, of the process a pidfd refers to (PIDFD_GET_INFO,
/// Linux 6.13+, else the pidfd's "Pid:" line in /proc/self/fdinfo). -1 when it has exited or
/// the descriptor is no pidfd.
int sandpiper_pidfd_pid(int pidfd);

/// socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC). Returns 0 or -1 with errno set.
int sandpiper_seqpacket_pair(int fds[2]);

/// This thread's filesystem uid and gid (setfsgid, then setfsuid: per thread, unlike setuid).
void sandpiper_set_fs_identity(uid_t uid, gid_t gid);
/// fsetxattr(2): sets extended attribute `name` on `fd`. Returns 0 or -1 with errno set.
int sandpiper_fsetxattr(int fd, const char *name, const void *value, unsigned long size);

/// fgetxattr(2): reads extended attribute `name` of `fd`. Returns its size or -1 with errno set.
long sandpiper_fgetxattr(int fd, const char *name, void *value, unsigned long size);

/// A TCP connection to `address` (IPv4, host byte order: 0x7F000001 is 127.0.0.1):`port` made inside the network namespace `netns_fd` (a
/// `/proc/<pid>/ns/net` descriptor): a short-lived thread joins the namespace, creates the
/// socket there and connects; the socket stays in that namespace. Waits up to `timeout_ms`.
/// Returns a blocking, close-on-exec descriptor, or -errno (ETIMEDOUT, ECONNREFUSED, ...).
int sandpiper_connect_in_netns(int netns_fd, uint32_t address, int port, int timeout_ms);
#endif
