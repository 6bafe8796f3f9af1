"""cbir: content-based image retrieval for biomedical images."""

import os

# PyTorch's CPU allocator asks the kernel for 2 MiB pages for its buffers of 2 MiB and more when this is set. Where
# transparent huge pages are "madvise" (only for memory that asks), every activation buffer is otherwise faulted in
# 4 KiB at a time: a training step of EfficientNet-Lite0 on 2 cores took 3.6 s instead of 2.4
# (benchmarks/huge_pages.py, 2026-12-03). torch reads it at its first allocation, so it is set before; THP_MEM_ALLOC_ENABLE=0
# in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
