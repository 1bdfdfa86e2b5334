/* New connections per second through a forwarder.
 *   forwardload HOST PORT THREADS SECONDS
 *   forwardload serve PORT THREADS      (the backend: read 1 byte, echo it, close)
 * Each thread loops: connect, send 1 byte, read until EOF (the backend echoes
 * and closes), close with RST (no TIME_WAIT on the client side).  Prints
 * "<completed> <errors> <seconds>". */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in addr;
static volatile int stop = 0;
static long done[256], errors[256];

static void *worker(void *arg) {
    long id = (long)arg;
    char buf[64];
    struct timeval tv = {5, 0};
    struct linger lg = {1, 0};
    while (!stop) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr) < 0 || send(s, "x", 1, 0) != 1) {
            errors[id]++; close(s); continue;
        }
        ssize_t n, got = 0;
        while ((n = recv(s, buf, sizeof buf, 0)) > 0) got += n;
        setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(s);
        if (n == 0 && got == 1) done[id]++; else errors[id]++;
    }
    return NULL;
}

static int listener;

static void *server(void *arg) {
    char buf[64];
    (void)arg;
    for (;;) {
        int c = accept(listener, NULL, NULL);
        if (c < 0) continue;
        ssize_t n = recv(c, buf, sizeof buf, 0);
        if (n > 0) send(c, buf, (size_t)n, 0);
        close(c);
    }
    return NULL;
}

static int serve(int port, int threads) {
    struct sockaddr_in a = {0};
    int one = 1;
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    listener = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&a, sizeof a) < 0 || listen(listener, 4096) < 0) { perror("listen"); return 1; }
    pthread_t t[256];
    if (threads > 256) threads = 256;
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, server, NULL);
    pthread_join(t[0], NULL);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "serve") == 0) return serve(atoi(argv[2]), atoi(argv[3]));
    if (argc != 5) { fprintf(stderr, "usage: %s HOST PORT THREADS SECONDS\n", argv[0]); return 2; }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);
    int threads = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (threads > 256) threads = 256;
    pthread_t t[256];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    usleep((useconds_t)(seconds * 1e6));
    stop = 1;
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long d = 0, e = 0;
    for (int i = 0; i < threads; i++) { d += done[i]; e += errors[i]; }
    printf("%ld %ld %.3f\n", d, e, (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
