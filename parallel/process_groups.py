"""Process groups for a second layout on the same ranks (the generation layout).

The training layout owns megatron-core's ``parallel_state`` (see :mod:`parallel.layout`).
The colocated rollout engine runs a second copy of the policy on the same processes in a
different layout (typically more TP or EP, no PP). megatron-core 0.19 modules take their
process groups from a ``ProcessGroupCollection`` handed to the model, so that copy gets
groups of its own, built here from the layout alone, while ``parallel_state`` keeps
describing the training layout.
"""

from __future__ import annotations

from typing import Any

from parallel.layout import Layout


def process_groups_for_layout(layout: Layout) -> Any:
    """A megatron ``ProcessGroupCollection`` for ``layout`` over the whole job.

    Collective: every rank must call it, in the same order as every other group
    creation. Ranks are ordered as megatron-core orders them (tp fastest, then cp, dp,
    pp; experts: expert-tp, ep, expert-dp, pp), so a layout equal to the training layout
    yields the same rank groups as ``parallel_state``.
    """
    from megatron.core.inference.shards import build_inference_pg_collection

    return build_inference_pg_collection(
        layout.world_size,
        tp_size=layout.tp,
        pp_size=layout.pp,
        cp_size=layout.cp,
        ep_size=layout.ep,
        expt_tp_size=layout.etp,
    )
