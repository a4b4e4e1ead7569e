//! User-space side of the ABI: `Pod` impls for the aya map wrappers, and colour names.

use core::fmt;

use crate::{
    Backend, BackendKey, COLOUR_BLUE, COLOUR_GREEN, ColourCounters, Flow, FlowKey, FlowSet, FlowSlot, Reverse,
    RingChunk, Service, ServiceKey, ShadowBucket, ShadowConfig, ShadowCounters, ShadowFlow, VipPort,
};

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: `#[repr(C)]`, only integers and byte arrays, no implicit padding (sizes are
        // asserted next to each type), so every bit pattern is a valid value.
        unsafe impl aya::Pod for $t {}
        // SAFETY: as above.
        unsafe impl bytemuck::Zeroable for $t {}
        // SAFETY: as above.
        unsafe impl bytemuck::Pod for $t {}
    )*};
}
pod!(ServiceKey, Service, Backend, RingChunk, FlowKey, Flow, BackendKey, VipPort, Reverse, ColourCounters);
pod!(ShadowConfig, ShadowFlow, ShadowBucket, ShadowCounters, FlowSlot, FlowSet);

/// `key`'s set in a `FLOWS` of `sets` sets (a power of two), as the data path finds it.
#[must_use]
pub fn flow_set(key: &FlowKey, sets: u32) -> u32 {
    let bytes = bytemuck::bytes_of(key);
    let h = crate::flow_set_hash(|i| {
        let mut w = [0; 8];
        w.copy_from_slice(&bytes[8 * i..8 * i + 8]);
        u64::from_ne_bytes(w)
    });
    h & sets.saturating_sub(1)
}

/// A colour as the CLI and the config spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Blue,
    Green,
}

impl Colour {
    #[must_use]
    pub fn as_u32(self) -> u32 {
        match self {
            Colour::Blue => COLOUR_BLUE,
            Colour::Green => COLOUR_GREEN,
        }
    }

    /// The map value; only the low bit counts, as in the data path.
    #[must_use]
    pub fn from_u32(v: u32) -> Colour {
        if v & 1 == COLOUR_GREEN { Colour::Green } else { Colour::Blue }
    }

    #[must_use]
    pub fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }

    pub const ALL: [Colour; 2] = [Colour::Blue, Colour::Green];
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a word that is not a colour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownColour;

impl fmt::Display for UnknownColour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown colour (expected \"blue\" or \"green\")")
    }
}

impl core::str::FromStr for Colour {
    type Err = UnknownColour;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Colour::Blue),
            "green" => Ok(Colour::Green),
            _ => Err(UnknownColour),
        }
    }
}
