// The fork loop of a warm Python fork template (libSandpiperForker.so, loaded with ctypes).
#ifndef SANDPIPER_FORKER_H
#define SANDPIPER_FORKER_H

/// Serves fork requests on `control` (see forker.c). Returns 0 when the host closed the socket,
/// -1 when the loop cannot go on. In each forked session it returns 1: the process is then the
/// session's pid 2, confined (its uid, no capability, the session filter), in /mnt/data, with
/// the agent's request pipe on fd 3, its response pipe on fd 4 and nothing else open but 0-2.
int sandpiper_forker_serve(int control, int own_pid_namespace, const char *session_init);

/// The template's last call: backs its heap with huge pages, forks a forker for each control
/// socket but the first (which the template serves itself), and in each of them becomes a child
/// subreaper, says `{"type":"ready","pid":P}` on its socket and serves it. The forkers never run
/// Python again (no at-fork hooks, no page written between the collapse and the loop). Returns
/// as `sandpiper_forker_serve` does, in the template, in each forker and in each session.
int sandpiper_forker_serve_all(const int *controls, int count, int own_pid_namespace, const char *session_init);

#endif
