"""vhostballoon: a vhost-user virtio-balloon back-end that really frees guest memory."""

__version__ = "0.1.0"
