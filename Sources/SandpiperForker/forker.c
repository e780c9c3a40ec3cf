// The fork loop of a warm Python fork template (docs/architecture.md, "Warm-fork sessions").
//
// The template (agent.py --template) imports the Python stack once, then each of its forkers
// calls `sandpiper_forker_serve` (through ctypes) and never returns to Python in the forker: a
// Python loop wrote ~230 pages of the interpreter between two forks (reference counts, frames,
// the JSON of each request), each a copy-on-write fault once the previous session shared it,
// and split the huge pages the next fork would have copied as one entry each. This loop writes
// its own stack and a few globals.
//
// Per request on the control socket (one seqpacket message, the host's JSON
// `{"type":"fork","uid":U,"tmpBytes":T,"diskBytes":D,"initUid":I}` with four descriptors: the
// agent's request and response pipes, the host's go pipe and the session's stderr):
//   1. takes a session init spawned ahead (sandpiper-init TMP DISK INIT_UID: new namespaces,
//      mounts, pid 1 confined; see Sources/sandpiper-init/main.c), or spawns one now;
//   2. enters its pid namespace for the next child only (setns on a pidfd) and forks: the child
//      is pid 2 of the session. Still here, before any Python code, it waits for the host's go
//      (sent once the host has moved it and pid 1 into the session's cgroups), enters the
//      session's other namespaces, takes /mnt/data, its pipes (3 and 4), its limits and its
//      uid under the session filter (`become_session`); then it returns 1 to Python, which
//      becomes the session's agent;
//   3. answers `{"type":"forked","pid":INIT,"agent":AGENT}` (pids as the template's pid
//      namespace numbers them) with a pidfd of each attached, from which the host reads their
//      pids in its own namespace, or `{"type":"error","message":...}`; then spawns the inits of
//      the next sessions, so that they set up on another core while this one forks.
// Children that end (the inits' first processes, sessions' pid 1s it is the subreaper of,
// agents) are reaped here.
#define _GNU_SOURCE
#include "sandpiper_forker.h"

#include "sandpiper_confine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define AHEAD 2
#define INIT_TIMEOUT_MS 10000
#define MAX_MESSAGE 4096
#define MAX_FDS 8

struct init_key {
    long long tmp_bytes;
    long long disk_bytes;
    long long init_uid;
};

struct spawned_init {
    struct init_key key;
    int report;
};

static struct spawned_init ahead[AHEAD];
static int ahead_count;
static struct sandpiper_filter session_filter;

static void reap(void) {
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

// In a forked session: the inits ahead are its forker's, not its own to end.
static void forget_ahead(void) {
    for (int i = 0; i < ahead_count; i++) close(ahead[i].report);
    ahead_count = 0;
}

static int read_report(int report, pid_t *init, char *error, size_t size);

// Ends the inits spawned ahead (a request with other limits): each is set up and reports its
// pid 1, whose death ends its namespaces.
static void discard_ahead(void) {
    for (int i = 0; i < ahead_count; i++) {
        pid_t init = 0;
        char error[400];
        if (read_report(ahead[i].report, &init, error, sizeof(error)) == 0) kill(init, SIGKILL);
    }
    ahead_count = 0;
}

static int spawn_init(const char *path, struct init_key key) {
    if (ahead_count == AHEAD) return 0;
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return -1;
    char numbers[3][24];
    snprintf(numbers[0], sizeof(numbers[0]), "%lld", key.tmp_bytes);
    snprintf(numbers[1], sizeof(numbers[1]), "%lld", key.disk_bytes);
    snprintf(numbers[2], sizeof(numbers[2]), "%lld", key.init_uid);
    char *argv[] = {(char *)path, numbers[0], numbers[1], numbers[2], NULL};
    char *envp[] = {NULL};
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, report[1], 3);
    pid_t pid;
    int failed = posix_spawn(&pid, path, &actions, NULL, argv, envp);
    posix_spawn_file_actions_destroy(&actions);
    close(report[1]);
    if (failed != 0) {
        close(report[0]);
        errno = failed;
        return -1;
    }
    ahead[ahead_count].key = key;
    ahead[ahead_count].report = report[0];
    ahead_count++;
    return 0;
}

// Pid 1 of a new session, from the first init ahead (spawned now if there is none with these
// limits). 0 or -1 with `error` set.
static int take_init(const char *path, struct init_key key, pid_t *init, char *error, size_t size) {
    if (ahead_count == 0 || memcmp(&ahead[0].key, &key, sizeof(key)) != 0) {
        discard_ahead();
        if (spawn_init(path, key) != 0) {
            snprintf(error, size, "cannot spawn sandpiper-init: %s", strerror(errno));
            return -1;
        }
    }
    int report = ahead[0].report;
    memmove(&ahead[0], &ahead[1], sizeof(ahead[0]) * (size_t)(ahead_count - 1));
    ahead_count--;
    return read_report(report, init, error, size);
}

// An init's report: its pid 1's pid, or why it failed. Closes `report`. 0 or -1 with `error`.
static int read_report(int report, pid_t *init, char *error, size_t size) {
    char said[600];
    size_t length = 0;
    int waited = 0;
    for (;;) {
        struct pollfd wait = {report, POLLIN, 0};
        int ready = poll(&wait, 1, 100);
        if (ready < 0 && errno != EINTR) break;
        if (ready <= 0) {
            waited += ready == 0 ? 100 : 0;
            if (waited >= INIT_TIMEOUT_MS) {
                close(report);
                snprintf(error, size, "sandpiper-init did not report in %d s", INIT_TIMEOUT_MS / 1000);
                return -1;
            }
            continue;
        }
        ssize_t got = read(report, said + length, sizeof(said) - 1 - length);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        length += (size_t)got;
        if (length == sizeof(said) - 1) break;
    }
    close(report);
    said[length] = '\0';
    while (length > 0 && (said[length - 1] == '\n' || said[length - 1] == ' ')) said[--length] = '\0';
    char *end = NULL;
    long value = strtol(said, &end, 10);
    if (length == 0 || *end != '\0' || value <= 0) {
        snprintf(error, size, "sandpiper-init: %s", length == 0 ? "no report" : said);
        return -1;
    }
    *init = (pid_t)value;
    return 0;
}

// Where the value of `"key":` starts in the host's JSON (written by the host, never by a
// session), or NULL.
static const char *json_value(const char *text, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "\"%s\"", key);
    const char *at = strstr(text, pattern);
    if (at == NULL) return NULL;
    at += strlen(pattern);
    while (*at == ' ') at++;
    if (*at++ != ':') return NULL;
    while (*at == ' ') at++;
    return at;
}

// `"key": <integer>`.
static int json_number(const char *text, const char *key, long long *out) {
    const char *at = json_value(text, key);
    if (at == NULL) return -1;
    char *end = NULL;
    errno = 0;
    long long value = strtoll(at, &end, 10);
    if (end == at || errno != 0) return -1;
    *out = value;
    return 0;
}

static int answer(int control, const char *text) {
    return send(control, text, strlen(text), MSG_NOSIGNAL) < 0 ? -1 : 0;
}

// The reply with descriptors attached (SCM_RIGHTS): the host learns the pids as its own pid
// namespace numbers them from the pidfds, not by reading /proc of every process of the template.
static int answer_with_fds(int control, const char *text, const int *fds, int count) {
    char space[CMSG_SPACE(sizeof(int) * 2)];
    memset(space, 0, sizeof(space));
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = space,
                         .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count)};
    struct cmsghdr *header = CMSG_FIRSTHDR(&msg);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
    memcpy(CMSG_DATA(header), fds, sizeof(int) * (size_t)count);
    return sendmsg(control, &msg, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

static int answer_error(int control, const char *format, ...) {
    char message[400];
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(message, sizeof(message), format, arguments);
    va_end(arguments);
    char text[900];
    size_t length = (size_t)snprintf(text, sizeof(text), "{\"type\":\"error\",\"message\":\"");
    for (const char *c = message; *c != '\0' && length < sizeof(text) - 8; c++) {
        if (*c == '"' || *c == '\\') text[length++] = '\\';
        text[length++] = (unsigned char)*c < 0x20 ? ' ' : *c;
    }
    snprintf(text + length, sizeof(text) - length, "\"}");
    return answer(control, text);
}

// One request: its text and up to MAX_FDS descriptors (close-on-exec here). The length, 0 when
// the host closed the socket, -1 on an error.
static ssize_t receive(int control, char *message, size_t size, int *fds, int *count) {
    union {
        char buffer[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control_data;
    struct iovec data = {message, size};
    struct msghdr header = {0};
    header.msg_iov = &data;
    header.msg_iovlen = 1;
    header.msg_control = control_data.buffer;
    header.msg_controllen = sizeof(control_data.buffer);
    ssize_t got = recvmsg(control, &header, MSG_CMSG_CLOEXEC);
    *count = 0;
    if (got < 0) return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&header); c != NULL; c = CMSG_NXTHDR(&header, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *received = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            if (*count < MAX_FDS) {
                fds[(*count)++] = received[i];
            } else {
                close(received[i]);
            }
        }
    }
    if (header.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        for (int i = 0; i < *count; i++) close(fds[i]);
        *count = 0;
        errno = EMSGSIZE;
        return -1;
    }
    return got;
}

// Pid 2 of a new session, just forked, before any Python code runs in it (each line of Python
// here cost page copies: ~180 for this part). `fds`: the agent's request and response pipes,
// the host's go pipe, the session's stderr. Returns only when the process is the session's.
static void become_session(int fds[4], int init_pidfd, uid_t uid) {
    char error[512];
    char go = 0;
    ssize_t got;
    do {
        got = read(fds[2], &go, 1);
    } while (got < 0 && errno == EINTR);
    if (got != 1 || go != 'g') _exit(0);  // the host gave up on this session
    if (setns(init_pidfd, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) != 0) {
        snprintf(error, sizeof(error), "setns: %s", strerror(errno));
        goto failed;
    }
    // pid 1 mounted it before the session was known
    if (chown("/mnt/data", uid, uid) != 0) {
        snprintf(error, sizeof(error), "chown /mnt/data: %s", strerror(errno));
        goto failed;
    }
    // The agent's pipes on 3 and 4, /dev/null on 0 and 1, the session's stderr on 2; nothing else.
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    int request = fcntl(fds[0], F_DUPFD_CLOEXEC, 10);
    int response = fcntl(fds[1], F_DUPFD_CLOEXEC, 10);
    int err = fcntl(fds[3], F_DUPFD_CLOEXEC, 10);
    // (The pipes' copies are above 9; /dev/null, whatever number from 3 up it got, goes first.)
    if (null < 0 || request < 0 || response < 0 || err < 0 || dup2(null, 0) != 0 || dup2(null, 1) != 1 ||
        dup2(err, 2) != 2 || dup2(request, 3) != 3 || dup2(response, 4) != 4) {
        snprintf(error, sizeof(error), "descriptors: %s", strerror(errno));
        goto failed;
    }
    if (syscall(SYS_close_range, 5, ~0U, 0) != 0) {
        for (int fd = 5; fd < 65536; fd++) close(fd);
    }
    setsid();
    struct rlimit files = {4096, 4096};
    struct rlimit core = {0, 0};
    if (setrlimit(RLIMIT_NOFILE, &files) != 0 || setrlimit(RLIMIT_CORE, &core) != 0) {
        snprintf(error, sizeof(error), "setrlimit: %s", strerror(errno));
        goto failed;
    }
    if (sandpiper_confine(uid, &session_filter, 0, error, sizeof(error)) != 0) goto failed;
    if (chdir("/mnt/data") != 0) {
        snprintf(error, sizeof(error), "chdir /mnt/data: %s", strerror(errno));
        goto failed;
    }
    return;
failed:
    dprintf(2, "sandpiper-forker: session set-up failed: %s\n", error);
    _exit(1);
}

// Backs the populated 2 MiB ranges of the anonymous private mappings (the heap, Python's and the
// libraries' allocations) with transparent huge pages (MADV_COLLAPSE, Linux 6.1+): a fork then
// copies one page-table entry per 2 MiB instead of 512 (~90 us a range here), and a child's
// write splits the range in the child only (~12 us) and copies the 4 KiB page it touches. Done
// here, after the last line of Python in the template: every page Python writes after a collapse
// is split again, in the template and in each forker. Best effort; returns the ranges collapsed.
static int collapse_to_huge_pages(void) {
    static char maps[1 << 18];
    const unsigned long huge = 1UL << 21;
    long length = sandpiper_read_file("/proc/self/maps", maps, sizeof(maps) - 1);
    if (length < 0) return 0;
    maps[length] = '\0';
    int collapsed = 0;
    for (char *line = maps; *line != '\0';) {
        char *end = strchr(line, '\n');
        if (end == NULL) break;  // a line cut short by the buffer: ignored
        *end = '\0';
        unsigned long low = 0, high = 0;
        char perms[5] = {0};
        char name[64] = {0};
        int fields = sscanf(line, "%lx-%lx %4s %*s %*s %*s %63s", &low, &high, perms, name);
        if (fields >= 3 && perms[0] == 'r' && perms[1] == 'w' && perms[3] == 'p' &&
            (fields == 3 || strcmp(name, "[heap]") == 0)) {
            for (unsigned long chunk = (low + huge - 1) & ~(huge - 1); chunk + huge <= high; chunk += huge) {
                if (madvise((void *)chunk, huge, 25 /* MADV_COLLAPSE */) == 0) collapsed++;
            }
        }
        line = end + 1;
    }
    return collapsed;
}

int sandpiper_forker_serve_all(const int *controls, int count, int own_pid_namespace, const char *session_init) {
    if (count < 1) return -1;
    collapse_to_huge_pages();
    int mine = 0;
    for (int i = 1; i < count; i++) {
        pid_t forker = fork();
        if (forker == 0) {
            mine = i;
            break;
        }
        if (forker < 0) dprintf(2, "sandpiper-forker: cannot fork forker %d: %s\n", i, strerror(errno));
    }
    for (int i = 0; i < count; i++) {
        if (i != mine) close(controls[i]);
    }
    // Each session's pid 1 outlives the sandpiper-init that spawned it: reaped by its forker (a
    // forker that dies leaves them to the first one, the parent of the others).
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0) {
        dprintf(2, "sandpiper-forker: PR_SET_CHILD_SUBREAPER: %s\n", strerror(errno));
        return -1;
    }
    char ready[64];
    int total = snprintf(ready, sizeof(ready), "{\"type\":\"ready\",\"pid\":%d}", (int)getpid());
    if (write(controls[mine], ready, (size_t)total) != total) return -1;
    return sandpiper_forker_serve(controls[mine], own_pid_namespace, session_init);
}

int sandpiper_forker_serve(int control, int own_pid_namespace, const char *session_init) {
    char message[MAX_MESSAGE + 1];
    char loaded[512];
    if (sandpiper_read_filter(SANDPIPER_SECCOMP_PROGRAM, &session_filter, loaded, sizeof(loaded)) != 0) {
        dprintf(2, "sandpiper-forker: %s\n", loaded);
        return -1;
    }
    sandpiper_last_capability();  // read here once: each session confines itself with it
    for (;;) {
        reap();
        struct pollfd wait = {control, POLLIN, 0};
        int ready = poll(&wait, 1, 1000);
        if (ready < 0 && errno != EINTR) return -1;
        if (ready <= 0) continue;
        int fds[MAX_FDS];
        int count = 0;
        ssize_t got = receive(control, message, MAX_MESSAGE, fds, &count);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            if (errno == EMSGSIZE) {
                if (answer_error(control, "request too large") != 0) return 0;
                continue;
            }
            return -1;
        }
        if (got == 0) return 0;  // the host is gone
        message[got] = '\0';
        long long uid = 0;
        struct init_key key = {0, 0, 0};
        const char *type = json_value(message, "type");
        if (type == NULL || strncmp(type, "\"fork\"", 6) != 0 || count != 4 || json_number(message, "uid", &uid) != 0 ||
            json_number(message, "tmpBytes", &key.tmp_bytes) != 0 ||
            json_number(message, "diskBytes", &key.disk_bytes) != 0 ||
            json_number(message, "initUid", &key.init_uid) != 0 || uid <= 0 || uid > 65535) {
            for (int i = 0; i < count; i++) close(fds[i]);
            if (answer_error(control, "bad request") != 0) return 0;
            continue;
        }
        pid_t init = 0;
        char error[400];
        int pidfd = -1;
        if (take_init(session_init, key, &init, error, sizeof(error)) == 0) {
            pidfd = (int)syscall(SYS_pidfd_open, init, 0);
            if (pidfd < 0) snprintf(error, sizeof(error), "pidfd_open: %s", strerror(errno));
        }
        // For the next child only: this process stays in its own pid namespace.
        if (pidfd >= 0 && setns(pidfd, CLONE_NEWPID) != 0) {
            snprintf(error, sizeof(error), "setns: %s", strerror(errno));
            close(pidfd);
            pidfd = -1;
        }
        if (pidfd < 0) {
            if (init > 0) kill(init, SIGKILL);
            for (int i = 0; i < count; i++) close(fds[i]);
            if (answer_error(control, "%s", error) != 0) return 0;
            continue;
        }
        pid_t agent = fork();
        if (agent == 0) {
            close(control);
            close(own_pid_namespace);
            forget_ahead();
            become_session(fds, pidfd, (uid_t)uid);
            return 1;
        }
        int fork_error = errno;
        // Back to its own pid namespace for the next inits: without it, the loop cannot go on.
        if (setns(own_pid_namespace, CLONE_NEWPID) != 0) return -1;
        for (int i = 0; i < count; i++) close(fds[i]);
        int agent_pidfd = agent > 0 ? (int)syscall(SYS_pidfd_open, agent, 0) : -1;
        if (agent_pidfd < 0) {
            if (agent > 0) {
                fork_error = errno;
                kill(agent, SIGKILL);
            }
            kill(init, SIGKILL);
            close(pidfd);
            if (answer_error(control, "%s: %s", agent < 0 ? "fork" : "pidfd_open", strerror(fork_error)) != 0)
                return 0;
            continue;
        }
        char reply[128];
        snprintf(reply, sizeof(reply), "{\"type\":\"forked\",\"pid\":%d,\"agent\":%d}", (int)init, (int)agent);
        int handles[2] = {pidfd, agent_pidfd};
        int sent = answer_with_fds(control, reply, handles, 2);
        close(pidfd);
        close(agent_pidfd);
        if (sent != 0) return 0;
        while (ahead_count < AHEAD) {
            if (spawn_init(session_init, key) != 0) {
                dprintf(2, "sandpiper-forker: cannot spawn sandpiper-init ahead: %s\n", strerror(errno));
                break;
            }
        }
    }
}
