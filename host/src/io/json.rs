//! The JSON check that `serde_json::Value` and the safetensors crate skip: a key repeated
//! in one object (both keep its last value silently).

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;

/// The first key that appears twice in one JSON object of `json`, as the path of keys
/// from the outermost object to it (`["__metadata__", "config"]`), or `None`.
/// `serde_json::Value` and the safetensors crate keep the last value of a repeated key
/// silently; this is the check that they skip.
///
/// # Errors
/// The JSON parser's error for malformed JSON.
pub fn duplicate_key(json: &str) -> std::result::Result<Option<Vec<String>>, serde_json::Error> {
    serde_json::from_str::<FirstDuplicate>(json).map(|found| found.0)
}

/// What [`duplicate_key`] finds in one JSON value.
struct FirstDuplicate(Option<Vec<String>>);

impl<'de> Deserialize<'de> for FirstDuplicate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(FirstDuplicateVisitor)
    }
}

struct FirstDuplicateVisitor;

impl<'de> Visitor<'de> for FirstDuplicateVisitor {
    type Value = FirstDuplicate;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self::Value, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self::Value, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self::Value, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self::Value, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Self::Value, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
        Ok(FirstDuplicate(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(FirstDuplicate(inner)) = seq.next_element()? {
            found = found.or(inner);
        }
        Ok(FirstDuplicate(found))
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            let FirstDuplicate(inner) = map.next_value()?;
            if found.is_none() {
                if seen.contains(&key) {
                    found = Some(vec![key.clone()]);
                } else if let Some(mut path) = inner {
                    path.insert(0, key.clone());
                    found = Some(path);
                }
            }
            seen.insert(key);
        }
        Ok(FirstDuplicate(found))
    }
}

/// How a path names a duplicate key in messages: `` `__metadata__` → `config` ``.
pub(crate) fn key_path(path: &[String]) -> String {
    path.iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(" → ")
}
