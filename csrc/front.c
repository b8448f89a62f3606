/*
 * Reading the front-end's socket in C, and answering the two messages a
 * ballooning guest sends per buffer without waking Python.
 *
 * The Linux driver reads num_pages before each buffer and writes actual
 * after it; QEMU turns each into GET_CONFIG and SET_CONFIG on the vhost-user
 * socket, so a guest giving back 1 GiB sends 2048 of them.  Through the
 * Python session each cost about 100 us of CPU, more than the kernel's work
 * of freeing the pages.  A front thread now reads the socket:
 *
 * - a chunk that starts at a message boundary (the session's decoder holds
 *   nothing) and brought no fds is walked message by message; each leading
 *   GET_CONFIG or SET_CONFIG of the one shape QEMU sends (offset 0, the
 *   whole 16-byte config, flags 0, no fds) is answered here; whatever
 *   remains is handed to the session verbatim;
 * - every other chunk (fds, a message split across reads, EOF, an error)
 *   goes to the session verbatim, exactly as the kernel returned it, and the
 *   thread waits until the session has handled it and says whether it may
 *   answer config messages again (vb_front_resume).
 *
 * So the session's sans-I/O connection sees the same bytes and fds, in the
 * same chunks, as before, minus complete well-formed config messages, and
 * every error message and reply it produced is still produced by it.  Only
 * the session writes the socket while the thread waits; only the thread
 * writes it otherwise.
 *
 * The config lives in its mailbox (config.c, vb_config.h), which the thread
 * answers GET_CONFIG from and applies SET_CONFIG to with the one write rule
 * (only actual and poison_val are taken).  A write that would change
 * poison_val goes to the session, which logs it; a full write log too.  The
 * mailbox logs each change of actual for the session to replay (events,
 * deflate-on-OOM accounting, "guest at target"); writes_fd is written when
 * the log stops being empty (the session drains it at its own pace),
 * target_fd when a write brings the balloon to the target (at once: the
 * session frees pending pages then).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vb_config.h"
#include "vb_runtime_internal.h"

/* The protocol's numbers and the config layout come from the Python
 * sources through vb_gen.h (vhost_user/constants.py, device/config_layout.py). */
#define FRONT_BUF 65536
#define FRONT_MAX_FDS VB_VHOST_USER_MAX_FDS
#define HDR VB_VHOST_USER_HEADER_SIZE
#define CFG_HDR VB_VHOST_USER_CONFIG_HEADER_SIZE
#define CFG_SIZE VB_CONFIG_SIZE

struct vb_front {
    int sock, chunk_fd, writes_fd, target_fd, stop_fd, resume_fd;  /* our own duplicates / eventfds */
    pthread_t thread;
    int started;
    int stop;             /* atomic */

    /* The chunk waiting for the session (state: under mu). */
    pthread_mutex_t mu;
    int waiting;          /* a chunk is handed over and not resumed yet */
    int taken;            /* the session took it */
    vb_front_chunk chunk;
    uint8_t *buf;         /* FRONT_BUF: what recvmsg returned; the chunk is buf[chunk_off..] */
    uint32_t chunk_off;
    int fast;             /* the session allows answering config messages here */
    int partial;          /* the session's decoder holds part of a message */

    vb_config *config;    /* the session's; outlives the thread */

    vb_front_counters c;  /* fields updated atomically */
};

static inline uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = v;
    p[1] = v >> 8;
    p[2] = v >> 16;
    p[3] = v >> 24;
}

static int stopping(vb_front *f)
{
    return __atomic_load_n(&f->stop, __ATOMIC_ACQUIRE);
}

/* Sends all of data (the socket may be non-blocking: it is shared with the
 * event loop's).  0, or -1 with errno (or stop requested). */
static int send_all(vb_front *f, const uint8_t *data, size_t len)
{
    while (len > 0) {
        ssize_t n = send(f->sock, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);

        if (n > 0) {
            data += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p[2] = {{f->sock, POLLOUT, 0}, {f->stop_fd, POLLIN, 0}};

            if (poll(p, 2, -1) < 0 && errno != EINTR) {
                return -1;
            }
            if (stopping(f)) {
                errno = ECANCELED;
                return -1;
            }
            continue;
        }
        return -1;
    }
    return 0;
}

/* Length of the complete GET_CONFIG/SET_CONFIG at p that may be answered
 * here, or 0: leave it (and all after it) to the session. */
static size_t hot_length(const uint8_t *p, size_t len)
{
    uint32_t request, flags, size;

    if (len < HDR) {
        return 0;
    }
    request = le32(p);
    flags = le32(p + 4);
    size = le32(p + 8);
    if (request != VB_VHOST_USER_REQ_GET_CONFIG && request != VB_VHOST_USER_REQ_SET_CONFIG) {
        return 0;
    }
    if ((flags != VB_VHOST_USER_F_VERSION && flags != (VB_VHOST_USER_F_VERSION | VB_VHOST_USER_F_NEED_REPLY)) || size != CFG_HDR + CFG_SIZE ||
        len < HDR + (size_t)size) {
        return 0;
    }
    if (le32(p + HDR) != 0 || le32(p + HDR + 4) != CFG_SIZE || le32(p + HDR + 8) != 0) {
        return 0;  /* offset 0, the whole config, flags 0 (front-end) only */
    }
    return HDR + size;
}

/* 1: answered; 0: leave it to the session; -1: the socket failed. */
static int answer(vb_front *f, const uint8_t *msg)
{
    uint8_t reply[HDR + CFG_HDR + CFG_SIZE];
    uint32_t request = le32(msg), flags = le32(msg + 4);

    if (request == VB_VHOST_USER_REQ_GET_CONFIG) {
        put32(reply, VB_VHOST_USER_REQ_GET_CONFIG);
        put32(reply + 4, VB_VHOST_USER_F_VERSION | VB_VHOST_USER_F_REPLY);
        put32(reply + 8, CFG_HDR + CFG_SIZE);
        put32(reply + HDR, 0);
        put32(reply + HDR + 4, CFG_SIZE);
        put32(reply + HDR + 8, 0);
        vb_config_pack(f->config, reply + HDR + CFG_HDR);
        if (send_all(f, reply, sizeof(reply)) < 0) {
            return -1;
        }
        __atomic_add_fetch(&f->c.config_reads, 1, __ATOMIC_RELAXED);
        return 1;
    } else {
        int rc = vb_config_guest_write(f->config, 0, msg + HDR + CFG_HDR, CFG_SIZE, 1, NULL, 0);

        if (rc < 0 || (rc & VB_CONFIG_REFUSED)) {
            /* A poison change (the session logs it) or a full write log. */
            if (rc > 0) {
                __atomic_add_fetch(&f->c.log_full, 1, __ATOMIC_RELAXED);
            }
            return 0;
        }
        __atomic_add_fetch(&f->c.config_writes, 1, __ATOMIC_RELAXED);
        if (flags & VB_VHOST_USER_F_NEED_REPLY) {
            put32(reply, VB_VHOST_USER_REQ_SET_CONFIG);
            put32(reply + 4, VB_VHOST_USER_F_VERSION | VB_VHOST_USER_F_REPLY);
            put32(reply + 8, 8);
            memset(reply + HDR, 0, 8);
            if (send_all(f, reply, HDR + 8) < 0) {
                return -1;
            }
        }
        if (rc & VB_CONFIG_FIRST_WRITE) {
            vb_eventfd_signal(f->writes_fd);
        }
        if (rc & VB_CONFIG_AT_TARGET) {
            vb_eventfd_signal(f->target_fd);
        }
        return 1;
    }
}

/* Hands buf[off..off+len) and fds to the session and waits until it has
 * handled them.  0: carry on; -1: stop. */
static int hand_over(vb_front *f, uint32_t off, uint32_t len, const int *fds, int nfds, int eof, int ctrunc,
                     int error)
{
    struct pollfd p[2] = {{f->resume_fd, POLLIN, 0}, {f->stop_fd, POLLIN, 0}};

    pthread_mutex_lock(&f->mu);
    memset(&f->chunk, 0, sizeof(f->chunk));
    f->chunk.len = len;
    f->chunk.nfds = nfds;
    memcpy(f->chunk.fds, fds, (size_t)nfds * sizeof(int));
    f->chunk.eof = eof;
    f->chunk.ctrunc = ctrunc;
    f->chunk.error = error;
    f->chunk_off = off;
    f->waiting = 1;
    f->taken = 0;
    pthread_mutex_unlock(&f->mu);
    __atomic_add_fetch(&f->c.handed_over, 1, __ATOMIC_RELAXED);
    vb_eventfd_signal(f->chunk_fd);
    for (;;) {
        if (poll(p, 2, -1) < 0 && errno != EINTR) {
            return -1;
        }
        if (stopping(f)) {
            return -1;
        }
        if (p[0].revents & POLLIN) {
            vb_eventfd_drain(f->resume_fd);
            pthread_mutex_lock(&f->mu);
            if (!f->waiting) {
                pthread_mutex_unlock(&f->mu);
                return 0;
            }
            pthread_mutex_unlock(&f->mu);
        }
    }
}

static void *front_main(void *arg)
{
    vb_front *f = arg;
    union {
        char space[CMSG_SPACE(FRONT_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;

    for (;;) {
        struct pollfd p[2] = {{f->sock, POLLIN, 0}, {f->stop_fd, POLLIN, 0}};
        struct iovec iov = {f->buf, FRONT_BUF};
        struct msghdr mh = {0};
        struct cmsghdr *cm;
        int fds[FRONT_MAX_FDS * 2], nfds = 0, ctrunc, fast, partial;
        ssize_t n;
        size_t off = 0;

        if (poll(p, 2, -1) < 0 && errno != EINTR) {
            hand_over(f, 0, 0, fds, 0, 0, 0, errno);
            break;
        }
        if (stopping(f)) {
            break;
        }
        if (!(p[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            continue;
        }
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.space;
        mh.msg_controllen = sizeof(control.space);
        n = recvmsg(f->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                continue;
            }
            hand_over(f, 0, 0, fds, 0, 0, 0, errno);
            break;
        }
        for (cm = CMSG_FIRSTHDR(&mh); cm != NULL; cm = CMSG_NXTHDR(&mh, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                int count = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));

                for (int i = 0; i < count && nfds < FRONT_MAX_FDS * 2; i++) {
                    memcpy(&fds[nfds++], CMSG_DATA(cm) + (size_t)i * sizeof(int), sizeof(int));
                }
            }
        }
        ctrunc = (mh.msg_flags & MSG_CTRUNC) != 0;
        if (ctrunc || nfds > FRONT_MAX_FDS) {
            for (int i = 0; i < nfds; i++) {
                close(fds[i]);
            }
            nfds = 0;
            ctrunc = 1;
        }
        if (n == 0) {
            hand_over(f, 0, 0, fds, 0, 1, ctrunc, 0);
            break;
        }
        pthread_mutex_lock(&f->mu);
        fast = f->fast;
        partial = f->partial;
        pthread_mutex_unlock(&f->mu);
        if (fast && !partial && nfds == 0 && !ctrunc) {
            size_t hot;

            while ((hot = hot_length(f->buf + off, (size_t)n - off)) > 0) {
                int rc = answer(f, f->buf + off);

                if (rc < 0) {
                    goto failed;
                }
                if (rc == 0) {
                    break;
                }
                off += hot;
            }
        }
        if (off < (size_t)n || nfds > 0 || ctrunc) {
            if (hand_over(f, (uint32_t)off, (uint32_t)((size_t)n - off), fds, nfds, 0, ctrunc, 0) < 0) {
                break;
            }
        }
        continue;
failed:
        hand_over(f, 0, 0, fds, 0, 0, 0, errno ? errno : EIO);
        break;
    }
    return NULL;
}

static void front_release(vb_front *f)
{
    int fds[] = {f->sock, f->chunk_fd, f->writes_fd, f->target_fd, f->stop_fd, f->resume_fd};

    pthread_mutex_lock(&f->mu);
    if (f->waiting && !f->taken) {
        for (int i = 0; i < f->chunk.nfds; i++) {
            close(f->chunk.fds[i]);
        }
        f->chunk.nfds = 0;
    }
    pthread_mutex_unlock(&f->mu);
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
        if (fds[i] >= 0) {
            close(fds[i]);
        }
    }
    pthread_mutex_destroy(&f->mu);
    free(f->buf);
    free(f);
}

vb_front *vb_front_start(int sock_fd, int chunk_fd, int writes_fd, int target_fd, vb_config *config,
                         char *err, size_t errlen)
{
    vb_front *f = calloc(1, sizeof(*f));

    if (f == NULL) {
        vb_seterr(err, errlen, "out of memory for the front-end reader");
        return NULL;
    }
    pthread_mutex_init(&f->mu, NULL);
    f->config = config;
    f->sock = fcntl(sock_fd, F_DUPFD_CLOEXEC, 0);
    f->chunk_fd = fcntl(chunk_fd, F_DUPFD_CLOEXEC, 0);
    f->writes_fd = fcntl(writes_fd, F_DUPFD_CLOEXEC, 0);
    f->target_fd = fcntl(target_fd, F_DUPFD_CLOEXEC, 0);
    f->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    f->resume_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    f->buf = malloc(FRONT_BUF);
    if (f->sock < 0 || f->chunk_fd < 0 || f->writes_fd < 0 || f->target_fd < 0 || f->stop_fd < 0 ||
        f->resume_fd < 0) {
        vb_seterr(err, errlen, "front-end reader: cannot duplicate its fds (socket %d): %s", sock_fd,
                  strerror(errno));
        front_release(f);
        return NULL;
    }
    if (f->buf == NULL) {
        vb_seterr(err, errlen, "out of memory for the front-end reader's buffer");
        front_release(f);
        return NULL;
    }
    if (vb_thread_start(&f->thread, front_main, f, "vb-front", "the front-end reader", err, errlen) < 0) {
        front_release(f);
        return NULL;
    }
    f->started = 1;
    return f;
}

int vb_front_take(vb_front *f, vb_front_chunk *out, uint8_t *data, uint32_t cap)
{
    int have = 0;

    vb_eventfd_drain(f->chunk_fd);
    pthread_mutex_lock(&f->mu);
    if (f->waiting && !f->taken && f->chunk.len <= cap) {
        *out = f->chunk;
        memcpy(data, f->buf + f->chunk_off, f->chunk.len);
        f->chunk.nfds = 0;  /* the fds are the session's now */
        f->taken = 1;
        have = 1;
    }
    pthread_mutex_unlock(&f->mu);
    return have;
}

void vb_front_resume(vb_front *f, int fast, int partial)
{
    pthread_mutex_lock(&f->mu);
    f->fast = fast ? 1 : 0;
    f->partial = partial ? 1 : 0;
    f->waiting = 0;
    pthread_mutex_unlock(&f->mu);
    vb_eventfd_signal(f->resume_fd);
}

void vb_front_drain_config_signals(vb_front *f)
{
    vb_eventfd_drain(f->writes_fd);
    vb_eventfd_drain(f->target_fd);
}

void vb_front_get_counters(vb_front *f, vb_front_counters *out)
{
    out->config_reads = __atomic_load_n(&f->c.config_reads, __ATOMIC_RELAXED);
    out->config_writes = __atomic_load_n(&f->c.config_writes, __ATOMIC_RELAXED);
    out->handed_over = __atomic_load_n(&f->c.handed_over, __ATOMIC_RELAXED);
    out->log_full = __atomic_load_n(&f->c.log_full, __ATOMIC_RELAXED);
}

void vb_front_free(vb_front *f)
{
    if (f == NULL) {
        return;
    }
    if (f->started) {
        __atomic_store_n(&f->stop, 1, __ATOMIC_RELEASE);
        vb_eventfd_signal(f->stop_fd);
        pthread_join(f->thread, NULL);
        f->started = 0;
    }
    front_release(f);
}
