"""The memory guide's expected-savings table, measured.

One training run for the baseline (``+exp=baseline_fp32``: every memory item off, FP32), the
baseline again (its change is the noise floor), one run per guide item switched on by
itself, the items together (``+exp=seed_all``) and the three things the guide lists as
missing (gradient accumulation, gradient checkpointing, render chunking); then the guide's
claimed saving next to the measured change of every item.

Modules, each importing only those before it:

* :mod:`analysis.ablation.items` — the items with the guide's claims, the presets, the
  training command of a row;
* :mod:`analysis.ablation.table` — runs -> the measured-vs-claimed table, its Markdown and
  the findings (read by :mod:`analysis.report`);
* :mod:`analysis.ablation.launch` — runs the rows and then writes the report
  (``python -m analysis.ablation``).

Memory measured: on CUDA the allocator's peak allocated and peak reserved memory; on every
device the peak of live tensor bytes (sampled iterations of the D and G steps). On a CPU only
the latter exists, and items that only act on CUDA (pinned memory, non-blocking copies,
``empty_cache``, moving eval samples off the GPU) cannot change it.
"""
