/* kpx-holder: the pod sandbox's pause process.
 *
 * usage: kpx-holder NETNS_PATH HOSTNAME [NETNS_PATH HOSTNAME ...]
 *
 * For each pair, forks a holder that creates new net, uts and ipc namespaces, sets the hostname
 * (the pod name), brings lo up and bind-mounts its network namespace on NETNS_PATH (a file
 * under /run/netns, so `ip netns exec` and `nsenter` work). Each pair gets one line on stdout,
 * in order: "ready <holder pid> <path>" or "error <path> <what>: <strerror>". The command exits
 * 0 when every holder is ready, 1 otherwise (the ones that failed are gone, the others run).
 *
 * A holder sleeps in pause() in its own session (it outlives the agent that started it, as a
 * pod outlives a kubelet restart), reaps any child that exits, and ends with status 0 on
 * SIGTERM/SIGINT; the bind mount stays until the sandbox is deleted (netns/sandbox.py).
 *
 * One exec does what `unshare --net=PATH --uts --ipc` + `hostname` + `ip link set lo up` +
 * `catatonit -P` would need four for, and one exec can make many sandboxes (process start-up,
 * not namespace creation, is what costs most on a busy machine). RSS ~0.25 MiB per holder.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int report_fd = -1;

static void report(const char *line) {
    size_t n = strlen(line);
    while (n > 0) {
        ssize_t w = write(report_fd, line, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        line += w;
        n -= (size_t)w;
    }
}

static void fail(const char *path, const char *what) {
    char buf[4400];
    snprintf(buf, sizeof buf, "error %s %s: %s\n", path, what, strerror(errno));
    report(buf);
    _exit(1);
}

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

static void on_chld(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

/* runs in the forked child: becomes the holder of one sandbox, never returns */
static void hold(const char *path, const char *host) {
    if (unshare(CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC) < 0) fail(path, "unshare");
    if (sethostname(host, strlen(host)) < 0) fail(path, "sethostname");

    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) fail(path, "socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) fail(path, "SIOCGIFFLAGS lo");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) fail(path, "SIOCSIFFLAGS lo");
    close(s);

    int fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
    if (fd < 0) fail(path, "create");
    close(fd);
    if (mount("/proc/self/ns/net", path, "none", MS_BIND, NULL) < 0) {
        int e = errno;
        unlink(path);
        errno = e;
        fail(path, "bind mount");
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);

    char buf[4200];
    snprintf(buf, sizeof buf, "ready %d %s\n", (int)getpid(), path);
    report(buf);
    close(report_fd);

    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2) close(null);
    }
    setsid();
    if (chdir("/") < 0) _exit(1);
    for (;;) pause();
}

/* forward a holder's one line; EOF without a line means it died early */
static int forward(int fd, pid_t child, const char *path) {
    char line[4400];
    size_t n = 0;
    while (n < sizeof line - 1) {
        ssize_t r = read(fd, line + n, sizeof line - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        n += (size_t)r;
        if (line[n - 1] == '\n') break;
    }
    close(fd);
    line[n] = '\0';
    if (n == 0) {
        printf("error %s holder exited before it was ready\n", path);
        waitpid(child, NULL, 0);
        return 0;
    }
    fputs(line, stdout);
    if (strncmp(line, "ready ", 6) != 0) {
        waitpid(child, NULL, 0);
        return 0;
    }
    return 1;
}

#define WINDOW 64 /* holders created concurrently: namespace set-up overlaps on all CPUs */

int main(int argc, char **argv) {
    if (argc < 3 || (argc - 1) % 2 != 0) {
        fprintf(stderr, "usage: kpx-holder NETNS_PATH HOSTNAME [NETNS_PATH HOSTNAME ...]\n");
        return 2;
    }
    int ok = 1, npairs = (argc - 1) / 2;
    for (int base = 0; base < npairs; base += WINDOW) {
        int fds[WINDOW];
        pid_t pids[WINDOW];
        int count = npairs - base < WINDOW ? npairs - base : WINDOW;
        for (int j = 0; j < count; j++) {
            const char *path = argv[1 + 2 * (base + j)], *host = argv[2 + 2 * (base + j)];
            int p[2];
            fds[j] = -1;
            if (pipe2(p, O_CLOEXEC) < 0) continue;
            pid_t child = fork();
            if (child == 0) {
                close(p[0]);
                report_fd = p[1];
                hold(path, host);
            }
            close(p[1]);
            if (child < 0) {
                close(p[0]);
                continue;
            }
            fds[j] = p[0];
            pids[j] = child;
        }
        for (int j = 0; j < count; j++) {
            const char *path = argv[1 + 2 * (base + j)];
            if (fds[j] < 0) {
                printf("error %s fork: %s\n", path, strerror(errno));
                ok = 0;
            } else if (!forward(fds[j], pids[j], path)) {
                ok = 0;
            }
        }
    }
    fflush(stdout);
    return ok ? 0 : 1;
}
