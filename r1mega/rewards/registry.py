"""Name -> reward class registry.

Rewards are chosen by name in ``rewards.specs[i].name``. New rewards register themselves
with :func:`register_reward`; the built-in ones are registered when :mod:`r1mega.rewards`
is imported (importing this module imports the package first, so they are always there).
"""

from __future__ import annotations

from collections.abc import Callable

from r1mega.rewards.base import Reward

__all__ = ["available_rewards", "get_reward", "register_reward"]

_REGISTRY: dict[str, type[Reward]] = {}

R = Callable[[type[Reward]], type[Reward]]


def register_reward(name: str) -> R:
    """Class decorator: make a :class:`Reward` subclass available as ``name``.

    Registering a second, different class under a taken name is an error rather than an
    override, so two plug-ins cannot silently shadow each other.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(cls: type[Reward]) -> type[Reward]:
        if not (isinstance(cls, type) and issubclass(cls, Reward)):
            raise TypeError(f"@register_reward({name!r}) needs a Reward subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"reward {name!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_rewards() -> list[str]:
    """Sorted names of every registered reward."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> type[Reward]:
    """The class registered as ``name``; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_rewards()) or "none"
        raise ValueError(f"unknown reward {name!r}; known rewards: {known}") from None
