//! Helpers for the typed config structs of every crate: keys that mmdetection / mmengine accept
//! and densepred refuses by name instead of dropping.

use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub use {serde, serde_json};

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

/// A table that must be empty (`train_cfg = {}` of mmsegmentation's EncoderDecoder): any key is
/// refused as unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyTable {}

/// Dotted key path of a `serde_path_to_error` path (`a.b.3.c`, as `--set` takes it).
pub fn dotted_path(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect()
}

/// Joins the key path `outer` of a deserialisation error with its message `msg`, where `msg` may
/// carry the inner path of a table selected by `type` (`@inner.path: message`, as
/// [`deserialize_tracked`] writes it). Returns the full path (possibly empty) and the message.
pub fn join_key_path(mut outer: Vec<String>, msg: &str) -> (Vec<String>, String) {
    if let Some(rest) = msg.strip_prefix('@') {
        if let Some((inner, m)) = rest.split_once(": ") {
            outer.extend(inner.split('.').filter(|s| !s.is_empty()).map(String::from));
            return (outer, m.to_string());
        }
    }
    (outer, msg.to_string())
}

/// Deserialises `value` (the content of a table selected by `type`, without that key) into `T`,
/// keeping the key path of an error inside it: serde reads such tables whole before choosing the
/// variant, which loses the path; this puts it back into the message as `@inner.path: message`,
/// for the caller's path tracking ([`join_key_path`]) to join.
pub fn deserialize_tracked<T: serde::de::DeserializeOwned, E: serde::de::Error>(
    value: serde_json::Value,
) -> Result<T, E> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let (path, msg) = join_key_path(dotted_path(e.path()), &e.inner().to_string());
        if path.is_empty() {
            E::custom(msg)
        } else {
            E::custom(format!("@{}: {msg}", path.join(".")))
        }
    })
}

/// Implements `Deserialize` for an enum whose newtype variants are selected by the table's
/// `type` key (the shape of serde's `#[serde(tag = "type")]`, which stays on the enum for
/// `Serialize`), keeping the key path of errors inside the variant's table
/// ([`deserialize_tracked`]).
///
/// `deserialize_by_type!(NeckConfig { "FPN" => NeckConfig::Fpn(FpnConfig) });`
#[macro_export]
macro_rules! deserialize_by_type {
    ($enum:ty { $($name:literal => $variant:path [$inner:ty]),+ $(,)? }) => {
        impl<'de> $crate::config::serde::Deserialize<'de> for $enum {
            fn deserialize<D: $crate::config::serde::Deserializer<'de>>(d: D) -> ::core::result::Result<Self, D::Error> {
                use $crate::config::serde::de::Error as _;
                let mut map: $crate::config::serde_json::Map<::std::string::String, $crate::config::serde_json::Value> =
                    $crate::config::serde::Deserialize::deserialize(d)?;
                let ty = match map.remove("type") {
                    ::core::option::Option::Some($crate::config::serde_json::Value::String(s)) => s,
                    ::core::option::Option::Some(other) => {
                        return ::core::result::Result::Err(D::Error::custom(::std::format!(
                            "@type: expected a string, got {other}"
                        )))
                    }
                    ::core::option::Option::None => return ::core::result::Result::Err(D::Error::missing_field("type")),
                };
                let value = $crate::config::serde_json::Value::Object(map);
                match ty.as_str() {
                    $($name => $crate::config::deserialize_tracked::<$inner, D::Error>(value)
                        .map($variant),)+
                    other => ::core::result::Result::Err(D::Error::custom(::std::format!(
                        "@type: unknown variant `{other}`, expected one of {}",
                        [$(concat!("`", $name, "`")),+].join(", ")
                    ))),
                }
            }
        }
    };
}

/// Declares a config enum selected by its table's `type` key: one newtype variant per `type`
/// name, `Serialize` as serde's `#[serde(tag = "type")]` and `Deserialize` by
/// [`deserialize_by_type!`] (error paths kept). An enum of a single `type` also gets `body()`,
/// that variant's table.
///
/// ```ignore
/// densepred_core::config_by_type! {
///     /// `model.neck` table.
///     pub enum NeckConfig {
///         /// Feature pyramid network.
///         "FPN" => Fpn(FpnConfig),
///     }
/// }
/// ```
#[macro_export]
macro_rules! config_by_type {
    (@decl $(#[$m:meta])* $vis:vis enum $name:ident {
        $($(#[$vm:meta])* $tag:literal => $variant:ident($inner:ty)),+
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize)]
        #[serde(tag = "type")]
        $vis enum $name {
            $($(#[$vm])* #[serde(rename = $tag)] $variant($inner),)+
        }
        $crate::deserialize_by_type!($name { $($tag => $name::$variant [$inner]),+ });
    };
    ($(#[$m:meta])* $vis:vis enum $name:ident {
        $(#[$vm:meta])* $tag:literal => $variant:ident($inner:ty) $(,)?
    }) => {
        $crate::config_by_type!(@decl $(#[$m])* $vis enum $name { $(#[$vm])* $tag => $variant($inner) });
        impl $name {
            /// The table of the only `type`.
            pub fn body(&self) -> &$inner {
                match self {
                    Self::$variant(c) => c,
                }
            }
        }
    };
    ($(#[$m:meta])* $vis:vis enum $name:ident {
        $($(#[$vm:meta])* $tag:literal => $variant:ident($inner:ty)),+ $(,)?
    }) => {
        $crate::config_by_type!(@decl $(#[$m])* $vis enum $name { $($(#[$vm])* $tag => $variant($inner)),+ });
    };
}

/// Default values of config fields (`#[serde(default = "d::yes")]` with
/// `use densepred_core::config::defaults as d;`): one home for the values mmdetection's
/// defaults repeat across components.
pub mod defaults {
    /// `256`.
    pub fn c256() -> usize {
        256
    }
    /// `4`.
    pub fn four_usize() -> usize {
        4
    }
    /// `0.5`.
    pub fn half() -> f64 {
        0.5
    }
    /// `255`.
    pub fn ignore_255() -> u8 {
        255
    }
    /// `-1.0`.
    pub fn neg_one_f64() -> f64 {
        -1.0
    }
    /// `-1`.
    pub fn neg_one_i64() -> i64 {
        -1
    }
    /// `1.0`.
    pub fn one_f64() -> f64 {
        1.0
    }
    /// `1`.
    pub fn one_u64() -> u64 {
        1
    }
    /// `1`.
    pub fn one_usize() -> usize {
        1
    }
    /// `3`.
    pub fn three_usize() -> usize {
        3
    }
    /// `2.0`.
    pub fn two_f64() -> f64 {
        2.0
    }
    /// `2`.
    pub fn two_usize() -> usize {
        2
    }
    /// `true`.
    pub fn yes() -> bool {
        true
    }
}
