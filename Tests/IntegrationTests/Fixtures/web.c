// The custom-container test server: HTTP/1.1 on port 8080, one forked child per connection.
// Built with `gcc -static` into the test image (no libc in it).
//   /echo            method, target, body size and FNV-1a of the body, then every header line
//   /state           POST stores the body, GET returns it ("state=...")
//   /download?bytes=N  N bytes (i % 251), streamed
//   /slow?seconds=N  answers after N seconds
//   /drop            closes the connection without answering
//   /stop-listening  the server closes its listening socket; answered once connections are refused
//   /health          200, or 500 once /sick was called
//   /ws              WebSocket (RFC 6455) echo: every data frame comes back as it was sent (opcode,
//                    FIN bit, payload), pings get their pong, a close is answered with the same
//                    code and reason; the text "headers" answers the upgrade request's header
//                    lines, "state" what /state holds, "close:CODE" closes from this side with
//                    CODE. `?hello` sends a text frame "hello" in the same write as the 101;
//                    `?bye` a close frame (1000 "bye") in that write, then closes at once;
//                    the first Sec-WebSocket-Protocol offered is accepted.
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

// SHA-1 (FIPS 180-1) and base64, for Sec-WebSocket-Accept.
static uint32_t rotl(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const uint8_t *data, size_t length, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t padded = ((length + 8) / 64 + 1) * 64;
    uint8_t *message = calloc(padded, 1);
    memcpy(message, data, length);
    message[length] = 0x80;
    uint64_t bits = (uint64_t)length * 8;
    for (int i = 0; i < 8; i++) message[padded - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t chunk = 0; chunk < padded; chunk += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++) {
            const uint8_t *p = message + chunk + 4 * i;
            w[i] = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        }
        for (int i = 16; i < 80; i++) w[i] = rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
            else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
            else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
            else f = b ^ c ^ d, k = 0xCA62C1D6;
            uint32_t t = rotl(a, 5) + f + e + k + w[i];
            e = d, d = c, c = rotl(b, 30), b = a, a = t;
        }
        h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
    }
    free(message);
    for (int i = 0; i < 20; i++) out[i] = (uint8_t)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *data, size_t length, char *out) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < length; i += 3) {
        uint32_t v = (uint32_t)data[i] << 16 | (i + 1 < length ? (uint32_t)data[i + 1] << 8 : 0) |
                     (i + 2 < length ? data[i + 2] : 0);
        *out++ = alphabet[v >> 18 & 63];
        *out++ = alphabet[v >> 12 & 63];
        *out++ = i + 1 < length ? alphabet[v >> 6 & 63] : '=';
        *out++ = i + 2 < length ? alphabet[v & 63] : '=';
    }
    *out = 0;
}

// The value of header `name` (without the colon) in `head`, up to `size` - 1 bytes; "" if absent.
static void header_value(const char *head, const char *name, char *value, size_t size) {
    value[0] = 0;
    size_t name_length = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (strncasecmp(line + 2, name, name_length) != 0 || line[2 + name_length] != ':') continue;
        const char *start = line + 3 + name_length;
        while (*start == ' ') start++;
        size_t length = strcspn(start, "\r");
        if (length >= size) length = size - 1;
        memcpy(value, start, length);
        value[length] = 0;
        return;
    }
}

// Reads exactly `length` bytes: first from what was read with the head, then from the socket.
static const char *pending;
static size_t pending_length;

static int read_exactly(int fd, uint8_t *out, size_t length) {
    while (length > 0) {
        if (pending_length > 0) {
            size_t count = pending_length < length ? pending_length : length;
            memcpy(out, pending, count);
            pending += count, pending_length -= count, out += count, length -= count;
            continue;
        }
        ssize_t count = read(fd, out, length);
        if (count <= 0) return -1;
        out += count, length -= (size_t)count;
    }
    return 0;
}

static int send_frame(int fd, int fin, int opcode, const uint8_t *payload, size_t length) {
    uint8_t head[10];
    size_t head_length = 2;
    head[0] = (uint8_t)((fin ? 0x80 : 0) | opcode);
    if (length < 126) {
        head[1] = (uint8_t)length;
    } else if (length < 65536) {
        head[1] = 126, head[2] = (uint8_t)(length >> 8), head[3] = (uint8_t)length, head_length = 4;
    } else {
        head[1] = 127, head_length = 10;
        for (int i = 0; i < 8; i++) head[2 + i] = (uint8_t)((uint64_t)length >> (56 - 8 * i));
    }
    if (write_all(fd, (const char *)head, head_length) != 0) return -1;
    return write_all(fd, (const char *)payload, length);
}

static void serve_websocket(int fd, const char *head, const char *target, const char *early, size_t early_length) {
    char key[128], protocols[256], accept[64], line[512];
    header_value(head, "Sec-WebSocket-Key", key, sizeof key);
    header_value(head, "Sec-WebSocket-Protocol", protocols, sizeof protocols);
    strcat(key, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    uint8_t digest[20];
    sha1((const uint8_t *)key, strlen(key), digest);
    base64(digest, 20, accept);
    static char answer[1024];
    int length = snprintf(answer, sizeof answer,
                          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Accept: %s\r\n",
                          accept);
    if (protocols[0]) {
        protocols[strcspn(protocols, ", ")] = 0;
        snprintf(line, sizeof line, "Sec-WebSocket-Protocol: %s\r\n", protocols);
        length += snprintf(answer + length, sizeof answer - (size_t)length, "%s", line);
    }
    length += snprintf(answer + length, sizeof answer - (size_t)length, "\r\n");
    if (strstr(target, "hello")) length += snprintf(answer + length, sizeof answer - (size_t)length, "\x81\x05hello");
    int bye = strstr(target, "bye") != NULL;
    if (bye) length += snprintf(answer + length, sizeof answer - (size_t)length, "\x88\x05\x03\xe8" "bye");
    if (write_all(fd, answer, (size_t)length) != 0 || bye) return;
    pending = early, pending_length = early_length;
    while (1) {
        uint8_t frame_head[2], mask[4] = {0};
        if (read_exactly(fd, frame_head, 2) != 0) return;
        int fin = frame_head[0] >> 7, opcode = frame_head[0] & 15;
        uint64_t size = frame_head[1] & 127;
        uint8_t extended[8];
        if (size == 126) {
            if (read_exactly(fd, extended, 2) != 0) return;
            size = (uint64_t)extended[0] << 8 | extended[1];
        } else if (size == 127) {
            if (read_exactly(fd, extended, 8) != 0) return;
            size = 0;
            for (int i = 0; i < 8; i++) size = size << 8 | extended[i];
        }
        if (size > (64u << 20)) return;
        if ((frame_head[1] & 0x80) && read_exactly(fd, mask, 4) != 0) return;
        uint8_t *payload = malloc(size + 1);
        if (read_exactly(fd, payload, size) != 0) return;
        for (uint64_t i = 0; i < size; i++) payload[i] ^= mask[i % 4];
        payload[size] = 0;
        if (opcode == 9) {
            send_frame(fd, 1, 10, payload, size);
        } else if (opcode == 8) {
            send_frame(fd, 1, 8, payload, size);
            free(payload);
            return;
        } else if (opcode == 1 && fin && strncmp((char *)payload, "close:", 6) == 0) {
            long code = atol((char *)payload + 6);
            uint8_t close_payload[8] = {(uint8_t)(code >> 8), (uint8_t)code, 's', 'e', 'r', 'v', 'e', 'r'};
            send_frame(fd, 1, 8, close_payload, sizeof close_payload);
            free(payload);
            return;
        } else if (opcode == 1 && fin && strcmp((char *)payload, "headers") == 0) {
            send_frame(fd, 1, 1, (const uint8_t *)head, strlen(head));
        } else if (opcode == 1 && fin && strcmp((char *)payload, "state") == 0) {
            char state[4096] = "";
            FILE *file = fopen("/tmp/state", "r");
            if (file) {
                size_t count = fread(state, 1, sizeof state - 1, file);
                state[count] = 0;
                fclose(file);
            }
            send_frame(fd, 1, 1, (const uint8_t *)state, strlen(state));
        } else {
            send_frame(fd, fin, opcode, payload, size);
        }
        free(payload);
    }
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
    char upgrade[64];
    header_value(request, "Upgrade", upgrade, sizeof upgrade);
    if (strncmp(target, "/ws", 3) == 0 && strcasecmp(upgrade, "websocket") == 0) {
        serve_websocket(fd, request, target, body, body_have);
        return;
    }
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
        // Answer once the port refuses connections: the parent closes it when it next runs, and a
        // connection made before that would sit in its backlog and then be reset, not refused.
        for (int i = 0; i < 1000; i++) {
            int probe = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in self = {.sin_family = AF_INET, .sin_port = htons(8080)};
            self.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            int refused = connect(probe, (struct sockaddr *)&self, sizeof self) != 0;
            close(probe);
            if (refused) break;
            usleep(10000);
        }
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
