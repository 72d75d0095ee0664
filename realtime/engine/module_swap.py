"""Switchable stand-ins for model layers: one place that wraps matching modules and flips their mode.

`realtime.engine.upsample` and `realtime.engine.groupnorm` replace diffusers layers with faster
exact forms. Each stand-in holds the original module (`.original`) and a `mode` attribute that
picks the form at call time, so a mode change never reloads weights and "the original's own
forward" is always one of the modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def switch_wrapped(
    root: torch.nn.Module,
    wrapper: type[Any],
    mode: str,
    *,
    original_mode: str,
    wraps: Callable[[Any], bool],
    on_switch: Callable[[Any], None] | None = None,
) -> int:
    """Put every module under `root` that `wraps` accepts in `mode`, wrapping it as `wrapper(module, mode)` on
    first use (not while `mode` is `original_mode`); `on_switch` sees each existing wrapper first. Returns
    how many modules are wrapped. Idempotent and reversible."""
    count = 0
    for parent in list(root.modules()):
        if isinstance(parent, wrapper):
            continue  # its `original` is the module it replaces
        for name, child in list(parent.named_children()):
            if isinstance(child, wrapper):
                if on_switch is not None:
                    on_switch(child)
                child.mode = mode
                count += 1
            elif mode != original_mode and wraps(child):
                setattr(parent, name, wrapper(child, mode))
                count += 1
    return count
