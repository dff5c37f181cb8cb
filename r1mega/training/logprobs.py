"""Per-token log-probabilities and entropy on vocab-parallel logits.

Under tensor parallelism each rank holds ``V / tp`` columns of the output logits. The
full vocabulary is never gathered (for DeepSeek-V3 that is 129,280 floats per token):
log p(token) comes from megatron-core's vocab-parallel cross entropy (max, sum-exp and
the target logit each reduced over TP), and the entropy from three TP all-reduces of
per-token scalars.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per token, differentiable; ``[b, s]`` from
    ``[b, s, V/tp]`` logits and ``[b, s]`` targets (global vocabulary ids)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    # megatron-core's kernel expects [s, b, V/tp] and subtracts the row maximum from its
    # input in place. transpose().contiguous() copies, except when the batch or sequence
    # dimension is 1 (the transposed view is contiguous already), and .float() of fp32
    # logits at T=1 is the caller's tensor itself: copy then, or the caller's logits
    # would be overwritten.
    seq_first = scaled.transpose(0, 1)
    seq_first = seq_first.clone() if seq_first.is_contiguous() and \
        seq_first.data_ptr() == logits.data_ptr() else seq_first.contiguous()
    loss = vocab_parallel_cross_entropy(seq_first, targets.transpose(0, 1).contiguous())
    return -loss.transpose(0, 1)


def vocab_parallel_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per token, ``[b, s]`` (no gradient: a metric)."""
    with torch.no_grad():
        scaled = logits.float() / temperature
        group = _tp_group()
        local_max = scaled.max(dim=-1, keepdim=True).values
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        shifted = scaled - local_max
        exp = shifted.exp()
        # -inf logits (masked vocabulary entries) have p = 0 and contribute 0 * log 0 = 0,
        # not 0 * -inf = nan.
        p_log_p = torch.where(exp > 0, exp * shifted, torch.zeros_like(exp))
        sums = torch.stack([exp.sum(-1), p_log_p.sum(-1)])
        dist.all_reduce(sums, group=group)
        return sums[0].log() - sums[1] / sums[0]
