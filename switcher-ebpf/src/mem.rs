//! Copies and clears that stay inline. The BPF backend expands a `memcpy` of constant size
//! into loads and stores, but `memmove` and `memset` become calls to the object's own
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
