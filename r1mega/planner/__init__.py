"""Layout planner: per-GPU memory and step time of a config's training and generation
layouts, from parameter counts and stated hardware figures (`r1mega plan`).

:mod:`r1mega.planner.params` counts parameters per component, :mod:`.estimate` turns
them and the layouts into bytes per GPU and seconds per step (formulas in its docstring),
:mod:`.hardware` holds every hardware figure and efficiency assumption, :mod:`.report`
prints the plan and refuses layouts that exceed the GPU memory.
"""

from r1mega.planner.report import add_plan_arguments, format_plan, run_plan

__all__ = ["add_plan_arguments", "format_plan", "run_plan"]
