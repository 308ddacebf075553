//! The `config` keys of SPEC §8 — their JSON names, command-line flags and documentation —
//! written once, in [`CONFIG_KEYS`]'s table below; the overrides struct, the JSON reader and
//! writer and the command line's flags are all generated from it.

use crate::error::{Error, Result};
use serde_json::Value;
use ssdkd_core::{LossConfig, LossWeights, PriorPreset};

/// One `config` key: its JSON name (SPEC §8), its command-line flag and what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigKey {
    /// The key in the `config` metadata JSON.
    pub key: &'static str,
    /// The command-line flag that sets it, without `--`.
    pub flag: &'static str,
    /// The value's form on the command line (`V0,V1`), for help texts.
    pub value_name: &'static str,
    /// One line of documentation.
    pub doc: &'static str,
}

impl ConfigKey {
    /// The entry of `key`, if it is a config key.
    #[must_use]
    pub fn find(key: &str) -> Option<&'static ConfigKey> {
        CONFIG_KEYS.iter().find(|k| k.key == key)
    }
}

/// A config value's forms: JSON (metadata) and text (a command-line flag).
trait ConfigValue: Sized + Copy {
    fn from_json(value: &Value) -> std::result::Result<Self, String>;
    fn from_text(text: &str) -> std::result::Result<Self, String>;
    fn to_json(self) -> Value;
}

fn json_number(value: &Value) -> std::result::Result<f32, String> {
    value
        .as_f64()
        .map(|v| v as f32)
        .ok_or_else(|| format!("expected a number, found {value}"))
}

fn text_number(text: &str) -> std::result::Result<f32, String> {
    let text = text.trim();
    text.parse::<f32>()
        .map_err(|e| format!("`{}`: {e}", text.escape_debug()))
}

fn json_numbers<const N: usize>(value: &Value) -> std::result::Result<[f32; N], String> {
    let list = value
        .as_array()
        .filter(|a| a.len() == N)
        .ok_or_else(|| format!("expected a list of {N} numbers, found {value}"))?;
    let numbers = list
        .iter()
        .map(|v| {
            v.as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| format!("expected numbers, found {v}"))
        })
        .collect::<std::result::Result<Vec<f32>, String>>()?;
    Ok(numbers.try_into().expect("length checked"))
}

fn text_numbers<const N: usize>(text: &str) -> std::result::Result<[f32; N], String> {
    let numbers = text
        .split(',')
        .map(text_number)
        .collect::<std::result::Result<Vec<f32>, String>>()?;
    numbers
        .try_into()
        .map_err(|v: Vec<f32>| format!("expected {N} comma-separated numbers, found {}", v.len()))
}

impl ConfigValue for f32 {
    fn from_json(value: &Value) -> std::result::Result<Self, String> {
        json_number(value)
    }
    fn from_text(text: &str) -> std::result::Result<Self, String> {
        text_number(text)
    }
    fn to_json(self) -> Value {
        Value::from(self)
    }
}

impl ConfigValue for u32 {
    fn from_json(value: &Value) -> std::result::Result<Self, String> {
        // Integers may arrive as `3` or `3.0` (Python's json writes either).
        value
            .as_u64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|v| v.fract() == 0.0 && *v >= 0.0)
                    .map(|v| v as u64)
            })
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| format!("expected a non-negative integer, found {value}"))
    }
    fn from_text(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        text.parse::<u32>().map_err(|e| {
            format!(
                "`{}`: {e} (expected a non-negative integer)",
                text.escape_debug()
            )
        })
    }
    fn to_json(self) -> Value {
        Value::from(self)
    }
}

impl ConfigValue for [f32; 2] {
    fn from_json(value: &Value) -> std::result::Result<Self, String> {
        json_numbers(value)
    }
    fn from_text(text: &str) -> std::result::Result<Self, String> {
        text_numbers(text)
    }
    fn to_json(self) -> Value {
        Value::from(self.to_vec())
    }
}

impl ConfigValue for LossWeights {
    fn from_json(value: &Value) -> std::result::Result<Self, String> {
        json_numbers(value).map(weights)
    }
    fn from_text(text: &str) -> std::result::Result<Self, String> {
        text_numbers(text).map(weights)
    }
    fn to_json(self) -> Value {
        Value::from(vec![self.soft, self.conf, self.l2, self.loc])
    }
}

fn weights([soft, conf, l2, loc]: [f32; 4]) -> LossWeights {
    LossWeights {
        soft,
        conf,
        l2,
        loc,
    }
}

/// Generates, from one row per key: [`CONFIG_KEYS`], [`ConfigOverrides`] and its JSON/text
/// readers, and [`config_json`]. `num_classes` is a key like the others in the files and on
/// the command line but is not applied to a [`LossConfig`]: C comes from the tensors, and the
/// key is only checked against it (in `BatchFile::from_bytes`).
macro_rules! config_keys {
    ($( $field:ident : $ty:ty, $flag:literal, $value_name:literal, $doc:literal; )*) => {
        /// Every `config` key of SPEC §8, in the order they are documented.
        pub const CONFIG_KEYS: &[ConfigKey] = &[
            ConfigKey {
                key: "num_classes",
                flag: "num-classes",
                value_name: "C",
                doc: "Classes including background (must equal the tensors' C)",
            },
            $( ConfigKey { key: stringify!($field), flag: $flag, value_name: $value_name, doc: $doc }, )*
        ];

        /// Config values given explicitly (file metadata or flags); `None` keeps what is
        /// below (SPEC §8: flags over metadata over defaults).
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct ConfigOverrides {
            /// `num_classes`: checked against the tensors' C.
            pub num_classes: Option<u32>,
            $( #[doc = concat!("`", stringify!($field), "`: ", $doc, ".")] pub $field: Option<$ty>, )*
            /// The prior preset (`prior_preset` metadata, `--preset` flag).
            pub preset: Option<PriorPreset>,
        }

        impl ConfigOverrides {
            /// `self` with every value `over` sets replaced (flags over metadata).
            #[must_use]
            pub fn then(&self, over: &ConfigOverrides) -> ConfigOverrides {
                ConfigOverrides {
                    num_classes: over.num_classes.or(self.num_classes),
                    $( $field: over.$field.or(self.$field), )*
                    preset: over.preset.or(self.preset),
                }
            }

            /// `config` with these values applied (all but `num_classes` and the preset).
            #[must_use]
            pub fn apply(&self, mut config: LossConfig) -> LossConfig {
                $( if let Some(v) = self.$field { config.$field = v; } )*
                config
            }

            /// Sets `key` from its JSON value (metadata) or, with `from_text`, from a
            /// flag's text.
            fn set(&mut self, key: &str, json: Option<&Value>, text: &str) -> std::result::Result<(), String> {
                fn read<T: ConfigValue>(json: Option<&Value>, text: &str) -> std::result::Result<T, String> {
                    match json {
                        Some(value) => T::from_json(value),
                        None => T::from_text(text),
                    }
                }
                match key {
                    "num_classes" => self.num_classes = Some(read(json, text)?),
                    $( stringify!($field) => self.$field = Some(read(json, text)?), )*
                    _ => {
                        let known: Vec<&str> = CONFIG_KEYS.iter().map(|k| k.key).collect();
                        return Err(format!("unknown config key (known: {})", known.join(", ")));
                    }
                }
                Ok(())
            }
        }

        /// The `config` metadata JSON of SPEC §8 for `config` with C = `num_classes`, every
        /// key written.
        #[must_use]
        pub fn config_json(config: &LossConfig, num_classes: u32) -> String {
            let mut object = serde_json::Map::new();
            object.insert("num_classes".into(), Value::from(num_classes));
            $( object.insert(stringify!($field).into(), ConfigValue::to_json(config.$field)); )*
            Value::Object(object).to_string()
        }
    };
}

config_keys! {
    overlap_threshold: f32, "threshold", "T", "Matching IoU threshold, in (0, 1]";
    negpos_ratio: u32, "negpos-ratio", "N", "Negatives kept per positive";
    negatives_for_hard: u32, "negatives-for-hard", "N", "Negatives kept in an image with no positives";
    variance: [f32; 2], "variance", "V0,V1", "Encoding variances";
    temperature: f32, "temperature", "T", "Distillation temperature T > 0";
    pos_w: f32, "pos-w", "W", "Object-class weight of the weighted soft loss";
    neg_w: f32, "neg-w", "W", "Background weight of the soft loss (> 1 selects the weighted form)";
    reg_m: f32, "reg-m", "M", "Margin of the teacher bound (may be negative)";
    eps: f32, "eps", "E", "ε of the weighted soft loss";
    weights: LossWeights, "weights", "S,C,L2,L", "Weights of the soft, conf, l2 and loc terms";
}

impl ConfigOverrides {
    /// The loss configuration for tensors of C = `classes`: the defaults with these values
    /// applied, after checking that `num_classes`, where given, equals C (C itself is the
    /// tensors', stored once in their shape).
    ///
    /// # Errors
    /// [`Error::Config`] naming `num_classes` when it disagrees with C.
    pub fn config_for(&self, classes: usize) -> Result<LossConfig> {
        if let Some(num_classes) = self.num_classes {
            if num_classes as usize != classes {
                return Err(Error::Config {
                    key: "num_classes".into(),
                    problem: format!("{num_classes}, but student_conf has C = {classes} classes"),
                });
            }
        }
        Ok(self.apply(LossConfig::DEFAULT))
    }

    /// Parses the `config` metadata JSON; unknown keys and wrong types are errors naming
    /// the key.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key, or `config` itself for malformed JSON.
    pub fn from_config_json(json: &str) -> Result<Self> {
        let bad = |key: &str, problem: String| Error::Config {
            key: key.to_owned(),
            problem,
        };
        let value: Value = serde_json::from_str(json)
            .map_err(|e| bad("config", format!("malformed JSON: {e}")))?;
        // serde_json keeps the last of a repeated key; a repeated setting is an error (SPEC §8.2).
        if let Ok(Some(path)) = super::json::duplicate_key(json) {
            return Err(bad(&path.join("."), "given more than once".into()));
        }
        let object = value
            .as_object()
            .ok_or_else(|| bad("config", "not a JSON object".into()))?;
        let mut out = ConfigOverrides::default();
        for (key, value) in object {
            out.set(key, Some(value), "")
                .map_err(|problem| bad(key, problem))?;
        }
        Ok(out)
    }

    /// Sets `key` (a `config` key of [`CONFIG_KEYS`]) from a command-line value such as
    /// `0.5` or `0.1,0.2`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key, for an unknown key or a value that does not parse.
    pub fn set_from_text(&mut self, key: &str, text: &str) -> Result<()> {
        self.set(key, None, text).map_err(|problem| Error::Config {
            key: key.to_owned(),
            problem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips_through_json_and_text() {
        let config = LossConfig {
            temperature: 3.5,
            reg_m: -0.25,
            variance: [0.2, 0.3],
            negpos_ratio: 5,
            ..LossConfig::DEFAULT
        };
        let json = config_json(&config, 21);
        let read = ConfigOverrides::from_config_json(&json).unwrap();
        assert_eq!(read.num_classes, Some(21));
        assert_eq!(read.apply(LossConfig::DEFAULT), config);
        let value: Value = serde_json::from_str(&json).unwrap();
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), CONFIG_KEYS.len());
        for key in CONFIG_KEYS {
            assert!(value.get(key.key).is_some(), "{} not written", key.key);
        }

        let mut flags = ConfigOverrides::default();
        flags.set_from_text("reg_m", "-0.2").unwrap();
        flags.set_from_text("variance", "0.1, -0.2").unwrap();
        assert_eq!(flags.reg_m, Some(-0.2));
        assert_eq!(flags.variance, Some([0.1, -0.2]));
        let e = flags.set_from_text("weights", "1,2").unwrap_err();
        assert!(
            matches!(&e, Error::Config { key, problem } if key == "weights" && problem.contains("4 comma-separated")),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let e = ConfigOverrides::from_config_json(r#"{"temprature": 2}"#).unwrap_err();
        assert!(
            matches!(&e, Error::Config { key, problem } if key == "temprature" && problem.contains("unknown"))
        );
        let e = ConfigOverrides::from_config_json(r#"{"negpos_ratio": -3}"#).unwrap_err();
        assert!(matches!(&e, Error::Config { key, .. } if key == "negpos_ratio"));
        let e = ConfigOverrides::from_config_json(r#"{"num_classes": 5,"#).unwrap_err();
        assert!(matches!(&e, Error::Config { key, .. } if key == "config"));
    }
}
