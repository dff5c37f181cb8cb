"""MoE routing replay: the training forward sends every token to the experts the rollout
engine sent it to.

A token's top-k experts can differ between the rollout engine and the trainer even with
identical weights (different kernels, batch shapes or precision tip a near-tie), and a
flipped expert changes that token's log-probability far more than rounding does. With
``rollout.routing_replay`` the engine records the experts per token
(:attr:`r1mega.rollout.types.Sample.routing`) and the training forward replays them:
each router still computes its scores (and therefore its gradients and the combine
weights) from the current weights, but takes the top-k *indices* from the record
(megatron-core's ``RouterReplay`` ``REPLAY_FORWARD`` action, set per router here rather
than through megatron's process-wide list, which the generation model's routers use).

Routing tensors are laid out like the microbatch tokens: ``[b, s, moe_layers, topk]``
for padded microbatches, ``[1, T, moe_layers, topk]`` packed. Each router takes its MoE
layer's column, in the order its input arrives (sequence-major, this rank's slice of the
sequence under sequence parallelism). Context parallelism and activation recompute are
not supported (the configuration check refuses them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch


def moe_layer_numbers(config: Any) -> list[int]:
    """Global 1-based numbers of the decoder's MoE layers, in order (the routing record's
    layer axis)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        pattern = [int(i % freq == 0) for i in range(config.num_layers)]
    else:
        pattern = list(freq)
    return [i + 1 for i, is_moe in enumerate(pattern) if is_moe]


def _replay_of(target: torch.Tensor) -> Any:
    """A megatron ``RouterReplay`` that replays ``target`` ``[tokens, topk]`` and is not
    added to megatron's process-wide instance list."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    replay = RouterReplay.__new__(RouterReplay)
    replay.recorded_topk_idx = None
    replay.replay_backward_list = []
    replay.static_buffer = None
    replay.layer_number = None
    replay.target_topk_idx = target
    replay.router_replay_action = RouterReplayAction.REPLAY_FORWARD
    return replay


def _router_rows(routing: torch.Tensor, column: int, config: Any, tp_rank: int,
                 tp_size: int) -> torch.Tensor:
    """``[tokens, topk]`` targets of one MoE layer in its router's input order."""
    layer = routing[:, :, column, :]  # [b, s, topk]
    b, s, topk = layer.shape
    if config.sequence_parallel and tp_size > 1:
        chunk = s // tp_size
        layer = layer[:, tp_rank * chunk:(tp_rank + 1) * chunk]
    return layer.transpose(0, 1).reshape(-1, topk).long()


@contextlib.contextmanager
def replayed_routing(model: torch.nn.Module, routing: torch.Tensor) -> Iterator[None]:
    """Within the block, every decoder MoE router of ``model`` (one pipeline stage) routes
    by ``routing`` (``[b, s, moe_layers, topk]``)."""
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.utils import unwrap_model

    bare = unwrap_model(model)
    config = bare.config
    if config.context_parallel_size > 1:
        raise NotImplementedError("routing replay does not support context parallelism")
    numbers = moe_layer_numbers(config)
    if routing.shape[2] != len(numbers):
        raise ValueError(f"routing record has {routing.shape[2]} MoE layers, the model "
                         f"{len(numbers)}")
    tp = bare.pg_collection.tp if getattr(bare, "pg_collection", None) is not None else None
    tp_rank, tp_size = (tp.rank(), tp.size()) if tp is not None else (0, 1)
    # Decoder routers only: multi-token-prediction layers number their layers from 1
    # again, and the rollout never runs them.
    routers = [m for m in bare.decoder.modules() if isinstance(m, TopKRouter)]
    saved = [r.router_replay for r in routers]
    try:
        for router in routers:
            rows = _router_rows(routing, numbers.index(router.layer_number), config,
                                tp_rank, tp_size)
            router.router_replay = _replay_of(rows.to(next(bare.parameters()).device))
        yield
    finally:
        for router, previous in zip(routers, saved, strict=True):
            router.router_replay = previous


def with_routing_replay(model_forward: Callable[[torch.nn.Module, dict[str, Any]], Any]
                        ) -> Callable[[torch.nn.Module, dict[str, Any]], Any]:
    """A ``model_forward`` that replays ``batch["routing"]`` when the batch carries one."""

    def forward(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
        routing = batch.get("routing")
        if routing is None:
            return model_forward(model, batch)
        with replayed_routing(model, routing):
            return model_forward(model, batch)

    return forward
