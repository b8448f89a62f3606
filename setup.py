# The native extension (csrc/) is built by cffi in API mode, out of line, at
# install time: setuptools runs csrc/build_native.py's ffibuilder. Nothing is
# compiled at import time.
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
