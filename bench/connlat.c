/* kpx-connlat: new-TCP-connection latency and rate, for `kpx bench` (Python's own connect() timing
 * would dominate a 20 us figure).
 *
 * usage: kpx-connlat lat  IP PORT N        N sequential connects; prints each connect() time in ns
 *        kpx-connlat rate IP PORT SECS P   P processes connect+close for SECS; prints total connects
 *        kpx-connlat loop N                N connects to a listener of its own on 127.0.0.1: the
 *                                          tool's own floor (syscalls + loopback handshake)
 *
 * A connect() returns when the SYN-ACK is back: first-packet round trip through whatever the
 * proxy mode put on the path (DNAT rule walk, IPVS lookup, nft map, userspace listener). Each
 * socket is closed with SO_LINGER 0 (RST) so the client leaves no TIME_WAIT and ports recycle.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* one connect; returns ns, or -1 on failure */
static long long one(const struct sockaddr_in *sa) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    struct timeval tv = {2, 0}; /* a lost SYN counts as a failure, not a 1-3 s retransmit sample */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    long long t0 = now_ns();
    int r = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
    long long dt = now_ns() - t0;
    close(fd);
    return r == 0 ? dt : -1;
}

static int addr(const char *ip, const char *port, struct sockaddr_in *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((unsigned short)atoi(port));
    return inet_pton(AF_INET, ip, &sa->sin_addr) == 1 ? 0 : -1;
}

static int lat(const struct sockaddr_in *sa, long n) {
    long fails = 0;
    for (long i = 0; i < n; i++) {
        long long dt = one(sa);
        if (dt < 0) {
            if (++fails > n / 10 + 10) {
                fprintf(stderr, "kpx-connlat: connect: %s (%ld failures)\n", strerror(errno), fails);
                return 1;
            }
            continue;
        }
        printf("%lld\n", dt);
    }
    if (fails) fprintf(stderr, "failures %ld\n", fails);
    return 0;
}

static int rate(const struct sockaddr_in *sa, double secs, int procs) {
    int pfd[2];
    if (pipe(pfd) < 0) return 1;
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            close(pfd[0]);
            long long end = now_ns() + (long long)(secs * 1e9), ok = 0;
            while (now_ns() < end)
                if (one(sa) >= 0) ok++;
            if (write(pfd[1], &ok, sizeof ok) != sizeof ok) _exit(1);
            _exit(0);
        }
    }
    close(pfd[1]);
    long long total = 0, v;
    while (read(pfd[0], &v, sizeof v) == sizeof v) total += v;
    while (wait(NULL) > 0) {}
    printf("%lld\n", total);
    return 0;
}

static int loop(long n) {
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0 ||
        getsockname(ls, (struct sockaddr *)&sa, &len) < 0) {
        perror("kpx-connlat: listen");
        return 1;
    }
    for (long i = 0; i < n; i++) {
        long long dt = one(&sa);
        int c = accept(ls, NULL, NULL);  /* drain the backlog as a server would */
        if (c >= 0) close(c);
        if (dt >= 0) printf("%lld\n", dt);
    }
    return 0;
}

int main(int argc, char **argv) {
    struct sockaddr_in sa;
    if (argc == 5 && !strcmp(argv[1], "lat") && addr(argv[2], argv[3], &sa) == 0)
        return lat(&sa, atol(argv[4]));
    if (argc == 6 && !strcmp(argv[1], "rate") && addr(argv[2], argv[3], &sa) == 0)
        return rate(&sa, atof(argv[4]), atoi(argv[5]));
    if (argc == 3 && !strcmp(argv[1], "loop"))
        return loop(atol(argv[2]));
    fprintf(stderr, "usage: kpx-connlat lat IP PORT N | rate IP PORT SECS PROCS | loop N\n");
    return 2;
}
