"""What a conversion expects to find, checked before anything is read or written.

Expected HF tensor shapes are derived, not restated: each group's ``to_hf`` transform
runs on ``meta`` tensors of the megatron shapes megatron reported for the model, so the
mapping, megatron's layout and the error messages cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from r1mega.convert.errors import ConversionError, name_list
from r1mega.convert.mappings import TensorGroup
from r1mega.convert.megatron_layout import MegatronLayout


def check_mapping(groups: list[TensorGroup], layout: MegatronLayout) -> None:
    """Every megatron module tensor is produced by exactly one group (a converter bug
    otherwise, e.g. a megatron-core upgrade that renamed a module)."""
    produced: list[str] = [m for g in groups if not g.alias for m in g.megatron]
    dupes = {m for m in produced if produced.count(m) > 1}
    unmapped = set(layout.tensors) - set(produced)
    unknown = {m for g in groups for m in g.megatron} - set(layout.tensors)
    if dupes or unmapped or unknown:
        raise AssertionError(
            "tensor mapping does not match megatron's model:\n"
            f"produced twice:\n{name_list(dupes)}\nnot produced:\n{name_list(unmapped)}\n"
            f"not in the model:\n{name_list(unknown)}")


def expected_hf_shapes(groups: list[TensorGroup], layout: MegatronLayout
                       ) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, in group order."""
    out: dict[str, tuple[int, ...]] = {}
    for g in groups:
        metas = [torch.empty(layout.tensors[m].shape, device="meta") for m in g.megatron]
        for name, t in zip(g.hf, g.to_hf(metas), strict=True):
            out[name] = tuple(t.shape)
    return out


def check_tensors(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                  where: str, ignorable: Iterable[str] = ()) -> None:
    """Raise one error naming every missing, unexpected and wrongly-shaped tensor."""
    ignorable = set(ignorable)
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected and n not in ignorable]
    shapes = [f"{n}: checkpoint has {list(found[n])}, expected {list(expected[n])}"
              for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}):\n{name_list(missing)}")
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}):\n{name_list(extra)}")
    if shapes:
        problems.append(f"shape mismatch ({len(shapes)}):\n{name_list(shapes)}")
    if problems:
        raise ConversionError(f"{where} does not match its config:\n" + "\n".join(problems))
