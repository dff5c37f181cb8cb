"""Parallel layouts, process groups, resharding and the CPU platform layer."""
