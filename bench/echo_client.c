/* The load client of bench/seed_echo.py: T threads send SIZE-byte messages to an
 * echo server and count the round trips whose reply came back whole and equal.
 *
 *   echo_client HOST PORT THREADS WARMUP_S SECONDS MODE [SIZE [RESPREAD_S]]
 *
 * MODE keepalive: each thread opens one connection and does write/read round
 *   trips on it; after an error it counts one, closes and connects again. With
 *   RESPREAD_S > 0 a thread also closes its connection after RESPREAD_S seconds
 *   (the first time after a fraction of it, different per thread) and opens a
 *   new one: with SO_REUSEPORT the kernel places each connection by a hash of
 *   its ports, so one set of connections is one spread over the server's
 *   processes; re-connecting averages the rate over many spreads.
 * MODE connect: each round trip is its own connection: connect, write, read the
 *   reply, close.
 *
 * Bounded: each thread stops at WARMUP_S + SECONDS, and a read or write waits at
 * most 2 s (SO_RCVTIMEO/SO_SNDTIMEO). Round trips done during the warm-up are not
 * counted. In connect mode thread i binds its side to 127.0.0.(2 + i % 200) with
 * IP_BIND_ADDRESS_NO_PORT when HOST is a 127/8 address, so the client's own
 * TIME_WAIT sockets do not run the ephemeral ports out. Traffic goes only to
 * HOST, which the bench sets to 127.0.0.1.
 *
 * Prints one line: "round_trips N errors E seconds S connect_errors C all_round_trips A", where
 * N, E and C are counted after the warm-up, in S seconds, and A is every good round trip.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum mode { KEEPALIVE, CONNECT };

struct shared {
    struct sockaddr_in server;
    enum mode mode;
    size_t size;
    double counting_from; /* monotonic seconds: round trips before this are warm-up */
    double until;
    int loopback;
    double respread; /* keepalive: seconds a connection is kept, 0 for ever */
};

struct worker {
    pthread_t thread;
    int index;
    const struct shared *cfg;
    uint64_t round_trips;
    uint64_t all_round_trips; /* with the warm-up */
    uint64_t errors;
    uint64_t connect_errors;
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int open_conn(const struct worker *w) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (w->cfg->mode == CONNECT && w->cfg->loopback) {
        struct sockaddr_in local;
        memset(&local, 0, sizeof local);
        local.sin_family = AF_INET;
        local.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(w->index % 200));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0) {
            close(fd);
            return -1;
        }
    }
    if (connect(fd, (const struct sockaddr *)&w->cfg->server, sizeof w->cfg->server) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* One message out, the same message back; return 0 on success. */
static int round_trip(int fd, const char *msg, char *back, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, msg + done, size - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    done = 0;
    while (done < size) {
        ssize_t n = read(fd, back + done, size - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        done += (size_t)n;
    }
    return memcmp(msg, back, size) == 0 ? 0 : -1;
}

static void *run(void *arg) {
    struct worker *w = arg;
    const struct shared *cfg = w->cfg;
    char *msg = malloc(cfg->size), *back = malloc(cfg->size);
    if (!msg || !back) abort();
    uint64_t seq = 0;
    int fd = -1;
    /* Staggered, so that the threads do not all re-connect at once. */
    double renew_at = cfg->respread > 0 ? now() + cfg->respread * (w->index % 8 + 1) / 8.0 : 0;
    for (;;) {
        double t = now();
        if (t >= cfg->until) break;
        int counting = t >= cfg->counting_from;
        /* A different message each time, so a stale or mixed-up reply is caught. */
        seq++;
        for (size_t i = 0; i < cfg->size; i++) msg[i] = (char)('a' + (seq + i + (size_t)w->index) % 26);
        if (fd < 0) {
            fd = open_conn(w);
            if (fd < 0) {
                if (counting) w->connect_errors++;
                usleep(1000); /* e.g. ECONNREFUSED: do not spin */
                continue;
            }
        }
        int rc = round_trip(fd, msg, back, cfg->size);
        if (rc == 0) w->all_round_trips++;
        if (counting) {
            if (rc == 0) w->round_trips++;
            else w->errors++;
        }
        if (rc != 0 || cfg->mode == CONNECT) {
            close(fd);
            fd = -1;
        } else if (renew_at > 0 && t >= renew_at) {
            close(fd);
            fd = -1;
            renew_at = t + cfg->respread;
        }
    }
    if (fd >= 0) close(fd);
    free(msg);
    free(back);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s HOST PORT THREADS WARMUP_S SECONDS keepalive|connect [SIZE [RESPREAD_S]]\n",
                argv[0]);
        return 2;
    }
    struct shared cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.server.sin_family = AF_INET;
    if (inet_pton(AF_INET, argv[1], &cfg.server.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address: %s\n", argv[1]);
        return 2;
    }
    int port = atoi(argv[2]), threads = atoi(argv[3]);
    double warmup = atof(argv[4]), seconds = atof(argv[5]);
    cfg.server.sin_port = htons((uint16_t)port);
    if (strcmp(argv[6], "keepalive") == 0) cfg.mode = KEEPALIVE;
    else if (strcmp(argv[6], "connect") == 0) cfg.mode = CONNECT;
    else {
        fprintf(stderr, "mode must be keepalive or connect, not %s\n", argv[6]);
        return 2;
    }
    cfg.size = argc > 7 ? (size_t)atol(argv[7]) : 64;
    cfg.respread = argc > 8 ? atof(argv[8]) : 0;
    if (port <= 0 || port > 65535 || threads <= 0 || threads > 1024 || warmup < 0 || seconds <= 0 ||
        seconds > 600 || cfg.size == 0 || cfg.size > (1 << 20) || cfg.respread < 0 || cfg.respread > 600) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    cfg.loopback = (ntohl(cfg.server.sin_addr.s_addr) >> 24) == 127;
    signal(SIGPIPE, SIG_IGN);

    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    if (!ws) return 1;
    double start = now();
    cfg.counting_from = start + warmup;
    cfg.until = cfg.counting_from + seconds;
    for (int i = 0; i < threads; i++) {
        ws[i].index = i;
        ws[i].cfg = &cfg;
        if (pthread_create(&ws[i].thread, NULL, run, &ws[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    uint64_t total = 0, all = 0, errors = 0, connect_errors = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(ws[i].thread, NULL);
        total += ws[i].round_trips;
        all += ws[i].all_round_trips;
        errors += ws[i].errors;
        connect_errors += ws[i].connect_errors;
    }
    /* The counted window ends at `until`, or later if a thread was mid round trip. */
    double elapsed = now() - cfg.counting_from;
    printf("round_trips %llu errors %llu seconds %.3f connect_errors %llu all_round_trips %llu\n",
           (unsigned long long)total, (unsigned long long)errors, elapsed, (unsigned long long)connect_errors,
           (unsigned long long)all);
    free(ws);
    return 0;
}
