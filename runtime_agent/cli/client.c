/*
 * berth-agent's native client: hands a command to the agent's CLI server.
 *
 * The same client as runtime_agent/cliclient.py (read that module and
 * runtime_agent/cliserver.py for the protocol), without the ~8 ms it takes
 * Python to start on every command. The agent itself stays Python; this is
 * only the front end that `python -m runtime_agent.cli.launcher` compiles when
 * a C compiler is there, as Mercurial's chg fronts its command server. When
 * the command can't be served (no server listening, BERTH_NO_SERVER set,
 * `serve`, `worker` or `join`, a request the server didn't take), it execs
 * the Python launcher (BERTH_FALLBACK, baked in at build time) with the same
 * arguments, which runs the command in-process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef BERTH_FALLBACK
#error "build with -DBERTH_FALLBACK='\"/path/to/berth-agent-py\"'"
#endif

#define PROTOCOL "berth-cli/1"
#define DEFAULT_RUN_ROOT "/run/berth"
#define SOCKET_NAME "cli.sock"

extern char **environ;
static volatile pid_t command_pid = -1;

static void relay(int signum) {
    if (command_pid > 0)
        kill(command_pid, signum);
}

static _Noreturn void run_in_process(char **argv) {
    argv[0] = BERTH_FALLBACK;
    execv(BERTH_FALLBACK, argv);
    fprintf(stderr, "berth-agent: can't run %s: %s\n", BERTH_FALLBACK, strerror(errno));
    _exit(125);
}

/* The request body grows in one buffer: fields separated by NUL. */
struct body {
    char *data;
    size_t len, cap;
};

static void add_field(struct body *b, const char *text, size_t n) {
    size_t need = b->len + n + 1;
    if (need > b->cap) {
        while (b->cap < need)
            b->cap = b->cap ? b->cap * 2 : 65536;
        b->data = realloc(b->data, b->cap);
        if (!b->data) {
            fputs("berth-agent: out of memory\n", stderr);
            _exit(125);
        }
    }
    if (b->len)
        b->data[b->len++] = '\0';
    memcpy(b->data + b->len, text, n);
    b->len += n;
}

static void add_text(struct body *b, const char *text) { add_field(b, text, strlen(text)); }

static int connect_server(void) {
    const char *root = getenv("BERTH_RUN_ROOT");
    if (!root || !*root)
        root = DEFAULT_RUN_ROOT;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    const char *sep = root[strlen(root) - 1] == '/' ? "" : "/";
    int n = snprintf(addr.sun_path, sizeof addr.sun_path, "%s%s%s", root, sep, SOCKET_NAME);
    if (n < 0 || (size_t)n >= sizeof addr.sun_path)
        return -1;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Send the request with our stdin, stdout and stderr attached; 0 or -1. */
static int send_request(int fd, const struct body *b) {
    char head[32];
    int head_len = snprintf(head, sizeof head, "%zu\n", b->len);
    struct iovec iov[2] = {{head, (size_t)head_len}, {b->data, b->len}};
    int stdio[3] = {0, 1, 2};
    union {
        char buf[CMSG_SPACE(sizeof stdio)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {
        .msg_iov = iov,
        .msg_iovlen = 2,
        .msg_control = control.buf,
        .msg_controllen = sizeof control.buf,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof stdio);
    memcpy(CMSG_DATA(cmsg), stdio, sizeof stdio);
    ssize_t sent;
    do
        sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0)
        return -1;
    size_t total = (size_t)head_len + b->len;
    for (size_t done = (size_t)sent; done < total;) {
        const char *from = done < (size_t)head_len ? head + done : b->data + (done - head_len);
        size_t n = done < (size_t)head_len ? (size_t)head_len - done : total - done;
        ssize_t w = send(fd, from, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        done += (size_t)w;
    }
    return 0;
}

/* The next line the server sends (a number), or -1 at end of stream. */
static long read_number(int fd, char *pending, size_t *pending_len, size_t cap) {
    for (;;) {
        char *newline = memchr(pending, '\n', *pending_len);
        if (newline) {
            *newline = '\0';
            char *end;
            long value = strtol(pending, &end, 10);
            int valid = end != pending && *end == '\0';
            size_t rest = *pending_len - (size_t)(newline + 1 - pending);
            memmove(pending, newline + 1, rest);
            *pending_len = rest;
            return valid ? value : -1;
        }
        if (*pending_len >= cap)
            return -1;
        ssize_t r = read(fd, pending + *pending_len, cap - *pending_len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        *pending_len += (size_t)r;
    }
}

int main(int argc, char **argv) {
    const char *no_server = getenv("BERTH_NO_SERVER");
    const char *command = NULL;
    for (int i = 1; i < argc; i++)
        if (argv[i][0] != '-') {
            command = argv[i];
            break;
        }
    if ((no_server && *no_server) ||
        (command && (!strcmp(command, "serve") || !strcmp(command, "worker") ||
                     !strcmp(command, "join"))))
        run_in_process(argv);
    int fd = connect_server();
    if (fd < 0)
        run_in_process(argv);

    struct body b = {0};
    char number[32];
    char *cwd = get_current_dir_name();
    mode_t umask_value = umask(0);
    umask(umask_value);
    add_text(&b, PROTOCOL);
    add_text(&b, cwd ? cwd : "/");
    free(cwd);
    snprintf(number, sizeof number, "%o", (unsigned)umask_value);
    add_text(&b, number);
    snprintf(number, sizeof number, "%d", argc - 1);
    add_text(&b, number);
    for (int i = 1; i < argc; i++)
        add_text(&b, argv[i]);
    for (char **entry = environ; *entry; entry++)
        if (strchr(*entry, '='))
            add_text(&b, *entry);
    if (send_request(fd, &b) < 0) {
        close(fd); /* the server went away between connect and send */
        run_in_process(argv);
    }
    free(b.data);

    char pending[128];
    size_t pending_len = 0;
    long pid = read_number(fd, pending, &pending_len, sizeof pending);
    if (pid <= 0) {
        fputs("berth-agent: the agent's CLI server refused the command\n", stderr);
        return 125;
    }
    command_pid = (pid_t)pid;
    struct sigaction action = {.sa_handler = relay};
    sigemptyset(&action.sa_mask);
    int relayed[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof relayed / sizeof relayed[0]; i++)
        sigaction(relayed[i], &action, NULL);
    long status = read_number(fd, pending, &pending_len, sizeof pending);
    if (status < 0) {
        fputs("berth-agent: the command ended without an exit status (killed?)\n", stderr);
        return 125;
    }
    return (int)(status & 0xFF);
}
