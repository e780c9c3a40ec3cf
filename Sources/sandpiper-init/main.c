// sandpiper-init: the first process of a forked Python session (docs/architecture.md,
// "Warm-fork sessions").
//
// The pool's fork template (a warm Python interpreter, root of its own user namespace, never
// running user code) spawns this small static program for each new session, instead of forking
// its whole interpreter twice. It:
//   1. unshares new mount, pid, net, ipc and uts namespaces and forks the session's pid 1;
//   2. pid 1 mounts the session's /proc, /tmp, /dev/shm and /mnt/data (tmpfs, size-limited;
//      the agent gives /mnt/data to the session uid), names the host `sandbox` and brings
//      `lo` up;
//   3. pid 1 drops to INIT_UID (the template's uid for its sessions' pid 1s, which owns nothing
//      and never runs user code), every capability, no_new_privs, not dumpable, and the session
//      seccomp filter; then it only reaps orphans for the rest of the session;
//   4. this process reports pid 1's pid (as the template sees it) on fd 3, or `error: ...`,
//      and exits.
// Nothing here depends on the session it will serve: the template spawns the next sessions'
// inits ahead of their requests, so that this work overlaps its forks. It then forks its warm
// interpreter into these namespaces as the session's agent.
//
// Usage: sandpiper-init TMP_BYTES DISK_BYTES INIT_UID   (fd 3: the report pipe)
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "sandpiper_confine.h"

#define REPORT_FD 3

// One line to `fd` then exit: how both processes fail.
static void fail(int fd, const char *format, ...) {
    char message[512];
    va_list arguments;
    va_start(arguments, format);
    int length = vsnprintf(message, sizeof(message), format, arguments);
    va_end(arguments);
    if (length < 0) length = 0;
    if ((size_t)length >= sizeof(message)) length = sizeof(message) - 1;
    char line[600];
    int total = snprintf(line, sizeof(line), "error: %.*s\n", length, message);
    if (total > 0) (void)!write(fd, line, (size_t)total < sizeof(line) ? (size_t)total : sizeof(line) - 1);
    _exit(1);
}

static long long parse_number(const char *text, long long max) {
    if (text == NULL || *text == '\0') return -1;
    char *end = NULL;
    errno = 0;
    long long value = strtoll(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < 0 || value > max) return -1;
    return value;
}

static void mount_or_fail(int fd, const char *source, const char *target, const char *type,
                          unsigned long flags, const char *data) {
    if (mount(source, target, type, flags, data) != 0)
        fail(fd, "mount %s: %s", target, strerror(errno));
}

static void loopback_up(int fd) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) fail(fd, "socket: %s", strerror(errno));
    struct ifreq request;
    memset(&request, 0, sizeof(request));
    strncpy(request.ifr_name, "lo", IFNAMSIZ - 1);
    if (ioctl(sock, SIOCGIFFLAGS, &request) != 0) fail(fd, "lo flags: %s", strerror(errno));
    request.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &request) != 0) fail(fd, "lo up: %s", strerror(errno));
    close(sock);
}

// No capability, no way back, no seccomp-free moment in the session's life after this.
static void drop_privileges(int fd, uid_t uid) {
    static struct sandpiper_filter filter;
    char error[512];
    if (sandpiper_read_filter(SANDPIPER_SECCOMP_PROGRAM, &filter, error, sizeof(error)) != 0 ||
        sandpiper_confine(uid, &filter, 1, error, sizeof(error)) != 0)
        fail(fd, "%s", error);
}

// Pid 1 of the session: its mounts, its privileges dropped, then reaping until killed.
static void session_init(int ready, long long tmp_bytes, long long disk_bytes, uid_t uid) {
    char options[128];
    mount_or_fail(ready, NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    mount_or_fail(ready, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    snprintf(options, sizeof(options), "size=%lld,mode=1777", tmp_bytes);
    mount_or_fail(ready, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, options);
    struct stat info;
    if (stat("/dev/shm", &info) == 0 && S_ISDIR(info.st_mode))
        mount_or_fail(ready, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, options);
    snprintf(options, sizeof(options), "size=%lld,mode=0700", disk_bytes);
    mount_or_fail(ready, "tmpfs", "/mnt/data", "tmpfs", MS_NOSUID | MS_NODEV, options);
    if (sethostname("sandbox", 7) != 0) fail(ready, "sethostname: %s", strerror(errno));
    loopback_up(ready);

    sigset_t children;
    sigemptyset(&children);
    sigaddset(&children, SIGCHLD);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    drop_privileges(ready, uid);

    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null < 0) fail(ready, "/dev/null: %s", strerror(errno));
    if (write(ready, "ok\n", 3) != 3) _exit(1);
    close(ready);
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    close(null);
    // Orphans of the session are reparented here: reap them, nothing else. Signals sent from
    // inside the namespace to its pid 1 without a handler are dropped by the kernel; the host
    // ends the session with SIGKILL from outside.
    for (;;) {
        siginfo_t info;
        if (sigwaitinfo(&children, &info) < 0 && errno != EINTR) pause();
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
    }
}

int main(int argc, char **argv) {
    // Whatever else the template had open stays out of the session.
    if (syscall(SYS_close_range, REPORT_FD + 1, ~0U, 0) != 0) {
        for (int fd = REPORT_FD + 1; fd < 4096; fd++) close(fd);
    }
    if (fcntl(REPORT_FD, F_GETFD) < 0) return 2;
    if (argc != 4) fail(REPORT_FD, "usage: sandpiper-init TMP_BYTES DISK_BYTES INIT_UID");
    long long tmp_bytes = parse_number(argv[1], LLONG_MAX / 2);
    long long disk_bytes = parse_number(argv[2], LLONG_MAX / 2);
    long long uid = parse_number(argv[3], 65535);
    if (tmp_bytes <= 0 || disk_bytes <= 0 || uid <= 0) fail(REPORT_FD, "bad arguments");

    if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) != 0)
        fail(REPORT_FD, "unshare: %s", strerror(errno));
    int ready[2];
    if (pipe2(ready, O_CLOEXEC) != 0) fail(REPORT_FD, "pipe: %s", strerror(errno));
    pid_t init = fork();
    if (init < 0) fail(REPORT_FD, "fork: %s", strerror(errno));
    if (init == 0) {
        close(ready[0]);
        close(REPORT_FD);
        session_init(ready[1], tmp_bytes, disk_bytes, (uid_t)uid);
        _exit(1);
    }
    close(ready[1]);
    char said[600];
    size_t length = 0;
    for (;;) {
        ssize_t got = read(ready[0], said + length, sizeof(said) - 1 - length);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        length += (size_t)got;
        if (length == sizeof(said) - 1) break;
    }
    said[length] = '\0';
    if (strcmp(said, "ok\n") != 0) {
        kill(init, SIGKILL);
        if (length == 0) fail(REPORT_FD, "the session's init exited during set-up");
        (void)!write(REPORT_FD, said, length);
        _exit(1);
    }
    char line[32];
    int total = snprintf(line, sizeof(line), "%d\n", (int)init);
    if (write(REPORT_FD, line, (size_t)total) != total) {
        kill(init, SIGKILL);
        _exit(1);
    }
    _exit(0);
}
