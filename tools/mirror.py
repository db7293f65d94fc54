"""Write the mirrored files of the training folders from wrn/: every file but models.py, byte for byte.

    python tools/mirror.py          # after editing a file of wrn/ other than models.py

wrn/ is the source; each other folder of common.FOLDERS (wrn_mobi/) holds the same files, but its
own models.py, which says which pair it trains. A file of wrn/ is copied over its twin where they
differ, and a file only in the copy is removed. What runs write into a folder (IGNORED_DIRS) is
left alone. tests/test_mirror.py fails until the copies are written.
"""
import shutil

from common import FOLDERS, ROOT

SOURCE, OWN_FILE = FOLDERS[0], "models.py"
IGNORED_DIRS = {"__pycache__", "logs", "data"}  # bytecode, and the default --save and --dataroot


def folder_files(folder):
    """The files of a training folder, as paths relative to it, without IGNORED_DIRS."""
    base = ROOT / folder
    return {path.relative_to(base).as_posix() for path in base.rglob("*")
            if path.is_file() and not IGNORED_DIRS.intersection(path.relative_to(base).parts)}


def mirror(copy):
    """Make `copy` hold wrn/'s files but models.py; returns (the files written, the files removed)."""
    source, target = folder_files(SOURCE) - {OWN_FILE}, folder_files(copy) - {OWN_FILE}
    written = sorted(name for name in source if name not in target
                     or (ROOT / SOURCE / name).read_bytes() != (ROOT / copy / name).read_bytes())
    for name in written:
        (ROOT / copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / SOURCE / name, ROOT / copy / name)
    removed = sorted(target - source)
    for name in removed:
        (ROOT / copy / name).unlink()
    return written, removed


def main():
    for copy in FOLDERS[1:]:
        written, removed = mirror(copy)
        print(f"{copy}/: " + ("; ".join(filter(None, [written and f"wrote {', '.join(written)}",
                                                      removed and f"removed {', '.join(removed)}"])) or "up to date"))


if __name__ == "__main__":
    main()
