/*
 * The balloon's config space (virtio 1.2, 5.5.4): the one owner of
 * num_pages, actual, free_page_hint_cmd_id and poison_val.
 *
 * A mailbox shared by the front-end reader thread (front.c), which answers
 * the guest's per-buffer GET_CONFIG/SET_CONFIG from it, and the Python
 * session, which sets the target and reads everything through
 * vb_config_get.  The rule for a guest write lives here only
 * (vb_config_guest_write), and so does what "at the target" means
 * (vb_at_target).  Knows nothing of vhost-user; the layout numbers come
 * from vhostballoon/device/config.py through the generated header.
 *
 * Part of the cffi cdef (build_native.py reads the CDEF block).
 */
#ifndef VB_CONFIG_H
#define VB_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* CDEF-BEGIN */

typedef struct vb_config vb_config;

typedef struct vb_config_values {
    uint32_t num_pages;             /* the device's: pages the guest should give */
    uint32_t actual;                /* the driver's: pages in the balloon */
    uint32_t free_page_hint_cmd_id; /* the device's (free page hinting: never offered) */
    uint32_t poison_val;            /* the driver's: its poison pattern, 0: none */
} vb_config_values;

/* One logged change of actual, with num_pages at that moment. */
typedef struct vb_config_write {
    uint32_t old_actual;
    uint32_t new_actual;
    uint32_t num_pages;
} vb_config_write;

/* What vb_config_guest_write did (bits). */
enum {
    VB_CONFIG_ACTUAL_CHANGED = 1,   /* actual changed: logged */
    VB_CONFIG_AT_TARGET = 2,        /* ... to num_pages (vb_at_target) */
    VB_CONFIG_POISON_CHANGED = 4,   /* poison_val changed */
    VB_CONFIG_FIRST_WRITE = 8,      /* the log was empty before this write */
    VB_CONFIG_REFUSED = 16          /* nothing taken: poison would change under keep_poison,
                                     * or the log is full */
};

vb_config *vb_config_new(void);
void vb_config_free(vb_config *c);
/* The one read of every field. */
void vb_config_get(vb_config *c, vb_config_values *out);
/* The whole space as the guest reads it: VB_CONFIG_SIZE le32 bytes. */
void vb_config_pack(vb_config *c, uint8_t *out);
/* The device's side: the target, and (restore, reset) actual and poison_val. */
void vb_config_set_num_pages(vb_config *c, uint32_t num_pages);
void vb_config_set_actual(vb_config *c, uint32_t actual);
void vb_config_set_poison(vb_config *c, uint32_t poison_val);
/* A guest write of bytes [offset, offset + len) of the space.  The rule:
 * only actual and poison_val are taken (QEMU forwards the whole struct, so
 * num_pages may be stale; free_page_hint_cmd_id is the device's).  Each
 * change of actual is logged with num_pages of that moment.  keep_poison: a
 * write that would change poison_val is refused (the reader thread leaves
 * it to the session, which logs it).  Returns VB_CONFIG_* bits, or -1 when
 * the write is outside the space (err says which values). */
int vb_config_guest_write(vb_config *c, uint32_t offset, const uint8_t *data, uint32_t len, int keep_poison,
                          char *err, size_t errlen);
/* Moves up to cap logged changes of actual out of the log, oldest first. */
uint32_t vb_config_take_writes(vb_config *c, vb_config_write *out, uint32_t cap);
/* The one definition of "at the target": the guest's count of its balloon
 * (actual, or what actual becomes once the buffers being served go back)
 * is num_pages. */
int vb_at_target(uint32_t num_pages, uint64_t pages);

/* CDEF-END */

#endif
