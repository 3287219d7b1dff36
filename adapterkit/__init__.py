"""adapterkit: fine-tune language models on one consumer GPU, with recipes that run end to end.

Entry points: the `adapterkit` CLI (`adapterkit.cli`), `adapterkit.config.load_recipe` and
`adapterkit.stages.run` (any stage; `adapterkit.stages.STAGES` lists them).
"""

import os

# PyTorch's CPU allocator puts tensors of 2 MB and more on transparent huge pages when this is set
# (read at its first large allocation). On CPU training it lowers the peak resident memory: measured
# with benchmarks/throughput.py at 100M parameters, 7,163-7,298 -> 5,553-5,568 MiB (QLoRA) and
# 6,432-6,705 -> 5,395 MiB (LoRA), at the same speed. Set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"


def _quiet_optional_backends() -> None:
    """Drop two start-up lines about optional backends that say nothing a user can act on (only those):

    - bitsandbytes, on a CPU with AVX512-BF16, tries to fetch a faster 4-bit matmul from the Hugging Face
      hub through the optional `kernels` package and, when that is not installed, warns on every start
      ("Failed to load CPU gemm_4bit_forward from kernels-community"). Its own 4-bit path runs instead,
      which is what adapterkit tests.
    - Liger-Kernel warns, the first time each op runs, that its CuTe DSL and Ascend backends "could not
      be imported"; its Triton backend, the one train.kernels=liger uses, runs instead."""
    import logging

    class _Drop(logging.Filter):
        def __init__(self, *needles: str) -> None:
            super().__init__()
            self.needles = needles

        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not all(needle in message for needle in self.needles)

    drops = [("bitsandbytes.backends.cpu.ops", _Drop("gemm_4bit_forward from kernels-community"))]
    for backend in ("_cutedsl", "_ascend"):
        drops.append(("liger_kernel.backends.registry", _Drop(f"liger_kernel.ops.backends.{backend}.",
                                                              "could not be imported")))
    for name, drop in drops:
        logging.getLogger(name).addFilter(drop)
        _DROPPED.append((name, drop))


_DROPPED: list = []


def show_library_noise() -> None:
    """Undo `_quiet_optional_backends` (`adapterkit --verbose`)."""
    import logging

    for name, drop in _DROPPED:
        logging.getLogger(name).removeFilter(drop)
    _DROPPED.clear()


_quiet_optional_backends()
