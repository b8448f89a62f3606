/*
 * The least CPU a vhost-user balloon back-end can spend per guest buffer on
 * this machine, whatever it is written in: for each buffer the Linux driver
 * (through QEMU) sends GET_CONFIG and SET_CONFIG, each answered on the
 * unix socket, and kicks once, answered on the call eventfd.  A responder
 * thread here does exactly that and nothing else (no ring, no bitmap, no
 * discard), sleeping in poll() between events; the driving thread plays the
 * guest.  Prints the responder's CPU time per buffer in ns
 * (CLOCK_THREAD_CPUTIME_ID), the median of `runs` runs of `buffers` buffers.
 *
 * Built and run by scripts/bench.py: cc -O2 -pthread transport_floor.c
 * usage: transport_floor [buffers] [runs]
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG 40 /* a GET_CONFIG request and its reply: 12-byte header + 12 + 16 */

static int sv[2], kick, call;
static long buffers;
static uint64_t responder_ns;

static uint64_t thread_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *responder(void *arg)
{
    uint8_t buf[MSG];
    uint64_t v;
    struct pollfd p[2] = {{sv[1], POLLIN, 0}, {kick, POLLIN, 0}};
    uint64_t t0 = thread_ns();

    (void)arg;
    for (long i = 0; i < buffers * 3; i++) {
        if (poll(p, 2, -1) < 0) {
            break;
        }
        if (p[0].revents & POLLIN) {
            if (recv(sv[1], buf, MSG, 0) != MSG || send(sv[1], buf, MSG, MSG_NOSIGNAL) != MSG) {
                break;
            }
        } else if (read(kick, &v, sizeof(v)) != sizeof(v) || write(call, &v, sizeof(v)) != sizeof(v)) {
            break;
        }
    }
    responder_ns = thread_ns() - t0;
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    long runs = argc > 2 ? atol(argv[2]) : 5;
    double *per = calloc((size_t)(runs > 0 ? runs : 1), sizeof(double));

    buffers = argc > 1 ? atol(argv[1]) : 4096;
    if (per == NULL || buffers <= 0 || runs <= 0) {
        return 2;
    }
    for (long r = 0; r < runs; r++) {
        pthread_t t;
        uint8_t buf[MSG] = {0};
        uint64_t one = 1, v;
        struct pollfd pc;

        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0 || (kick = eventfd(0, 0)) < 0 ||
            (call = eventfd(0, 0)) < 0 || pthread_create(&t, NULL, responder, NULL) != 0) {
            perror("transport_floor");
            return 1;
        }
        pc.fd = call;
        pc.events = POLLIN;
        for (long i = 0; i < buffers; i++) {
            if (send(sv[0], buf, MSG, 0) != MSG || recv(sv[0], buf, MSG, MSG_WAITALL) != MSG ||   /* GET_CONFIG */
                write(kick, &one, sizeof(one)) != sizeof(one) || poll(&pc, 1, -1) < 0 ||         /* the buffer */
                read(call, &v, sizeof(v)) != sizeof(v) ||
                send(sv[0], buf, MSG, 0) != MSG || recv(sv[0], buf, MSG, MSG_WAITALL) != MSG) {   /* SET_CONFIG */
                perror("transport_floor");
                return 1;
            }
        }
        pthread_join(t, NULL);
        per[r] = (double)responder_ns / (double)buffers;
        close(sv[0]);
        close(sv[1]);
        close(kick);
        close(call);
    }
    qsort(per, (size_t)runs, sizeof(double), cmp);
    printf("%.0f\n", per[runs / 2]);
    return 0;
}
