#define _GNU_SOURCE
#include "CSandpiperShims.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/vfs.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/fsuid.h>

#ifndef NS_GET_USERNS
#define NS_GET_USERNS 0xb701
#endif

int sandpiper_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int sandpiper_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                    const int *fds, int count) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attributes;
    int rc = posix_spawn_file_actions_init(&actions);
    if (rc != 0) return rc;
    rc = posix_spawnattr_init(&attributes);
    if (rc != 0) {
        posix_spawn_file_actions_destroy(&actions);
        return rc;
    }
    // Move every source far away first, so that a source numbered like a target survives.
    const int base = 1000;
    for (int i = 0; i < count && rc == 0; i++) rc = posix_spawn_file_actions_adddup2(&actions, fds[i], base + i);
    for (int i = 0; i < count && rc == 0; i++) rc = posix_spawn_file_actions_adddup2(&actions, base + i, i);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&actions, count);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attributes, &none);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attributes, &all);
    if (rc == 0)
        rc = posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSID);
    if (rc == 0) rc = posix_spawn(pid, path, &actions, &attributes, argv, envp);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attributes);
    return rc;
}

long sandpiper_fs_type(const char *path) {
    struct statfs fs;
    if (statfs(path, &fs) != 0) return -1;
    return (long)fs.f_type;
}

int sandpiper_ns_get_userns(int fd) { return ioctl(fd, NS_GET_USERNS); }

long sandpiper_read_timeout(int fd, void *buffer, unsigned long count, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do {
        rc = poll(&p, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    if (rc < 0) return -1;
    ssize_t n;
    do {
        n = read(fd, buffer, count);
    } while (n < 0 && errno == EINTR);
    return n;
}

long sandpiper_send_with_fds(int sock, const void *buffer, unsigned long length, const int *fds, int count) {
    if (count < 0 || count > 16) {
        errno = EINVAL;
        return -1;
    }
    char control[CMSG_SPACE(sizeof(int) * 16)];
    memset(control, 0, sizeof(control));
    struct iovec iov = {.iov_base = (void *)buffer, .iov_len = length};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (count > 0) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
        struct cmsghdr *header = CMSG_FIRSTHDR(&msg);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * count);
        memcpy(CMSG_DATA(header), fds, sizeof(int) * count);
    }
    long n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
}

int sandpiper_seqpacket_pair(int fds[2]) {
    return socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds);
}

void sandpiper_set_fs_identity(uid_t uid, gid_t gid) {
    setfsgid(gid);
    setfsuid(uid);
}

int sandpiper_fsetxattr(int fd, const char *name, const void *value, unsigned long size) {
    return fsetxattr(fd, name, value, size, 0);
}

long sandpiper_fgetxattr(int fd, const char *name, void *value, unsigned long size) {
    return fgetxattr(fd, name, value, size);
}
