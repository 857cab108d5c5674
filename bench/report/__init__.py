"""`bench report DIR [out=DIR]`: Markdown + CSV tables and PNG plots for one run or a whole sweep.

Reads run directories only (through bench/rundir.py) plus a sweep's index, and never imports torch, so it runs
on a login node or a laptop, on sweeps still running. What DIR may be, unfinished runs, the outputs and the
submodules: docs/architecture.md, "Report"."""
