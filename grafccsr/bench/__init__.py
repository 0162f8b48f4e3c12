"""Speed and memory benchmark of the training step (``python -m grafccsr.bench``).

For every row of a grid (a list of Hydra overrides) it builds the models and a
:class:`~grafccsr.training.step.GanStep` exactly as the training loop does, feeds
it a synthetic batch of the right shapes (no dataset needed) and measures

* time of the D step, the G step and the whole iteration: the median of
  ``--repeats`` iterations after ``--warmup`` iterations (``torch.cuda.synchronize``
  around every phase on CUDA; ``check_finite=True`` as in the loop);
* peak memory per phase in one more, untimed iteration (so tracking overhead
  never pollutes a timing): on CUDA ``max_memory_allocated`` / ``max_memory_reserved``
  with the peak counters reset per phase; everywhere the live tensor bytes of
  :class:`~grafccsr.measure.PhaseMemory` (rounded to 512 B like CUDA);
* rays/s and radiance-field points/s (2 x batch x rays per patch per iteration:
  the D step's fakes and the G step's fakes; a hierarchical pass evaluates its coarse
  samples twice);
* FLOPs of one more untimed iteration (torch's FlopCounterMode: matmuls and convolutions
  only, see :mod:`~grafccsr.bench.flops`) and their ratio to the reference's, so that a
  speed-up reads as less arithmetic or as faster execution;
* ratios against the grid's first row, the reference (the original graf_ccsr
  preset), measured in the same process on the same device.

Results: a printed table, ``bench.csv`` and ``bench.json`` in ``--out``, and with
``--mlflow`` a parent MLflow run with one child run per row (mlflow is imported
only then). The code path is the same on CPU and CUDA apart from synchronisation
and the CUDA memory statistics.

Split by job: :mod:`~grafccsr.bench.grids` (what to measure), :mod:`~grafccsr.bench.runner`
(measuring) and :mod:`~grafccsr.bench.report` (table, CSV/JSON, MLflow); the command line is
:mod:`grafccsr.cli.bench`; :mod:`~grafccsr.bench.flops` counts FLOPs (also alone, under
FakeTensorMode: ``python -m grafccsr.bench.flops [overrides]``).
"""
