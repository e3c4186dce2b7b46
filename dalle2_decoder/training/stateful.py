"""A registry of stateful parts: a checkpoint's trainer state is `{name: part.state_dict()}`.

Each part follows the `Stateful` protocol of `torch.distributed.checkpoint` (`state_dict()` and
`load_state_dict(state_dict)`), as torchtitan's checkpointer is handed its states, so a new piece of
state is one `register` call: saving and loading need no other edit. The registry adds two things
the trainer's file format needs:

- a part whose `state_dict()` returns None writes no entry (e.g. the whole weights of a sharded
  run, which its shard files hold instead);
- a part registered with `load_absent=True` is loaded with None when the state has no entry for it
  (a part that must say what it starts from, or reset itself); the others are left as they are.

A part's `load_state_dict` may return notes for the user (a list of lines); the registry returns
them all, in registration order, which is also the order of the entries and of loading.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from torch.distributed.checkpoint.stateful import Stateful


class StateRegistry:
    """Named `Stateful` parts, saved and loaded in the order they were registered."""

    def __init__(self) -> None:
        self._parts: Dict[str, Stateful] = {}
        self._load_absent: Dict[str, bool] = {}

    def register(self, name: str, part: Stateful, *, load_absent: bool = False) -> None:
        """Add `part` under `name` (its key in the state); `load_absent`: see the module docstring."""
        if not isinstance(part, Stateful):
            raise TypeError(f"state part {name!r}: a {type(part).__name__} has no state_dict()/load_state_dict()")
        if name in self._parts:
            raise ValueError(f"state part {name!r} is registered twice")
        self._parts[name] = part
        self._load_absent[name] = load_absent

    @property
    def names(self) -> List[str]:
        return list(self._parts)

    def __getitem__(self, name: str) -> Stateful:
        return self._parts[name]

    def state_dict(self) -> Dict[str, Any]:
        """Every part's state under its name, in registration order; parts with nothing to save left out."""
        state: Dict[str, Any] = {}
        for name, part in self._parts.items():
            value: Optional[Any] = part.state_dict()
            if value is not None:
                state[name] = value
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> List[str]:
        """Load each part from its entry of `state`, in registration order; returns the parts' notes."""
        notes: List[str] = []
        for name, part in self._parts.items():
            if name not in state and not self._load_absent[name]:
                continue
            said = part.load_state_dict(state.get(name))
            if said:
                notes += list(said)
        return notes
