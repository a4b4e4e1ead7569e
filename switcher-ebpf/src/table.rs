//! The flow table, `FLOWS`: an array of `FlowSlot`s in sets of `FLOW_WAYS`. A 5-tuple lives
//! in one slot of the set `flow_set_hash` gives it, so a lookup reads at most four slots that
//! sit side by side, and an insert writes one: no lock, no allocation, no list to keep, and a
//! full table costs a new flow what an empty one does. A new flow takes its 5-tuple's own slot
//! if it has one, else a free slot of the set, else the slot of a flow that has ended, else
//! the slot of the flow seen longest ago (the set's least recently seen). The table has twice
//! the slots of `max_flows` (`flow_sets`), so a set overflows rarely before the table fills.
//!
//! Writers are the data path on every CPU and, rarely, the daemon (a drain's end, a removed
//! service). A slot being given to another flow is emptied first (its family set to 0) and
//! its family written last, so a reader never takes a half-written key for a flow's; what a
//! reader may see in that instant is the value of the flow about to own the slot, which is
//! one packet of an evicted flow, the same as the flow evicted a moment earlier.

use core::sync::atomic::{Ordering, compiler_fence};

use switcher_common::{FLOW_WAYS, Flow, FlowKey, FlowSet, FlowSlot, colour_slot, flow_expired, flow_set_hash};

use crate::{
    mem,
    prog::{COUNTERS, FLOW_SET_MASK, FLOWS, UDP_IDLE_NS},
};

/// The index of `key`'s set. The key sits in a map value (the per-CPU scratch), 8-byte
/// aligned (asserted with `Scratch`), so its words are read as words. Volatile loads keep
/// LLVM from hoisting all five loads ahead of the mixing, which would spill them to the stack.
#[inline(always)]
fn set_index(key: &FlowKey) -> u32 {
    let words = core::ptr::from_ref(key).cast::<u64>();
    // SAFETY: `i` < 5 words of a 40-byte key, 8-byte aligned (see above).
    flow_set_hash(|i| unsafe { words.add(i).read_volatile() }) & FLOW_SET_MASK.load()
}

/// `key`'s set.
#[inline(always)]
fn set_of(key: &FlowKey) -> Option<&'static mut FlowSet> {
    // SAFETY: a live array element; it stays valid while the program runs.
    FLOWS.get_ptr_mut(set_index(key)).map(|p| unsafe { &mut *p })
}

/// The slot [`switcher_flow_find`] answered (`at` ≠ 0).
#[inline(always)]
fn slot_at(at: u32) -> Option<&'static mut FlowSlot> {
    let at = at.checked_sub(1)?;
    // SAFETY: a live array element; it stays valid while the program runs.
    let set = unsafe { &mut *FLOWS.get_ptr_mut(at / FLOW_WAYS)? };
    set.slots.get_mut((at % FLOW_WAYS) as usize)
}

/// Whether `slot` holds `key`'s flow: the five 8-byte words of the two keys (both in map
/// values, 8-byte aligned; a free slot's family, 0, never matches a key's). Volatile loads,
/// word by word as the compare goes: LLVM would otherwise load all ten words at once and
/// spill them to the stack.
#[inline(always)]
fn holds(slot: &FlowSlot, key: &FlowKey) -> bool {
    let (a, b) = (core::ptr::from_ref(&slot.key).cast::<u64>(), core::ptr::from_ref(key).cast::<u64>());
    // SAFETY: word `i` < 5 of two 40-byte, 8-aligned keys.
    let same = |i: usize| unsafe { a.add(i).read_volatile() == b.add(i).read_volatile() };
    same(4) && same(0) && same(1) && same(2) && same(3)
}

/// The flow of `key` (in the per-CPU scratch), if the table has it: [`switcher_flow_find`]
/// finds its slot, and one array lookup gives the slot to the caller.
#[inline(always)]
pub fn get(key: &FlowKey) -> Option<&'static mut Flow> {
    slot_at(switcher_flow_find(key)).map(|slot| &mut slot.flow)
}

/// [`get`] with the lookup inlined, for the one caller on the established path: a call and
/// its return cost more than the lookup here (the kernel's return thunks), and the verifier
/// checks this copy only where it is used.
#[inline(always)]
pub fn get_inline(key: &FlowKey) -> Option<&'static mut Flow> {
    slot_at(find(key)).map(|slot| &mut slot.flow)
}

/// Where `key`'s flow is: 1 + its set × `FLOW_WAYS` + its way, or 0 if the table does not
/// have it. A global function: the verifier checks it once, not at each of the many places
/// that look a flow up (which would take the program past its limit of verified
/// instructions), and it returns a number, not a pointer, so [`get`] looks the slot up.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn switcher_flow_find(key: *const FlowKey) -> u32 {
    // The verifier checks a global function for any caller: a null key included.
    // SAFETY: non-null (checked), and every caller passes a key of the scratch.
    let Some(key) = (unsafe { key.as_ref() }) else { return 0 };
    find(key)
}

/// [`switcher_flow_find`]'s work.
#[inline(always)]
fn find(key: &FlowKey) -> u32 {
    let set = set_index(key);
    // SAFETY: a live array element; it stays valid while the program runs.
    let Some(slots) = FLOWS.get_ptr_mut(set).map(|p| unsafe { &(*p).slots }) else { return 0 };
    let mut way = 0;
    while way < slots.len() {
        if holds(&slots[way], key) {
            return 1 + set * FLOW_WAYS + way as u32;
        }
        way += 1;
    }
    0
}

/// Records `flow` for `key` (in the per-CPU scratch): in the slot `key` already has, else a
/// free one, else one whose flow ended, else the set's least recently seen.
/// `flow.last_seen_ns` is the clock of the decision. Global, like [`switcher_flow_find`]:
/// checked once by the verifier.
#[inline(always)]
pub fn insert(key: &FlowKey, flow: &Flow) {
    switcher_flow_insert(key, flow);
}

/// [`insert`]'s work; returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn switcher_flow_insert(key: *const FlowKey, flow: *const Flow) -> u32 {
    // The verifier checks a global function for any caller: null pointers included.
    // SAFETY: non-null (checked), and every caller passes the scratch's key and flow.
    let (Some(key), Some(flow)) = (unsafe { key.as_ref() }, unsafe { flow.as_ref() }) else { return 0 };
    let Some(set) = set_of(key) else { return 0 };
    let now = flow.last_seen_ns;
    let (mut best, mut low) = (0, u64::MAX);
    for (i, slot) in set.slots.iter().enumerate() {
        let score = score(slot, key, now);
        if score < low {
            (best, low) = (i, score);
        }
    }
    let Some(slot) = set.slots.get_mut(best) else { return 0 };
    if low == SCORE_OWN {
        mem::copy(&mut slot.flow, flow);
        return 0;
    }
    if low >= SCORE_OPEN {
        // A flow that had not ended loses its slot: counted on its colour.
        let (service, colour) = (slot.flow.service, u32::from(slot.flow.colour));
        if let Some(c) = COUNTERS.get_ptr_mut(colour_slot(service, colour)) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe { (*c).evicted += 1 };
        }
    }
    // Empty the slot, write the flow and the key, then the family that makes it findable.
    // SAFETY: a field of a live map value.
    unsafe { core::ptr::addr_of_mut!(slot.key.family).write_volatile(0) };
    compiler_fence(Ordering::Release);
    mem::copy(&mut slot.flow, flow);
    mem::copy(&mut slot.key.src, &key.src);
    mem::copy(&mut slot.key.dst, &key.dst);
    slot.key.sport = key.sport;
    slot.key.dport = key.dport;
    slot.key.proto = key.proto;
    slot.key._pad = [0; 2];
    compiler_fence(Ordering::Release);
    // SAFETY: as above.
    unsafe { core::ptr::addr_of_mut!(slot.key.family).write_volatile(key.family) };
    0
}

/// [`score`]s: the slot is the key's own, free, or its flow has ended; an open flow's slot
/// scores `SCORE_OPEN` + when it was last seen.
const SCORE_OWN: u64 = 0;
const SCORE_FREE: u64 = 1;
const SCORE_ENDED: u64 = 2;
const SCORE_OPEN: u64 = 3;

/// How fit a slot is to take `key`'s flow, the lowest the fittest: its own, a free one, one
/// whose flow has ended (at `now`), then open flows' by when they were last seen (the least
/// recently seen goes first).
#[inline(always)]
fn score(slot: &FlowSlot, key: &FlowKey, now: u64) -> u64 {
    if slot.key.family == 0 {
        SCORE_FREE
    } else if holds(slot, key) {
        SCORE_OWN
    } else if flow_expired(slot.key.proto, slot.flow.flags, now, slot.flow.last_seen_ns, UDP_IDLE_NS.load()) {
        SCORE_ENDED
    } else {
        slot.flow.last_seen_ns.saturating_add(SCORE_OPEN)
    }
}

/// Forgets `key`'s flow, if the table has it: its slot is free again.
#[inline(always)]
pub fn remove(key: &FlowKey) {
    if let Some(slot) = slot_at(switcher_flow_find(key)) {
        // SAFETY: a field of a live map value.
        unsafe { core::ptr::addr_of_mut!(slot.key.family).write_volatile(0) };
    }
}
