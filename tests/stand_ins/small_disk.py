"""A stand-in for a small disk, for the tests: the files under one folder share `capacity` bytes, and
a write that does not fit fails as on a full device, with OSError ENOSPC (os.write first writes what
fits, as the kernel does). Writes through open() and os.write are watched, which is how main.py
writes its files. sitecustomize.py beside it installs it in a Python process started with this
folder on PYTHONPATH and SMALL_DISK=FOLDER:BYTES."""
import builtins
import errno
import os
import stat


def install(folder, capacity):
    folder = os.path.abspath(folder)
    real_open, real_write = builtins.open, os.write

    def inside(path):
        path = os.path.abspath(os.fsdecode(path))
        return path == folder or path.startswith(folder + os.sep)

    def files():
        return [os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names]

    def used():
        total = 0
        for path in files():
            try:
                total += os.path.getsize(path)
            except FileNotFoundError:  # removed meanwhile
                pass
        return total

    def full():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class SmallDiskFile:
        """A file opened for writing under the folder: its writes fail once the disk is full."""

        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.flush()  # what it wrote before counts
            if memoryview(data).nbytes > capacity - used():
                raise full()
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            return self.file.__exit__(*exception)

    def small_disk_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(file):
            return SmallDiskFile(opened)
        return opened

    def small_disk_write(descriptor, data):
        status = os.fstat(descriptor)
        if stat.S_ISREG(status.st_mode) and any(os.path.samestat(status, os.stat(path)) for path in files()):
            fits = min(memoryview(data).nbytes, capacity - used())
            if fits <= 0:
                raise full()
            return real_write(descriptor, bytes(data)[:fits])
        return real_write(descriptor, data)

    builtins.open, os.write = small_disk_open, small_disk_write
