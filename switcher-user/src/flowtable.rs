//! The daemon's view of the flow table, `FLOWS`: an array of sets of [`FLOW_WAYS`] slots
//! (see the data path's `table`), mapped into this process (`BPF_F_MMAPABLE`). Reading it
//! takes no syscall; a write touches one slot, in the data path's order (the slot emptied,
//! the flow and the key written, the family that makes it findable last), so neither side
//! ever finds a half-written key.

use std::{
    ops::ControlFlow,
    os::fd::{AsFd, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{Ordering, compiler_fence},
};

use switcher_common::{FLOW_WAYS, Flow, FlowKey, FlowSet, FlowSlot, user::flow_set};

/// Entries handed to a walk's callback at a time.
pub const BATCH: usize = 4096;

const WAYS: usize = FLOW_WAYS as usize;

/// `FLOWS`, mapped. Dropping it unmaps it.
#[derive(Debug)]
pub struct FlowTable {
    base: NonNull<FlowSet>,
    sets: u32,
    len: usize,
}

// SAFETY: the mapping is shared memory that the kernel and the data path write concurrently
// anyway; every access goes through volatile reads and writes of plain integers.
unsafe impl Send for FlowTable {}
// SAFETY: as above.
unsafe impl Sync for FlowTable {}

/// Why `FLOWS` could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum FlowTableError {
    #[error("reading the flow table's description: {0}")]
    Info(std::io::Error),
    #[error(
        "the flow table is not the one this switcher knows (type {map_type}, {value_size}-byte entries, flags {flags:#x}): it was made by another version; run `switcher uninstall` and start again"
    )]
    Foreign { map_type: u32, value_size: u32, flags: u32 },
    #[error("mapping the flow table into memory: {0}")]
    Map(std::io::Error),
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;

impl FlowTable {
    /// Maps the flow table on `fd` (its own mapping: `fd` may be closed afterwards).
    ///
    /// # Errors
    /// The map is not `FLOWS` as this build makes it, or could not be mapped.
    pub fn open(fd: &impl AsFd) -> Result<FlowTable, FlowTableError> {
        // struct bpf_map_info's head: type, id, key_size, value_size, max_entries, map_flags.
        let mut info = [0u32; 22];
        // struct { bpf_fd: u32, info_len: u32, info: u64 }
        let mut attr = [0u64; 16];
        let raw = u64::try_from(fd.as_fd().as_raw_fd()).unwrap_or(0);
        attr[0] = raw | ((size_of_val(&info) as u64) << 32);
        attr[1] = info.as_mut_ptr() as u64;
        // SAFETY: `info` is ours and of the length given, alive across the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), 128) };
        if rc != 0 {
            return Err(FlowTableError::Info(std::io::Error::last_os_error()));
        }
        let (map_type, value_size, sets, flags) = (info[0], info[3], info[4], info[5]);
        if map_type != BPF_MAP_TYPE_ARRAY
            || value_size as usize != size_of::<FlowSet>()
            || flags & BPF_F_MMAPABLE == 0
            || !sets.is_power_of_two()
        {
            return Err(FlowTableError::Foreign { map_type, value_size, flags });
        }
        // SAFETY: plain libc call.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let len = (sets as usize * size_of::<FlowSet>()).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's memory, of the length the kernel made.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(FlowTableError::Map(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<FlowSet>()).ok_or(FlowTableError::Map(std::io::Error::other("null")))?;
        Ok(FlowTable { base, sets, len })
    }

    /// Sets in the table.
    #[must_use]
    pub fn sets(&self) -> u32 {
        self.sets
    }

    /// The flows the table is made for (`max_flows`, rounded up to a power of two): half
    /// its slots.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        u64::from(self.sets) * WAYS as u64 / 2
    }

    /// Slot `way` of set `set` (both in range).
    fn slot(&self, set: u32, way: usize) -> *mut FlowSlot {
        debug_assert!(set < self.sets && way < WAYS);
        // SAFETY: in range of the mapping (`set` < `sets`, `way` < `WAYS`).
        unsafe { (&raw mut (*self.base.as_ptr().add(set as usize)).slots[way]) }
    }

    /// A copy of a slot; `None` if it is free.
    fn read(&self, set: u32, way: usize) -> Option<FlowSlot> {
        let p = self.slot(set, way);
        // SAFETY: a slot of the mapping; plain integers, any bit pattern is valid.
        let slot = unsafe { p.read_volatile() };
        (slot.key.family != 0).then_some(slot)
    }

    /// Where `key`'s flow is, if the table has it.
    fn find(&self, key: &FlowKey) -> Option<(u32, usize, Flow)> {
        let set = flow_set(key, self.sets);
        (0..WAYS).find_map(|way| self.read(set, way).filter(|s| s.key == *key).map(|s| (set, way, s.flow)))
    }

    /// `key`'s flow, if the table has it.
    #[must_use]
    pub fn lookup(&self, key: &FlowKey) -> Option<Flow> {
        self.find(key).map(|(_, _, flow)| flow)
    }

    /// Replaces `key`'s flow, only if the table still has it.
    ///
    /// # Errors
    /// The key is gone (`ENOENT`).
    pub fn update(&self, key: &FlowKey, flow: &Flow) -> std::io::Result<()> {
        let (set, way, _) = self.find(key).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))?;
        // SAFETY: a slot of the mapping.
        unsafe { (&raw mut (*self.slot(set, way)).flow).write_volatile(*flow) };
        Ok(())
    }

    /// Records `flow` for `key` (tests and benchmarks): in the slot `key` has, else a free
    /// one, else that of the set's least recently seen flow. Unlike the data path it does
    /// not look for ended flows first, nor count evictions.
    pub fn insert(&self, key: &FlowKey, flow: &Flow) {
        if self.update(key, flow).is_ok() {
            return;
        }
        let set = flow_set(key, self.sets);
        let way = (0..WAYS)
            .min_by_key(|&way| self.read(set, way).map_or(0, |s| s.flow.last_seen_ns.saturating_add(1)))
            .unwrap_or(0);
        let p = self.slot(set, way);
        // SAFETY: fields of a slot of the mapping, written in the data path's order.
        unsafe {
            (&raw mut (*p).key.family).write_volatile(0);
            compiler_fence(Ordering::Release);
            (&raw mut (*p).flow).write_volatile(*flow);
            (&raw mut (*p).key).write_volatile(FlowKey { family: 0, ..*key });
            compiler_fence(Ordering::Release);
            (&raw mut (*p).key.family).write_volatile(key.family);
        }
    }

    /// Forgets `key`'s flow if the table has it as `flow` (one the data path re-created
    /// since is left alone); returns whether it did.
    pub fn remove_if(&self, key: &FlowKey, flow: &Flow) -> bool {
        match self.find(key) {
            Some((set, way, found)) if found == *flow => {
                // SAFETY: a field of a slot of the mapping.
                unsafe { (&raw mut (*self.slot(set, way)).key.family).write_volatile(0) };
                true
            }
            _ => false,
        }
    }

    /// Calls `each` with the flows, [`BATCH`] at a time. Flows the data path adds or removes
    /// meanwhile may or may not be seen; `each` may change or remove flows it was given.
    pub fn walk(&self, mut each: impl FnMut(&[FlowKey], &[Flow])) {
        self.walk_until(|keys, flows| {
            each(keys, flows);
            ControlFlow::Continue(())
        });
    }

    /// [`FlowTable::walk`], until `each` says to stop (a limit reached, a deadline passed):
    /// nothing more is read after a batch it answered [`ControlFlow::Break`] to. Returns
    /// whether it was stopped.
    pub fn walk_until(&self, mut each: impl FnMut(&[FlowKey], &[Flow]) -> ControlFlow<()>) -> bool {
        let (mut keys, mut flows) = (Vec::with_capacity(BATCH), Vec::with_capacity(BATCH));
        for set in 0..self.sets {
            for way in 0..WAYS {
                if let Some(s) = self.read(set, way) {
                    keys.push(s.key);
                    flows.push(s.flow);
                }
            }
            if keys.len() + WAYS > BATCH {
                if each(&keys, &flows).is_break() {
                    return true;
                }
                keys.clear();
                flows.clear();
            }
        }
        each(&keys, &flows).is_break()
    }
}

impl Drop for FlowTable {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of this length; nothing refers to it after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
