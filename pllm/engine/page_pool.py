"""`PagePool`: which pages of the KV cache pool each sequence holds, and prompt prefixes shared
between sequences (the block manager of vLLM / nano-vllm, for the fixed-shape step's cache).

Pages are reference-counted. A page of a prompt prefix, once computed, is remembered under the
tokens it depends on (its own and every earlier one: block-causal keys/values never see later
blocks, and a page holds whole blocks), chained page by page from the sequence's start; a later
sequence with the same prefix takes those pages instead of recomputing them. Shared pages are
never written: the step writes only a sequence's own pages. A page whose last holder left stays
remembered until its memory is needed (least recently released first).
"""

from __future__ import annotations

from collections import OrderedDict


class PagePool:
    def __init__(self, num_pages: int, first_page: int = 0):
        """Pages first_page .. num_pages - 1 are handed out (the ones before are the cache's scratch)."""
        self.free: list[int] = list(range(num_pages - 1, first_page - 1, -1))
        self.refs = [0] * num_pages
        self.key_of: dict[int, tuple] = {}  # a remembered page -> its key
        self.page_of: dict[tuple, int] = {}  # key -> remembered page
        self.unused: OrderedDict[int, None] = OrderedDict()  # remembered pages nobody holds, oldest first
        self.num_shared = 0  # pages handed out from memory instead of recomputed

    def available(self) -> int:
        """Pages `allocate` can hand out now (free, or remembered but unused)."""
        return len(self.free) + len(self.unused)

    def allocate(self, n: int) -> list[int]:
        """n pages for one holder; forgets the oldest unused remembered pages if the free ones run out."""
        if n > self.available():
            raise RuntimeError(f"the KV cache pool has {self.available()} pages available, {n} needed")
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.unused.popitem(last=False)
                del self.page_of[self.key_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def lookup(self, keys: list[tuple]) -> list[int]:
        """The remembered pages of the longest prefix of `keys`, each now held once more."""
        pages = []
        for key in keys:
            page = self.page_of.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.unused[page]
            self.refs[page] += 1
            pages.append(page)
        self.num_shared += len(pages)
        return pages

    def remember(self, keys: list[tuple], pages: list[int]) -> None:
        """Remember computed prefix pages under their keys (a key already remembered keeps its page)."""
        for key, page in zip(keys, pages):
            if key not in self.page_of and page not in self.key_of:
                self.page_of[key], self.key_of[page] = page, key

    def release(self, pages: list[int]) -> None:
        """A holder gives its pages back: unheld pages are free again, or kept while remembered."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.unused[page] = None
                else:
                    self.free.append(page)


def prefix_keys(tokens: list[int], page_size: int, num_pages: int) -> list[tuple]:
    """The keys of a sequence's first num_pages pages: page i's is (page i - 1's key, its tokens),
    so equal keys mean equal tokens from the start."""
    keys, parent = [], None
    for i in range(num_pages):
        parent = (parent, tuple(tokens[i * page_size:(i + 1) * page_size]))
        keys.append(parent)
    return keys
