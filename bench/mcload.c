/* mcload: a small pipelined memcached text-protocol load generator (memaslap cannot pipeline).
 *
 *   mcload HOST PORT CONNS DEPTH SECONDS [KEYS]
 *
 * CONNS connections on one thread (epoll), each keeping DEPTH requests in flight: 90 % get /
 * 10 % set, 32-byte keys shaped like memaslap's (8 bytes of binary prefix, then characters
 * from [A-Za-z0-9.-]), 100-byte values. The KEYS keys (default 10000) are set first, so gets
 * hit. Prints one JSON object: ops, seconds, tps, mean_us, p99_us, errors. Replies are framed
 * by their terminator (END for get, one line for set); an error line counts as an error.
 * Built by bench/memcache.py with `cc -O2`; never part of proxyd.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define KEYLEN 32
#define VALLEN 100
#define MAXLAT 200000 /* us histogram */

typedef struct {
    int fd;
    char *rbuf;
    size_t rlen, rcap;
    char *wbuf;
    size_t wlen, woff, wcap;
    int inflight;
    unsigned char *types; /* ring: 1 get, 2 set */
    double *sent;
    int head, depth;
} Conn;

static char (*keys)[KEYLEN];
static int nkeys;
static uint64_t rng = 88172645463325252ULL;
static uint64_t xs(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static void wput(Conn *c, const char *p, size_t n) {
    if (c->wlen + n > c->wcap) {
        c->wcap = (c->wlen + n) * 2;
        c->wbuf = realloc(c->wbuf, c->wcap);
    }
    memcpy(c->wbuf + c->wlen, p, n);
    c->wlen += n;
}
static void send_req(Conn *c, int preload_idx) {
    char line[256];
    int t, k;
    if (preload_idx >= 0) {
        t = 2;
        k = preload_idx;
    } else {
        t = (xs() % 10 == 0) ? 2 : 1;
        k = (int)(xs() % (uint64_t)nkeys);
    }
    if (t == 1) {
        memcpy(line, "get ", 4);
        memcpy(line + 4, keys[k], KEYLEN);
        memcpy(line + 4 + KEYLEN, "\r\n", 2);
        wput(c, line, 4 + KEYLEN + 2);
    } else {
        int n = 0;
        memcpy(line, "set ", 4);
        n = 4;
        memcpy(line + n, keys[k], KEYLEN);
        n += KEYLEN;
        n += sprintf(line + n, " 0 0 %d\r\n", VALLEN);
        wput(c, line, (size_t)n);
        char v[VALLEN + 2];
        memset(v, 'v', VALLEN);
        v[VALLEN] = '\r';
        v[VALLEN + 1] = '\n';
        wput(c, v, sizeof v);
    }
    int slot = (c->head + c->inflight) % c->depth;
    c->types[slot] = (unsigned char)t;
    c->sent[slot] = now();
    c->inflight++;
}
static int flush(Conn *c) {
    while (c->woff < c->wlen) {
        ssize_t w = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
        if (w < 0) {
            if (errno == EAGAIN) return 0;
            return -1;
        }
        c->woff += (size_t)w;
    }
    c->wlen = c->woff = 0;
    return 0;
}
static char *find(char *p, size_t n, const char *s) {
    size_t k = strlen(s);
    if (n < k) return NULL;
    for (size_t i = 0; i + k <= n; i++)
        if (p[i] == s[0] && memcmp(p + i, s, k) == 0) return p + i;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: mcload HOST PORT CONNS DEPTH SECONDS [KEYS]\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]), nconn = atoi(argv[3]), depth = atoi(argv[4]);
    double seconds = atof(argv[5]);
    nkeys = argc > 6 ? atoi(argv[6]) : 10000;
    static const char cls[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-";
    keys = malloc((size_t)nkeys * KEYLEN);
    for (int i = 0; i < nkeys; i++) {
        static const unsigned char pre[8] = {0x10, 0xb0, 0x10, 0x10, 0x10, 0x10, 0x10, 0x10};
        memcpy(keys[i], pre, 8);
        for (int j = 8; j < KEYLEN; j++) keys[i][j] = cls[xs() % 64];
    }
    int ep = epoll_create1(0);
    Conn *cs = calloc((size_t)nconn, sizeof(Conn));
    for (int i = 0; i < nconn; i++) {
        Conn *c = &cs[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        inet_pton(AF_INET, host, &a.sin_addr);
        if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0) {
            perror("connect");
            return 1;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        c->depth = depth > 64 ? depth : 64; /* room for the preload */
        c->types = calloc((size_t)c->depth, 1);
        c->sent = calloc((size_t)c->depth, sizeof(double));
        c->rcap = 1 << 16;
        c->rbuf = malloc(c->rcap);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    static long hist[MAXLAT + 1];
    long ops = 0, errors = 0, preload_done = 0;
    int next_preload = 0;
    double lat_sum = 0;
    /* preload: every key set once, spread over the connections, 32 in flight each */
    int preloading = 1;
    for (int i = 0; i < nconn; i++) {
        for (int d = 0; d < 32 && next_preload < nkeys; d++) send_req(&cs[i], next_preload++);
        flush(&cs[i]);
    }
    double t0 = 0, deadline = 0;
    struct epoll_event evs[256];
    for (;;) {
        if (!preloading && now() >= deadline) break;
        int n = epoll_wait(ep, evs, 256, 100);
        for (int e = 0; e < n; e++) {
            Conn *c = evs[e].data.ptr;
            if (evs[e].events & EPOLLIN) {
                for (;;) {
                    if (c->rcap - c->rlen < 4096) {
                        c->rcap *= 2;
                        c->rbuf = realloc(c->rbuf, c->rcap);
                    }
                    ssize_t r = read(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen);
                    if (r == 0) {
                        fprintf(stderr, "connection closed by peer\n");
                        return 1;
                    }
                    if (r < 0) break;
                    c->rlen += (size_t)r;
                }
                size_t off = 0;
                while (c->inflight) {
                    char *p = c->rbuf + off;
                    size_t left = c->rlen - off;
                    char *eol = find(p, left, "\r\n");
                    if (!eol) break;
                    size_t used;
                    int err = 0;
                    if (c->types[c->head] == 1 && (left >= 5 && memcmp(p, "VALUE", 5) == 0)) {
                        char *end = find(p, left, "END\r\n");
                        if (!end) break;
                        used = (size_t)(end - p) + 5;
                    } else {
                        used = (size_t)(eol - p) + 2;
                        if (c->types[c->head] == 1) err = !(used == 5 && memcmp(p, "END", 3) == 0);
                        else err = !(used == 8 && memcmp(p, "STORED", 6) == 0);
                    }
                    off += used;
                    double lat = now() - c->sent[c->head];
                    c->head = (c->head + 1) % c->depth;
                    c->inflight--;
                    if (preloading) {
                        preload_done++;
                        errors += err;
                        if (next_preload < nkeys) send_req(c, next_preload++);
                        continue;
                    }
                    ops++;
                    errors += err;
                    long us = (long)(lat * 1e6);
                    hist[us > MAXLAT ? MAXLAT : us]++;
                    lat_sum += lat;
                    send_req(c, -1);
                }
                memmove(c->rbuf, c->rbuf + off, c->rlen - off);
                c->rlen -= off;
            }
            if (flush(c) < 0) {
                perror("write");
                return 1;
            }
        }
        if (preloading && preload_done >= nkeys) {
            preloading = 0;
            errors = 0;
            t0 = now();
            deadline = t0 + seconds;
            for (int i = 0; i < nconn; i++) {
                Conn *c = &cs[i];
                while (c->inflight < depth) send_req(c, -1);
                flush(c);
            }
        }
    }
    double el = now() - t0;
    long acc = 0, p99 = 0;
    for (long i = 0; i <= MAXLAT; i++) {
        acc += hist[i];
        if (acc >= 0.99 * ops) {
            p99 = i;
            break;
        }
    }
    printf("{\"ops\": %ld, \"seconds\": %.3f, \"tps\": %.1f, \"mean_us\": %.1f, \"p99_us\": %ld, \"errors\": %ld}\n",
           ops, el, ops / el, ops ? 1e6 * lat_sum / ops : 0.0, p99, errors);
    return 0;
}
