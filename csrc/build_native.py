"""cffi build script for vhostballoon._native (API mode, out of line).

setuptools runs it through ``cffi_modules`` in setup.py; running it directly
(``python csrc/build_native.py``) builds the module into the current
directory, which is handy when working on the C.

The cdef is the part of vb.h between the CDEF markers, so the C
declarations are written once.
"""

import os
import re

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
C_FILES = ["mem.c", "vring.c", "discard.c", "track.c", "serve.c", "persist.c", "front.c"]
HEADERS = ["vb.h", "vb_internal.h"]


def read_cdef(header_path: str) -> str:
    with open(header_path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"/\* CDEF-BEGIN \*/(.*?)/\* CDEF-END \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{header_path}: no CDEF-BEGIN/CDEF-END block")
    return match.group(1)


def _rel(path: str) -> str:
    # setuptools wants paths relative to the directory it runs in (the repo
    # root under pip); relpath also works when this script is run from
    # elsewhere.
    return os.path.relpath(path)


ffibuilder = cffi.FFI()
ffibuilder.cdef(read_cdef(os.path.join(HERE, "vb.h")))
ffibuilder.set_source(
    "vhostballoon._native",
    '#include "vb.h"',
    sources=[_rel(os.path.join(HERE, name)) for name in C_FILES],
    include_dirs=[_rel(HERE)],
    depends=[_rel(os.path.join(HERE, name)) for name in HEADERS],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
