"""Python imports this module at startup from PYTHONPATH: with SMALL_DISK=FOLDER:BYTES in the
environment, FOLDER lies on a disk of BYTES bytes in this process (small_disk.py)."""
import os

if os.environ.get("SMALL_DISK"):
    import small_disk

    folder, capacity = os.environ["SMALL_DISK"].rsplit(":", 1)
    small_disk.install(folder, int(capacity))
