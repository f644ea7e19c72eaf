"""A bounded least-recently-used mapping, for every cache of the adapters (plans, layouts, graphs)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, List, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A bounded mapping that evicts the least recently used entry, calling ``on_evict`` first.

    Example:
        >>> cache = LRUCache(2)
        >>> for key in "abc":
        ...     _ = cache.put(key, key.upper())
        >>> cache.keys(), cache.get("a")
        (['b', 'c'], None)
    """

    def __init__(self, capacity: int, on_evict: Optional[Callable[[K, V], None]] = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._on_evict = on_evict
        self._data: "OrderedDict[K, V]" = OrderedDict()

    def get(self, key: K) -> Optional[V]:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def peek(self, key: K) -> Optional[V]:
        """The value of ``key`` without making it the most recently used."""
        return self._data.get(key)

    def put(self, key: K, value: V) -> List[K]:
        """Inserts (or refreshes) ``key``; returns the keys evicted to stay within capacity."""
        self._data[key] = value
        self._data.move_to_end(key)
        evicted = []
        while len(self._data) > self.capacity:
            old_key, old_value = self._data.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(old_key, old_value)
            evicted.append(old_key)
        return evicted

    def pop(self, key: K, notify: bool = True) -> Optional[V]:
        value = self._data.pop(key, None)
        if value is not None and notify and self._on_evict is not None:
            self._on_evict(key, value)
        return value

    def clear(self) -> None:
        while self._data:
            key, value = self._data.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(key, value)

    def keys(self) -> List[K]:
        """Keys from least to most recently used."""
        return list(self._data.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._data.keys()))
