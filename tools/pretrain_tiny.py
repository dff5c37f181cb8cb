#!/usr/bin/env python3
"""Warm-start the tiny base model that `r1mega train configs/tiny_cpu.yaml` starts from.

R1-Zero needs a base model that already emits the answer format now and then; a random
tiny model never does, so RL would see only zero rewards. This trains one in about three
minutes on one CPU core, on generated text (the R1-Zero template + single-digit
addition problems from the train pairs of ``builtin:add_small`` + deliberately
imperfect ``<think> 3 + 4 </think> <answer> 7 </answer>`` completions), and caches it:

    python tools/pretrain_tiny.py configs/tiny_cpu.yaml --out runs/tiny_base --eval 20

writes ``runs/tiny_base/weights`` (a megatron distributed checkpoint, loadable at any
layout, with ``r1mega_config.yaml`` beside it) and ``runs/tiny_base/meta.json`` (task,
settings, seed, losses, model-config hash, cache key). Running it again with the same
model, tokenizer, template and options reuses the cache and trains nothing (layouts and
``rollout.*`` are not part of the key); ``--force`` retrains. The task defaults to the
config's ``data.train_path`` (``--task`` overrides it); the tool warns when
``rollout.max_new_tokens`` cannot hold a formatted answer (45 tokens for ``add_small``).
``r1mega train configs/tiny_cpu.yaml`` runs this on first use (``checkpoint.load:
warm_start:runs/tiny_base``).

Measured 2026-12-01 with the command above on one core of a shared 2-core machine
(details in :mod:`r1mega.pretrain`; defaults: 800 steps, ``--correct-frac 0.9``,
``--format-frac 0.6``): training 168-192 s (cached: 2 s), held-out completion loss
6.274 -> 0.088; on the 20 held-out problems the model writes the strict format 56% of
the time at temperature 1 with accuracy 0.22 (rollout engine, 320 samples), and is
right on 8 of 20 greedily.

Useful options (see ``--help``): ``--steps N`` (default 800), ``--seed``, ``--task``,
``--eval N`` (afterwards, sample N held-out problems 4 times at temperature 1 and once
greedily, with the config's response budget and stop strings, and print format rate and
accuracy), ``key=value`` config overrides. Then point RL at it with
``checkpoint.load=runs/tiny_base/weights``. See :mod:`r1mega.pretrain`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from r1mega.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
