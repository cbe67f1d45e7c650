"""Count what a piece of work dispatches: PyTorch operations (each a kernel launch on a GPU, except views) and
Triton kernel launches.

On a GPU every dispatched operation that is not a view costs a launch of a few microseconds, whatever its
size, so a layer that issues thousands of them per call is launch-bound however fast its arithmetic. The
Phase 1 / Phase 2 fused paths keep this count small and independent of the sequence length; the launch
budget test and the benchmarks measure it with :func:`count_launches`.

Triton launches are counted through ``triton.knobs.runtime.launch_enter_hook`` on a GPU and by wrapping the
interpreter's launch under ``TRITON_INTERPRET=1``; the interpreter's own host copies are not counted as
PyTorch operations.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # triton is optional
    triton = None


@dataclass
class LaunchCount:
    """``ops``: PyTorch operations by name (views included); ``views``: how many of them were views (no kernel);
    ``triton``: Triton launches by kernel name."""

    ops: Counter = field(default_factory=Counter)
    views: int = 0
    triton: Counter = field(default_factory=Counter)

    @property
    def torch_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def triton_launches(self) -> int:
        return sum(self.triton.values())

    @property
    def launches(self) -> int:
        """Kernel launches as the budgets count them: PyTorch operations that are not views + Triton launches."""
        return self.torch_ops - self.views + self.triton_launches


class _Counter(TorchDispatchMode):
    def __init__(self, count: LaunchCount) -> None:
        super().__init__()
        self.count, self.paused = count, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.count.ops[str(func.overloadpacket)] += 1
            self.count.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_hooks(count: LaunchCount, mode: _Counter) -> Iterator[None]:
    if triton is None:
        yield
        return
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            count.triton[self.__name__] += 1
        mode.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    def hook(metadata) -> None:
        count.triton[getattr(metadata, "name", "kernel")] += 1

    InterpretedFunction.run = run
    hooks = getattr(getattr(triton, "knobs", None), "runtime", None)
    if hooks is not None:
        hooks.launch_enter_hook.add(hook)
    try:
        yield
    finally:
        InterpretedFunction.run = original
        if hooks is not None:
            hooks.launch_enter_hook.remove(hook)


def count_launches(fn: Callable[[], object]) -> LaunchCount:
    """Run ``fn()`` (e.g. a forward and a backward) and count its PyTorch operations and Triton launches."""
    count = LaunchCount()
    mode = _Counter(count)
    with _triton_hooks(count, mode), mode:
        fn()
    return count
