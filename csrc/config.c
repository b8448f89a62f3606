/*
 * The balloon's config space: see vb_config.h.
 *
 * A mutex guards the values and the write log: the reader thread writes
 * from the socket while the session reads, sets the target and drains the
 * log.  Everything is le32 on the wire (the device is VERSION_1 only).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "vb_config.h"
#include "vb_gen.h"
#include "vb_internal.h"

/* Changes of actual kept for the session: 4096 is 16 GiB of Linux buffers
 * (256 pages each) between two looks of the session (every 50 ms). */
#define WRITE_LOG 4096

struct vb_config {
    pthread_mutex_t mu;
    vb_config_values v;
    vb_config_write log[WRITE_LOG];
    uint32_t log_len;
};

static inline uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void pack(const vb_config_values *v, uint8_t *out)
{
    put_le32(out + VB_CONFIG_OFF_NUM_PAGES, v->num_pages);
    put_le32(out + VB_CONFIG_OFF_ACTUAL, v->actual);
    put_le32(out + VB_CONFIG_OFF_FREE_PAGE_HINT_CMD_ID, v->free_page_hint_cmd_id);
    put_le32(out + VB_CONFIG_OFF_POISON, v->poison_val);
}

/* Does [offset, offset + len) touch the le32 field at field? */
static inline int touches(uint32_t offset, uint32_t len, uint32_t field)
{
    return offset < field + 4 && offset + len > field;
}

vb_config *vb_config_new(void)
{
    vb_config *c = calloc(1, sizeof(*c));

    if (c != NULL) {
        pthread_mutex_init(&c->mu, NULL);
    }
    return c;
}

void vb_config_free(vb_config *c)
{
    if (c == NULL) {
        return;
    }
    pthread_mutex_destroy(&c->mu);
    free(c);
}

void vb_config_get(vb_config *c, vb_config_values *out)
{
    pthread_mutex_lock(&c->mu);
    *out = c->v;
    pthread_mutex_unlock(&c->mu);
}

void vb_config_pack(vb_config *c, uint8_t *out)
{
    vb_config_values v;

    vb_config_get(c, &v);
    pack(&v, out);
}

void vb_config_set_num_pages(vb_config *c, uint32_t num_pages)
{
    pthread_mutex_lock(&c->mu);
    c->v.num_pages = num_pages;
    pthread_mutex_unlock(&c->mu);
}

void vb_config_set_actual(vb_config *c, uint32_t actual)
{
    pthread_mutex_lock(&c->mu);
    c->v.actual = actual;
    pthread_mutex_unlock(&c->mu);
}

void vb_config_set_poison(vb_config *c, uint32_t poison_val)
{
    pthread_mutex_lock(&c->mu);
    c->v.poison_val = poison_val;
    pthread_mutex_unlock(&c->mu);
}

int vb_at_target(uint32_t num_pages, uint64_t pages)
{
    return pages == num_pages;
}

int vb_config_guest_write(vb_config *c, uint32_t offset, const uint8_t *data, uint32_t len, int keep_poison,
                          char *err, size_t errlen)
{
    uint8_t raw[VB_CONFIG_SIZE];
    uint32_t actual, poison;
    int rc = 0;

    if (len == 0 || offset > VB_CONFIG_SIZE || len > VB_CONFIG_SIZE - offset) {
        vb_seterr(err, errlen, "config access offset %" PRIu32 " size %" PRIu32
                  " is outside the %d-byte balloon config", offset, len, VB_CONFIG_SIZE);
        return -1;
    }
    pthread_mutex_lock(&c->mu);
    pack(&c->v, raw);
    memcpy(raw + offset, data, len);
    actual = touches(offset, len, VB_CONFIG_OFF_ACTUAL) ? get_le32(raw + VB_CONFIG_OFF_ACTUAL) : c->v.actual;
    poison = touches(offset, len, VB_CONFIG_OFF_POISON) ? get_le32(raw + VB_CONFIG_OFF_POISON) : c->v.poison_val;
    if ((keep_poison && poison != c->v.poison_val) || (actual != c->v.actual && c->log_len == WRITE_LOG)) {
        pthread_mutex_unlock(&c->mu);
        return VB_CONFIG_REFUSED;
    }
    if (poison != c->v.poison_val) {
        c->v.poison_val = poison;
        rc |= VB_CONFIG_POISON_CHANGED;
    }
    if (actual != c->v.actual) {
        vb_config_write *w = &c->log[c->log_len];

        rc |= VB_CONFIG_ACTUAL_CHANGED;
        if (c->log_len == 0) {
            rc |= VB_CONFIG_FIRST_WRITE;
        }
        if (vb_at_target(c->v.num_pages, actual)) {
            rc |= VB_CONFIG_AT_TARGET;
        }
        w->old_actual = c->v.actual;
        w->new_actual = actual;
        w->num_pages = c->v.num_pages;
        c->log_len++;
        c->v.actual = actual;
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

uint32_t vb_config_take_writes(vb_config *c, vb_config_write *out, uint32_t cap)
{
    uint32_t n;

    pthread_mutex_lock(&c->mu);
    n = c->log_len < cap ? c->log_len : cap;
    memcpy(out, c->log, n * sizeof(*out));
    memmove(c->log, c->log + n, (c->log_len - n) * sizeof(*out));
    c->log_len -= n;
    pthread_mutex_unlock(&c->mu);
    return n;
}
