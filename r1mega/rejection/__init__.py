"""Rejection sampling (DeepSeek-R1, section 2.3.3): turn an RL checkpoint into SFT data.

``r1mega sample CONFIG`` generates ``sample.samples_per_prompt`` responses per prompt with
the colocated rollout engine, keeps those the rewards accept (rule rewards for reasoning
prompts, a reward model for general ones), drops unreadable ones and duplicates, and
appends the survivors to ``<sample.output_dir>/dataset.jsonl`` for the SFT stage.

One job per module:

* :mod:`~r1mega.rejection.prompts` -- which prompts, and how each is judged (reward kind);
* :mod:`~r1mega.rejection.scoring` -- rule rewards, or a reward model for general prompts;
* :mod:`~r1mega.rejection.filtering` -- keep/drop one prompt's samples, with a reason each;
* :mod:`~r1mega.rejection.judge` -- a batch's samples to dataset rows and progress records;
* :mod:`~r1mega.rejection.store` -- the output directory, crash-safe and resumable;
* :mod:`~r1mega.rejection.stats` -- ``stats.json``, recomputed from the progress log;
* :mod:`~r1mega.rejection.faults` -- fault injection for the resume tests;
* :mod:`~r1mega.rejection.sampler` -- :func:`run_sampling`, every rank's entry point.
"""
