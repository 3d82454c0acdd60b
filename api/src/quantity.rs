//! Byte quantities as users write them: `10Gi`, `500Mi`, `1G`, `1.5Gi`, or a plain byte count.
//!
//! Binary suffixes (`Ki Mi Gi Ti Pi Ei`) are powers of 1024, decimal ones (`k K M G T P E`) powers
//! of 1000 — the Kubernetes convention, so manifests read the same as there. A fraction is allowed
//! with a suffix (`1.5Gi`) and is rounded *up* to a whole byte. Negative values, overflow past
//! `u64` and unknown suffixes are refused with a message that says what is allowed.
//!
//! A quantity always serializes canonically: the largest binary suffix that divides it exactly
//! (`1536Mi`, not `1.5Gi`), or a plain byte count.
//!
//! ```
//! use cobalt_api::Quantity;
//! let q: Quantity = "1.5Gi".parse().unwrap();
//! assert_eq!(q.bytes(), 1536 * 1024 * 1024);
//! assert_eq!(q.to_string(), "1536Mi");
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One mebibyte: volume sizes are rounded up to a whole number of these.
pub const MIB: u64 = 1024 * 1024;

const SUFFIXES: &[(&str, u64)] = &[
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
    ("Pi", 1 << 50),
    ("Ei", 1 << 60),
    ("k", 1_000),
    ("K", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("P", 1_000_000_000_000_000),
    ("E", 1_000_000_000_000_000_000),
];

/// What a quantity may look like; quoted in every parse error.
pub const QUANTITY_FORMS: &str =
    "a byte count or a number with a suffix Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or k, M, G, T, P, E (powers of 1000), e.g. 10Gi, 500Mi, 1.5Gi";

/// A non-negative number of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(u64);

/// Why a quantity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantity is empty; expected {QUANTITY_FORMS}")]
    Empty,
    #[error("quantity {0:?} is negative; sizes must be zero or more")]
    Negative(String),
    #[error("quantity {0:?} has an unknown suffix {1:?}; expected {QUANTITY_FORMS}")]
    UnknownSuffix(String, String),
    #[error("quantity {0:?} is not a number; expected {QUANTITY_FORMS}")]
    NotANumber(String),
    #[error("quantity {0:?} is too large (the limit is 2^64 - 1 bytes, about 16Ei)")]
    Overflow(String),
}

impl Quantity {
    pub const fn from_bytes(bytes: u64) -> Self {
        Quantity(bytes)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size rounded up to a whole MiB, as quotas are set. Saturates at the largest whole MiB.
    pub fn round_up_mib(self) -> Quantity {
        match self.0.checked_add(MIB - 1) {
            Some(v) => Quantity(v / MIB * MIB),
            None => Quantity(u64::MAX / MIB * MIB),
        }
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(QuantityError::Empty);
        }
        if s.starts_with('-') {
            return Err(QuantityError::Negative(input.to_string()));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(split);
        let multiplier = if suffix.is_empty() {
            1
        } else {
            SUFFIXES
                .iter()
                .find(|(name, _)| *name == suffix)
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    QuantityError::UnknownSuffix(input.to_string(), suffix.to_string())
                })?
        };
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        let digits_ok = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !digits_ok(whole) || !digits_ok(fraction) {
            return Err(QuantityError::NotANumber(input.to_string()));
        }
        let overflow = || QuantityError::Overflow(input.to_string());
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| overflow())?
        };
        let mut bytes = whole.checked_mul(multiplier as u128).ok_or_else(overflow)?;
        if !fraction.is_empty() {
            // Exact decimal arithmetic: fraction * multiplier / 10^len, rounded up.
            let fraction = fraction.trim_end_matches('0');
            if fraction.len() > 30 {
                return Err(QuantityError::NotANumber(input.to_string()));
            }
            if !fraction.is_empty() {
                let numerator: u128 = fraction.parse().map_err(|_| overflow())?;
                let denominator = 10u128.pow(fraction.len() as u32);
                let scaled = numerator
                    .checked_mul(multiplier as u128)
                    .ok_or_else(overflow)?;
                bytes = bytes
                    .checked_add(scaled.div_ceil(denominator))
                    .ok_or_else(overflow)?;
            }
        }
        u64::try_from(bytes).map(Quantity).map_err(|_| overflow())
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0");
        }
        for (name, m) in SUFFIXES[..6].iter().rev() {
            if self.0 % m == 0 {
                return write!(f, "{}{}", self.0 / m, name);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(QUANTITY_FORMS)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                u64::try_from(v)
                    .map(Quantity)
                    .map_err(|_| E::custom(QuantityError::Negative(v.to_string())))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl schemars::JsonSchema for Quantity {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Quantity".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": format!("A size in bytes: {QUANTITY_FORMS}."),
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$"}
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<u64, QuantityError> {
        s.parse::<Quantity>().map(Quantity::bytes)
    }

    #[test]
    fn binary_and_decimal_suffixes_parse() {
        assert_eq!(q("10Gi"), Ok(10 << 30));
        assert_eq!(q("500Mi"), Ok(500 << 20));
        assert_eq!(q("1G"), Ok(1_000_000_000));
        assert_eq!(q("4k"), Ok(4000));
        assert_eq!(q("1048576"), Ok(1 << 20));
        assert_eq!(q("1.5Gi"), Ok(3 << 29));
        assert_eq!(q(".5Ki"), Ok(512));
    }

    #[test]
    fn fractions_round_up_to_a_whole_byte() {
        assert_eq!(q("1.0001Ki"), Ok(1025));
        assert_eq!(q("0.1"), Ok(1));
    }

    #[test]
    fn negatives_overflow_and_unknown_suffixes_are_refused_with_guidance() {
        assert!(matches!(q("-1Gi"), Err(QuantityError::Negative(_))));
        assert!(matches!(q("16Ei"), Err(QuantityError::Overflow(_))));
        assert!(matches!(
            q("99999999999999999999999"),
            Err(QuantityError::Overflow(_))
        ));
        let err = q("10GB").unwrap_err();
        assert!(matches!(err, QuantityError::UnknownSuffix(_, ref s) if s == "GB"));
        assert!(err.to_string().contains("Gi"), "{err}");
        assert!(matches!(q(""), Err(QuantityError::Empty)));
        assert!(matches!(q("Gi"), Err(QuantityError::NotANumber(_))));
        assert!(matches!(q("1.2.3Gi"), Err(QuantityError::NotANumber(_))));
    }

    #[test]
    fn formatting_is_canonical_and_round_trips() {
        for (input, canonical) in [
            ("1.5Gi", "1536Mi"),
            ("1024Mi", "1Gi"),
            ("1G", "1000000000"),
            ("0", "0"),
            ("1025", "1025"),
        ] {
            let parsed: Quantity = input.parse().unwrap();
            assert_eq!(parsed.to_string(), canonical);
            assert_eq!(canonical.parse::<Quantity>().unwrap(), parsed);
        }
    }

    #[test]
    fn rounds_up_to_whole_mebibytes() {
        assert_eq!(Quantity(1).round_up_mib().bytes(), MIB);
        assert_eq!(Quantity(MIB).round_up_mib().bytes(), MIB);
        assert_eq!(Quantity(u64::MAX).round_up_mib().bytes() % MIB, 0);
    }

    #[test]
    fn deserializes_from_numbers_and_strings() {
        let a: Quantity = serde_json::from_str("1048576").unwrap();
        let b: Quantity = serde_json::from_str("\"1Mi\"").unwrap();
        assert_eq!(a, b);
        assert!(serde_json::from_str::<Quantity>("-5").is_err());
    }
}
