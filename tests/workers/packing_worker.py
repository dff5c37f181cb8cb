"""Worker for tests/test_packing.py: packed forward/backward == padded forward/backward.

For each tiny model, at the TP size of the job (TP = world size; DeepSeek-V3 with TP > 1
runs sequence parallel, so the packed length is padded to a multiple of TP), two
microbatches of rows with different valid lengths run through megatron-core's schedule
twice: padded ``[b, s]`` and packed ``[1, T]`` (THD, :mod:`r1mega.training.packing`).
The loss is the sum of the response tokens' log-probabilities. Compared: per-token
log-probabilities of the response tokens, and the finalized gradients (``main_grad``
after ``finalize_model_grads``: DP/TP reductions, sequence-parallel norm sums). The
worst differences over all ranks go to ``result.json``.

Module buffers (the MoE router's expert bias and token counts, which the aux-loss-free
balancing updates after each backward) are restored between the two runs so that both
start from the same state.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.layout import detect_distributed_env
from r1mega.training.logprobs import vocab_parallel_logprobs
from r1mega.training.packing import pack_microbatch, packed_rl_forward, unpack_tokens
from r1mega.training.policy import Policy, build_policy
from r1mega.training.schedule import forward_backward
from tests.workers.common import setup_layout

SEQ = 16
# (prompt length, valid length) per row; rows are right-padded to SEQ.
ROWS = [[(4, 16), (3, 9), (5, 6), (2, 13)], [(6, 11), (4, 16), (3, 7), (5, 5)]]


def padded_microbatches(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded microbatches with ``lengths``; padding holds random junk tokens,
    which must not matter."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for rows in ROWS:
        b = len(rows)
        tokens = torch.randint(0, vocab, (b, SEQ + 1), generator=gen)
        loss_mask = torch.zeros(b, SEQ)
        for i, (prompt, length) in enumerate(rows):
            loss_mask[i, prompt - 1:length] = 1.0
        out.append({
            "tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(b, SEQ).contiguous(),
            "advantages": torch.randn(b, generator=gen),
            "lengths": torch.tensor([length for _, length in rows]),
        })
    return out


def logprob_sum_loss(sink: list[torch.Tensor], batch: dict[str, torch.Tensor],
                     logits: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the response tokens' log-probabilities; records them (padded layout)."""
    logp = vocab_parallel_logprobs(logits, batch["labels"])
    mask = batch["loss_mask"]
    sink.append((unpack_tokens(logp, batch) if "cu_seqlens" in batch else logp).detach())
    return (logp * mask).sum(), mask.sum().to(torch.int), {}


def run(policy: Policy, microbatches: list[dict[str, torch.Tensor]],
        buffers: dict[str, torch.Tensor], forward_only: bool = False
        ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One forward(/backward) from the saved buffer state; (logprobs, finalized grads)."""
    module = policy.chunks[0].module
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name])
    policy.zero_grad()
    sink: list[torch.Tensor] = []
    forward_backward(policy, microbatches, partial(logprob_sum_loss, sink),
                     forward_only=forward_only, model_forward=packed_rl_forward)
    grads = {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}
    return sink, grads


def compare(model_name: str, tp: int) -> dict[str, Any]:
    _, model_cfg, layout_cfg, layout = setup_layout(model_name, tp, 1, 1)
    policy = build_policy(model_cfg, layout_cfg)
    module = policy.chunks[0].module
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    padded = padded_microbatches(model_cfg.vocab_size)
    # 8: pads the packed length (not a multiple of 8 here) with a dummy segment, and is a
    # multiple of TP as sequence parallelism requires.
    packed = [pack_microbatch(mb, pad_to_multiple=8) for mb in padded]
    logp_padded, grads_padded = run(policy, padded, buffers)
    logp_packed, grads_packed = run(policy, packed, buffers)
    # Control: the same packed tokens as one sequence (no segment boundaries), so that
    # attention crosses rows and rotary positions run on; must differ from the padded run.
    unsegmented = [{**mb, "cu_seqlens": torch.tensor([0, mb["tokens"].shape[1]],
                                                     dtype=torch.int32),
                    "max_seqlen": torch.tensor(mb["tokens"].shape[1])} for mb in packed]
    logp_unsegmented, _ = run(policy, unsegmented, buffers, forward_only=True)

    def max_diff(logps: list[torch.Tensor]) -> float:
        return max(((a - b) * mb["loss_mask"]).abs().max().item()
                   for a, b, mb in zip(logp_padded, logps, padded, strict=True))

    logp_diff, control_diff = max_diff(logp_packed), max_diff(logp_unsegmented)
    grad_diff, grad_rel, worst = 0.0, 0.0, ""
    for name, g in grads_padded.items():
        diff = (grads_packed[name] - g).abs().max().item()
        rel = diff / max(g.abs().max().item(), 1e-12)
        if diff > grad_diff:
            grad_diff, worst = diff, name
        grad_rel = max(grad_rel, rel)
    totals = torch.tensor([logp_diff, grad_diff, grad_rel, -control_diff])
    dist.all_reduce(totals, op=dist.ReduceOp.MAX)
    return {"logp_max_abs_diff": totals[0].item(), "grad_max_abs_diff": totals[1].item(),
            "grad_max_rel_diff": totals[2].item(), "control_logp_min_diff": -totals[3].item(),
            "worst_param": worst,
            "num_params": len(grads_padded), "layout": layout.describe(),
            "packed_lengths": [int(mb["tokens"].shape[1]) for mb in packed]}


def main(workdir: str, *models: str) -> None:
    tp = detect_distributed_env().world_size  # the whole job is one TP group
    results = {model_name: compare(model_name, tp) for model_name in models}
    if dist.get_rank() == 0:
        (Path(workdir) / "result.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
