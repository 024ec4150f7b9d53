"""The host's book of the KV page pool: free pages, reference counts, the prefix cache.

The device holds the pages (`transformer.PagedKV`); this module decides which
row gets which. A page is in use while a row's page table holds it
(`refs > 0`), free otherwise. Full pages of prompt tokens are also entered
in a prefix cache under the tokens from the prompt's start to the page's
end, so that the K samples of a prompt, and every prompt that starts with
the same few-shot exemplars, read one copy: a released cached page stays
readable until a new allocation needs it (least recently released first),
as vLLM's automatic prefix caching does. Page 0 is never handed out: padding
writes there and unused table entries point there.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class PoolExhausted(RuntimeError):
    """Not enough pages for a request, even with every cached page evicted."""


PrefixKey = tuple  # the prompt's tokens from its start to a page's end


def prefix_keys(tokens: Sequence[int], page_size: int, length: int) -> list[PrefixKey]:
    """The prefix-cache keys of the full pages among tokens[:length]."""
    return [tuple(tokens[: (j + 1) * page_size]) for j in range(length // page_size)]


class PagePool:
    """Allocation, sharing and release of the pages 1 .. num_pages - 1."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(
                f"A page pool needs at least 2 pages (page 0 is reserved); got {num_pages}."
            )
        self.num_pages = num_pages
        self.refs = [0] * num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # popped from the end: 1, 2, ...
        self._cached: dict[PrefixKey, int] = {}
        self._key_of: dict[int, PrefixKey] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.peak_in_use = 0

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - len(self._free) - len(self._evictable)

    def available(self) -> int:
        """Pages an allocation can get now (free ones, then cached ones no row holds)."""
        return len(self._free) + len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """n pages for one row (refs 1), evicting the least recently released cached
        pages when the free ones run out."""
        if n > self.available():
            raise PoolExhausted(f"{n} pages asked, {self.available()} available.")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._cached[self._key_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """A row lets go of its pages; cached ones stay readable until evicted."""
        for page in pages:
            if self.refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than held")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def lookup(self, keys: Sequence[PrefixKey]) -> list[int]:
        """The cached pages of the longest run of leading keys, now held by one more row."""
        pages = []
        for key in keys:
            page = self._cached.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self._evictable[page]
            self.refs[page] += 1
            pages.append(page)
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return pages

    def register(self, key: PrefixKey, page: int) -> None:
        """Enters a held page, now written with key's tokens, in the prefix cache."""
        if key not in self._cached and page not in self._key_of:
            self._cached[key] = page
            self._key_of[page] = key

    def forget_prefixes(self) -> None:
        """Empties the prefix cache (the weights changed: cached keys are stale)."""
        for page in list(self._evictable):
            self._free.append(page)
        self._evictable.clear()
        self._cached.clear()
        self._key_of.clear()

    def all_free(self) -> bool:
        """Whether no row holds a page (what every finished call must leave)."""
        return not any(self.refs)
