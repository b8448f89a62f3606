"""What the model guest's driver raises."""


class DriverError(RuntimeError):
    """The model guest could not do what it was asked."""


class DeviceTimeout(DriverError):
    """The device did not return a buffer in time."""
