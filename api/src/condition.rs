//! Kubernetes-style status conditions.
//!
//! A condition says one thing about an object (`Ready`, `Scheduled`, `Exported`, …) as
//! True/False/Unknown with a machine-readable `reason` and a sentence for people.
//! [`set_condition`] keeps `lastTransitionTime` when only the reason or message changes, so a
//! status that did not change serializes identically and is not written again.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::compact::{word, Text, Word};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(rename = "type", deserialize_with = "crate::compact::deserialize_word")]
    pub type_: Word,
    pub status: ConditionStatus,
    #[serde(
        default,
        skip_serializing_if = "str::is_empty",
        deserialize_with = "crate::compact::deserialize_word"
    )]
    pub reason: Word,
    #[serde(default, skip_serializing_if = "Text::is_empty")]
    pub message: Text,
    pub last_transition_time: DateTime<Utc>,
    #[serde(default)]
    pub observed_generation: i64,
}

impl Condition {
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Finds the condition of the given type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets a condition, keeping its transition time unless its status flips.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: i64,
    now: DateTime<Utc>,
) {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.status = status;
                c.last_transition_time = now;
            }
            if c.reason != reason {
                c.reason = word(reason);
            }
            c.message = Text::new(message);
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: word(type_),
            status,
            reason: word(reason),
            message: Text::new(message),
            last_transition_time: now,
            observed_generation,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let mut cs = Vec::new();
        set_condition(
            &mut cs,
            "Ready",
            ConditionStatus::False,
            "Creating",
            "",
            1,
            t0,
        );
        set_condition(
            &mut cs,
            "Ready",
            ConditionStatus::False,
            "Quota",
            "m",
            1,
            t1,
        );
        assert_eq!(cs[0].last_transition_time, t0);
        assert_eq!(cs[0].reason, "Quota");
        set_condition(&mut cs, "Ready", ConditionStatus::True, "Ready", "", 2, t1);
        assert_eq!(cs[0].last_transition_time, t1);
        assert_eq!(cs.len(), 1);
        assert!(find_condition(&cs, "Ready").unwrap().is_true());
    }
}
