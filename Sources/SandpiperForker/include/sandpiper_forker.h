// The fork loop of a warm Python fork template (libSandpiperForker.so, loaded with ctypes).
#ifndef SANDPIPER_FORKER_H
#define SANDPIPER_FORKER_H

/// What a forked session's agent gets back: the session's uid (inside the template's user
/// namespace), its pipes, and a pidfd of its pid 1.
struct sandpiper_forked {
    int uid;
    int request_fd;
    int response_fd;
    int go_fd;
    int stderr_fd;
    int init_pidfd;
};

/// Serves fork requests on `control` (see forker.c). Returns 0 when the host closed the socket,
/// -1 when the loop cannot go on; in each forked session it returns 1, with `forked` filled in.
int sandpiper_forker_serve(int control, int own_pid_namespace, const char *session_init,
                           struct sandpiper_forked *forked);

#endif
