#define _GNU_SOURCE
#include "CSandpiperShims.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/vfs.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/fsuid.h>
#include <sched.h>
#include <pthread.h>
#include <netinet/in.h>
#include <arpa/inet.h>

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

// Waits up to `timeout_ms` for `fd` to be readable: 0, or -1 with errno (ETIMEDOUT on timeout).
static int wait_readable(int fd, int timeout_ms) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do {
        rc = poll(&p, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    return rc < 0 ? -1 : 0;
}

long sandpiper_read_timeout(int fd, void *buffer, unsigned long count, int timeout_ms) {
    if (wait_readable(fd, timeout_ms) != 0) return -1;
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

long sandpiper_receive_with_fds_timeout(int sock, void *buffer, unsigned long count, int *fds, int max_fds,
                                        int *received, int timeout_ms) {
    *received = 0;
    if (wait_readable(sock, timeout_ms) != 0) return -1;
    char control[CMSG_SPACE(sizeof(int) * 16)];
    struct iovec iov = {.iov_base = buffer, .iov_len = count};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control)};
    long n;
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return n;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&msg); header != NULL; header = CMSG_NXTHDR(&msg, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        int attached = (int)((header->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *data = (int *)CMSG_DATA(header);
        for (int i = 0; i < attached; i++) {
            int fd;
            memcpy(&fd, data + i, sizeof(int));
            if (*received < max_fds) {
                fds[(*received)++] = fd;
            } else {
                close(fd);
            }
        }
    }
    return n;
}

// struct pidfd_info as Linux 6.13 introduced it (PIDFD_INFO_SIZE_VER0, 64 bytes); later kernels
// accept this size and fill what it holds.
struct sandpiper_pidfd_info {
    uint64_t mask;
    uint64_t cgroupid;
    uint32_t pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid;
    uint32_t spare0;
};
#define SANDPIPER_PIDFD_GET_INFO _IOWR(0xFF, 11, struct sandpiper_pidfd_info)

int sandpiper_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

int sandpiper_pidfd_pid(int pidfd) {
    struct sandpiper_pidfd_info info;
    memset(&info, 0, sizeof(info));
    info.mask = 1; // PIDFD_INFO_PID
    if (ioctl(pidfd, SANDPIPER_PIDFD_GET_INFO, &info) == 0) return info.pid > 0 ? (int)info.pid : -1;
    if (errno == ESRCH) return -1;
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char text[1024];
    ssize_t got = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (got <= 0) return -1;
    text[got] = '\0';
    const char *line = strstr(text, "\nPid:");
    if (line == NULL) return -1;
    int pid = atoi(line + 5);  // -1 once the process has exited
    return pid > 0 ? pid : -1;
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

struct netns_connect {
    int netns_fd;
    uint32_t address;
    int port;
    int timeout_ms;
    int result;
};

static void *netns_connect_thread(void *argument) {
    struct netns_connect *job = argument;
    // This thread only: the network namespace is per task, and the thread ends right after.
    if (setns(job->netns_fd, CLONE_NEWNET) != 0) {
        job->result = -errno;
        return NULL;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        job->result = -errno;
        return NULL;
    }
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((uint16_t)job->port);
    address.sin_addr.s_addr = htonl(job->address);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        if (errno != EINPROGRESS) {
            job->result = -errno;
            close(fd);
            return NULL;
        }
        struct pollfd waiter = {.fd = fd, .events = POLLOUT};
        int ready;
        do {
            ready = poll(&waiter, 1, job->timeout_ms);
        } while (ready < 0 && errno == EINTR);
        if (ready <= 0) {
            job->result = ready == 0 ? -ETIMEDOUT : -errno;
            close(fd);
            return NULL;
        }
        int error = 0;
        socklen_t length = sizeof error;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) != 0 || error != 0) {
            job->result = error != 0 ? -error : -errno;
            close(fd);
            return NULL;
        }
    }
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    job->result = fd;
    return NULL;
}

int sandpiper_connect_in_netns(int netns_fd, uint32_t address, int port, int timeout_ms) {
    struct netns_connect job = {
        .netns_fd = netns_fd, .address = address, .port = port, .timeout_ms = timeout_ms, .result = -EIO};
    pthread_t thread;
    int rc = pthread_create(&thread, NULL, netns_connect_thread, &job);
    if (rc != 0) return -rc;
    pthread_join(thread, NULL);
    return job.result;
}
