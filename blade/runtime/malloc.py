"""Which C allocator serves this process, and how to make it hand freed memory back to the OS.

On the CPU every tensor is a malloc. glibc serves the large ones (a flattened gradient bucket, an fp32
copy of a partition) from fresh mmap pages each step, and the page faults cost DeepSpeed's ZeRO
optimizers, which allocate such buffers every step, far more than a DDP loop that reuses its buckets.
tcmalloc keeps and reuses them, so launch/malloc.sh preloads it for CPU runs (docs/deepspeed_cpu.md,
"The CPU allocator").

The bench's CPU memory probe reads the process RSS, which only follows the live tensors if the
allocator returns what is freed: `return_freed_memory()` asks glibc or tcmalloc to do so.
"""
from __future__ import annotations

import ctypes
import functools

KNOWN = {"libtcmalloc": "tcmalloc", "libjemalloc": "jemalloc"}


@functools.lru_cache(maxsize=1)
def active_allocator() -> str:
    """"tcmalloc" or "jemalloc" when one is loaded into this process (LD_PRELOAD), else "glibc"."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "glibc"
    return next((name for lib, name in KNOWN.items() if lib in maps), "glibc")


def _tcmalloc():
    return ctypes.CDLL(None)  # the preloaded library's symbols are in the global namespace


def return_freed_memory() -> bool:
    """From now on, freed memory leaves the RSS: glibc serves every allocation over 64 KiB by mmap and
    trims its heap; tcmalloc decommits freed pages at once. False for an allocator it cannot steer."""
    allocator = active_allocator()
    try:
        if allocator == "glibc":
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD (also disables the dynamic threshold)
            libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        elif allocator == "tcmalloc":
            if not _tcmalloc().MallocExtension_SetNumericProperty(b"tcmalloc.aggressive_memory_decommit",
                                                                  ctypes.c_size_t(1)):
                return False  # a tcmalloc without the property
        else:
            return False
    except (OSError, AttributeError):
        return False
    trim()
    return True


def trim() -> None:
    """Give the memory the allocator holds free back to the OS now."""
    try:
        allocator = active_allocator()
        if allocator == "glibc":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        elif allocator == "tcmalloc":
            _tcmalloc().MallocExtension_ReleaseFreeMemory()
    except (OSError, AttributeError):
        pass
