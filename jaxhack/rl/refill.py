"""Continuous batching for the sampler: a fixed batch of B decode slots, refilled as rows finish.

`sampler.generate(schedule="refill")` runs here (design: docs/sampler.md, "Refill schedule"). Row
groups decode until their longest row is done, so with completion lengths of mean 500 and max 1536
most of a group's decode steps run for rows that have already stopped. Here a finished row's slot
takes the next pending row instead:

- **Prompt pool.** Each prompt is prefilled once, into a pool of NP prompt entries of Pp positions
  (`PromptCache`: keys/values, next-token logits, real lengths), and all its rows read that one copy:
  a decode step reads each live prompt's keys once for its rows (`prefix_decode_attention`), so the
  prompt positions, most of the keys a row reads at LeetCode lengths, are read and stored once per
  GRPO group rather than once per row. The host keeps the book (`PromptRuns`): a run of consecutive
  rows with one prompt takes a pool entry at its first row's refill and gives it back when its last
  row stops; with rows refilled in order, NP = min(runs, B + 1) entries never run out.
- **Slots.** The slot cache holds B slots of Sg = max_new (rounded up to the decode kernel's split)
  positions: slot b holds one row's generated tokens at a time, its t-th token at position t, t
  being the slot's own step. Slots are at different steps, so the decode forward writes each row's
  key/value at its own position (`qwen3.forward` with a [B] cache_index) and reads, per row, its own
  live range (the Pallas decode kernel takes per-row bounds); a token's RoPE position is its prompt's
  real length + t.
- **Refill program** (`_refill`, R rows at a time): prefill the prompts whose runs start among the R
  rows (U <= R of them; at R = 8 and G = 6, 2) in token chunks into their pool entries, point the slots
  at their rows' pool entries (and the entries' member tables at the slots), take the prompts'
  next-token logits, reset the slots' mask, step and outputs, and hand back the outputs the slots held
  (the finished rows'). A new row's own positions are written as it decodes (stale keys past its step
  are never read). Unused entries of the R point past the last slot and are dropped.
- **Round program** (`_round`): a `lax.while_loop` of decode steps over all B slots that stops once
  `trigger` slots are free (or all are). Finished slots emit nothing, write nothing the live rows
  read, and read one cache position each; a prompt none of whose rows is live is not read.
- **Host loop** (`generate_slots`): between rounds the host reads the B `done` flags (one small
  device-to-host copy per round), refills min(R, pending) free slots at a time, and calls the next
  round with trigger = min(R, pending rows), or B + 1 once no row is pending (then the round runs to
  the end). Shapes never depend on the round, so there are two compiled programs (refill and round)
  per (B, R, P, max_new, NP, Gm, U, ...), and the state is donated to each call (updated in place).
- **Same tokens.** A row's t-th token is drawn with fold_in(fold_in(key, t), row id), as in the row
  group schedule, and the per-step code is shared (`sampling.next_tokens`), so a row's tokens do not
  depend on its slot, on when it was refilled, or on the schedule, up to float differences of the
  logits between batch shapes and between one softmax and two merged ones (on CPU the tests see
  identical tokens and log-probs within ~1e-6; on a GPU another batch shape may pick another matmul
  kernel, as with row groups of another size).

Trade-off of deciding refills on the host: one device-to-host sync per round (about N / R rounds)
and a freed slot idles until R slots are free (R also sets the prefill's batch). The decode steps are
set by the long rows started last more than by R (`schedule_decode_steps`: 1517 steps at R = 8 and
1508 at R = 1 for the `full` preset's realistic lengths).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxhack.models import decode_layout, qwen3
from jaxhack.models.config import Qwen3Config
from jaxhack.models.decode_attention import SPLIT
from jaxhack.rl.sampling import MAX_EOS_IDS, SAMPLER_COMPILER_OPTIONS, batch_bucket, next_tokens, prefill, row_keys


@functools.partial(jax.tree_util.register_dataclass, data_fields=["cache", "logits", "start", "length"],
                   meta_fields=[])
@dataclasses.dataclass
class PromptCache:
    """The prompt pool: NP prompts, each prefilled once and read by all its rows, left-padded to P in
    Pp >= P positions (the decode kernel's split)."""
    cache: dict  # {"k","v": L-tuples of [NP,Hkv,Pp,hd]}: prompt j's real tokens at [start[j], P)
    logits: jax.Array  # [NP,V] fp32: next-token logits after each prompt
    start: jax.Array  # [NP] int32: first real position (P - length)
    length: jax.Array  # [NP] int32: real tokens


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["step", "done", "eos", "cap", "row", "prompt", "member", "members", "prompts",
                                "logits", "cache", "mask", "tokens", "logprobs", "n_steps"], meta_fields=[])
@dataclasses.dataclass
class SlotState:
    """The refill decoder's state: B slots of Sg positions, a pool of NP prompts of up to Gm rows each."""
    step: jax.Array  # [B] int32: tokens the slot's row has emitted (its next token's index t)
    done: jax.Array  # [B] bool: the slot is free (its row stopped, or it never held one)
    eos: jax.Array  # [B] bool: the slot's row emitted an EOS
    cap: jax.Array  # [B] int32: the row stops after this many tokens (max_lengths)
    row: jax.Array  # [B] int32: the row's index in the caller's list (its sampling key)
    prompt: jax.Array  # [B] int32: the row's prompt's pool entry
    member: jax.Array  # [B] int32: the row's place among its prompt's rows
    members: jax.Array  # [NP,Gm] int32: the slot of each pool prompt's m-th row (any slot where none)
    prompts: PromptCache
    logits: jax.Array  # [B,V] fp32: next-token logits
    cache: dict  # {"k","v": L-tuples of [B,Hkv,Sg,hd]}: the rows' generated tokens
    mask: jax.Array  # [B,Sg] bool: positions holding a generated token of the slot's row
    tokens: jax.Array  # [B,max_new] int32 (pad_id where not generated)
    logprobs: jax.Array  # [B,max_new] f32
    n_steps: jax.Array  # [] int32: decode steps run so far (all slots together)


def _init(config: Qwen3Config, B: int, Sg: int, max_new: int, NP: int, Gm: int, Pp: int, cache_dtype,
          pad_id) -> SlotState:
    zeros_b = jnp.zeros((B,), jnp.int32)
    prompts = PromptCache(cache=qwen3.init_cache(config, NP, Pp, cache_dtype),
                          logits=jnp.zeros((NP, config.vocab_size), jnp.float32),
                          start=jnp.zeros((NP,), jnp.int32), length=jnp.zeros((NP,), jnp.int32))
    return SlotState(step=zeros_b, done=jnp.ones((B,), bool), eos=jnp.zeros((B,), bool),
                     cap=jnp.ones((B,), jnp.int32), row=zeros_b, prompt=zeros_b, member=zeros_b,
                     members=jnp.zeros((NP, Gm), jnp.int32), prompts=prompts,
                     logits=jnp.zeros((B, config.vocab_size), jnp.float32),
                     cache=qwen3.init_cache(config, B, Sg, cache_dtype), mask=jnp.zeros((B, Sg), bool),
                     tokens=jnp.full((B, max_new), pad_id, jnp.int32), logprobs=jnp.zeros((B, max_new), jnp.float32),
                     n_steps=jnp.int32(0))


_init_jit = jax.jit(_init, static_argnames=("config", "B", "Sg", "max_new", "NP", "Gm", "Pp", "cache_dtype"))


def _refill(state: SlotState, params, adapters, prompt_tokens, prompt_mask, pool_rows, slots, rows, caps, prompt,
            member, pad_id, *, config: Qwen3Config, prefill_chunk: int):
    """Put R new rows into the slots `slots` ([R] int32; B = unused entry, dropped).
    prompt_tokens, prompt_mask: [U,P] left-padded, the prompts new to the pool (each prefilled once,
    in token chunks), written to pool entries pool_rows [U] (NP = unused, dropped); rows: [R] the rows'
    indices in the caller's list; caps: [R] their token caps; prompt, member: [R] each row's pool entry
    and its place among the prompt's rows. Returns (state, the slots' previous outputs: tokens
    [R,max_new], logprobs [R,max_new], lengths [R], eos [R]; meaningless for unused entries)."""
    U, P = prompt_tokens.shape
    R = slots.shape[0]
    B, Sg = state.mask.shape
    NP = state.members.shape[0]
    chex.assert_shape([slots, rows, caps, prompt, member], (R,))
    chex.assert_shape(prompt_mask, (U, P))
    chex.assert_shape(pool_rows, (U,))
    take = jnp.minimum(slots, B - 1)
    previous = (state.tokens[take], state.logprobs[take], state.step[take], state.eos[take])
    small = qwen3.init_cache(config, U, P, state.prompts.cache["k"][0].dtype)  # [U,Hkv,P,hd] per layer
    logits, small = prefill(params, adapters, prompt_tokens, prompt_mask, small, config, prefill_chunk)
    length = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

    def pool_put(big, new):  # big [NP,...], new [U,...]: entries pool_rows, unused (index NP) dropped
        return big.at[pool_rows].set(new, mode="drop")

    prompts = PromptCache(cache=jax.tree.map(lambda big, new: big.at[pool_rows, :, :P].set(new, mode="drop"),
                                             state.prompts.cache, small),
                          logits=pool_put(state.prompts.logits, logits), start=pool_put(state.prompts.start, P - length),
                          length=pool_put(state.prompts.length, length))

    def put(big, new):  # big [B,...], new [R,...]: rows `slots`, unused entries (index B) dropped
        return big.at[slots].set(new, mode="drop")

    max_new = state.tokens.shape[1]
    members = state.members.at[jnp.where(slots < B, prompt, NP), member].set(slots, mode="drop")
    new = SlotState(
        step=put(state.step, jnp.zeros((R,), jnp.int32)), done=put(state.done, jnp.zeros((R,), bool)),
        eos=put(state.eos, jnp.zeros((R,), bool)), cap=put(state.cap, caps), row=put(state.row, rows),
        prompt=put(state.prompt, prompt), member=put(state.member, member), members=members, prompts=prompts,
        logits=put(state.logits, prompts.logits[prompt]), cache=state.cache,
        mask=put(state.mask, jnp.zeros((R, Sg), bool)),
        tokens=put(state.tokens, jnp.full((R, max_new), pad_id, jnp.int32)),
        logprobs=put(state.logprobs, jnp.zeros((R, max_new), jnp.float32)), n_steps=state.n_steps)
    return new, previous


_refill_jit = jax.jit(_refill, static_argnames=("config", "prefill_chunk"), donate_argnums=0,
                      compiler_options=SAMPLER_COMPILER_OPTIONS)


def _round(state: SlotState, params, adapters, trigger, key, eos, pad_id, mode, temperature, top_p, *,
           config: Qwen3Config) -> SlotState:
    """Decode steps over all B slots until at least `trigger` ([] int32) slots are free, or all are."""
    B, Sg = state.mask.shape
    NP = state.members.shape[0]
    max_new = state.tokens.shape[1]
    chex.assert_shape(eos, (MAX_EOS_IDS,))
    slots = jnp.arange(B)
    pool = state.prompts

    def cond(s: SlotState):
        return ~jnp.all(s.done) & (jnp.sum(s.done) < trigger)

    def body(s: SlotState) -> SlotState:
        t = s.step  # [B]
        live = ~s.done
        token, logp, hit_eos = next_tokens(s.logits, row_keys(key, t, s.row), live, eos, pad_id, mode,
                                           temperature, top_p)
        col = jnp.where(live, t, max_new)  # finished slots write nowhere (index past the end: dropped)
        position = jnp.minimum(t, Sg - 1)  # [B] the slot-cache position of this step's token
        mask = s.mask.at[slots, position].set(live)
        read = jnp.zeros((NP,), jnp.int32).at[s.prompt].max(live.astype(jnp.int32)) > 0  # [NP] prompts read
        prefix = {"k": pool.cache["k"], "v": pool.cache["v"], "start": pool.start,
                  "end": jnp.where(read, pool.start + pool.length, pool.start), "members": s.members,
                  "prompt": s.prompt, "member": s.member, "offset": pool.length[s.prompt]}
        hidden, cache = qwen3.forward(params, config, token[:, None], mask, adapters=adapters, cache=s.cache,
                                      cache_index=position, attention="decode", prefix=prefix)  # hidden [B,1,D]
        return dataclasses.replace(
            s, step=t + live, done=s.done | hit_eos | (t + 1 >= s.cap), eos=s.eos | hit_eos,
            logits=qwen3.lm_logits(params, config, hidden[:, 0]), cache=cache, mask=mask,
            tokens=s.tokens.at[slots, col].set(token, mode="drop"),
            logprobs=s.logprobs.at[slots, col].set(logp, mode="drop"), n_steps=s.n_steps + 1)

    return jax.lax.while_loop(cond, body, state)


_round_jit = jax.jit(_round, static_argnames=("config",), donate_argnums=0,
                     compiler_options=SAMPLER_COMPILER_OPTIONS)


class PromptRuns:
    """The host's book of the prompt pool. A run is a maximal stretch of consecutive rows with one
    prompt (a GRPO group's G rows; a prompt repeated apart from itself makes two runs, each prefilled).
    Rows are refilled in order, so the runs holding a pool entry, those with a row refilled and a
    row unfinished, are at most the B slots' runs and the one that continues at the next row: a pool
    of min(runs, B + 1) entries (rounded up to a power of two up to 8, then to a multiple of 8: the
    `full` preset's 43 runs take 48 entries; `batch_bucket`'s 64 held 1.2 GB more at Qwen3-4B's shape
    with 512-position prompts) never runs out.

    ids: [N] prompt identities (`prompt_ids`); slots: B; refill_rows: R. Attributes: pool_size (NP),
    most_rows (Gm: the longest run, a power of two), U (the most runs starting in one refill's R rows,
    a power of two <= R: the prompts one refill program prefills)."""

    def __init__(self, ids, slots: int, refill_rows: int):
        ids = np.asarray(ids).reshape(-1)
        N = len(ids)
        is_start = np.r_[True, ids[1:] != ids[:-1]][:N]  # [N] the row begins a run
        starts = np.flatnonzero(is_start)
        self.run_of_row = np.cumsum(is_start) - 1
        self.member = np.arange(N) - starts[self.run_of_row]
        self.left = np.diff(np.r_[starts, N])  # [runs] rows not finished
        self.first = starts
        R = max(1, min(refill_rows, slots))
        most_new = max((int(np.sum((starts >= a) & (starts < a + R))) for a in range(0, N, R)), default=1)
        self.U = min(R, 1 << max(0, most_new - 1).bit_length())
        self.most_rows = 1 << max(0, int(self.left.max(initial=1)) - 1).bit_length()
        runs = len(starts)
        self.pool_size = min(batch_bucket(runs) if runs <= 8 else -(-runs // 8) * 8, slots + 1)
        self.free = list(range(self.pool_size))
        self.entry = {}  # run -> pool entry

    def refill(self, rows: np.ndarray):
        """rows: the k consecutive rows of a refill. Returns (first rows of the runs new to the pool [<= U],
        their pool entries [U] (pool_size = unused), each row's pool entry [k], each row's member [k])."""
        runs = self.run_of_row[rows]
        new = [r for r in dict.fromkeys(runs.tolist()) if r not in self.entry]
        pool_rows = np.full((self.U,), self.pool_size, np.int32)
        for i, r in enumerate(new):
            self.entry[r] = pool_rows[i] = self.free.pop(0)
        return (self.first[new].astype(int), pool_rows, np.array([self.entry[r] for r in runs.tolist()], np.int32),
                self.member[rows].astype(np.int32))

    def finished(self, rows: np.ndarray):
        """rows that stopped in the last round: a run whose rows all stopped gives its pool entry back."""
        for r in self.run_of_row[rows[rows >= 0]].tolist():
            self.left[r] -= 1
            if self.left[r] == 0:
                self.free.append(self.entry.pop(r))


def device_parts(n: int, devices: int) -> np.ndarray:
    """[devices + 1] boundaries cutting n rows into `devices` consecutive parts of near-equal size
    (`generate_slots_on_devices`: device d samples rows bounds[d]:bounds[d + 1])."""
    return np.linspace(0, n, devices + 1).round().astype(int)


def prompt_ids(prompt_tokens: np.ndarray, prompt_mask: np.ndarray) -> np.ndarray:
    """[N,P] left-padded prompts (tokens and mask) -> [N] int: equal for rows with the same prompt."""
    rows = np.concatenate([prompt_tokens, prompt_mask], axis=1)
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)


def prompt_windows(ids, refill_rows: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Which prompts each window of R consecutive rows ([jR, (j+1)R)) prefills, each once: a mesh
    device's rows of a row group (`distinct_prompts`). ids: [N] prompt identities (`prompt_ids`; rows
    g G .. g G + G - 1 of GRPO groups share theirs). Returns (source [N]: row i's prompt among its
    window's distinct ones; firsts: per window, the first row of each of its distinct prompts; U: the
    most distinct prompts in any window rounded up to a power of two (fewer compiled shapes), at most
    R). At R = 8 and G = 6 a window holds 2 prompts: 4x fewer prefilled tokens than rows."""
    ids = np.asarray(ids).reshape(-1)
    R = max(1, refill_rows)
    source, firsts = np.zeros(len(ids), np.int32), []
    for start in range(0, len(ids), R):
        _, first, inverse = np.unique(ids[start:start + R], return_index=True, return_inverse=True)
        order = np.argsort(first)  # distinct prompts in the order of their first row
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        source[start:start + R] = rank[inverse.reshape(-1)]
        firsts.append(start + first[order])
    most = max((len(f) for f in firsts), default=1)
    return source, firsts, min(R, 1 << (most - 1).bit_length())


def distinct_prompts(tokens: np.ndarray, mask: np.ndarray, window: int, pad_id: int):
    """[N,P] left-padded prompts in windows of `window` consecutive rows (a row group; a mesh device's
    rows of a row group) -> (tokens, mask [W*U,P]: window w's distinct prompts at rows w*U..,
    padded to U (`prompt_windows`); source [N] int32: each row's prompt among its window's U; U). The
    rows then prefill each distinct prompt once (`sampling.prefill_prompts`)."""
    N, P = tokens.shape
    source, firsts, U = prompt_windows(prompt_ids(tokens, mask), window)
    out_tokens = np.full((len(firsts) * U, P), pad_id, np.int32)
    out_mask = np.zeros((len(firsts) * U, P), bool)
    for w, rows in enumerate(firsts):
        out_tokens[w * U:w * U + len(rows)], out_mask[w * U:w * U + len(rows)] = tokens[rows], mask[rows]
    return out_tokens, out_mask, source, U


def schedule_decode_steps(lengths, slots: int, refill_rows: int, devices: int = 1) -> int:
    """Decode steps `generate_slots` runs for rows of these completion lengths (in row order), without a
    model: the same host loop (refill min(R, pending) free slots at a time, once that many are free;
    a round stops when `trigger` slots are free), with each slot's row taking `length` steps. For
    planning `sample_rows` (slots) against memory: every slot holds max_new cache positions (and each
    distinct prompt P, once).
    devices: `generate_slots_on_devices`' D parts (`device_parts`), each with `slots` slots; the
    largest part's count.
    lengths: [N] ints >= 1 (a row's real length: at its EOS or its cap)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or (lengths < 1).any():
        raise ValueError("lengths must be a 1-D array of ints >= 1")
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if devices > 1:
        bounds = device_parts(len(lengths), devices)
        return max((schedule_decode_steps(lengths[a:b], slots, refill_rows) for a, b in zip(bounds, bounds[1:])
                    if b > a), default=0)
    N, B, R = len(lengths), slots, min(refill_rows, slots)
    if R < 1:
        raise ValueError(f"refill_rows and slots must be >= 1, got {refill_rows}, {slots}")
    remaining = np.zeros((B,), np.int64)
    done = np.ones((B,), bool)
    next_row = steps = 0
    while True:
        pending = N - next_row
        free = np.flatnonzero(done)
        if pending and len(free) >= min(R, pending):
            k = min(R, pending)
            remaining[free[:k]] = lengths[next_row:next_row + k]
            done[free[:k]] = False
            next_row += k
            continue
        if not pending and done.all():
            return steps
        trigger = min(R, pending) if pending else B + 1
        live = np.flatnonzero(~done)
        # the round runs until `trigger` slots are free (or all are): jump to that step
        need = trigger - int(done.sum())
        left = np.sort(remaining[live])
        t = int(left[min(need, len(left)) - 1]) if need > 0 else 0
        t = max(t, 1)
        remaining[live] -= t
        steps += t
        done[live[remaining[live] <= 0]] = True


def generate_slots(params, adapters, prompt_tokens: np.ndarray, prompt_mask: np.ndarray, caps: np.ndarray,
                   eos: np.ndarray, pad_id: int, key, mode: int, temperature: float, top_p: float, *,
                   config: Qwen3Config, max_new: int, cache_dtype, prefill_chunk: int, slots: int,
                   refill_rows: int, row_offset: int = 0, stop=None):
    """The host loop. params, adapters: the decode layout (`lend.decode_weights`). prompt_tokens,
    prompt_mask: [N,P] left-padded (numpy); caps: [N] tokens per row (<= max_new); eos: [MAX_EOS_IDS]
    int32 padded with -1; slots: B; refill_rows: R (<= B); row_offset: row i draws with the key of row
    row_offset + i (a device's part of the rows, `generate_slots_on_devices`); stop: a threading.Event
    checked between refills and rounds (set: raise `SamplingStopped`; the other devices' loops after one
    device failed or Ctrl-C).
    Returns numpy tokens [N,max_new], logprobs [N,max_new], lengths [N], finished [N] in row order, and
    the number of decode steps run (each a forward over all B slots)."""
    if not decode_layout.is_laid_out(params):
        raise ValueError("generate_slots: params must be laid out for decoding (rl.lend.decode_weights)")
    N, P = prompt_tokens.shape
    B, R = slots, min(refill_rows, slots)
    if R < 1:
        raise ValueError(f"refill_rows must be >= 1, got {refill_rows}")
    Sg = -(-max_new // SPLIT) * SPLIT  # the slots hold generated tokens only
    Pp = -(-P // SPLIT) * SPLIT  # the prompt cache's positions (the kernel's split); P..Pp-1 never read
    table = PromptRuns(prompt_ids(prompt_tokens, prompt_mask), B, R)
    state = _init_jit(config, B, Sg, max_new, table.pool_size, table.most_rows, Pp, cache_dtype, jnp.int32(pad_id))
    scalars = (key, jnp.asarray(eos), jnp.int32(pad_id), jnp.int32(mode), jnp.float32(temperature),
               jnp.float32(top_p))
    slot_row = np.full((B,), -1)  # host copy: which row each slot holds (-1: none yet)
    done = np.ones((B,), bool)
    handed_back = []  # (rows [k], device outputs of R slots, k): outputs of rows whose slot was refilled
    next_row = 0
    while True:
        if stop is not None and stop.is_set():
            raise SamplingStopped("sampling stopped: another device's part failed or was interrupted")
        pending = N - next_row
        free = np.flatnonzero(done)
        if pending and len(free) >= min(R, pending):
            k = min(R, pending)
            chosen = free[:k]
            idx = np.full((R,), B, np.int32)
            idx[:k] = chosen
            rows = np.zeros((R,), np.int32)
            rows[:k] = np.arange(next_row, next_row + k)
            row_caps = np.ones((R,), np.int32)
            row_caps[:k] = caps[next_row:next_row + k]
            firsts, new_entries, entry, member = table.refill(rows[:k])  # new runs' first rows; [U]; [k]; [k]
            toks = np.full((table.U, P), pad_id, np.int32)
            msk = np.zeros((table.U, P), bool)
            toks[:len(firsts)], msk[:len(firsts)] = prompt_tokens[firsts], prompt_mask[firsts]
            row_entry, row_member = np.zeros((R,), np.int32), np.zeros((R,), np.int32)
            row_entry[:k], row_member[:k] = entry, member
            state, previous = _refill_jit(state, params, adapters, jnp.asarray(toks), jnp.asarray(msk),
                                          jnp.asarray(new_entries), jnp.asarray(idx), jnp.asarray(rows + row_offset),
                                          jnp.asarray(row_caps), jnp.asarray(row_entry), jnp.asarray(row_member),
                                          jnp.int32(pad_id), config=config, prefill_chunk=prefill_chunk)
            evicted = slot_row[chosen]
            if (evicted >= 0).any():
                handed_back.append((evicted, previous, np.flatnonzero(evicted >= 0)))
            slot_row[chosen] = rows[:k]
            done[chosen] = False
            next_row += k
            continue
        if not pending and done.all():
            break
        trigger = min(R, pending) if pending else B + 1
        state = _round_jit(state, params, adapters, jnp.int32(trigger), *scalars, config=config)
        now_done = np.array(state.done)  # the round's one sync (a writable copy)
        table.finished(slot_row[now_done & ~done])
        done = now_done

    out_tokens = np.full((N, max_new), pad_id, np.int32)
    out_logp = np.zeros((N, max_new), np.float32)
    lengths = np.zeros((N,), np.int32)
    finished = np.zeros((N,), bool)

    def collect(rows, outputs, where):
        tokens, logp, length, eos_hit = (np.asarray(x)[where] for x in outputs)
        out_tokens[rows[where]], out_logp[rows[where]] = tokens, logp
        lengths[rows[where]], finished[rows[where]] = length, eos_hit

    for rows, previous, where in handed_back:
        collect(rows, previous, where)
    collect(slot_row, (state.tokens, state.logprobs, state.step, state.eos), np.flatnonzero(slot_row >= 0))
    return out_tokens, out_logp, lengths, finished, int(state.n_steps)


class SamplingStopped(RuntimeError):
    """A device's refill loop stopped because another device's part failed (or Ctrl-C)."""


def _on_device(x, device):
    """x on `device`: the shard a replicated jax.Array already holds there (no copy), else a device_put."""
    if isinstance(x, jax.Array):
        for shard in x.addressable_shards:
            if shard.device == device and shard.data.shape == x.shape:
                return shard.data
    return jax.device_put(x, device)


def generate_slots_on_devices(devices, params, adapters, prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                              caps: np.ndarray, eos: np.ndarray, pad_id: int, key, mode: int, temperature: float,
                              top_p: float, *, slots: int, **kwargs):
    """Data-parallel refill: the N rows are cut into len(devices) consecutive parts of near-equal size and
    device d runs `generate_slots` on its part (its own `slots` decode slots, its own host loop, in a
    thread of its own) with its copy of params / adapters (the replicated arrays' shards on d). Row i
    keeps its key (row_offset), so the tokens are one device's. One process's devices only (threads).
    Returns as `generate_slots`, the rows in order; the decode steps are the largest device's count."""
    bounds = device_parts(len(prompt_tokens), len(devices))  # [D+1]
    # each device's shards, taken here in the calling thread: reading a fresh jit output's shards from
    # several threads at once gave an inconsistent array on CPU (one buffer for two devices), session 12
    local = [jax.tree.map(lambda x, device=device: _on_device(x, device), (params, adapters, key))
             for device in devices]

    def run(d: int):
        start, end = int(bounds[d]), int(bounds[d + 1])
        if start == end:
            return None
        local_params, local_adapters, local_key = local[d]
        with jax.default_device(devices[d]):
            return generate_slots(local_params, local_adapters, prompt_tokens[start:end], prompt_mask[start:end],
                                  caps[start:end], eos, pad_id, local_key, mode, temperature, top_p,
                                  slots=slots, row_offset=start, stop=stop, **kwargs)

    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        try:
            parts = [part for part in pool.map(run, range(len(devices))) if part is not None]
        except BaseException:  # a device's error or Ctrl-C: the other loops stop at their next round
            stop.set()
            raise
    tokens, logprobs, lengths, finished = (np.concatenate([part[i] for part in parts]) for i in range(4))
    return tokens, logprobs, lengths, finished, max(part[4] for part in parts)
