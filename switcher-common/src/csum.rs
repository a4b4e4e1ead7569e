//! Incremental Internet checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! XDP has no `bpf_l3_csum_replace`/`bpf_l4_csum_replace`, so the data path accumulates the
//! changed 16-bit words in a [`CsumDelta`] and applies it to each checksum field it touches.
//!
//! Words are summed in the machine's own byte order: the ones'-complement sum does not depend
//! on it (RFC 1071, 2.B), so a field read as a native `u16` straight from the packet and a
//! checksum written back the same way are right on either endianness, with no byte swaps.
//! [`CsumDelta::replace2`] and [`CsumDelta::apply`] take the same words as their two bytes in
//! wire order. The sum is folded once, when it is applied, not at every word.

/// A running sum of `~old + new` over every replaced 16-bit word (unfolded: it holds
/// thousands of words before it could overflow, and a packet changes a few dozen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CsumDelta(u32);

impl CsumDelta {
    #[inline(always)]
    #[must_use]
    pub const fn new() -> Self {
        CsumDelta(0)
    }

    /// Records that a 16-bit word changed from `old` to `new`, each the word's two bytes read
    /// as a native-endian `u16`.
    #[inline(always)]
    pub fn replace16(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    /// Records that a 16-bit word changed from `old` to `new` (its bytes in wire order).
    #[inline(always)]
    pub fn replace2(&mut self, old: [u8; 2], new: [u8; 2]) {
        self.replace16(u16::from_ne_bytes(old), u16::from_ne_bytes(new));
    }

    /// Records that a 32-bit field (an IPv4 address) changed.
    #[inline(always)]
    pub fn replace4(&mut self, old: [u8; 4], new: [u8; 4]) {
        self.replace2([old[0], old[1]], [new[0], new[1]]);
        self.replace2([old[2], old[3]], [new[2], new[3]]);
    }

    /// Adds the changes recorded in another delta.
    #[inline(always)]
    pub fn add(&mut self, other: CsumDelta) {
        self.0 += other.0;
    }

    /// Applies the recorded changes to a checksum field read as a native-endian `u16`.
    #[inline(always)]
    #[must_use]
    pub fn apply16(self, check: u16) -> u16 {
        !(fold32(u32::from(!check) + fold32(self.0)) as u16)
    }

    /// Applies the changes to a UDP checksum read as a native-endian `u16`: 0 means "no
    /// checksum" (IPv4) and stays 0, and a computed 0 is sent as 0xffff (RFC 768). Both values
    /// read the same in either byte order.
    #[inline(always)]
    #[must_use]
    pub fn apply16_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        let out = self.apply16(check);
        if out == 0 { 0xffff } else { out }
    }

    /// Applies the recorded changes to a checksum field (its bytes in wire order).
    #[inline(always)]
    #[must_use]
    pub fn apply(self, check: [u8; 2]) -> [u8; 2] {
        self.apply16(u16::from_ne_bytes(check)).to_ne_bytes()
    }

    /// [`CsumDelta::apply16_udp`] on a checksum field's bytes in wire order.
    #[inline(always)]
    #[must_use]
    pub fn apply_udp(self, check: [u8; 2]) -> [u8; 2] {
        self.apply16_udp(u16::from_ne_bytes(check)).to_ne_bytes()
    }
}

/// Folds carries back into the low 16 bits (twice covers any sum of a few terms).
#[inline(always)]
const fn fold32(s: u32) -> u32 {
    let s = (s & 0xffff) + (s >> 16);
    (s & 0xffff) + (s >> 16)
}

/// The full Internet checksum of `data` with an initial partial sum: for host-side tests and
/// for user space that builds packets. Not used on the data path.
#[must_use]
pub fn checksum(initial: u32, data: &[u8]) -> [u8; 2] {
    let mut sum = initial;
    let (pairs, rest) = data.as_chunks::<2>();
    for pair in pairs {
        sum = fold32(sum + u32::from(u16::from_be_bytes(*pair)));
    }
    if let [last] = rest {
        sum = fold32(sum + (u32::from(*last) << 8));
    }
    (!(fold32(sum) as u16)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte IPv4 header with a valid checksum.
    fn header(dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, ttl, 6, 0, 0, 192, 0, 2, 2, dst[0], dst[1], dst[2], dst[3]];
        let c = checksum(0, &h);
        h[10] = c[0];
        h[11] = c[1];
        h
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let samples: [([u8; 4], [u8; 4], u8); 5] = [
            ([203, 0, 113, 10], [198, 51, 100, 2], 64),
            ([203, 0, 113, 10], [198, 51, 100, 18], 1),
            ([0, 0, 0, 0], [255, 255, 255, 255], 255),
            ([255, 255, 255, 255], [0, 0, 0, 0], 2),
            ([1, 2, 3, 4], [1, 2, 3, 4], 64),
        ];
        for (old, new, ttl) in samples {
            let before = header(old, ttl);
            let after = header(new, ttl.wrapping_sub(1));
            let mut d = CsumDelta::new();
            d.replace4(old, new);
            d.replace2([ttl, 6], [ttl.wrapping_sub(1), 6]);
            assert_eq!(d.apply([before[10], before[11]]), [after[10], after[11]], "{old:?}->{new:?} ttl {ttl}");
        }
    }

    /// Pseudo-random bytes from `seed`: a simple LCG keeps the tests deterministic without a
    /// dependency.
    fn bytes(seed: u32) -> impl FnMut() -> u8 {
        let mut x = seed;
        move || {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) as u8
        }
    }

    /// 24 bytes from `next` and their checksum.
    fn block(next: &mut impl FnMut() -> u8) -> ([u8; 24], [u8; 2]) {
        let mut data = [0u8; 24];
        data.iter_mut().for_each(|b| *b = next());
        (data, checksum(0, &data))
    }

    /// 0x0000 and 0xffff are the same value in ones' complement.
    fn norm(c: [u8; 2]) -> [u8; 2] {
        if c == [0xff, 0xff] { [0, 0] } else { c }
    }

    #[test]
    fn incremental_update_over_many_random_words() {
        let mut next = bytes(0x1234_5678);
        for _ in 0..2000 {
            let (mut data, before) = block(&mut next);
            let i = usize::from(next() % 12) * 2;
            let new = [next(), next()];
            let mut d = CsumDelta::new();
            d.replace2([data[i], data[i + 1]], new);
            data[i] = new[0];
            data[i + 1] = new[1];
            let expect = checksum(0, &data);
            let got = d.apply(before);
            assert_eq!(norm(got), norm(expect));
        }
    }

    #[test]
    fn every_word_of_a_block_replaced_in_two_deltas_matches_recomputation() {
        // An IPv6 address and a port (the data path's largest rewrite) and more: up to all
        // twelve words of 24 bytes, as native-endian words, split over two deltas added.
        let mut next = bytes(0x9e37_79b9);
        for round in 0..500 {
            let (mut data, before) = block(&mut next);
            let (mut a, mut b) = (CsumDelta::new(), CsumDelta::new());
            for i in 0..=(round % 12) {
                let new = [next(), next()];
                let old = u16::from_ne_bytes([data[2 * i], data[2 * i + 1]]);
                let d = if i % 2 == 0 { &mut a } else { &mut b };
                d.replace16(old, u16::from_ne_bytes(new));
                data[2 * i] = new[0];
                data[2 * i + 1] = new[1];
            }
            a.add(b);
            let expect = checksum(0, &data);
            let got = a.apply16(u16::from_ne_bytes(before)).to_ne_bytes();
            assert_eq!(norm(got), norm(expect), "round {round}");
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero_and_computed_zero_is_sent_as_ffff() {
        let mut d = CsumDelta::new();
        d.replace2([0, 1], [0, 2]);
        assert_eq!(d.apply_udp([0, 0]), [0, 0]);
        // ~(~0x0001 + ~1 + 1) would be... pick a field that lands on 0 after the change.
        let mut d = CsumDelta::new();
        d.replace2([0x00, 0x00], [0xff, 0xfe]);
        assert_eq!(d.apply([0xff, 0xfe]), [0, 0]);
        assert_eq!(d.apply_udp([0xff, 0xfe]), [0xff, 0xff]);
    }
}
