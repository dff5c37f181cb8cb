"""Rule-based rewards for R1-Zero-style RL (DeepSeek-R1, section 2.2.2).

Built-in plug-ins, chosen by ``rewards.specs[i].name``:

* ``accuracy`` -- final answer (last ``<answer>`` block, its ``\\boxed{}`` if any) equals
  the ground truth according to math-verify, after normalising currency signs, digits and
  superscripts;
* ``format`` -- the ``<think>...</think><answer>...</answer>`` layout, strict or lenient;
* ``language`` -- fraction of chain-of-thought words in the target language (R1's
  language-consistency reward);
* ``code`` -- fraction of stdin/stdout tests the answer's Python program passes, run in a
  bubblewrap sandbox (:mod:`r1mega.rewards.sandbox`).

:class:`RewardFunction` combines them into the weighted sum the trainer optimises; every
reward scores each sample in worker processes under a time budget
(:mod:`r1mega.rewards.runner`). New rewards subclass :class:`Reward`, implement
:meth:`Reward.score` and register with :func:`register_reward`.
"""

# Importing the built-in reward modules registers them by name.
from r1mega.rewards.accuracy import AccuracyReward, extract_final_answer, math_verify_check
from r1mega.rewards.base import Reward, RewardInput, RewardResult, parse_params
from r1mega.rewards.code_exec import CodeReward, extract_program, outputs_match, run_program
from r1mega.rewards.combine import RewardBreakdown, RewardFunction
from r1mega.rewards.formatting import FormatReward, format_ok
from r1mega.rewards.language import LanguageReward, language_fraction
from r1mega.rewards.registry import available_rewards, get_reward, register_reward

__all__ = [
    "AccuracyReward",
    "CodeReward",
    "FormatReward",
    "LanguageReward",
    "Reward",
    "RewardBreakdown",
    "RewardFunction",
    "RewardInput",
    "RewardResult",
    "available_rewards",
    "extract_final_answer",
    "extract_program",
    "format_ok",
    "get_reward",
    "language_fraction",
    "math_verify_check",
    "outputs_match",
    "parse_params",
    "register_reward",
    "run_program",
]
