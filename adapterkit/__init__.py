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
