//! Equality-based label selectors, as `-l` and `?labelSelector=` take them:
//! `disk=ssd`, `disk==ssd`, `tier!=cold`, `app` (has the label), `!legacy` (lacks it), joined by
//! commas; every term must hold.
//!
//! ```
//! use cobalt_api::selector::LabelSelector;
//! let sel: LabelSelector = "disk=ssd,!legacy".parse().unwrap();
//! let labels = [("disk".to_string(), "ssd".to_string())].into();
//! assert!(sel.matches(&labels));
//! ```

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A conjunction of label terms; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Term>);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("label selector term {term:?} is invalid: {reason}; expected key=value, key!=value, key or !key, joined by commas")]
pub struct SelectorError {
    pub term: String,
    pub reason: &'static str,
}

impl LabelSelector {
    pub fn matches(&self, labels: &crate::compact::StringMap) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.has(k, v),
            Term::NotEquals(k, v) => !labels.has(k, v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = |reason| SelectorError {
                term: raw.to_string(),
                reason,
            };
            let key_ok = |k: &str| {
                !k.is_empty()
                    && k.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')
                    })
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Equals(k.trim().to_string(), v.trim().to_string())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::NotExists(k.trim().to_string())
            } else {
                Term::Exists(raw.to_string())
            };
            let key = match &term {
                Term::Equals(k, _)
                | Term::NotEquals(k, _)
                | Term::Exists(k)
                | Term::NotExists(k) => k,
            };
            if !key_ok(key) {
                return Err(bad("the key is empty or has characters other than letters, digits, '-', '_', '.' and '/'"));
            }
            if let Term::Equals(_, v) | Term::NotEquals(_, v) = &term {
                if v.contains(['=', '!', ' ']) {
                    return Err(bad("the value has '=', '!' or a space"));
                }
            }
            terms.push(term);
        }
        Ok(LabelSelector(terms))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|t| match t {
                Term::Equals(k, v) => format!("{k}={v}"),
                Term::NotEquals(k, v) => format!("{k}!={v}"),
                Term::Exists(k) => k.clone(),
                Term::NotExists(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> crate::compact::StringMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_term_must_hold() {
        let sel: LabelSelector = "disk=ssd, tier!=cold, app, !legacy".parse().unwrap();
        assert!(sel.matches(&labels(&[("disk", "ssd"), ("app", "x")])));
        assert!(!sel.matches(&labels(&[("disk", "hdd"), ("app", "x")])));
        assert!(!sel.matches(&labels(&[("disk", "ssd"), ("app", "x"), ("tier", "cold")])));
        assert!(!sel.matches(&labels(&[("disk", "ssd")])));
        assert!(!sel.matches(&labels(&[("disk", "ssd"), ("app", "x"), ("legacy", "")])));
        assert_eq!(sel.to_string(), "disk=ssd,tier!=cold,app,!legacy");
    }

    #[test]
    fn empty_selector_matches_all_and_bad_terms_are_named() {
        let empty: LabelSelector = "".parse().unwrap();
        assert!(empty.matches(&labels(&[])));
        let err = "disk=ssd,=x".parse::<LabelSelector>().unwrap_err();
        assert_eq!(err.term, "=x");
    }
}
