"""The selection steps (Triton) the Stream and bounds search kernels share (``stream_triton``,
``bounds_triton``): one round's best halves by rank counting, and the found blocks stored ascending.
Sort-free: ranks are compare-and-count over register vectors (module doc of ``stream_triton``).
"""

import triton
import triton.language as tl


@triton.jit
def keep_best_halves_by_rank(score, non_empty, cand, cand_is_real, cand_start, cand_end, branch,
                             N_SEARCH: tl.constexpr):
    """One search round's selection by compare-and-count: rank[c] =
    the number of real candidates that beat candidate c in a strict total order (higher score, then
    non-empty, then lower index); the candidate of rank r becomes branch r. Returns the new
    ``(branch_start, branch_end)``."""
    other_score, own_score = score[None, :], score[:, None]
    other_full, own_full = non_empty[None, :], non_empty[:, None]
    beats = (other_score > own_score) | (
        (other_score == own_score)
        & ((other_full & ~own_full) | ((other_full == own_full) & (cand[None, :] < cand[:, None])))
    )
    rank = tl.sum((beats & cand_is_real[None, :]).to(tl.int32), axis=1)
    chosen = (rank[None, :] == branch[:, None]) & (cand_is_real & (rank < N_SEARCH))[None, :]
    branch_start = tl.sum(tl.where(chosen, cand_start[None, :], 0), axis=1)
    branch_end = tl.sum(tl.where(chosen, cand_end[None, :], 0), axis=1)
    return branch_start, branch_end


@triton.jit
def store_branches_ascending(row_ptr, branch_start, branch, branch_is_real, SINK_BLOCKS: tl.constexpr):
    """Store the found blocks (each branch's start) ascending after the sinks:
    a block's position is the number of real branches before it."""
    before = (branch_start[None, :] < branch_start[:, None]) | (
        (branch_start[None, :] == branch_start[:, None]) & (branch[None, :] < branch[:, None])
    )
    position = tl.sum((before & branch_is_real[None, :]).to(tl.int32), axis=1)
    tl.store(row_ptr + SINK_BLOCKS + position, branch_start.to(tl.int64), mask=branch_is_real)
