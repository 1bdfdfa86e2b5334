/* echoload: closed-loop TCP echo load generator, used by bench/echo.py.
 *
 *   echoload HOST PORT CONNECTIONS DURATION_S WARMUP_S [SIZE]
 *
 * Opens CONNECTIONS TCP connections to HOST:PORT.  Each one sends SIZE bytes
 * (default 32), waits until all SIZE bytes have come back, and sends again.
 * One thread, non-blocking sockets, epoll: the generator must cost far less
 * CPU than the single-threaded server it drives.
 *
 * Round trips that start after the WARMUP_S seconds and finish within the
 * following DURATION_S seconds are counted; at the end one line is printed:
 *
 *   roundtrips=N seconds=S rate=R p50_us=X p99_us=Y
 *
 * On any error (refused, reset, closed, too many bytes echoed) it prints a
 * message on stderr and exits 1.
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
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct conn {
    int fd;
    size_t got;  /* bytes of the current echo received so far */
    double sent; /* when the current message was sent */
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "echoload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *msg)
{
    fprintf(stderr, "echoload: %s\n", msg);
    exit(1);
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* p-th quantile of the sorted array v[0..n). */
static double quantile(const double *v, size_t n, double p)
{
    return n ? v[(size_t)(p * (n - 1) + 0.5)] : 0.0;
}

static void send_message(struct conn *c, const char *msg, size_t size)
{
    ssize_t n = send(c->fd, msg, size, MSG_NOSIGNAL);
    if (n < 0)
        die("send");
    if ((size_t)n != size) /* cannot happen with one small message in flight */
        fail("short send");
    c->got = 0;
    c->sent = now();
}

int main(int argc, char **argv)
{
    if (argc < 6 || argc > 7) {
        fprintf(stderr, "usage: %s HOST PORT CONNECTIONS DURATION_S WARMUP_S [SIZE]\n", argv[0]);
        return 2;
    }
    int nconn = atoi(argv[3]);
    double duration = atof(argv[4]), warmup = atof(argv[5]);
    size_t size = argc == 7 ? (size_t)atoi(argv[6]) : 32;
    if (nconn < 1 || duration <= 0 || warmup < 0 || size < 1 || size > 65536)
        fail("bad arguments");

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1)
        fail("HOST must be an IPv4 address");

    static char buf[65536], msg[65536];
    memset(msg, 'x', size);
    struct conn *conns = calloc(nconn, sizeof *conns);
    int ep = epoll_create1(0);
    if (!conns || ep < 0)
        die("setup");

    for (int i = 0; i < nconn; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (fd < 0)
            die("socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
            die("connect");
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
            die("epoll_ctl");
        conns[i].fd = fd;
    }

    size_t cap = 1 << 16, count = 0;
    double *lat = malloc(cap * sizeof *lat);
    if (!lat)
        die("malloc");
    double measure_from = now() + warmup, end = measure_from + duration;
    for (int i = 0; i < nconn; i++)
        send_message(&conns[i], msg, size);

    struct epoll_event events[256];
    while (now() < end) {
        int n = epoll_wait(ep, events, 256, 100);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r < 0 && errno == EAGAIN)
                continue;
            if (r < 0)
                die("recv");
            if (r == 0)
                fail("server closed a connection");
            c->got += r;
            if (c->got > size)
                fail("server echoed more bytes than were sent");
            if (c->got < size)
                continue;
            double t = now();
            if (c->sent >= measure_from && t <= end) {
                if (count == cap && !(lat = realloc(lat, (cap *= 2) * sizeof *lat)))
                    die("realloc");
                lat[count++] = (t - c->sent) * 1e6;
            }
            send_message(c, msg, size);
        }
    }

    qsort(lat, count, sizeof *lat, compare);
    printf("roundtrips=%zu seconds=%.3f rate=%.1f p50_us=%.1f p99_us=%.1f\n", count, duration,
           count / duration, quantile(lat, count, 0.50), quantile(lat, count, 0.99));
    return 0;
}
