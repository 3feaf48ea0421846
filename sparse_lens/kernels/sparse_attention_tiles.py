"""Device helpers shared by the block-sparse attention kernels (``@triton.jit``, no launch here).

Tile loads and stores: ``load_rows``, ``load_tile`` (unmasked where the tiles are whole, ``EVEN``,
with an L2 eviction hint), ``store_rows``, ``add_rows`` (fp32 atomics). A program's (query block,
head): ``block_and_head`` (the grid order ``sparse_attention_launch.query_grid`` chooses), its key
head: ``kv_row`` (GQA). Tile products with fp32 accumulation: ``dot``, ``dot_into`` (``DOT_UPCAST``:
bf16 operands multiplied in fp32, the Triton interpreter's workaround). Scores: ``scores_log2``
(base 2, the scale folded into the caller's exp2, the optional soft-cap ``soft_cap``),
``masked_scores``; the causal / window mask: ``visibility``; per key tile, what to load and whether
to mask: ``tile_plan``, and per step of the (slot, key tile) loop: ``step_tile_plan``. The forward (``sparse_attention_fwd_triton``) and backward
(``sparse_attention_bwd_triton``) kernels use them, ``rescore_triton`` and ``block_mass_triton``
some; ``sparse_attention_triton``'s docstring maps the pieces.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # the kernels run the softmax in base 2: exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # (tl.constexpr: a kernel may read no other global)


@triton.jit
def load_rows(base, rows, n_rows, columns, n_columns):
    """Rows ``rows`` of a row-major [n_rows, n_columns] matrix at ``base``; 0 out of range."""
    in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
    return tl.load(base + rows[:, None] * n_columns + columns[None, :], mask=in_range, other=0.0)


@triton.jit
def store_rows(base, rows, n_rows, columns, n_columns, values):
    """Write ``values`` to rows ``rows`` of a row-major [n_rows, n_columns] matrix, in range only."""
    in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
    tl.store(base + rows[:, None] * n_columns + columns[None, :], values.to(base.dtype.element_ty), mask=in_range)


@triton.jit
def add_rows(base, rows, n_rows, columns, n_columns, values):
    """Atomically add ``values`` to rows ``rows`` of a row-major fp32 [n_rows, n_columns] matrix."""
    in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
    tl.atomic_add(base + rows[:, None] * n_columns + columns[None, :], values, mask=in_range, sem="relaxed")


@triton.jit
def kv_row(batch_head, n_q_heads, n_kv_heads):
    """Row ``batch * n_kv_heads + kv_head`` of the key head that query row ``batch_head`` reads (GQA)."""
    batch, q_head = batch_head // n_q_heads, batch_head % n_q_heads
    return batch * n_kv_heads + q_head // (n_q_heads // n_kv_heads)


@triton.jit
def block_and_head(n_q_heads, n_kv_heads, HEADS_INNER: tl.constexpr):
    """``(query block, batch * n_q_heads + q_head)`` of this program (``query_grid`` lays them out)."""
    if HEADS_INNER:  # the query heads of a GQA group side by side, on one query block
        group = n_q_heads // n_kv_heads
        query_block_id = tl.program_id(0) // group
        batch_head = tl.program_id(1).to(tl.int64) * group + tl.program_id(0) % group
    else:
        query_block_id = tl.program_id(0)
        batch_head = tl.program_id(1).to(tl.int64)  # int64: offsets pass 2**31 on long contexts
    return query_block_id, batch_head


@triton.jit
def dot(left, right, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fp32 ``left @ right``; ``DOT_UPCAST`` multiplies in fp32 (the interpreter's bf16 workaround)."""
    if DOT_UPCAST:
        product = tl.dot(left.to(tl.float32), right.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(left, right, input_precision=DOT_PRECISION)
    return product


@triton.jit
def masked_scores(query_tile, key_tile, query_pos, key_pos, seq_len, scale,
                   DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """fp32 ``scale * q . k`` of a [query tile, key tile], -inf where the key is not visible."""
    scores = dot(query_tile, tl.trans(key_tile), DOT_PRECISION, DOT_UPCAST) * scale
    visible = (key_pos[None, :] <= query_pos[:, None]) & (query_pos[:, None] < seq_len)
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def soft_cap(scores, softcap):
    """``softcap * tanh(scores / softcap)``, tanh as ``1 - 2 / (exp(2x) + 1)`` (exact at +-inf, no NaN)."""
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))


@triton.jit
def load_tile(base, rows, n_rows, columns, n_columns, EVEN: tl.constexpr, EVICTION: tl.constexpr):
    """``load_rows``, unmasked when ``EVEN`` (every row in range, ``columns`` exactly the width), with
    an L2 ``eviction_policy`` (``""``: the default; no default value here: Triton 3.6 does not make
    an omitted string argument a constexpr)."""
    at = base + rows[:, None] * n_columns + columns[None, :]
    if EVEN:
        tile = tl.load(at, eviction_policy=EVICTION)
    else:
        in_range = (rows[:, None] < n_rows) & (columns[None, :] < n_columns)
        tile = tl.load(at, mask=in_range, other=0.0, eviction_policy=EVICTION)
    return tile


@triton.jit
def dot_into(left, right, accumulator, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``accumulator + left @ right`` (fp32), the sum made by the tensor-core instruction itself."""
    if DOT_UPCAST:
        result = tl.dot(left.to(tl.float32), right.to(tl.float32), accumulator, input_precision="ieee")
    else:
        result = tl.dot(left, right, accumulator, input_precision=DOT_PRECISION)
    return result


@triton.jit
def scores_log2(left_rows, right_rows, scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, FOLD_SCALE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``(scores, factor, capped)`` of ``left_rows @ right_rows^T`` (queries by keys, or keys by
    queries): the base-2 scores are ``scores * factor`` (``factor > 0``).

    ``FOLD_SCALE`` (scale > 0, no soft-cap) leaves ``scale * LOG2E`` in ``factor``, so that the
    caller's ``exp2(scores * factor - max)`` is one fused multiply-add; ``capped`` is the
    soft-capped natural score (for the backward's derivative; 0 without soft-capping).
    """
    scores = dot(left_rows, tl.trans(right_rows), DOT_PRECISION, DOT_UPCAST)
    capped = 0.0
    factor = 1.0
    if HAS_SOFTCAP:
        capped = soft_cap(scores * scale, softcap)
        scores = capped * LOG2E
    elif FOLD_SCALE:
        factor = scale * LOG2E
    else:
        scores = scores * (scale * LOG2E)
    return scores, factor, capped


@triton.jit
def visibility(key_pos, query_pos, row_limit, window, HAS_WINDOW: tl.constexpr, KEYS_BY_ROWS: tl.constexpr = False):
    """[query tile, key tile] visibility (``KEYS_BY_ROWS``: [key tile, query tile]): ``key <=
    row_limit`` (the query, or -1 for a row that sees nothing), and inside the window if any."""
    if KEYS_BY_ROWS:
        visible = key_pos[:, None] <= row_limit[None, :]
        if HAS_WINDOW:
            visible = visible & (key_pos[:, None] > query_pos[None, :] - window)
    else:
        visible = key_pos[None, :] <= row_limit[:, None]
        if HAS_WINDOW:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
    return visible


@triton.jit
def tile_plan(key_block_id, first_key, first_query, last_query, seq_len, window,
               QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """``(reached, mask_first_key, load_first_key, needs_mask)`` of one key tile of a query tile.

    ``reached``: some key of the tile may be visible (a used slot, not after the tile's last query,
    not wholly older than the window). An unreached tile is read at block 0 (``load_first_key``)
    and masked as keys from ``seq_len`` on (``mask_first_key``), which no query sees.
    ``needs_mask``: some query of the tile does not see some key of it (the diagonal, an unreached
    tile, padding rows, the window's edge); the other tiles skip the mask when ``MASK_ALL`` is off.
    """
    reached = (key_block_id >= 0) & (first_key <= last_query)
    if HAS_WINDOW:
        reached = reached & (first_key + KEY_TILE > first_query - window + 1)
    mask_first_key = tl.where(reached, first_key, seq_len)
    needs_mask = (mask_first_key + KEY_TILE - 1 > first_query) | (last_query < first_query + QUERY_TILE - 1)
    if HAS_WINDOW:
        needs_mask = needs_mask | (first_key <= last_query - window)
    return reached, mask_first_key, tl.where(reached, first_key, 0), needs_mask


@triton.jit
def step_tile_plan(step, block_indices_ptr, slots_row, first_query, last_query, seq_len, window,
                   KEY_BLOCK: tl.constexpr, TILES: tl.constexpr, QUERY_TILE: tl.constexpr, KEY_TILE: tl.constexpr,
                   HAS_WINDOW: tl.constexpr):
    """Step ``step`` of a query tile's loop over its row's (slot, key tile) pairs, key tiles fastest
    (``TILES`` key tiles per block): ``(slot, reached, mask_first_key, load_first_key, needs_mask)``,
    the slot read from the row at ``block_indices_ptr + slots_row`` and ``tile_plan``'s four for key
    tile ``step % TILES`` of its block."""
    slot = step // TILES
    key_block_id = tl.load(block_indices_ptr + slots_row + slot)
    first_key = key_block_id * KEY_BLOCK + (step % TILES) * KEY_TILE
    reached, mask_first_key, load_first_key, needs_mask = tile_plan(
        key_block_id, first_key, first_query, last_query, seq_len, window, QUERY_TILE, KEY_TILE, HAS_WINDOW)
    return slot, reached, mask_first_key, load_first_key, needs_mask
