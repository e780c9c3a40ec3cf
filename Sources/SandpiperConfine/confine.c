// Confining a process to its session (see sandpiper_confine.h).
#define _GNU_SOURCE
#include "sandpiper_confine.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

long sandpiper_read_file(const char *path, void *buffer, size_t size) {
    int source = open(path, O_RDONLY | O_CLOEXEC);
    if (source < 0) return -1;
    size_t length = 0;
    while (length < size) {
        ssize_t got = read(source, (char *)buffer + length, size - length);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            int saved = errno;
            close(source);
            errno = saved;
            return -1;
        }
        if (got == 0) break;
        length += (size_t)got;
    }
    close(source);
    return (long)length;
}

int sandpiper_read_filter(const char *path, struct sandpiper_filter *filter, char *error, size_t size) {
    long length = sandpiper_read_file(path, filter->program, sizeof(filter->program));
    if (length < 0) {
        snprintf(error, size, "read %s: %s", path, strerror(errno));
        return -1;
    }
    if ((size_t)length == sizeof(filter->program)) {
        snprintf(error, size, "%s is too large", path);
        return -1;
    }
    if (length == 0 || (size_t)length % sizeof(struct sock_filter) != 0) {
        snprintf(error, size, "%s is malformed", path);
        return -1;
    }
    filter->length = (unsigned short)((size_t)length / sizeof(struct sock_filter));
    return 0;
}

#define FAIL(...)                               \
    do {                                        \
        snprintf(error, size, __VA_ARGS__);     \
        return -1;                              \
    } while (0)

static int last_capability = -1;

int sandpiper_last_capability(void) {
    if (last_capability >= 0) return last_capability;
    int last = 63;
    char text[16];
    long got = sandpiper_read_file("/proc/sys/kernel/cap_last_cap", text, sizeof(text) - 1);
    if (got > 0) {
        text[got] = '\0';
        char *end = NULL;
        long value = strtol(text, &end, 10);
        if (end != text && value >= 0 && value <= 63) last = (int)value;
    }
    last_capability = last;
    return last;
}

int sandpiper_confine(uid_t uid, const struct sandpiper_filter *filter, int undumpable, char *error, size_t size) {
    int last = sandpiper_last_capability();
    for (int i = 0; i <= last; i++) {
        if (prctl(PR_CAPBSET_DROP, i, 0, 0, 0) != 0 && errno != EINVAL)
            FAIL("drop capability %d: %s", i, strerror(errno));
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0) FAIL("ambient: %s", strerror(errno));
    if (setgroups(0, NULL) != 0) FAIL("setgroups: %s", strerror(errno));
    if (setresgid(uid, uid, uid) != 0) FAIL("setresgid: %s", strerror(errno));
    if (setresuid(uid, uid, uid) != 0) FAIL("setresuid: %s", strerror(errno));
    // Leaving uid 0 cleared the permitted and effective sets; the inheritable set too:
    struct {
        unsigned int version;
        int pid;
    } header = {0x20080522, 0};
    unsigned int data[6] = {0};
    if (syscall(SYS_capset, &header, data) != 0) FAIL("capset: %s", strerror(errno));
    if (undumpable && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) FAIL("not dumpable: %s", strerror(errno));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) FAIL("no_new_privs: %s", strerror(errno));
    struct sock_fprog program = {filter->length, (struct sock_filter *)filter->program};
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0) != 0) FAIL("seccomp: %s", strerror(errno));
    return 0;
}
