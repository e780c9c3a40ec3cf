// The custom-container test server: HTTP/1.1 on port 8080, one forked child per connection.
// Built with `gcc -static` into the test image (no libc in it).
//   /echo            method, target, body size and FNV-1a of the body, then every header line
//   /state           POST stores the body, GET returns it ("state=...")
//   /download?bytes=N  N bytes (i % 251), streamed
//   /slow?seconds=N  answers after N seconds
//   /drop            closes the connection without answering
//   /stop-listening  the server closes its listening socket (later connections are refused)
//   /health          200, or 500 once /sick was called
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int listener = -1;

static void stop_listening(int signal_number) {
    (void)signal_number;
    if (listener >= 0) close(listener);
    listener = -1;
}

static int write_all(int fd, const char *data, size_t length) {
    while (length > 0) {
        ssize_t written = write(fd, data, length);
        if (written <= 0) return -1;
        data += written;
        length -= (size_t)written;
    }
    return 0;
}

static void respond(int fd, int status, const char *body) {
    char head[256];
    int length = snprintf(head, sizeof head,
                          "HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                          status, strlen(body));
    write_all(fd, head, (size_t)length);
    write_all(fd, body, strlen(body));
}

static long query_number(const char *target, const char *name) {
    const char *found = strstr(target, name);
    return found ? atol(found + strlen(name)) : 0;
}

static void serve(int fd) {
    static char request[65536];
    size_t used = 0;
    char *end = NULL;
    while (!end) {
        if (used == sizeof request - 1) return;
        ssize_t count = read(fd, request + used, sizeof request - 1 - used);
        if (count <= 0) return;
        used += (size_t)count;
        request[used] = 0;
        end = strstr(request, "\r\n\r\n");
    }
    *end = 0;
    char *body = end + 4;
    size_t body_have = used - (size_t)(body - request);
    char method[16] = "", target[4096] = "";
    sscanf(request, "%15s %4095s", method, target);
    long content_length = 0;
    for (char *line = strstr(request, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, "Content-Length:", 15) == 0) content_length = atol(line + 17);
    }
    // The body: streamed through FNV-1a; kept (up to 4 KiB) for /state.
    uint32_t hash = 2166136261u;
    long received = 0;
    char kept[4096];
    size_t kept_length = 0;
    char buffer[65536];
    char *chunk = body;
    size_t chunk_length = body_have;
    while (1) {
        for (size_t i = 0; i < chunk_length && received < content_length; i++, received++) {
            hash = (hash ^ (uint8_t)chunk[i]) * 16777619u;
            if (kept_length < sizeof kept - 1) kept[kept_length++] = chunk[i];
        }
        if (received >= content_length) break;
        ssize_t count = read(fd, buffer, sizeof buffer);
        if (count <= 0) return;
        chunk = buffer;
        chunk_length = (size_t)count;
    }
    kept[kept_length] = 0;

    if (strncmp(target, "/echo", 5) == 0) {
        static char text[70000];
        int length = snprintf(text, sizeof text, "method=%s\ntarget=%s\nbody-bytes=%ld\nbody-fnv=%08x\n", method,
                              target, received, hash);
        for (char *line = strstr(request, "\r\n"); line && length < (int)sizeof text - 100;
             line = strstr(line + 2, "\r\n")) {
            char *next = strstr(line + 2, "\r\n");
            size_t line_length = next ? (size_t)(next - line - 2) : strlen(line + 2);
            length += snprintf(text + length, sizeof text - (size_t)length, "header:%.*s\n", (int)line_length, line + 2);
        }
        respond(fd, 200, text);
    } else if (strncmp(target, "/state", 6) == 0) {
        if (strcmp(method, "POST") == 0) {
            FILE *file = fopen("/tmp/state", "w");
            if (file) {
                fputs(kept, file);
                fclose(file);
            }
        }
        char state[4200] = "state=";
        FILE *file = fopen("/tmp/state", "r");
        if (file) {
            size_t count = fread(state + 6, 1, sizeof state - 8, file);
            state[6 + count] = 0;
            fclose(file);
        }
        strcat(state, "\n");
        respond(fd, 200, state);
    } else if (strncmp(target, "/download", 9) == 0) {
        long total = query_number(target, "bytes=");
        char head[256];
        int length = snprintf(head, sizeof head,
                              "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %ld\r\n"
                              "Connection: close\r\n\r\n",
                              total);
        if (write_all(fd, head, (size_t)length) != 0) return;
        for (long sent = 0; sent < total;) {
            size_t count = total - sent < (long)sizeof buffer ? (size_t)(total - sent) : sizeof buffer;
            for (size_t i = 0; i < count; i++) buffer[i] = (char)((sent + (long)i) % 251);
            if (write_all(fd, buffer, count) != 0) return;
            sent += (long)count;
        }
    } else if (strncmp(target, "/slow", 5) == 0) {
        sleep((unsigned)query_number(target, "seconds="));
        respond(fd, 200, "slow\n");
    } else if (strncmp(target, "/drop", 5) == 0) {
        return;
    } else if (strncmp(target, "/stop-listening", 15) == 0) {
        kill(getppid(), SIGUSR1);
        respond(fd, 200, "stopped\n");
    } else if (strncmp(target, "/sick", 5) == 0) {
        close(open("/tmp/unhealthy", O_WRONLY | O_CREAT, 0644));
        respond(fd, 200, "sick\n");
    } else if (strncmp(target, "/health", 7) == 0) {
        struct stat info;
        if (stat("/tmp/unhealthy", &info) == 0) respond(fd, 500, "unhealthy\n");
        else respond(fd, 200, "healthy\n");
    } else {
        respond(fd, 404, "not found\n");
    }
}

int main(void) {
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction action = {.sa_handler = stop_listening};
    sigaction(SIGUSR1, &action, NULL);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    int yes = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 64) != 0) {
        perror("listen");
        return 1;
    }
    while (1) {
        if (listener < 0) {
            pause();
            continue;
        }
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) continue;
        if (fork() == 0) {
            close(listener);
            serve(fd);
            close(fd);
            _exit(0);
        }
        close(fd);
    }
}
