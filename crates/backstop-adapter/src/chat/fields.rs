//! One-pass deserializing for the structs that hold a request's bulk.
//!
//! serde's `#[serde(flatten)]` and `#[serde(untagged)]` first buffer the
//! whole value into an intermediate tree, then deserialize from that tree.
//! On a request, the body was parsed twice and held three times. The
//! containers (the request, each message, its content) read each field
//! straight into its place instead, and only unknown fields become a
//! `Value`. Leaves (a content part, a tool) keep `flatten`: what they buffer
//! is only their own small size.

use std::borrow::Cow;
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
        while let Some(Key(key)) = map.next_key()? {
            if let Some(i) = T::REQUIRED.iter().position(|r| *r == key) {
                seen |= 1 << i;
            }
            if !out.field(&key, &mut map)? {
                let value: Value = map.next_value()?;
                out.extra().insert(key.into_owned(), value);
            }
        }
        match (0..T::REQUIRED.len()).find(|i| seen & (1 << i) == 0) {
            Some(i) => Err(de::Error::missing_field(T::REQUIRED[i])),
            None => Ok(out),
        }
    }
}

/// A field name, borrowed from the body when it has no escapes: only an
/// unknown field's name is copied (into `extra`).
#[cfg_attr(test, derive(PartialEq, Eq, PartialOrd, Ord))]
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_borrowed_from_the_body_through_the_path_tracker() {
        // As a request's keys are read: map keys, through serde_path_to_error.
        let keys = |body: &'static str| {
            let mut de = serde_json::Deserializer::from_str(body);
            let map: std::collections::BTreeMap<Key, de::IgnoredAny> =
                serde_path_to_error::deserialize(&mut de).unwrap();
            map.into_keys().map(|k| k.0).collect::<Vec<_>>()
        };
        assert!(matches!(
            keys(r#"{"model": 1}"#)[..],
            [Cow::Borrowed("model")]
        ));
        // A name with an escape cannot be borrowed, and is still read.
        assert_eq!(keys(r#"{"mod\u0065l": 1}"#), ["model"]);
    }
}
