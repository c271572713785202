/* kpx-holder: the pod sandbox's pause process.
 *
 * usage: kpx-holder NETNS_PATH HOSTNAME
 *
 * Creates new net, uts and ipc namespaces, sets the hostname (the pod name), brings lo up,
 * bind-mounts its network namespace on NETNS_PATH (a file under /run/netns, so `ip netns exec`
 * and `nsenter` work), then forks: the parent prints "ready <child pid>" and exits, the child
 * sleeps in pause() in its own session, reaping any child that exits. SIGTERM/SIGINT end it with status 0; the bind mount stays until
 * the sandbox is deleted (netns/sandbox.py unmounts it).
 *
 * It does in one exec what `unshare --net=PATH --uts --ipc` + `hostname` + `ip link set lo up`
 * + `catatonit -P` would need four for, and stays well under 1 MiB RSS when linked statically.
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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what, const char *arg) {
    fprintf(stderr, "kpx-holder: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static void on_term(int sig) { (void)sig; _exit(0); }

static void on_chld(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: kpx-holder NETNS_PATH HOSTNAME\n");
        return 2;
    }
    const char *path = argv[1], *host = argv[2];
    if (unshare(CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC) < 0) die("unshare", NULL);
    if (sethostname(host, strlen(host)) < 0) die("sethostname", host);

    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket", NULL);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) die("SIOCGIFFLAGS", "lo");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) die("SIOCSIFFLAGS", "lo");
    close(s);

    int fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0);
    if (fd < 0) die("create", path);
    close(fd);
    if (mount("/proc/self/ns/net", path, "none", MS_BIND, NULL) < 0) {
        int e = errno;
        unlink(path);
        errno = e;
        die("bind mount on", path);
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

    /* Fork the pause loop off: the caller's exec returns at once (no child to reap) and the
     * holder outlives the agent that started it, as a pod outlives a kubelet restart. */
    pid_t child = fork();
    if (child < 0) die("fork", NULL);
    if (child > 0) {
        printf("ready %d\n", (int)child);
        return 0;
    }
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
