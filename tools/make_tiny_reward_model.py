#!/usr/bin/env python3
"""Build the tiny random reward model the CPU walk-through of the R1 pipeline uses.

    python tools/make_tiny_reward_model.py --out runs/tiny_reward_model
    python tools/make_tiny_reward_model.py --hf --out models/tiny-reward-model

writes a converted megatron checkpoint of a small random Qwen2ForSequenceClassification
(byte-tokenizer vocabulary), or with ``--hf`` the Hugging Face directory itself. Stage-2
RL points ``rewards.reward_model.load`` at either. See
:mod:`r1mega.rewards.tiny_reward_model`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1mega.rewards.tiny_reward_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
