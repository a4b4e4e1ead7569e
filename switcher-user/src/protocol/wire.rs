//! Serde forms of `switcher_common`'s [`Colour`], which has none (the ABI crate stays free
//! of serde): the lowercase word, as the protocol has always carried it. An unknown word is an
//! error that names it.

use serde::{Deserializer, Serializer};

use super::Colour;

fn parse<E: serde::de::Error>(word: &str) -> Result<Colour, E> {
    word.parse().map_err(|e| E::custom(format!("{word:?}: {e}")))
}

/// `#[serde(with = "wire::colour")]`: a colour.
pub mod colour {
    use super::{Colour, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(c: &Colour, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(c.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Colour, D::Error> {
        super::parse(&<String as serde::Deserialize>::deserialize(d)?)
    }
}

/// `#[serde(with = "wire::colour_opt")]`: an optional colour (`null` or absent: none).
pub mod colour_opt {
    use super::{Colour, Deserializer, Serializer};

    #[expect(clippy::ref_option, reason = "serde's `with` passes a reference to the field")]
    pub fn serialize<S: Serializer>(c: &Option<Colour>, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => s.serialize_some(c.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Colour>, D::Error> {
        <Option<String> as serde::Deserialize>::deserialize(d)?.map(|w| super::parse(&w)).transpose()
    }
}

/// `#[serde(with = "wire::draining")]`: a draining colour and its open flows, `["blue", 3]`.
pub mod draining {
    use super::{Colour, Deserializer, Serializer};

    #[expect(clippy::ref_option, reason = "serde's `with` passes a reference to the field")]
    pub fn serialize<S: Serializer>(c: &Option<(Colour, u64)>, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&c.map(|(c, n)| (c.as_str(), n)), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(Colour, u64)>, D::Error> {
        <Option<(String, u64)> as serde::Deserialize>::deserialize(d)?
            .map(|(w, n)| super::parse(&w).map(|c| (c, n)))
            .transpose()
    }
}
