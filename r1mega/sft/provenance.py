"""Where distillation data came from: the rejection-sampling run beside the data file.

DeepSeek-R1 distils its small dense models by SFT on samples that the large model
generated and rejection sampling kept. A student trained on a stale or half-written
sample set is an easy mistake to miss, so ``r1mega distill`` reads what ``r1mega sample``
(:mod:`r1mega.rejection`) leaves beside its ``dataset.jsonl``:

* ``stats.json``: prompts done, samples generated, kept and dropped (by reason);
* ``run.json``: the run's manifest -- the teacher's weights and model, the template,
  the sampling settings;

prints a summary and checks it against the data file and the student's job:

* the files must be JSON objects;
* ``kept`` must equal the number of rows in the data file -- otherwise the data changed
  after sampling, or sampling is still running (it is resumable and appends);
* ``complete`` false means sampling did not finish all its prompts;
* a teacher template other than the student's ``data.template`` means the student sees
  its prompts in another context than the teacher answered them in.

Problems are warnings, not errors: hand-curated data without these files is legitimate,
and a partial sample set may be used on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATS_FILE = "stats.json"
MANIFEST_FILE = "run.json"


@dataclass
class Provenance:
    """What the sampling run recorded about the data file, and what does not add up."""

    directory: Path
    facts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"data provenance ({self.directory}): rejection sampling"]
        out += [f"  {fact}" for fact in self.facts]
        out += [f"  warning: {w}" for w in self.warnings]
        return out


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warnings.append(f"{path.name} is unreadable: {err}")
        return None
    if not isinstance(value, dict):
        warnings.append(f"{path.name}: expected a JSON object, got {type(value).__name__}")
        return None
    return value


def _count_rows(path: Path) -> int | None:
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _stats_facts(stats: dict[str, Any], data: Path, result: Provenance) -> None:
    kept = stats.get("kept")
    generated = stats.get("samples_generated")
    if "prompts_done" in stats:
        result.facts.append(f"prompts {stats['prompts_done']}/{stats.get('prompts_total', '?')}"
                            f", samples generated {generated}, kept {kept} "
                            f"({100 * float(stats.get('acceptance_rate', 0.0)):.1f}%)")
    dropped = stats.get("dropped")
    if isinstance(dropped, dict):
        reasons = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"
        result.facts.append(f"dropped: {reasons}")
    rows = _count_rows(data)
    if isinstance(kept, int) and rows is not None and kept != rows:
        result.warnings.append(
            f"{STATS_FILE} records {kept} kept rows but {data.name} has {rows}: the data "
            f"changed after sampling, or sampling is still running")
    if stats.get("complete") is False:
        result.warnings.append("rejection sampling has not finished all its prompts "
                               "(complete=false)")


def _manifest_facts(manifest: dict[str, Any], template: str | None,
                    result: Provenance) -> None:
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    shape = (f"{model.get('arch')} ({model.get('num_layers')} layers, hidden "
             f"{model.get('hidden_size')})") if model else "unknown model"
    weights = manifest.get("weights") or "random initial weights"
    result.facts.append(f"teacher: {shape}, weights {weights}")
    sampling = manifest.get("sampling") if isinstance(manifest.get("sampling"), dict) else {}
    if sampling:
        result.facts.append(f"sampled {manifest.get('samples_per_prompt')} per prompt at "
                            f"temperature {sampling.get('temperature')}, template "
                            f"{manifest.get('template')}")
    teacher_template = manifest.get("template")
    if template is not None and teacher_template is not None and teacher_template != template:
        result.warnings.append(
            f"the teacher sampled with template {teacher_template!r} but the student trains "
            f"with data.template={template!r}")


def read_provenance(data_path: str | Path, template: str | None = None
                    ) -> Provenance | None:
    """The provenance of ``data_path`` from the sampling run's files beside it; ``None``
    when there are none. ``template``: the student's ``data.template``, to compare."""
    data = Path(data_path)
    stats_path, manifest_path = data.parent / STATS_FILE, data.parent / MANIFEST_FILE
    if not stats_path.is_file() and not manifest_path.is_file():
        return None
    result = Provenance(directory=data.parent)
    if manifest_path.is_file():
        manifest = _read_json(manifest_path, result.warnings)
        if manifest is not None:
            _manifest_facts(manifest, template, result)
    if stats_path.is_file():
        stats = _read_json(stats_path, result.warnings)
        if stats is not None:
            _stats_facts(stats, data, result)
    else:
        result.warnings.append(f"no {STATS_FILE}: the sampling run wrote no statistics yet")
    return result
