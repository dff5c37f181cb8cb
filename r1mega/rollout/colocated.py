"""The colocated rollout: the policy generates on the ranks it trains on, in its own layout.

Per RL step, on every rank of the job:

1. memory handover to generation (gradients and optimizer state out, generation weights
   in; :mod:`r1mega.rollout.handover`);
2. resharding: the training-layout weights are copied into the generation-layout model
   (:class:`parallel.resharding.WeightResharder`, megatron-core's refit);
3. generation: each data-parallel replica of the generation layout decodes its share of
   the rows with the engine (:mod:`r1mega.rollout.engine`, megatron-core's dynamic
   inference engine: its KV memory is resumed, emptied (the weights just changed) and
   suspended again afterwards), and the samples are gathered so every rank holds all of
   them;
4. memory handover back to training.

The generation layout is chosen for decoding: typically more tensor or expert parallelism
than training and no pipeline parallelism, so a token passes through the whole model on
one group of ranks instead of waiting on pipeline bubbles.

A growing generation budget (a response-length schedule) needs nothing from the caller:
:meth:`ColocatedRollout.generate` passes each request's ``max_new_tokens`` and the engine
re-sizes its context when a longer sequence arrives (:meth:`RolloutEngine.reserve`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from parallel.layout import Layout
from parallel.process_groups import process_groups_for_layout
from parallel.resharding import WeightResharder
from r1mega.models import build_generation_model
from r1mega.monitoring.progress import progress_bar
from r1mega.rollout.engine import EngineSettings, RolloutEngine
from r1mega.rollout.handover import MemoryHandover
from r1mega.rollout.types import GenerationRequest, Sample, SamplingParams


def split_rows(count: int, parts: int, index: int) -> slice:
    """Contiguous share ``index`` of ``count`` rows over ``parts`` (sizes differ by <= 1)."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def generation_layout_for(cfg: Any, world_size: int) -> Any:
    """``cfg`` with a generation layout that tiles ``world_size``: the configured one when
    it does, else plain data parallelism (evaluation and ad-hoc generation often run on
    fewer processes than training)."""
    from omegaconf import OmegaConf

    try:
        Layout.from_config(cfg.generation_layout, world_size, name="generation_layout")
        return cfg
    except ValueError:
        if dist.is_initialized() and dist.get_rank() == 0:
            print(f"[r1mega] generation_layout does not tile {world_size} process(es); "
                  "generating with tp=ep=1", flush=True)
        plain = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "cp": 1, "sequence_parallel": False}
        return OmegaConf.merge(cfg, {"generation_layout": plain})


class ColocatedRollout:
    """Reshard-then-generate on the training ranks (collective over the job)."""

    def __init__(self, cfg: Any, policy: Any, optimizer: Any | None) -> None:
        self.layout = Layout.from_config(cfg.generation_layout, dist.get_world_size(),
                                         name="generation_layout")
        self.groups = process_groups_for_layout(self.layout)
        self.model = build_generation_model(cfg.model, self.layout, self.groups, cfg.precision,
                                            record_routing=cfg.rollout.routing_replay,
                                            cuda_graphs=cfg.rollout.cuda_graphs)
        self.resharder = WeightResharder(policy.chunks, self.model,
                                         backend=cfg.rollout.refit_backend)
        moe = cfg.model.num_experts is not None
        self.engine = RolloutEngine(
            self.model, self.groups, EngineSettings.from_config(cfg.rollout),
            # Expert-parallel groups can span data-parallel replicas: with MoE every rank
            # steps together; a dense model's TP ranks already share their requests.
            lockstep_group=None if moe else self.groups.tp)
        self.handover = MemoryHandover(
            policy, optimizer, self.model,
            offload_training_state=cfg.rollout.offload_training_state and optimizer is not None,
            release_generation_weights=cfg.rollout.release_generation_weights,
            kv_cache_bytes=self.engine.resident_kv_bytes)
        self.metrics: dict[str, float] = {}

    def describe(self) -> str:
        return f"generation layout {self.layout.describe()}"

    def held_metrics(self, phase: str) -> dict[str, float]:
        return self.handover.held_metrics(phase)

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams,
                 seeds: Sequence[int], stop: Sequence[str],
                 decode: Callable[[list[int]], str] | None) -> list[Sample]:
        """One sample per prompt (every rank passes all rows and gets all samples)."""
        dp_rank, dp_size = self.groups.dp.rank(), self.groups.dp.size()
        mine = split_rows(len(prompts), dp_size, dp_rank)
        requests = [GenerationRequest(list(p), params, s)
                    for p, s in zip(prompts[mine], seeds[mine], strict=True)]
        with self.handover.generation():
            reshard_s = self.resharder.reshard()
            start = time.perf_counter()
            try:
                with progress_bar(len(requests), "generate", unit="resp") as bar:
                    local = self.engine.generate(requests, stop, decode,
                                                 on_finish=lambda: bar.update(1))
                generate_s = time.perf_counter() - start
                held = self.handover.held_metrics("generation")
            finally:
                self.engine.suspend()  # the KV memory goes back before training resumes
        gathered: list[Any] = [None] * dp_size
        dist.all_gather_object(gathered, local, group=self.groups.dp)
        samples = [s for part in gathered for s in part]
        self.metrics = {
            "time/reshard": reshard_s, "time/generate": generate_s,
            **self.engine.stats.as_metrics(),
            **self.resharder.traffic.as_metrics(),
            **held,
        }
        return samples
