//! One-pass deserializing for the structs that hold a request's bulk.
//!
//! serde's `#[serde(flatten)]` and `#[serde(untagged)]` first buffer the
//! whole value into an intermediate tree, then deserialize from that tree.
//! On a request, the body was parsed twice and held three times. The
//! containers (the request, each message, its content) read each field
//! straight into its place instead, and only unknown fields become a
//! `Value`. Leaves (a content part, a tool) keep `flatten`: what they buffer
//! is only their own small size.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::Extra;

/// A struct read field by field, what it does not know kept in `extra`.
pub(super) trait Fields: Sized {
    /// What the value is, for errors: "a chat request".
    const EXPECTING: &'static str;
    /// Fields that must be there (at most 8).
    const REQUIRED: &'static [&'static str];
    /// The value before any field is read.
    fn empty() -> Self;
    /// Reads the value of `key` into its field; false for a key it does
    /// not know, whose value the caller then reads.
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
    /// Where unknown fields go.
    fn extra(&mut self) -> &mut Extra;
}

/// Deserializes a [`Fields`] struct from a map, in one pass.
pub(super) fn deserialize<'de, T: Fields, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_map(FieldsVisitor(PhantomData))
}

struct FieldsVisitor<T>(PhantomData<T>);

impl<'de, T: Fields> Visitor<'de> for FieldsVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<T, A::Error> {
        let mut out = T::empty();
        let mut seen = 0u8;
        while let Some(key) = map.next_key::<String>()? {
            if let Some(i) = T::REQUIRED.iter().position(|r| *r == key) {
                seen |= 1 << i;
            }
            if !out.field(&key, &mut map)? {
                let value: Value = map.next_value()?;
                out.extra().insert(key, value);
            }
        }
        match (0..T::REQUIRED.len()).find(|i| seen & (1 << i) == 0) {
            Some(i) => Err(de::Error::missing_field(T::REQUIRED[i])),
            None => Ok(out),
        }
    }
}
