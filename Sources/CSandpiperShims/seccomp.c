// The syscall filter applied to every sandbox (handed to bubblewrap as raw BPF).
// Default: allow. Denied with EPERM: everything that manipulates namespaces, mounts, the kernel,
// other processes' memory, keys, BPF, perf, io_uring, clocks; ENOSYS for clone3 so that libc
// falls back to clone, whose namespace flags are then checked. Foreign architectures are killed.
#define _GNU_SOURCE
#include "CSandpiperShims.h"

#include <errno.h>
#include <string.h>
#include <sched.h>
#include <seccomp.h>
#include <sys/ioctl.h>

#ifndef CLONE_NEWCGROUP
#define CLONE_NEWCGROUP 0x02000000
#endif
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif

static const char *denied[] = {
    "mount", "umount", "umount2", "pivot_root", "chroot",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
    "setns", "unshare", "open_by_handle_at", "name_to_handle_at", "userfaultfd",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup",
    "lookup_dcookie", "uselib", "nfsservctl", "sysfs", "_sysctl",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "clock_settime", "clock_adjtime", "settimeofday", "adjtimex", "stime",
    "sethostname", "setdomainname", "iopl", "ioperm", "create_module", "get_kernel_syms",
    "query_module", "fanotify_init", "kcmp", "lsm_set_self_attr",
};

// What a fork template needs beyond a session: its sandpiper-init gives each forked session new
// namespaces (unshare), its own /proc, /tmp and /mnt/data (mount) and hostname; the template
// forks the session's agent into them (setns, only into namespaces its own user namespace owns).
// Everything else stays denied, and so does clone with any namespace flag.
static const char *template_allowed[] = {"mount", "unshare", "sethostname", "setns"};

static int template_allows(const char *name) {
    for (unsigned i = 0; i < sizeof(template_allowed) / sizeof(template_allowed[0]); i++) {
        if (strcmp(template_allowed[i], name) == 0) return 1;
    }
    return 0;
}

static int export_bpf(int fd, int for_template);

int sandpiper_seccomp_export_bpf(int fd) { return export_bpf(fd, 0); }

int sandpiper_seccomp_export_template_bpf(int fd) { return export_bpf(fd, 1); }

static int export_bpf(int fd, int for_template) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (ctx == NULL) return -ENOMEM;
    // A binary tree of syscall numbers instead of a linear list: the kernel runs the filter for
    // every syscall number when it is installed (to cache the always-allowed ones), twice per
    // forked session; ~100 us instead of ~180 us an install here, and fewer instructions per
    // call for the syscalls whose arguments are checked.
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2);
    if (rc < 0) goto out;
    for (unsigned i = 0; i < sizeof(denied) / sizeof(denied[0]); i++) {
        if (for_template && template_allows(denied[i])) continue;
        int nr = seccomp_syscall_resolve_name(denied[i]);
        if (nr == __NR_SCMP_ERROR) continue;  // unknown on this architecture/libseccomp: nothing to deny
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0);
        if (rc < 0) goto out;
    }
    // clone3 passes flags in memory the filter cannot read: make libc fall back to clone.
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0);
    if (rc < 0) goto out;
    const unsigned long ns_flags[] = {
        CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET,
        CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWCGROUP, CLONE_NEWTIME,
    };
    for (unsigned i = 0; i < sizeof(ns_flags) / sizeof(ns_flags[0]); i++) {
        rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
                              SCMP_A0(SCMP_CMP_MASKED_EQ, ns_flags[i], ns_flags[i]));
        if (rc < 0) goto out;
    }
    // No faking terminal input into another process's tty.
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(ioctl), 1,
                          SCMP_A1(SCMP_CMP_MASKED_EQ, 0xFFFFFFFFu, TIOCSTI));
    if (rc < 0) goto out;
    // personality: no turning address-space randomisation off.
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(personality), 1,
                          SCMP_A0(SCMP_CMP_MASKED_EQ, 0x0040000u, 0x0040000u));
    if (rc < 0) goto out;
    // AF_PACKET / raw sockets fail for lack of caps anyway; deny them explicitly too.
    rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 1,
                          SCMP_A0(SCMP_CMP_EQ, 17 /* AF_PACKET */));
    if (rc < 0) goto out;
    rc = seccomp_export_bpf(ctx, fd);
out:
    seccomp_release(ctx);
    return rc < 0 ? rc : 0;
}
