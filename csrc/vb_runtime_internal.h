/*
 * Helpers shared by the C files of the runtime (serve.c, front.c, ...);
 * not part of the cffi interface.
 */
#ifndef VB_RUNTIME_INTERNAL_H
#define VB_RUNTIME_INTERNAL_H

#include <pthread.h>
#include <unistd.h>

#include "vb_internal.h"
#include "vb_runtime.h"

/* Adds 1 to an eventfd (-1: none).  EAGAIN (counter saturated) is fine:
 * the reader has a wakeup pending anyway. */
static inline void vb_eventfd_signal(int fd)
{
    uint64_t one = 1;

    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
        /* EAGAIN */
    }
}

/* Resets a non-blocking eventfd (EAGAIN: nothing was pending). */
static inline void vb_eventfd_drain(int fd)
{
    uint64_t value;

    if (read(fd, &value, sizeof(value)) < 0) {
        /* EAGAIN */
    }
}

/* Starts fn(arg) on a thread named name (as top -H shows it); 0, or -1 with
 * the reason in err ("cannot start <what> thread: ..."). */
static inline int vb_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg, const char *name,
                                  const char *what, char *err, size_t errlen)
{
    int rc = pthread_create(thread, NULL, fn, arg);

    if (rc != 0) {
        vb_seterr(err, errlen, "cannot start %s thread: %s", what, strerror(rc));
        return -1;
    }
    pthread_setname_np(*thread, name);
    return 0;
}

#endif
