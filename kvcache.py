"""The KV cache the sampler decodes with: keys and values in fixed-size pages.

    cache = KVCache(config, batch_size=3, max_seq_len=64)              # one 64-position page per slot
    cache = KVCache(config, batch_size=256, max_seq_len=12288, page_size=16, n_pages=40_000)
    pages = cache.take(4)                     # host bookkeeping: a free list and reference counts
    cache.set_table(slot, pages)              # which pages hold a slot's positions, in order
    cache.sync()                              # the page tables, to the device, before a step

The pool is (layers, n_pages, page_size, H_kv, Dh) for keys and for values. Position p of the
sequence in slot s lives at page table[s][p // page_size], offset p % page_size. Pages are taken
as a sequence grows and given back when it ends; a page shared by several sequences (a prompt's,
by its n samples) is counted, and returns to the free list with its last user. With page_size
None every slot owns one page of max_seq_len positions: a static cache, whose tables never
change (what the model's tests and the benchmarks' baselines use).

What the model calls (model.Attention), the same for any page size:
- index(slots, positions) -> where each token's keys and values go, as flat pool rows;
- write(layer, index, k, v) stores a step's keys and values (B, T, H_kv, Dh) there;
- gather(layer, slots, length) -> keys, values (B, H_kv, length, Dh) of positions 0..length-1 of
  each slot's sequence, the decode step's attention reading only the pages it covers.
"""

import array
import math

import torch
import torch.nn as nn

# Where the paged decode kernel does not run (off Triton), a decode step gathers each slot's pages
# into contiguous keys and values, a chunk of slots at a time: at most this many bytes of one
# layer's keys and values.
GATHER_BYTES = 256 * 2**20


def long_tensor(values, shape=(-1,)):
    """An int64 CPU tensor of a flat list of ints: through array, 3-6x faster than torch.tensor on
    a list (17-20 vs 60-120 us for 1,024 values here), which counts in a decode step's host time."""
    if not values:
        return torch.zeros(0, dtype=torch.long).view(shape)
    return torch.frombuffer(array.array("q", values), dtype=torch.long).view(shape)


class KVCache(nn.Module):
    def __init__(self, config, batch_size, max_seq_len, dtype=None, device=None, page_size=None,
                 n_pages=None):
        super().__init__()
        self.static = static = page_size is None
        self.page_size = max_seq_len if static else page_size
        self.max_seq_len = max_seq_len
        self.pages_per_seq = math.ceil(max_seq_len / self.page_size)
        n_pages = batch_size if static else n_pages
        shape = (config.num_hidden_layers, n_pages, self.page_size, config.num_key_value_heads,
                 config.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        table = torch.arange(batch_size)[:, None] if static else \
            torch.full((batch_size, self.pages_per_seq), n_pages - 1, dtype=torch.long)
        self.register_buffer("block_table", table.to(device), persistent=False)  # (slots, pages per seq)
        # Host bookkeeping of a paged cache; a static one is never asked. The last page is
        # scratch: idle slots and the unused ends of page tables point there, so what an idle
        # slot writes and what a padded read sees touch no sequence's pages.
        self.scratch = n_pages - 1
        self.free = [] if static else list(range(n_pages - 2, -1, -1))
        self.refs = [0] * n_pages
        self.tables = [[s] for s in range(batch_size)] if static else [[] for _ in range(batch_size)]
        self.dirty = set()     # slots whose whole table row the device must be sent
        self.appended = []     # (slot, index, page) entries appended since the last sync
        # Full prompt pages that others may share while anyone holds them (vLLM's automatic prefix
        # caching, within one call): keyed by (the page before it, or -1, its tokens), so a key
        # names the whole prefix up to and including the page, and a page leaves with its last user.
        self.prefix_pages, self.prefix_key = {}, {}

    @staticmethod
    def bytes_per_slot(config, max_seq_len, dtype) -> int:
        """Bytes one sequence of max_seq_len positions holds (keys and values of every layer)."""
        return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                * max_seq_len * torch.empty((), dtype=dtype).element_size())

    @property
    def n_pages(self):
        return self.k.shape[1]

    @property
    def page_bytes(self):
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def pages_for(self, n_positions) -> int:
        return math.ceil(n_positions / self.page_size)

    # ---- the host's bookkeeping: free pages, references, page tables ----

    def take(self, n) -> list[int]:
        """n free pages, each with one reference; the caller checks len(self.free) first."""
        if n > len(self.free):
            raise RuntimeError(f"{n} pages asked for, {len(self.free)} free")
        pages = [self.free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        return pages

    def share(self, pages):
        """One more reference to each of `pages` (a prompt's, for another of its samples)."""
        for p in pages:
            self.refs[p] += 1
        return list(pages)

    def give(self, pages):
        """Drop one reference to each page; a page nobody holds is free again (and no longer shared)."""
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)
                if p in self.prefix_key:
                    del self.prefix_pages[self.prefix_key.pop(p)]

    def shared_prefix(self, ids) -> list[int]:
        """The pages that hold the longest run of ids' leading full pages that some prompt in
        flight has written (remember), in order."""
        pages, before = [], -1
        for k in range(len(ids) // self.page_size):
            page = self.prefix_pages.get((before, tuple(ids[k * self.page_size:(k + 1) * self.page_size])))
            if page is None:
                break
            pages.append(page)
            before = page
        return pages

    def remember(self, ids, pages):
        """Offer the full pages of a prompt's prefix ids, just written to `pages`, for others to share."""
        before = -1
        for k in range(len(ids) // self.page_size):
            key = (before, tuple(ids[k * self.page_size:(k + 1) * self.page_size]))
            if self.prefix_pages.setdefault(key, pages[k]) == pages[k]:
                self.prefix_key[pages[k]] = key
            before = pages[k]

    def set_table(self, slot, pages):
        self.tables[slot] = pages
        self.dirty.add(slot)

    def append_page(self, slot, page):
        """Add one page at the end of a slot's table (a sequence growing into its next page): the
        common change, sent to the device as one entry rather than a whole row."""
        table = self.tables[slot]
        table.append(page)
        if slot not in self.dirty:
            self.appended.append((slot, len(table) - 1, page))

    def copy_page(self, dst, src):
        """Copy page src's keys and values (every layer) into page dst: a prompt's partly filled
        last page, which each sample then fills with its own tokens."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def sync(self):
        """Copy the page tables that changed to the device: whole rows for the slots whose table
        was replaced, single entries for the pages appended; one host-to-device copy of each."""
        device = self.block_table.device
        if self.dirty:
            slots = sorted(self.dirty)
            pad = [self.scratch] * self.pages_per_seq
            rows = long_tensor([p for s in slots for p in (self.tables[s] + pad)[:self.pages_per_seq]],
                               (len(slots), self.pages_per_seq))
            self.block_table[long_tensor(slots).to(device)] = rows.to(device)
        entries = [x for e in self.appended if e[0] not in self.dirty and e[1] < self.pages_per_seq for x in e]
        if entries:
            slot, col, page = long_tensor(entries, (-1, 3)).to(device).unbind(1)
            self.block_table[slot, col] = page
        self.dirty.clear()
        self.appended.clear()

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages sequences hold (the scratch page not counted)."""
        return (self.n_pages - 1 - len(self.free)) * self.page_bytes

    # ---- what the model calls ----

    def index(self, slots, positions):
        """Flat pool rows (B, T) of the tokens at `positions` (B, T) of `slots` (B,) (None: 0..B-1)."""
        B, T = positions.shape
        rows = torch.arange(B, device=positions.device) if slots is None else slots
        pages = self.block_table[rows[:, None].expand(B, T), positions // self.page_size]
        return pages * self.page_size + positions % self.page_size

    def write(self, layer, index, k, v):
        """Store keys/values (B, T, H_kv, Dh) at flat pool rows `index` (B, T)."""
        self.k[layer].view(-1, *self.k.shape[3:])[index] = k.to(self.k.dtype)
        self.v[layer].view(-1, *self.v.shape[3:])[index] = v.to(self.v.dtype)

    def gather_slots(self, length) -> int:
        """Slots whose first `length` positions one gather may copy: a static cache is read in
        place (all of them); a paged one's copies stay under GATHER_BYTES."""
        if self.static:
            return len(self.tables)
        per_slot = 2 * length * self.k.shape[3] * self.k.shape[4] * self.k.element_size()
        return max(1, GATHER_BYTES // per_slot)

    def gather(self, layer, slots, length, batch):
        """Keys and values (B, H_kv, length, Dh) of positions 0..length-1 of each slot's sequence
        (slots None: the first `batch` slots), read from the pages that hold them."""
        if self.static:  # slot b's one page is page b
            k, v = (self.k[layer][:batch], self.v[layer][:batch]) if slots is None else \
                (self.k[layer][slots], self.v[layer][slots])
            return k[:, :length].transpose(1, 2), v[:, :length].transpose(1, 2)
        n = self.pages_for(length)
        pages = (self.block_table[:batch] if slots is None else self.block_table[slots])[:, :n]
        B = pages.shape[0]
        # index_select copies whole pages (contiguous blocks), far faster than indexing by (B, n)
        k, v = (torch.index_select(pool[layer], 0, pages.reshape(-1)) for pool in (self.k, self.v))
        k = k.view(B, n * self.page_size, *k.shape[2:])[:, :length]
        v = v.view(B, n * self.page_size, *v.shape[2:])[:, :length]
        return k.transpose(1, 2), v.transpose(1, 2)


# ---- sizing a pool ----

PAGE_SIZE = 16  # positions per KV page (vLLM's default too)

# Shares of the device a default budget leaves free: for everything a decode step allocates
# besides the cache (logits, sampling noise, attention scratch), and for the caching allocator's
# slack (memory it holds that no tensor uses), which the memory plan sets aside as fragmentation.
KV_RESERVE = 0.05
ALLOCATOR_SLACK = 0.05


def kv_budget(free_bytes, total_bytes) -> int:
    """The default KV-cache budget: what is free once everything else is resident, less
    KV_RESERVE and ALLOCATOR_SLACK of the device."""
    return max(0, int(free_bytes - (KV_RESERVE + ALLOCATOR_SLACK) * total_bytes))


def device_memory(device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, counting what the caching allocator holds unused as free."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def device_kv_budget(device) -> int | None:
    """kv_budget of a CUDA device now; None (no limit) elsewhere."""
    return kv_budget(*device_memory(device)) if device.type == "cuda" else None


def cache_pages(config, prompts, params, dtype, budget_bytes, slots, page_size=PAGE_SIZE) -> int:
    """Pages in the pool: what the budget (bytes; None: no limit) holds, and no more than this
    call could ever use at once (every slot at its longest sequence, every prompt's pages, the
    scratch page). prompts are scheduler.Prompts (their tokens and their own limits). A budget
    below what one sequence needs is an error that names the number."""
    longest = max(prompts, key=lambda p: len(p.ids) + p.limit(params))
    per_seq = -(-(len(longest.ids) + longest.limit(params)) // page_size)
    prefix = -(-(max(len(p.ids) for p in prompts) - 1) // page_size)
    page_bytes = KVCache.bytes_per_slot(config, page_size, dtype)
    most = slots * per_seq + min(slots, len(prompts)) * prefix + 1
    if budget_bytes is None:
        return most
    one = per_seq + prefix + 1
    if budget_bytes < one * page_bytes:
        raise ValueError(f"the KV cache needs {one} pages of {page_size} positions ({one * page_bytes / 2**30:.2f} "
                         f"GiB) for one sequence of {len(longest.ids)} + {longest.limit(params)} tokens, but its "
                         f"budget is {budget_bytes / 2**30:.2f} GiB: raise the budget (kv_budget_gib), free device "
                         f"memory, or shorten prompts / max_new_tokens")
    return min(most, budget_bytes // page_bytes)


def new_cache(model, n_slots, seq_len, page_size, n_pages) -> KVCache:
    """A paged KV cache in the model's dtype and device: n_slots page tables of up to seq_len
    positions over a pool of n_pages pages."""
    weight = model.embed_tokens.weight
    return KVCache(model.config, n_slots, seq_len, weight.dtype, weight.device, page_size, n_pages)
