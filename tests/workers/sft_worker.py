"""Worker for tests/test_sft.py (2 ranks): the SFT loss, packing, memorization.

In one torchrun job, two layouts in turn:

1. the tiny DeepSeek-V3 (MLA, MoE with shared expert, MTP) at TP=1 PP=2, the cold-start
   layout of ``configs/sft_tiny_cpu.yaml``;
2. the tiny dense Qwen2 at TP=2, the student layout of ``configs/distill_tiny_cpu.yaml``;

and the packing check alone at DP=2 (DeepSeek-V3 with EP=2; Qwen2 with one rank padded
by an empty packed sequence), and context parallelism (CP=2 against DP=2, padded rows).

For each, **packing** first: one global batch as padded microbatches and as THD-packed
sequences, from the same weights and buffers; the losses, token counts and every
finalized gradient (``main_grad``) compared. Then **memorization**: 4 fixed random-token
rows, ``MEMO_STEPS`` optimizer steps of :func:`r1mega.sft.step.sft_step` with megatron's
distributed optimizer, the per-step losses reported. Then the **masked loss** on those
rows: the SFT loss (:func:`r1mega.sft.step.sft_loss`: megatron's per-token cross-entropy
from ``labels``, the response loss mask, megatron's global token normalisation) against a
plain-PyTorch recomputation from the model's full logits (gathered over TP):
cross-entropy by hand over each row's response positions, found from its prompt and
response lengths, compared as means and token by token (the masked per-token losses
that ``lm_loss`` sums). It runs after memorization because a trained model predicts the
response tokens and not the random prompt tokens, so a wrong mask (all tokens, off by
one) would change the loss by a lot; at random initialisation every token costs about
ln(vocab) and such mistakes would hide.

MTP's loss is normalised per microbatch by megatron-core (the tokens its one-token shift
keeps in that microbatch), which depends on which rows share a microbatch; for the MTP
model the rows are therefore chosen so that padding (2 rows per microbatch) and first-fit
packing group them alike. The dense model has no such term and uses rows whose padded
and packed groupings differ. Results (worst values over ranks) go to ``result.json``.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from r1mega.config.schema import TrainConfig
from r1mega.sft.batching import StepBatch, packed_step_batch, padded_step_batch
from r1mega.sft.data import SFTExample
from r1mega.sft.step import sft_forward, sft_loss, sft_step
from r1mega.training.optim import build_lr_scheduler, build_optimizer
from r1mega.training.packing import packed_rl_forward
from r1mega.training.policy import Policy, build_policy
from r1mega.training.schedule import forward_backward, lm_loss
from tests.workers.common import setup_layout

PAD, EOS = 0, 255
MEMO_STEPS = 30
# (prompt tokens, response tokens incl. EOS) per row; inputs = sum - 1.
# MTP model: inputs 30, 10, 28, 12 -> padded pairs (0,1), (2,3); packing into 40 tokens
# (first fit decreasing) puts 0 with 1 and 2 with 3 as well.
MTP_ROWS = [(12, 19), (5, 6), (20, 9), (4, 9)]
# Dense model: any grouping; 3 padded microbatches of 2 vs 4 packed sequences of <= 40.
DENSE_ROWS = [(9, 15), (3, 7), (11, 7), (6, 25), (2, 4), (7, 6)]
# DP=2: rank 0's rows fill one packed sequence of 40, rank 1's two, so rank 0 also runs
# an empty one (no loss tokens) to keep the microbatch count equal.
DP_ROWS = [(3, 3), (2, 4), (4, 2), (3, 3), (10, 12), (9, 10), (8, 12), (12, 9)]
MEMO_ROWS = [(6, 10), (8, 9), (5, 12), (7, 8)]
CAPACITY = 40


def random_rows(shape: list[tuple[int, int]], seed: int) -> list[SFTExample]:
    """Rows of random tokens (never PAD or EOS) ending in EOS."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, response in shape:
        ids = torch.randint(1, EOS, (prompt + response - 1,), generator=gen).tolist()
        rows.append(SFTExample(tuple(ids[:prompt]), (*ids[prompt:], EOS)))
    return rows


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _full_logits(logits: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[b, s, V/tp]`` gathered to ``[b, s, V]``."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _record_logits(sink: list[torch.Tensor], batch: dict[str, torch.Tensor],
                   logits: torch.Tensor):
    sink.append(_full_logits(logits.detach()).double())
    return logits.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}


def reference_losses(policy: Policy, rows: list[SFTExample], batch: StepBatch
                     ) -> tuple[torch.Tensor, dict[str, float]] | None:
    """By hand from full logits: the per-token cross-entropy at each row's response
    positions (0 elsewhere, ``[rows, width]``), and its mean over response tokens
    (``response``), all tokens (``all``) and the response positions one token earlier
    (``early``: an off-by-one mask); None off the last pipeline stage."""
    from megatron.core import parallel_state as ps

    sink: list[torch.Tensor] = []
    with torch.no_grad():
        forward_backward(policy, batch.microbatches, partial(_record_logits, sink),
                         forward_only=True, model_forward=packed_rl_forward)
    if not ps.is_pipeline_last_stage():
        return None
    logits = torch.cat(sink)  # [rows, width, V], rows in order (DP = 1)
    per_token = torch.zeros(logits.shape[:2], dtype=torch.float64)
    terms: dict[str, list[torch.Tensor]] = {"response": [], "all": [], "early": []}
    for i, row in enumerate(rows):
        ids = row.ids
        first = len(row.prompt_ids) - 1  # the position that predicts the first response token
        logp = torch.log_softmax(logits[i], dim=-1)
        for p in range(len(ids) - 1):  # input position p predicts ids[p + 1]
            nll = -logp[p, ids[p + 1]]
            terms["all"].append(nll)
            if p >= first:
                terms["response"].append(nll)
                per_token[i, p] = nll
            if first - 1 <= p < len(ids) - 2:
                terms["early"].append(nll)
    assert len(terms["response"]) == sum(len(r.response_ids) for r in rows)
    return per_token, {key: torch.stack(values).mean().item() for key, values in terms.items()}


def _recording_lm_loss(sink: list[torch.Tensor], batch: dict[str, torch.Tensor],
                       output: torch.Tensor):
    """``lm_loss``, keeping the masked per-token losses it sums."""
    sink.append((output.detach() * batch["loss_mask"]).double())
    return lm_loss(batch, output)


def check_masked_loss(policy: Policy, rows: list[SFTExample]) -> dict[str, Any]:
    """The SFT loss (mean, and per token under the mask) against the by-hand reference;
    ``control_gap``: how far the all-token and off-by-one means are from the reference."""
    batch = padded_step_batch(rows, 0, 1, micro_batch_size=2, pad_id=PAD)
    loss, tokens = sft_loss(policy, batch.microbatches, forward_only=True)
    masked: list[torch.Tensor] = []
    with torch.no_grad():
        forward_backward(policy, batch.microbatches, partial(_recording_lm_loss, masked),
                         forward_only=True, model_forward=sft_forward)
    ref = reference_losses(policy, rows, batch)
    means = None
    if ref is None:
        diff, token_diff, gap = -1.0, -1.0, -1.0
    else:
        per_token, means = ref
        diff = abs(loss - means["response"])
        token_diff = (torch.cat(masked) - per_token).abs().max().item()
        gap = min(abs(means[k] - means["response"]) for k in ("all", "early"))
    diff, token_diff, gap = _max_over_ranks([diff, token_diff, gap])
    return {"loss": loss, "tokens": tokens, "abs_diff": diff, "per_token_max_diff": token_diff,
            "control_gap": gap, "reference": means,
            "expected_tokens": sum(len(r.response_ids) for r in rows)}


def _loss_and_grads(policy: Policy, batch: StepBatch, buffers: dict[str, torch.Tensor]
                    ) -> tuple[float, int, dict[str, torch.Tensor]]:
    module = policy.chunks[0].module
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name])
    policy.zero_grad()
    loss, tokens = sft_loss(policy, batch.microbatches)
    return loss, tokens, {n: p.main_grad.detach().clone()
                          for n, p in module.named_parameters()}


def check_packing(policy: Policy, rows: list[SFTExample]) -> dict[str, Any]:
    from megatron.core import parallel_state as ps

    module = policy.chunks[0].module
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    padded = padded_step_batch(rows, *dp, micro_batch_size=2, pad_id=PAD)
    packed = packed_step_batch(rows, *dp, capacity=CAPACITY, pad_id=PAD)
    loss_a, tokens_a, grads_a = _loss_and_grads(policy, padded, buffers)
    loss_b, tokens_b, grads_b = _loss_and_grads(policy, packed, buffers)
    grad_rel = max((grads_b[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                   for n, g in grads_a.items())
    nonzero = sum(int(g.abs().max().item() > 0) for g in grads_a.values())
    loss_diff, grad_rel = _max_over_ranks([abs(loss_a - loss_b), grad_rel])
    counts = torch.tensor([len(packed.microbatches), int(sum(
        mb["loss_mask"].sum() == 0 for mb in packed.microbatches))])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return {"loss_padded": loss_a, "loss_packed": loss_b, "loss_abs_diff": loss_diff,
            "tokens": [tokens_a, tokens_b], "grad_max_rel_diff": grad_rel,
            "params_with_grad": nonzero, "num_params": len(grads_a),
            "microbatches": [len(padded.microbatches), len(packed.microbatches)],
            "max_empty_packed": int(counts[1]),
            "computed_tokens": [padded.computed_tokens, packed.computed_tokens]}


def check_context_parallel(name: str, rows: list[SFTExample], workdir: Path
                           ) -> dict[str, Any]:
    """The padded SFT loss and finalized gradients at CP=2 (every row split over the two
    ranks, attention gathering keys and values) against DP=2 from the same weights; one
    row per microbatch in both.

    The MTP head runs (its rolls cross CP ranks) but adds no loss: megatron-core 0.19.2
    normalises the MTP loss by each CP rank's own token counts (``process_mtp_loss``:
    ``original_num_tokens / num_tokens`` of the local half), so under CP its weighting
    differs from the whole sequence's by design, by up to a few per cent on these short
    rows."""
    from megatron.core import parallel_state as ps

    from parallel.layout import Layout, initialize_layout
    from parallel.platform import manual_seed
    from r1mega.checkpointing.model_io import load_model, save_model

    out: dict[str, Any] = {}
    for cp in (1, 2):
        _, model_cfg, layout_cfg, _ = setup_layout(name, 1, 1, 1)
        layout_cfg.cp = cp
        if model_cfg.mtp_num_layers:
            model_cfg.mtp_loss_scaling_factor = 0.0
        layout = Layout.from_config(layout_cfg, dist.get_world_size())
        initialize_layout(layout)
        manual_seed(1234)
        policy = build_policy(model_cfg, layout_cfg, use_distributed_optimizer=False)
        weights = str(workdir / f"cp_weights_{name}")
        if cp == 1:
            save_model(policy.chunks, weights)
        else:
            load_model(policy.chunks, weights)
        dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        batch = padded_step_batch(rows, *dp, micro_batch_size=1, pad_id=PAD, pad_multiple=4)
        policy.zero_grad()
        loss, tokens = sft_loss(policy, batch.microbatches)
        grads = {n: p.main_grad.detach().clone()
                 for n, p in policy.chunks[0].module.named_parameters()}
        out[cp] = (loss, tokens, grads, layout.describe())
    (loss_a, tokens_a, grads_a, _), (loss_b, tokens_b, grads_b, described) = out[1], out[2]
    grad_rel = max((grads_b[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                   for n, g in grads_a.items())
    loss_diff, grad_rel = _max_over_ranks([abs(loss_a - loss_b), grad_rel])
    return {"layout": described, "loss": [loss_a, loss_b], "tokens": [tokens_a, tokens_b],
            "loss_abs_diff": loss_diff, "grad_max_rel_diff": grad_rel}


def memorize(policy: Policy, rows: list[SFTExample]) -> list[float]:
    train_cfg = OmegaConf.structured(TrainConfig(lr=3e-3, min_lr=3e-3, steps=MEMO_STEPS,
                                                 adam_beta2=0.99, grad_clip=1.0))
    optimizer = build_optimizer(policy, train_cfg)
    scheduler = build_lr_scheduler(optimizer, train_cfg)
    batch = packed_step_batch(rows, 0, 1, capacity=CAPACITY, pad_id=PAD)
    losses = [sft_step(policy, optimizer, scheduler, batch.microbatches)["loss"]
              for _ in range(MEMO_STEPS)]
    losses.append(sft_loss(policy, batch.microbatches, forward_only=True)[0])
    return losses


def main(workdir: str) -> None:
    results: dict[str, Any] = {}
    for name, layout_sizes, rows in (("deepseek_v3", (1, 2, 1), MTP_ROWS),
                                     ("dense", (2, 1, 1), DENSE_ROWS)):
        _, model_cfg, layout_cfg, layout = setup_layout(name, *layout_sizes)
        policy = build_policy(model_cfg, layout_cfg, use_distributed_optimizer=True)
        packing = check_packing(policy, random_rows(rows, 1))
        memo_rows = random_rows(MEMO_ROWS, 2)
        # After memorization the response tokens are predictable and the (random) prompt
        # tokens are not, so a wrong mask would change the loss a lot.
        losses = memorize(policy, memo_rows)
        results[name] = {"layout": layout.describe(), "packing": packing,
                         "memorize": losses, "masked_loss": check_masked_loss(policy,
                                                                              memo_rows)}
    # Data parallel: packing only (the by-hand reference above assumes one DP rank).
    for name, layout_sizes, rows in (("deepseek_v3", (1, 1, 2), MTP_ROWS + MTP_ROWS),
                                     ("dense", (1, 1, 1), DP_ROWS)):
        _, model_cfg, layout_cfg, layout = setup_layout(name, *layout_sizes)
        policy = build_policy(model_cfg, layout_cfg, use_distributed_optimizer=True)
        results[f"{name}_dp2"] = {"layout": layout.describe(),
                                  "packing": check_packing(policy, random_rows(rows, 3))}
    # Context parallelism: CP=2 against DP=2.
    for name, rows in (("deepseek_v3", MTP_ROWS), ("dense", DENSE_ROWS)):
        results[f"{name}_cp2"] = check_context_parallel(name, random_rows(rows, 4),
                                                        Path(workdir))
    if dist.get_rank() == 0:
        (Path(workdir) / "result.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
