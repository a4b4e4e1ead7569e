//! Copies and clears that stay inline, and 16-bit word access to headers and map values.
//! The BPF backend expands a `memcpy` of constant size into loads and stores, but `memmove` and `memset` become calls to the object's own
//! byte-at-a-time loops: LLVM picks them for plain assignments between two pointers it cannot
//! tell apart (a map value and the scratch space) and for `write_bytes`, and a 64-byte clear
//! then costs hundreds of instructions on every packet. These helpers say what is meant.

/// `*dst = *src`, as a `memcpy` (a `&mut` and a `&` never overlap).
#[inline(always)]
pub fn copy<T: Copy>(dst: &mut T, src: &T) {
    // SAFETY: two valid references to one type, which cannot overlap.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, 1) }
}

/// Zeroes `dst` four bytes at a time. `T` is 4-byte aligned and a multiple of 4 bytes long
/// (checked at compile time); volatile stores, so LLVM cannot fold them back into `memset`.
#[inline(always)]
pub fn zero<T>(dst: &mut T) {
    const { assert!(size_of::<T>() % 4 == 0 && align_of::<T>() >= 4) };
    let words = core::ptr::from_mut(dst).cast::<u32>();
    let mut i = 0;
    while i < size_of::<T>() / 4 {
        // SAFETY: within `dst`, aligned (asserted above).
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
}

/// The `i`th 16-bit word at `p`, in native byte order (the checksum sums words that way, see
/// `switcher_common::csum`). Header fields read by word start at even offsets of a frame that
/// starts at an even address, and map-value fields at even offsets of 8-aligned values, so a
/// 16-bit access is aligned: one load where a copy of bytes takes two loads, a shift and an
/// or, and LLVM keeps no byte of it in a spill slot.
///
/// # Safety
/// `p` points at `i + 1` words the verifier knows are in bounds (packet or map value, never
/// the stack: its accesses must be aligned to their size, which a `[u8; N]` there is not).
#[inline(always)]
pub unsafe fn load16(p: *const u8, i: usize) -> u16 {
    // SAFETY: the caller's.
    unsafe { p.add(2 * i).cast::<u16>().read() }
}

/// Writes the `i`th 16-bit word at `p` (see [`load16`]).
///
/// # Safety
/// As for [`load16`].
#[inline(always)]
pub unsafe fn store16(p: *mut u8, i: usize, v: u16) {
    // SAFETY: the caller's.
    unsafe { p.add(2 * i).cast::<u16>().write(v) }
}

/// Copies `words` 16-bit words from `src` to `dst` (see [`load16`]).
///
/// # Safety
/// As for [`load16`], for both.
#[inline(always)]
pub unsafe fn copy16(dst: *mut u8, src: *const u8, words: usize) {
    let mut i = 0;
    while i < words {
        // SAFETY: the caller's.
        unsafe { store16(dst, i, load16(src, i)) };
        i += 1;
    }
}

/// The four bytes at `p` as `u32::from_ne_bytes` gives them, by two 16-bit loads.
///
/// # Safety
/// As for [`load16`], two words.
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    // SAFETY: the caller's.
    let (a, b) = unsafe { (u32::from(load16(p, 0)), u32::from(load16(p, 1))) };
    if cfg!(target_endian = "little") { a | (b << 16) } else { (a << 16) | b }
}
