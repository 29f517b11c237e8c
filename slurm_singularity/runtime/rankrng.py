"""The random number generators of the logical ranks: torch's (CPU and the
device's), Python's ``random`` and numpy's global generator.

Why all four: under DDP every process has its own copy of each global
generator, so a collate function that calls ``random.random()`` or
``numpy.random.rand()`` draws from its rank's stream. Spliced, the ``k``
logical ranks of a device share one process; each turn swaps the rank's
state of every generator in and out, so what a rank draws does not depend on
how many devices the job runs on. The states are plain values (tensors,
tuples of ints, a numpy array) and go into every checkpoint.

Seeds (``rank_seed``): logical rank ``r`` of a run with ``seed`` starts
torch's CPU and CUDA generators with ``manual_seed(s)``, Python's as
``random.Random(s)`` and numpy's as ``numpy.random.RandomState(s % 2**32)``,
where ``s = (seed * 1_000_003 + 7_919 * (r + 1)) % 2**63``.

Why Python's and numpy's states are copied by hand (see ``_PythonGlobal``): ``numpy.random.get_state`` and
``set_state`` build and parse a dict of 624 words (about 40 us each), which
over 8 turns would cost 1-2 % of a step. Its Mersenne Twister keeps its
words and position in one C struct (``mt19937_state``, 2,500 bytes) that
``ctypes`` copies in half a microsecond. The legacy generator also caches a
second Gaussian outside that struct, so the fast copy is used only while
that cache is known empty (it fills only by a draw, which changes the
struct); otherwise, and where numpy lays things out otherwise, the full
``get_state``/``set_state`` is used.
"""

from __future__ import annotations

import ctypes
import random
import sys
from typing import Any

import numpy
import torch

#: Generator names in a rank's state.
TORCH_CPU, TORCH_CUDA, PYTHON, NUMPY = "cpu", "cuda", "python", "numpy"

_MT_WORDS = 624
_MT_BYTES = _MT_WORDS * 4 + 4      # uint32 key[624]; int pos


def rank_seed(seed: int, rank: int) -> int:
    """Seed of logical rank ``rank``'s RNG streams (independent of D)."""
    return (seed * 1_000_003 + 7_919 * (rank + 1)) % (2**63)


def _numpy_tuple(raw: bytes) -> tuple[Any, ...]:
    """numpy's legacy state tuple of a struct copy taken with no cached Gaussian."""
    key = numpy.frombuffer(raw[:_MT_WORDS * 4], dtype=numpy.uint32).copy()
    pos = int(numpy.frombuffer(raw[_MT_WORDS * 4:], dtype=numpy.int32)[0])
    return ("MT19937", key, pos, 0, 0.0)


class _NumpyGlobal:
    """Save and restore numpy's global generator, fast where it can (see the
    module docstring). A snapshot is the struct's bytes (no cached Gaussian)
    or numpy's full state tuple."""

    def __init__(self) -> None:
        self.addr: int | None = None
        try:
            bitgen = numpy.random.mtrand._rand._bit_generator
            if type(bitgen).__name__ == "MT19937":
                self.addr = int(bitgen.ctypes.state_address)
        except (AttributeError, TypeError):
            self.addr = None
        self.clean: bytes | None = None   # struct bytes last seen with no cached Gaussian

    def get(self) -> Any:
        if self.addr is not None and self.clean is not None:
            raw = ctypes.string_at(self.addr, _MT_BYTES)
            if raw == self.clean:
                return raw
        full = numpy.random.get_state()
        if self.addr is not None and int(full[3]) == 0:
            self.clean = ctypes.string_at(self.addr, _MT_BYTES)
            return self.clean
        self.clean = None
        return full

    def set(self, snapshot: Any) -> None:
        if isinstance(snapshot, bytes):
            if (self.addr is not None and self.clean is not None
                    and ctypes.string_at(self.addr, _MT_BYTES) == self.clean):
                ctypes.memmove(self.addr, snapshot, _MT_BYTES)
            else:
                numpy.random.set_state(_numpy_tuple(snapshot))
            self.clean = snapshot
            return
        numpy.random.set_state(tuple(snapshot))
        self.clean = ctypes.string_at(self.addr, _MT_BYTES) \
            if self.addr is not None and int(snapshot[3]) == 0 else None

    @staticmethod
    def portable(snapshot: Any) -> tuple[Any, ...]:
        """The snapshot as numpy's state tuple (what a checkpoint holds)."""
        return _numpy_tuple(snapshot) if isinstance(snapshot, bytes) else tuple(snapshot)


class _PythonGlobal:
    """Save and restore Python's global ``random`` generator. CPython keeps
    its Mersenne Twister as ``int index; uint32_t state[624]`` right after
    the object header of ``random._inst``; copying those 2,500 bytes costs
    half a microsecond where ``getstate`` builds a tuple of 625 ints (5-20
    us). The layout is verified against ``getstate`` when this is built,
    and ``getstate``/``setstate`` are used where it does not match. A fast
    snapshot is ``(bytes, gauss_next)``; a slow one is ``getstate()``'s tuple."""

    def __init__(self) -> None:
        self.inst = random._inst  # type: ignore[attr-defined]
        self.addr: int | None = id(self.inst) + 16 if sys.implementation.name == "cpython" \
            and ctypes.sizeof(ctypes.c_void_p) == 8 else None
        if self.addr is not None:
            keep = random.getstate()
            try:
                random.setstate(random.Random(20261130).getstate())
                if self._words_of(ctypes.string_at(self.addr, _MT_BYTES)) != random.getstate()[1]:
                    self.addr = None
            finally:
                random.setstate(keep)

    @staticmethod
    def _words_of(raw: bytes) -> tuple[int, ...]:
        index = int(numpy.frombuffer(raw[:4], dtype=numpy.int32)[0])
        return tuple(numpy.frombuffer(raw[4:], dtype=numpy.uint32).tolist()) + (index,)

    def get(self) -> Any:
        if self.addr is None:
            return random.getstate()
        return (ctypes.string_at(self.addr, _MT_BYTES), self.inst.gauss_next)

    def set(self, snapshot: Any) -> None:
        if self.addr is not None and isinstance(snapshot[0], bytes):
            ctypes.memmove(self.addr, snapshot[0], _MT_BYTES)
            self.inst.gauss_next = snapshot[1]
            return
        if isinstance(snapshot[0], bytes):
            snapshot = self.portable(snapshot)
        version, internal, gauss = snapshot
        if isinstance(internal, numpy.ndarray):
            internal = internal.tolist()
        random.setstate((version, tuple(internal), gauss))

    def portable(self, snapshot: Any) -> tuple[Any, ...]:
        """``getstate()``'s tuple (version 3)."""
        if isinstance(snapshot[0], bytes):
            return (3, self._words_of(snapshot[0]), snapshot[1])
        return tuple(snapshot)


class RankRng:
    """Every generator's state of each logical rank of this device, and the
    state code outside the turns sees (``shared``), swapped at turns."""

    def __init__(self, seed: int, ranks: range, device: torch.device) -> None:
        self.device = device
        self._numpy = _NumpyGlobal()
        self._python = _PythonGlobal()
        self.states = {r: self.seeded(seed, r) for r in ranks}
        self._shared: dict[str, Any] | None = None

    def seeded(self, seed: int, rank: int) -> dict[str, Any]:
        """Logical rank ``rank``'s initial state of every generator."""
        s = rank_seed(seed, rank)
        gen = torch.Generator()
        gen.manual_seed(s)
        state: dict[str, Any] = {TORCH_CPU: gen.get_state(),
                                 PYTHON: random.Random(s).getstate(),
                                 NUMPY: numpy.random.RandomState(s % 2**32).get_state()}
        if self.device.type == "cuda":
            cuda_gen = torch.Generator(device=self.device)
            cuda_gen.manual_seed(s)
            state[TORCH_CUDA] = cuda_gen.get_state()
        return state

    def capture(self) -> dict[str, Any]:
        """The process's current state of every generator."""
        state: dict[str, Any] = {TORCH_CPU: torch.get_rng_state(), PYTHON: self._python.get(),
                                 NUMPY: self._numpy.get()}
        if self.device.type == "cuda":
            state[TORCH_CUDA] = torch.cuda.get_rng_state(self.device)
        return state

    def apply(self, state: dict[str, Any]) -> None:
        """Make ``state`` the process's generators (those it holds: a
        checkpoint written before Python's and numpy's were kept has torch's only)."""
        torch.set_rng_state(state[TORCH_CPU])
        if TORCH_CUDA in state:
            torch.cuda.set_rng_state(state[TORCH_CUDA], self.device)
        if PYTHON in state:
            self._python.set(state[PYTHON])
        if NUMPY in state:
            self._numpy.set(state[NUMPY])

    # ---- turns ---------------------------------------------------------------
    def begin_pass(self) -> None:
        """Before the first turn of a pass: keep what code outside the turns sees."""
        self._shared = self.capture()

    def begin_turn(self, rank: int) -> None:
        self.apply(self.states[rank])

    def end_turn(self, rank: int) -> None:
        self.states[rank] = self.capture()

    def end_pass(self) -> None:
        """After the last turn: code outside the turns sees its own state again
        (the same on every device)."""
        if self._shared is not None:
            self.apply(self._shared)
            self._shared = None

    # ---- checkpoint ------------------------------------------------------------
    def portable(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state as a checkpoint stores it: numpy's as its state tuple,
        Python's 625 words as a uint32 array (2.5 KB of tensor bytes, not
        7 KB of JSON)."""
        out = dict(state)
        if NUMPY in out:
            out[NUMPY] = self._numpy.portable(out[NUMPY])
        if PYTHON in out:
            version, internal, gauss = self._python.portable(out[PYTHON])
            out[PYTHON] = (version, numpy.asarray(internal, dtype=numpy.uint32), gauss)
        return out

    def rank_state(self, rank: int) -> dict[str, Any]:
        return self.portable(self.states[rank])

    def load_rank(self, rank: int, saved: dict[str, Any]) -> None:
        """A rank's state from a checkpoint; generators an older checkpoint
        did not keep start from the rank's seed (already in place)."""
        self.states[rank] = {**self.states[rank], **saved}
