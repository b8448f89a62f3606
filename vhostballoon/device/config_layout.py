"""Where the fields of the balloon's config space lie (virtio 1.2, 5.5.4;
``struct virtio_balloon_config`` in linux/include/uapi/linux/virtio_balloon.h):
four le32 fields, 16 bytes.

The one home of these numbers: ``config.py`` builds its layout from them and
checks it, and the C runtime gets them through the header generated at
build time (``csrc/build_native.py``, which loads this file by path, so:
standard library only).
"""

NUM_PAGES_OFFSET = 0  # written by the device: pages the guest should give
ACTUAL_OFFSET = 4  # written by the driver: pages in the balloon now
FREE_PAGE_HINT_CMD_ID_OFFSET = 8  # FREE_PAGE_HINT only
POISON_OFFSET = 12  # PAGE_POISON only: the guest's poison pattern
CONFIG_SIZE = 16  # QEMU's config_size must equal it
