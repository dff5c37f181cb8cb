"""Performance arithmetic: model FLOPs and MFU, device peak figures, decode rooflines.

Pure functions of the model config and measured times, shared by the benchmarks
(``bench/``) and unit-tested against hand calculations.
"""
