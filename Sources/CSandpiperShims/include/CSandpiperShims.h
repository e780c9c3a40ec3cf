#ifndef C_SANDPIPER_SHIMS_H
#define C_SANDPIPER_SHIMS_H
#include <sys/types.h>

/// Writes the sandbox's seccomp filter, as raw BPF, to `fd`. Returns 0 or a negative errno.
int sandpiper_seccomp_export_bpf(int fd);

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

/// fsetxattr(2): sets extended attribute `name` on `fd`. Returns 0 or -1 with errno set.
int sandpiper_fsetxattr(int fd, const char *name, const void *value, unsigned long size);

/// fgetxattr(2): reads extended attribute `name` of `fd`. Returns its size or -1 with errno set.
long sandpiper_fgetxattr(int fd, const char *name, void *value, unsigned long size);
#endif
