/* A small HTTP/1.1 load client for bench/asgi.py: one thread, epoll, N connections.
 *
 *   http_client HOST PORT CONNECTIONS SECONDS keepalive|close PATH [THINK_MS]
 *
 * keepalive: each connection sends a request, reads the whole response
 * (Content-Length), and sends the next one on the same connection.
 * close: a new connection per request; the client closes it after the answer.
 * THINK_MS: each client waits that long between an answer and
 * its next request, for a load that leaves the machine room (reload runs).
 * Prints one JSON line: requests, errors, closes (keep-alive answers that said
 * Connection: close, after which it reconnects), p50_us, p99_us (latency of a
 * round trip from connect or send to the last byte of the answer), t0
 * (CLOCK_MONOTONIC at the start, Python's time.monotonic) and slots (answers
 * per 10 ms from t0).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKETS 200000 /* 10 us each: 0 .. 2 s; slower answers land in the last */

struct conn { int fd; size_t got; double start; double due; char buf[8192]; };

static struct sockaddr_in addr;
static int ep, keepalive;
static double think;           /* seconds a connection waits between an answer and its next request */
static char request[512];
static size_t request_len;
static long hist[BUCKETS], requests, errors, closes;
static long *slots;            /* answers per 10 ms since t0, for windows around reloads */
static double t0;
static int nslots;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_conn(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->got = 0;
    c->start = now();
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void send_request(struct conn *c) {
    if (write(c->fd, request, request_len) != (ssize_t)request_len) { errors++; }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Return the length of the whole response in buf, or 0 if incomplete. */
static size_t response_size(const char *buf, size_t n) {
    const char *end = memmem(buf, n, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = end - buf + 4;
    long length = 0;
    for (const char *p = buf; p < end; p++) {
        if ((p == buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
            length = strtol(p + 15, NULL, 10);
            break;
        }
    }
    return n >= head + length ? head + length : 0;
}

static void answered(struct conn *c) {
    double us = (now() - c->start) * 1e6;
    int b = (int)(us / 10);
    hist[b < BUCKETS ? b : BUCKETS - 1]++;
    requests++;
    int slot = (int)((now() - t0) * 100);
    if (slot >= 0 && slot < nslots) slots[slot]++;
    const char *head_end = memmem(c->buf, c->got, "\r\n\r\n", 4);
    int closing = head_end && memmem(c->buf, head_end - c->buf, "onnection: close", 16);
    if (keepalive && closing) closes++;   /* announced: reconnect, counted apart from errors */
    if (keepalive && !closing) {
        c->got = 0;
        if (think > 0) { c->due = now() + think; return; }   /* sent by the main loop when due */
        c->start = now();
        if (write(c->fd, request, request_len) != (ssize_t)request_len) errors++;
        return;
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;   /* a keep-alive client told Connection: close reconnects for its next request */
    if (think > 0) { c->due = now() + think; return; }   /* reconnected by the main loop when due */
    if (open_conn(c) < 0) errors++;
}

static void failed(struct conn *c) {
    errors++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    if (open_conn(c) < 0) errors++;
}

static long percentile(double q) {
    long seen = 0, want = (long)(requests * q);
    for (int i = 0; i < BUCKETS; i++) {
        seen += hist[i];
        if (seen > want) return (i + 1) * 10L;
    }
    return BUCKETS * 10L;
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS SECONDS keepalive|close PATH [THINK_MS]\n", argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    int n = atoi(argv[3]);
    double seconds = atof(argv[4]);
    keepalive = strcmp(argv[5], "keepalive") == 0;
    think = argc == 8 ? atof(argv[7]) / 1000 : 0;
    request_len = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: bench\r\n\r\n", argv[6]);
    ep = epoll_create1(0);
    struct conn *conns = calloc(n, sizeof *conns);
    for (int i = 0; i < n; i++) if (open_conn(&conns[i]) < 0) errors++;
    struct epoll_event evs[256];
    t0 = now();
    nslots = (int)(seconds * 100) + 1;
    slots = calloc(nslots, sizeof *slots);
    double end = t0 + seconds;
    while (now() < end) {
        int k = epoll_wait(ep, evs, 256, think > 0 ? 1 : 100);
        if (think > 0) {
            double t = now();
            for (int i = 0; i < n; i++) {
                struct conn *c = &conns[i];
                if (c->due > 0 && t >= c->due) {
                    c->due = 0;
                    c->start = t;
                    if (!keepalive || c->fd < 0) { if (open_conn(c) < 0) errors++; }
                    else if (write(c->fd, request, request_len) != (ssize_t)request_len) errors++;
                }
            }
        }
        for (int i = 0; i < k; i++) {
            struct conn *c = evs[i].data.ptr;
            if (evs[i].events & EPOLLOUT) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) { failed(c); continue; }
                send_request(c);
                continue;
            }
            ssize_t r = read(c->fd, c->buf + c->got, sizeof c->buf - c->got);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN) continue;
                failed(c);
                continue;
            }
            c->got += r;
            size_t whole = response_size(c->buf, c->got);
            if (whole) answered(c);
            else if (c->got == sizeof c->buf) failed(c);
        }
    }
    printf("{\"requests\": %ld, \"errors\": %ld, \"closes\": %ld, \"seconds\": %.3f, \"p50_us\": %ld, "
           "\"p99_us\": %ld, \"t0\": %.6f, \"slots\": [", requests, errors, closes, seconds, percentile(0.50),
           percentile(0.99), t0);
    for (int i = 0; i < nslots; i++) printf(i ? ",%ld" : "%ld", slots[i]);
    printf("]}\n");
    return 0;
}
