//! Helpers for the typed config structs of every crate: keys that mmdetection / mmengine accept
//! and densepred refuses by name instead of dropping.

use serde::{Deserialize, Serialize};

/// A key that mmdetection / mmengine accept and densepred does not implement: any value is
/// refused when the config is read (the message says the key is not supported; the config
/// loader adds the key's path).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unsupported;

impl<'de> Deserialize<'de> for Unsupported {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "this key is not supported by densepred (remove it from the config)",
        ))
    }
}

/// Deserialises a flag that densepred supports only as `true` (`#[serde(deserialize_with)]`).
///
/// Errors: `false`, with "only `true` is supported".
pub fn only_true<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    if bool::deserialize(d)? {
        Ok(true)
    } else {
        Err(serde::de::Error::custom(
            "only `true` is supported by densepred",
        ))
    }
}

/// The keys of a table that no field of its struct took, refused: put it last in a struct that
/// has a `#[serde(flatten)]` field (`#[serde(flatten)] pub unknown_keys: DenyRest`), where serde
/// cannot deny unknown fields by itself. Serialises to nothing.
///
/// Errors (when read): "unknown field(s) `a`, `b`" naming every key left over.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DenyRest;

impl<'de> Deserialize<'de> for DenyRest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let rest = std::collections::BTreeMap::<String, serde::de::IgnoredAny>::deserialize(d)?;
        if rest.is_empty() {
            return Ok(DenyRest);
        }
        let keys: Vec<String> = rest.keys().map(|k| format!("`{k}`")).collect();
        Err(serde::de::Error::custom(format!(
            "unknown field{} {}",
            if keys.len() > 1 { "s" } else { "" },
            keys.join(", ")
        )))
    }
}

impl Serialize for DenyRest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        s.serialize_map(Some(0))?.end()
    }
}
