// The reference echo server of bench/seed_echo.py, in the design of the seed's
// "each process creates its own listener" example (SO_REUSEPORT):
//   - the parent forks N worker processes and waits for a signal;
//   - each worker opens its own TCP socket with SO_REUSEPORT, binds the same
//     address, listens, and runs one epoll loop over that listener and its
//     connections: the kernel spreads new connections across the N queues;
//   - the listener is level-triggered and one accept() is done per wake-up;
//     connections are edge-triggered and echoed with read()/write().
// Differences from the seed, so that the comparison is fair and the bench is
// safe: the address, port, worker count and backlog come from the command line
// (the bench uses upgraderd's default backlog, 1024); a read that fills the buffer is
// followed by another, as edge-triggered mode requires; a short write is finished instead of
// dropped; the workers die with the parent (PR_SET_PDEATHSIG); the parent says
// "ready" on stdout once every worker is listening.
//
//   seed_echo_server HOST PORT WORKERS [BACKLOG]

#include <arpa/inet.h>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace {

volatile sig_atomic_t g_stop = 0;

void on_signal(int) { g_stop = 1; }

void die(const char* what) {
    std::perror(what);
    std::_Exit(1);
}

void make_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) die("fcntl");
}

int open_listener(const char* host, int port, int backlog) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("SO_REUSEADDR");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) die("SO_REUSEPORT");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        std::fprintf(stderr, "bad IPv4 address: %s\n", host);
        std::_Exit(2);
    }
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) die("bind");
    if (listen(fd, backlog) < 0) die("listen");
    make_nonblocking(fd);
    return fd;
}

// Echo what is readable on `fd`; return false once the connection is finished.
// As in the seed, one read() per wake-up; only a read that filled the buffer is
// followed by another, since edge-triggered mode reports the rest no more.
bool echo_ready(int fd) {
    char buf[16384];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n == 0) return false;
        if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
        ssize_t done = 0;
        while (done < n) {
            ssize_t w = write(fd, buf + done, static_cast<size_t>(n - done));
            if (w < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    usleep(100);  // a client that does not read: the bench's never does
                    continue;
                }
                return false;
            }
            done += w;
        }
        if (static_cast<size_t>(n) < sizeof buf) return true;
    }
}

[[noreturn]] void serve(const char* host, int port, int backlog, int ready_fd) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    int lfd = open_listener(host, port, backlog);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) die("epoll_ctl listener");
    char one = 'r';
    if (write(ready_fd, &one, 1) != 1) die("ready pipe");
    close(ready_fd);

    std::vector<epoll_event> events(256);
    while (!g_stop) {
        int n = epoll_wait(ep, events.data(), static_cast<int>(events.size()), 500);
        for (int i = 0; i < n; ++i) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int cfd = accept4(lfd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) continue;  // another wake-up, or an aborted connection
                epoll_event cev{};
                cev.events = EPOLLIN | EPOLLET;
                cev.data.fd = cfd;
                if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev) < 0) close(cfd);
            } else if (!echo_ready(fd)) {
                close(fd);  // also removes it from the epoll set
            }
        }
    }
    std::_Exit(0);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) {
        std::fprintf(stderr, "usage: %s HOST PORT WORKERS [BACKLOG]\n", argv[0]);
        return 2;
    }
    const char* host = argv[1];
    int port = std::atoi(argv[2]);
    int workers = std::atoi(argv[3]);
    int backlog = argc > 4 ? std::atoi(argv[4]) : 1024;
    if (port <= 0 || port > 65535 || workers <= 0 || workers > 64 || backlog <= 0) {
        std::fprintf(stderr, "bad arguments\n");
        return 2;
    }
    struct sigaction sa{};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);
    // The parent takes SIGTERM/SIGINT only inside sigsuspend(), so none is missed.
    sigset_t blocked, waiting;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGTERM);

    int pipefd[2];
    if (pipe(pipefd) < 0) die("pipe");
    sigprocmask(SIG_BLOCK, &blocked, &waiting);
    std::vector<pid_t> pids;
    for (int i = 0; i < workers; ++i) {
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            close(pipefd[0]);
            sigprocmask(SIG_UNBLOCK, &blocked, nullptr);
            serve(host, port, backlog, pipefd[1]);
        }
        pids.push_back(pid);
    }
    close(pipefd[1]);
    for (int got = 0; got < workers;) {
        char c;
        ssize_t n = read(pipefd[0], &c, 1);
        if (n == 1) {
            ++got;
        } else if (n == 0 || errno != EINTR) {
            std::fprintf(stderr, "a worker died before listening\n");
            g_stop = 1;
            break;
        }
    }
    close(pipefd[0]);
    if (!g_stop) {
        std::printf("ready %d\n", workers);
        std::fflush(stdout);
    }
    while (!g_stop) sigsuspend(&waiting);
    for (pid_t pid : pids) kill(pid, SIGTERM);
    for (pid_t pid : pids) waitpid(pid, nullptr, 0);
    return 0;
}
