//! Where the Maglev tables live in `RING`: a slab of 512-byte elements that each (service,
//! colour) table takes a run of, sized to its pool (`switcher_common::ring_class`).
//!
//! A new table is written into free elements and then made live with one `RING_LIVE` write;
//! the elements of the table it replaced may still be read by a packet that looked
//! `RING_LIVE` up just before, so they rest until [`Slab::settle`] (called once a second by
//! the daemon, or when nothing else is free) before they are given out again.

use std::collections::BTreeMap;

use switcher_common::{RING_CHUNK, RING_OFFSET_MASK, RING_SIZES, ring_class};

/// Bytes of one `RING` element.
pub const ELEMENT_BYTES: u64 = RING_CHUNK as u64 * 2;

/// Elements of the smallest slab: 512 KiB.
const MIN_ELEMENTS: u32 = 1_024;

/// Elements a table of `backends` pool members takes (none for an empty pool).
#[must_use]
pub fn table_elements(backends: usize) -> u32 {
    if backends == 0 { 0 } else { 1 << ring_class(u32::try_from(backends).unwrap_or(u32::MAX)) }
}

/// Elements for tables of `need` elements in all: twice that (room to grow pools and add
/// services by reload), plus one largest table so that any pool can always be rebuilt, at
/// least 512 KiB and at most what a `RING_LIVE` value can address.
#[must_use]
pub fn capacity_for(need: u64) -> u32 {
    let largest = 1u64 << (RING_SIZES.len() - 1);
    let want = (need * 2 + largest).max(u64::from(MIN_ELEMENTS));
    u32::try_from(want.min(u64::from(RING_OFFSET_MASK) + 1)).unwrap_or(RING_OFFSET_MASK + 1)
}

/// The slab is full: even after the resting runs were freed, no run of `len` elements is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the Maglev slab (RING: {capacity} elements, {} MiB) has no room for a table of {len} elements ({used} in use); restart the daemon: it sizes the slab to the config",
    (u64::from(*capacity) * ELEMENT_BYTES) >> 20
)]
pub struct SlabFull {
    pub capacity: u32,
    pub len: u32,
    pub used: u32,
}

/// Free and resting runs of the slab.
#[derive(Debug, Clone)]
pub struct Slab {
    capacity: u32,
    /// Free runs, first element → length; neighbours are always merged.
    free: BTreeMap<u32, u32>,
    /// Runs given back since the last [`Slab::settle`].
    resting: Vec<(u32, u32)>,
    used: u32,
}

impl Slab {
    #[must_use]
    pub fn new(capacity: u32) -> Slab {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Slab { capacity, free, resting: Vec::new(), used: 0 }
    }

    #[must_use]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Elements held by tables (live or resting).
    #[must_use]
    pub fn used(&self) -> u32 {
        self.used
    }

    /// Takes a run of `len` elements: the smallest free run that fits (so large runs stay
    /// whole), the resting runs too if nothing else fits. Returns its first element.
    ///
    /// # Errors
    /// [`SlabFull`] when no run of `len` is free.
    pub fn alloc(&mut self, len: u32) -> Result<u32, SlabFull> {
        if let Some(at) = self.best_fit(len) {
            return Ok(at);
        }
        self.settle();
        self.best_fit(len).ok_or(SlabFull { capacity: self.capacity, len, used: self.used })
    }

    fn best_fit(&mut self, len: u32) -> Option<u32> {
        let (&at, &run) = self.free.iter().filter(|&(_, &run)| run >= len).min_by_key(|&(&at, &run)| (run, at))?;
        self.free.remove(&at);
        if run > len {
            self.free.insert(at + len, run - len);
        }
        self.used += len;
        Some(at)
    }

    /// Gives a run back; it rests until the next [`Slab::settle`].
    pub fn release(&mut self, at: u32, len: u32) {
        if len > 0 {
            self.resting.push((at, len));
        }
    }

    /// Frees the resting runs: no packet still reads them (a packet's program run lasts
    /// microseconds; this runs at most once a second, or when the slab is otherwise full).
    pub fn settle(&mut self) {
        for (at, len) in std::mem::take(&mut self.resting) {
            self.used -= len;
            self.free_run(at, len);
        }
    }

    fn free_run(&mut self, mut at: u32, mut len: u32) {
        if let Some((&before, &run)) = self.free.range(..at).next_back()
            && before + run == at
        {
            self.free.remove(&before);
            at = before;
            len += run;
        }
        if let Some(run) = self.free.remove(&(at + len)) {
            len += run;
        }
        self.free.insert(at, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sized_to_their_pools() {
        assert_eq!(table_elements(0), 0);
        assert_eq!(table_elements(1), 1);
        assert_eq!(table_elements(2), 2);
        assert_eq!(table_elements(64), 64);
        assert_eq!(capacity_for(0), MIN_ELEMENTS);
        assert_eq!(capacity_for(10_000), 20_256);
    }

    #[test]
    fn runs_are_reused_only_after_they_rest() {
        let mut s = Slab::new(8);
        let a = s.alloc(4).expect("a");
        let b = s.alloc(4).expect("b");
        assert_ne!(a, b);
        s.release(a, 4);
        assert_eq!(s.used(), 8, "resting runs still count");
        // Full but for the resting run: it is settled and given out.
        assert_eq!(s.alloc(4), Ok(a));
        s.release(b, 4);
        s.release(a, 4);
        s.settle();
        assert_eq!(s.used(), 0);
        assert_eq!(s.alloc(8), Ok(0), "neighbours merge into one run");
        assert_eq!(s.alloc(1), Err(SlabFull { capacity: 8, len: 1, used: 8 }));
    }

    #[test]
    fn small_tables_do_not_break_up_large_runs() {
        let mut s = Slab::new(16);
        let a = s.alloc(2).expect("a");
        let _b = s.alloc(8).expect("b");
        s.release(a, 2);
        s.settle();
        // Free: [0, 2) and [10, 16): a run of 2 goes into the first.
        assert_eq!(s.alloc(2), Ok(0));
        assert_eq!(s.alloc(6), Ok(10));
    }

    #[test]
    fn churn_never_loses_elements() {
        let mut s = Slab::new(capacity_for(32 * 64));
        let mut live: Vec<(u32, u32)> = Vec::new();
        let mut x = 12_345u32;
        for round in 0..10_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let len = table_elements((x >> 16) as usize % 64 + 1);
            if live.len() >= 32 || (round % 3 == 0 && !live.is_empty()) {
                let (at, n) = live.swap_remove((x as usize >> 8) % live.len());
                s.release(at, n);
            }
            let at = s.alloc(len).expect("room");
            assert!(live.iter().all(|&(o, n)| at + len <= o || o + n <= at), "runs never overlap");
            live.push((at, len));
            if round % 100 == 0 {
                s.settle();
            }
        }
        for (at, n) in live.drain(..) {
            s.release(at, n);
        }
        s.settle();
        assert_eq!(s.used(), 0);
        assert_eq!(s.alloc(s.capacity()), Ok(0), "everything merged back");
    }
}
