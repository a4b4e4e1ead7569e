//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with weights.
//!
//! Each backend walks its own permutation of the table's slots, derived from its name only,
//! and claims the next free slot on its turn; a backend of weight `w` takes `w` turns per
//! round. Because a backend's permutation does not depend on the others, adding or removing
//! one moves about `1/N` of the slots, and every node that builds a table from the same
//! backends gets the same table.

use switcher_common::RING_EMPTY;

/// One backend as the table sees it: a stable name (its address), a weight, and the index it
/// has in the pool (`BACKENDS`), which is what the table stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub weight: u32,
    pub index: u16,
}

/// 64-bit FNV-1a with a seed.
fn hash(seed: u64, s: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // A final avalanche so that similar names get unrelated permutations.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Builds a table of `size` slots (a prime). Members of weight 0 get no slots; with no
/// members of positive weight every slot is `RING_EMPTY`.
#[must_use]
pub fn build(members: &[Member], size: u32) -> Vec<u16> {
    let m = u64::from(size);
    let mut table = vec![RING_EMPTY; size as usize];
    let live: Vec<&Member> = members.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || size < 2 {
        return table;
    }
    let perm: Vec<(u64, u64)> = live.iter().map(|b| (hash(1, &b.name) % m, hash(2, &b.name) % (m - 1) + 1)).collect();
    let mut next = vec![0u64; live.len()];
    let mut filled = 0u64;
    'fill: loop {
        for (i, b) in live.iter().enumerate() {
            for _ in 0..b.weight {
                let (offset, skip) = perm[i];
                // Every backend's walk visits all slots (skip and m are coprime, m prime), so
                // this finds a free one while any is free.
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != RING_EMPTY {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = b.index;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65_537;

    fn members(names: &[&str]) -> Vec<Member> {
        names.iter().zip(0u16..).map(|(n, i)| Member { name: (*n).to_owned(), weight: 1, index: i }).collect()
    }

    fn share(table: &[u16], index: u16) -> f64 {
        table.iter().filter(|&&s| s == index).count() as f64 / table.len() as f64
    }

    #[test]
    fn every_slot_is_filled_and_evenly_shared() {
        let t = build(&members(&["a:1", "b:1", "c:1"]), M);
        assert!(t.iter().all(|&s| s < 3));
        for i in 0..3 {
            assert!((share(&t, i) - 1.0 / 3.0).abs() < 0.01, "backend {i}: {}", share(&t, i));
        }
    }

    #[test]
    fn removing_a_backend_moves_about_its_share_only() {
        let names = ["198.51.100.2:80", "198.51.100.3:80", "198.51.100.4:80", "198.51.100.5:80"];
        let before = build(&members(&names), M);
        // Remove the third; the others keep their pool indices.
        let mut rest = members(&names);
        rest.remove(2);
        let after = build(&rest, M);
        let kept = before.iter().zip(&after).filter(|(b, a)| **b != 2 && b == a).count();
        let others = before.iter().filter(|&&b| b != 2).count();
        assert!(kept as f64 / others as f64 > 0.97, "slots of the remaining backends kept: {kept}/{others}");
        assert!(after.iter().all(|&s| s != 2), "the removed backend is gone");
    }

    #[test]
    fn weights_shape_the_shares() {
        let mut m = members(&["a:1", "b:1"]);
        m[1].weight = 3;
        let t = build(&m, M);
        assert!((share(&t, 1) - 0.75).abs() < 0.01, "{}", share(&t, 1));
        m[0].weight = 0;
        assert!(build(&m, M).iter().all(|&s| s == 1), "weight 0 takes no slots");
    }

    /// Slots of the busiest backend over the mean, minus one, for `n` backends of weight 1 in
    /// the table the daemon sizes for them.
    fn imbalance(n: u32) -> f64 {
        let names: Vec<String> = (0..n).map(|i| format!("198.51.100.{}:{}", i % 250, 8000 + i)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let size = switcher_common::RING_SIZES[switcher_common::ring_class(n) as usize];
        let t = build(&members(&refs), size);
        let most = (0..n as u16).map(|i| t.iter().filter(|&&s| s == i).count()).max().unwrap_or(0);
        most as f64 / (f64::from(size) / f64::from(n)) - 1.0
    }

    #[test]
    fn tables_sized_to_their_pools_stay_within_half_a_percent() {
        let worst = (1..=switcher_common::MAX_POOL)
            .map(|n| (imbalance(n), n))
            .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
        eprintln!("worst imbalance: {:.3} % with {} backends", worst.0 * 100.0, worst.1);
        assert!(
            worst.0 <= 0.005,
            "{} backends: the busiest has {:.3} % more slots than the mean",
            worst.1,
            worst.0 * 100.0
        );
    }

    #[test]
    fn small_tables_move_little_more_than_the_removed_share() {
        // 4 backends: a 1,021-slot table. Removing one moves its quarter and little else.
        let names = ["198.51.100.2:80", "198.51.100.3:80", "198.51.100.4:80", "198.51.100.5:80"];
        let size = switcher_common::RING_SIZES[switcher_common::ring_class(4) as usize];
        let before = build(&members(&names), size);
        let mut rest = members(&names);
        rest.remove(2);
        let after = build(&rest, size);
        let kept = before.iter().zip(&after).filter(|(b, a)| **b != 2 && b == a).count();
        let others = before.iter().filter(|&&b| b != 2).count();
        eprintln!("{size} slots: {kept} of {others} slots of the remaining backends kept");
        assert!(kept as f64 / others as f64 > 0.9, "slots of the remaining backends kept: {kept}/{others}");
    }

    #[test]
    fn empty_and_deterministic() {
        assert!(build(&[], 7).iter().all(|&s| s == RING_EMPTY));
        let a = build(&members(&["x:1", "y:2"]), 4099);
        let b = build(&members(&["x:1", "y:2"]), 4099);
        assert_eq!(a, b, "same inputs, same table: every node agrees");
    }
}
