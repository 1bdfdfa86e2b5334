/* chatload: chat room load generator, used by bench/chat.py.
 *
 *   chatload HOST PORT SERVER_PID CLIENTS SENDERS WINDOW TPUT_S WARMUP_S RATE LAT_S
 *
 * PORT and SERVER_PID may be comma-separated lists (bench/scale.py: chat on two
 * processes): clients connect to the ports in turn, and the servers' fds, VmRSS
 * and CPU are summed over the pids.
 *
 * Opens CLIENTS TCP connections to HOST:PORT (in batches of 40, each batch
 * waited for in /proc/SERVER_PID/fd, reading everything the server sends all
 * along), then makes sure every client is in the room: client 0 says "S k"
 * until all clients have received it (a barrier).  Server VmRSS is read before
 * the first connect and after the barrier.
 *
 * Lines received are either notices ("*** ..."), skipped, or room messages
 * "<name> text".  Messages of this generator are "M SENDER SEQ T_NS", T_NS the
 * CLOCK_MONOTONIC send time in ns; the receiver computes the latency.
 *
 * Throughput (TPUT_S > 0): clients 0..SENDERS-1 send as fast as the room takes
 * it, each with at most WINDOW messages not yet received by every client.
 * Deliveries received in the TPUT_S seconds after WARMUP_S seconds are counted.
 * Then the generator waits (10 s at most) until every message is delivered.
 *
 * Latency (LAT_S > 0): RATE messages per second in all, from the senders in
 * turn, for LAT_S seconds; every delivery's send-to-receive latency is kept.
 *
 * With SENDERS 0 only the connect + memory part runs (idle clients).
 *
 * One thread, non-blocking sockets, epoll.  Every loop is bounded in time.
 * At the end one line of key=value pairs is printed on stdout; on a fatal
 * error a message goes to stderr and the exit status is 1.  A client closed by
 * the server is counted (closed=), not fatal.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PART_MAX 4096
#define OUT_MAX 4096
#define BATCH 40

struct conn {
    int fd;
    int closed;
    int barrier_seen;      /* highest barrier number received */
    size_t partlen;        /* bytes of an unfinished line */
    size_t outlen;         /* bytes waiting to be sent */
    char part[PART_MAX];
    char out[OUT_MAX];
};

static struct conn *conns;
static int nconn, alive, nsend, window;
static int ep;
static long long *lastseq;          /* [receiver * nsend + sender]: last seq received */
static unsigned *ring;              /* [sender * window + seq % window]: receivers that got it */
static long long *next_seq, *done_seq, *lat_first_seq;
static int barrier_target, barrier_count;

/* counters */
static long long deliveries, win_deliveries, notices, others, gaps, dups, kick_notices;
static double win_from = 1e300, win_to = -1e300;
static int latency_phase; /* 1: keep latencies of lat-phase messages, 2: of window deliveries */
static double *lat;
static size_t nlat, caplat;
static char last_kick[256];

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "chatload: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *msg)
{
    fprintf(stderr, "chatload: %s\n", msg);
    exit(1);
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double quantile(const double *v, size_t n, double p)
{
    return n ? v[(size_t)(p * (n - 1) + 0.5)] : 0.0;
}

static long proc_kb(int pid, const char *key)
{
    char path[64], line[256];
    size_t klen = strlen(key);
    long kb = -1;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, klen) && line[klen] == ':')
            kb = atol(line + klen + 1);
    fclose(f);
    return kb;
}

static int fd_count(int pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* CPU seconds (user + system) used so far by process pid. */
static double proc_cpu(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / sysconf(_SC_CLK_TCK);
}

static double self_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void set_events(struct conn *c, unsigned events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl");
}

static void close_conn(struct conn *c)
{
    if (c->closed)
        return;
    c->closed = 1;
    alive--;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void flush_out(struct conn *c)
{
    if (c->closed || !c->outlen)
        return;
    ssize_t n = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        n = 0;
    if (n < 0) {
        close_conn(c);
        return;
    }
    memmove(c->out, c->out + n, c->outlen - n);
    c->outlen -= n;
    set_events(c, c->outlen ? EPOLLIN | EPOLLOUT : EPOLLIN);
}

/* Queue a line on c; 0 if there is no room (the caller tries later). */
static int send_line(struct conn *c, const char *line, size_t len)
{
    if (c->closed || c->outlen + len > OUT_MAX)
        return 0;
    int was_empty = c->outlen == 0;
    memcpy(c->out + c->outlen, line, len);
    c->outlen += len;
    if (was_empty) {
        ssize_t n = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            n = 0;
        if (n < 0) {
            close_conn(c);
            return 1;
        }
        memmove(c->out, c->out + n, c->outlen - n);
        c->outlen -= n;
        if (c->outlen)
            set_events(c, EPOLLIN | EPOLLOUT);
    }
    return 1;
}

static void advance(int s)
{
    while (done_seq[s] < next_seq[s] && ring[s * window + done_seq[s] % window] >= (unsigned)alive) {
        ring[s * window + done_seq[s] % window] = 0;
        done_seq[s]++;
    }
}

static void keep_latency(double ms)
{
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 1 << 16;
        if (!(lat = realloc(lat, caplat * sizeof *lat)))
            die("realloc");
    }
    lat[nlat++] = ms;
}

static void on_line(struct conn *c, char *line, size_t len, double t)
{
    line[len] = 0;
    if (len >= 4 && !memcmp(line, "*** ", 4)) {
        notices++;
        if (strstr(line, "disconnected") || strstr(line, "slow") || strstr(line, "too many")) {
            kick_notices++;
            snprintf(last_kick, sizeof last_kick, "%s", line);
        }
        return;
    }
    char *text = line[0] == '<' ? strstr(line, "> ") : NULL;
    if (!text) {
        others++;
        return;
    }
    text += 2;
    if (text[0] == 'M' && text[1] == ' ') {
        char *p = text + 2, *e;
        long s = strtol(p, &e, 10);
        long long q = e > p && *e == ' ' ? strtoll(p = e + 1, &e, 10) : -1;
        long long tns = e > p && *e == ' ' ? strtoll(p = e + 1, &e, 10) : -1;
        if (e == p || *e || s < 0 || s >= nsend || q < 0 || tns < 0) {
            others++;
            return;
        }
        deliveries++;
        if (t >= win_from && t <= win_to) {
            win_deliveries++;
            if (latency_phase == 2)
                keep_latency((now_ns() - tns) / 1e6);
        }
        if (latency_phase == 1 && q >= lat_first_seq[s])
            keep_latency((now_ns() - tns) / 1e6);
        long long *last = &lastseq[(c - conns) * (long)nsend + s];
        if (q <= *last)
            dups++;
        else if (q != *last + 1)
            gaps += q - *last - 1;
        if (q > *last)
            *last = q;
        if (q >= done_seq[s] && q < next_seq[s]) {
            ring[s * window + q % window]++;
            advance(s);
        }
    } else if (text[0] == 'S' && text[1] == ' ') {
        int k = atoi(text + 2);
        if (k > c->barrier_seen) {
            if (c->barrier_seen < barrier_target && k >= barrier_target)
                barrier_count++;
            c->barrier_seen = k;
        }
    } else {
        others++;
    }
}

static void on_readable(struct conn *c)
{
    static char buf[1 << 18];
    for (int rounds = 0; rounds < 4 && !c->closed; rounds++) {
        ssize_t r = recv(c->fd, buf, sizeof buf, 0);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (r <= 0) {
            int s;
            close_conn(c);
            for (s = 0; s < nsend; s++)
                advance(s);
            return;
        }
        double t = now();
        char *p = buf, *end = buf + r;
        while (p < end) {
            char *nl = memchr(p, '\n', end - p);
            size_t n = (nl ? nl : end) - p;
            if (c->partlen + n >= PART_MAX) { /* absurdly long line: drop it */
                c->partlen = 0;
                if (!nl)
                    break;
                p = nl + 1;
                continue;
            }
            if (!nl) { /* unfinished line: keep it for the next read */
                memcpy(c->part + c->partlen, p, n);
                c->partlen += n;
                break;
            }
            if (c->partlen) {
                memcpy(c->part + c->partlen, p, n);
                on_line(c, c->part, c->partlen + n, t);
                c->partlen = 0;
            } else {
                *nl = 0;
                on_line(c, p, n, t);
            }
            p = nl + 1;
        }
        if ((size_t)r < sizeof buf)
            return;
    }
}

static void pump(int timeout_ms)
{
    struct epoll_event events[512];
    int n = epoll_wait(ep, events, 512, timeout_ms);
    if (n < 0 && errno != EINTR)
        die("epoll_wait");
    for (int i = 0; i < n; i++) {
        struct conn *c = events[i].data.ptr;
        if (c->closed)
            continue;
        if (events[i].events & EPOLLOUT)
            flush_out(c);
        if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
            on_readable(c);
    }
}

static struct conn *first_alive(void)
{
    for (int i = 0; i < nconn; i++)
        if (!conns[i].closed)
            return &conns[i];
    fail("the server closed every connection");
    return NULL;
}

/* Every client has received a barrier message sent after all that came before. */
static void barrier(double timeout)
{
    char line[64];
    double deadline = now() + timeout;
    while (now() < deadline) {
        barrier_target++;
        barrier_count = 0;
        int n = snprintf(line, sizeof line, "S %d\n", barrier_target);
        struct conn *c = first_alive();
        while (!send_line(c, line, n) && now() < deadline)
            pump(10);
        double retry = now() + 2.0;
        while (barrier_count < alive && now() < retry && now() < deadline)
            pump(10);
        if (barrier_count >= alive)
            return;
    }
    fprintf(stderr, "chatload: barrier: %d of %d clients got it within %.0f s\n", barrier_count, alive, timeout);
    exit(1);
}

static void send_message(int s)
{
    char line[96];
    int n = snprintf(line, sizeof line, "M %d %lld %lld\n", s, next_seq[s], now_ns());
    if (send_line(&conns[s], line, n))
        next_seq[s]++;
}

static int all_done(void)
{
    for (int s = 0; s < nsend; s++)
        if (!conns[s].closed && done_seq[s] < next_seq[s])
            return 0;
    return 1;
}

static void drain(double timeout)
{
    double deadline = now() + timeout;
    while (!all_done() && now() < deadline)
        pump(10);
}

static long long outstanding(void)
{
    long long n = 0;
    for (int s = 0; s < nsend; s++)
        n += next_seq[s] - done_seq[s];
    return n;
}

#define MAX_SERVERS 16
static int pids[MAX_SERVERS], npids;

static long all_kb(const char *key)
{
    long sum = 0;
    for (int i = 0; i < npids; i++) {
        long kb = proc_kb(pids[i], key);
        if (kb < 0)
            return -1;
        sum += kb;
    }
    return sum;
}

static int all_fds(void)
{
    int sum = 0;
    for (int i = 0; i < npids; i++) {
        int n = fd_count(pids[i]);
        if (n < 0)
            return -1;
        sum += n;
    }
    return sum;
}

static double all_cpu(void)
{
    double sum = 0;
    for (int i = 0; i < npids; i++)
        sum += proc_cpu(pids[i]);
    return sum;
}

int main(int argc, char **argv)
{
    if (argc != 11) {
        fprintf(stderr, "usage: %s HOST PORT SERVER_PID CLIENTS SENDERS WINDOW TPUT_S WARMUP_S RATE LAT_S\n",
                argv[0]);
        return 2;
    }
    for (char *t = strtok(argv[3], ","); t && npids < MAX_SERVERS; t = strtok(NULL, ","))
        pids[npids++] = atoi(t);
    int pid = npids ? pids[0] : 0;
    nconn = atoi(argv[4]);
    nsend = atoi(argv[5]);
    window = atoi(argv[6]);
    double tput = atof(argv[7]), warmup = atof(argv[8]), rate = atof(argv[9]), latdur = atof(argv[10]);
    if (pid < 1 || nconn < 1 || nsend < 0 || nsend > nconn || window < 1 || tput < 0 || warmup < 0 ||
        rate < 0 || latdur < 0 || (latdur > 0 && rate <= 0) || tput > 600 || latdur > 600)
        fail("bad arguments");

    struct sockaddr_in addrs[MAX_SERVERS];
    int naddrs = 0;
    for (char *t = strtok(argv[2], ","); t && naddrs < MAX_SERVERS; t = strtok(NULL, ",")) {
        addrs[naddrs] = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(atoi(t))};
        if (inet_pton(AF_INET, argv[1], &addrs[naddrs].sin_addr) != 1)
            fail("HOST must be an IPv4 address");
        naddrs++;
    }
    if (!naddrs)
        fail("bad arguments");

    conns = calloc(nconn, sizeof *conns);
    lastseq = malloc((size_t)nconn * (nsend ? nsend : 1) * sizeof *lastseq);
    ring = calloc((size_t)(nsend ? nsend : 1) * window, sizeof *ring);
    next_seq = calloc(nsend + 1, sizeof *next_seq);
    done_seq = calloc(nsend + 1, sizeof *done_seq);
    lat_first_seq = calloc(nsend + 1, sizeof *lat_first_seq);
    ep = epoll_create1(0);
    if (!conns || !lastseq || !ring || !next_seq || !done_seq || !lat_first_seq || ep < 0)
        die("setup");
    for (long i = 0; i < (long)nconn * (nsend ? nsend : 1); i++)
        lastseq[i] = -1;

    /* connect, in batches the listen backlog takes; read what arrives meanwhile */
    long rss_before = all_kb("VmRSS");
    int fds_before = all_fds();
    if (rss_before < 0 || fds_before < 0)
        fail("cannot read /proc/SERVER_PID");
    double t0 = now();
    for (int i = 0; i < nconn;) {
        int upto = i + BATCH < nconn ? i + BATCH : nconn;
        for (; i < upto; i++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
            if (fd < 0)
                die("socket");
            if (connect(fd, (struct sockaddr *)&addrs[i % naddrs], sizeof addrs[0]) < 0)
                die("connect");
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            fcntl(fd, F_SETFL, O_NONBLOCK);
            conns[i].fd = fd;
            alive++;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &conns[i]};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
                die("epoll_ctl");
        }
        double deadline = now() + 20;
        while (all_fds() < fds_before + i) {
            if (now() > deadline)
                fail("the server accepted too few connections within 20 s");
            if (all_fds() < 0)
                fail("the server exited");
            pump(2);
        }
    }
    barrier(60);
    double connect_s = now() - t0;
    for (double settle = now() + 0.5; now() < settle;)
        pump(10);
    long rss_after = all_kb("VmRSS");
    int fds_after = all_fds();

    double rate_out = 0, srv_cpu = 0, gen_cpu = 0, tp50 = 0, tp99 = 0;
    long long tput_msgs = 0, tput_left = 0;
    if (nsend && tput > 0) {
        /* throughput: each sender keeps up to WINDOW messages not yet received by everyone */
        latency_phase = 2;
        double start = now();
        win_from = start + warmup;
        win_to = win_from + tput;
        double c0 = -1, g0 = 0;
        long long m0 = 0;
        while (now() < win_to) {
            if (c0 < 0 && now() >= win_from) {
                c0 = all_cpu();
                g0 = self_cpu();
                m0 = 0;
                for (int s = 0; s < nsend; s++)
                    m0 += done_seq[s];
            }
            for (int s = 0; s < nsend; s++)
                while (!conns[s].closed && next_seq[s] - done_seq[s] < window && conns[s].outlen == 0)
                    send_message(s);
            pump(10);
        }
        srv_cpu = (all_cpu() - c0) / tput * 100;
        gen_cpu = (self_cpu() - g0) / tput * 100;
        for (int s = 0; s < nsend; s++)
            tput_msgs += done_seq[s];
        tput_msgs -= m0;
        rate_out = win_deliveries / tput;
        latency_phase = 0;
        qsort(lat, nlat, sizeof *lat, compare);
        tp50 = quantile(lat, nlat, 0.5);
        tp99 = quantile(lat, nlat, 0.99);
        nlat = 0;
        drain(10);
        tput_left = outstanding();
        barrier(30);
    }

    long long lat_sent = 0, lat_expected = 0, lat_got = 0;
    double p50 = 0, p99 = 0, pmax = 0, lat_cpu = 0;
    if (nsend && latdur > 0) {
        /* latency: RATE messages per second in all, senders in turn */
        for (int s = 0; s < nsend; s++)
            lat_first_seq[s] = next_seq[s];
        latency_phase = 1;
        double start = now(), next = start, end = start + latdur, c0 = all_cpu();
        while (now() < end) {
            double t = now();
            if (t >= next) {
                int s = lat_sent % nsend;
                if (!conns[s].closed) {
                    send_message(s);
                    lat_expected += alive;
                }
                lat_sent++;
                next += 1.0 / rate;
                continue;
            }
            int ms = (int)((next - t) * 1000) + 1;
            pump(ms < 10 ? ms : 10);
        }
        lat_cpu = (all_cpu() - c0) / latdur * 100;
        drain(10);
        latency_phase = 0;
        lat_got = nlat;
        qsort(lat, nlat, sizeof *lat, compare);
        p50 = quantile(lat, nlat, 0.5);
        p99 = quantile(lat, nlat, 0.99);
        pmax = nlat ? lat[nlat - 1] : 0;
    }

    printf("clients=%d connect_s=%.2f rss_before_kb=%ld rss_after_kb=%ld server_fds=%d "
           "deliveries_per_s=%.1f tput_msgs=%lld tput_left=%lld tput_p50_ms=%.2f tput_p99_ms=%.2f "
           "server_cpu_pct=%.0f gen_cpu_pct=%.0f "
           "lat_sent=%lld lat_expected=%lld lat_got=%lld p50_ms=%.3f p99_ms=%.3f max_ms=%.3f lat_server_cpu_pct=%.0f "
           "closed=%d gaps=%lld dups=%lld notices=%lld kick_notices=%lld others=%lld\n",
           nconn, connect_s, rss_before, rss_after, fds_after - fds_before, rate_out, tput_msgs, tput_left,
           tp50, tp99, srv_cpu, gen_cpu, lat_sent, lat_expected, lat_got, p50, p99, pmax, lat_cpu,
           nconn - alive, gaps, dups, notices, kick_notices, others);
    if (kick_notices)
        fprintf(stderr, "chatload: %lld kick notices, last: %s\n", kick_notices, last_kick);
    return 0;
}
