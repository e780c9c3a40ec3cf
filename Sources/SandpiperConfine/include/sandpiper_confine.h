// Confining a process to its session: shared by sandpiper-init (each session's pid 1) and the
// fork template's loop (each session's agent), so that both drop exactly the same way.
#ifndef SANDPIPER_CONFINE_H
#define SANDPIPER_CONFINE_H

#include <linux/filter.h>
#include <stddef.h>
#include <sys/types.h>

#define SANDPIPER_SECCOMP_PROGRAM "/opt/sandpiper/seccomp.bpf"
#define SANDPIPER_MAX_FILTER (64 * 1024 / sizeof(struct sock_filter))

/// A seccomp program as the host exported it (`sandpiper_seccomp_export_bpf`).
struct sandpiper_filter {
    unsigned short length;
    struct sock_filter program[SANDPIPER_MAX_FILTER];
};

/// Reads `path` into `buffer` until its end or `size` bytes (a result of `size` may mean more
/// was left). The byte count, or -1 with errno set.
long sandpiper_read_file(const char *path, void *buffer, size_t size);

/// Reads the session filter from `path` into `filter`. 0, or -1 with `error` set.
int sandpiper_read_filter(const char *path, struct sandpiper_filter *filter, char *error, size_t size);

/// The highest capability number this kernel knows (/proc/sys/kernel/cap_last_cap; 63 when it
/// cannot be read), read once per process: a process that calls it before forking gives its
/// children the value (the fork loop does, so no session reads the file while it confines).
int sandpiper_last_capability(void);

/// For the rest of this process's life: no capability in any set (bounding and ambient
/// included), `uid`:`uid` with no supplementary group, no_new_privs, and `filter`. Not dumpable
/// when `undumpable`. 0, or -1 with `error` set (the caller must then exit).
int sandpiper_confine(uid_t uid, const struct sandpiper_filter *filter, int undumpable, char *error, size_t size);

#endif
