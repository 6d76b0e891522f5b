//! Checkers that judge a history. Each checker is a pure function from
//! recorded data to a `Verdict`; none of them talks to the zone.
//!
//! - `linearizable`: the register workload (read, write, compare-and-set).
//! - `set`: every acknowledged instance create survives, no failed one appears.
//! - `unique`: instance ids and names are never handed out twice.
//! - `ledger`: agents' side-effect ledgers show no order from a deposed
//!   leader and no instance running on two hosts.

pub mod ledger;
pub mod linearizable;
pub mod networks;
pub mod set;
pub mod unique;

use std::io::Write;

use serde::{Deserialize, Serialize};

/// Whether a history passed a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validity {
    Valid,
    Invalid,
    /// The checker could not decide, for example because its time budget ran
    /// out or the input was malformed. Never counts as a pass.
    Unknown,
}

impl Validity {
    pub fn as_str(self) -> &'static str {
        match self {
            Validity::Valid => "valid",
            Validity::Invalid => "invalid",
            Validity::Unknown => "unknown",
        }
    }

    /// Combines two results: invalid wins over unknown, unknown over valid.
    pub fn combine(self, other: Validity) -> Validity {
        match (self, other) {
            (Validity::Invalid, _) | (_, Validity::Invalid) => Validity::Invalid,
            (Validity::Unknown, _) | (_, Validity::Unknown) => Validity::Unknown,
            _ => Validity::Valid,
        }
    }
}

/// One violation a checker found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Short name of the violation, e.g. "stale read" or "duplicate id".
    pub kind: String,
    /// One or two sentences naming the keys, values and operations involved.
    pub message: String,
    /// `Op::index` values of the history entries involved, ascending. The
    /// ledger checker puts positions in its input slice here instead.
    pub indices: Vec<u64>,
}

impl Anomaly {
    pub fn new(kind: &str, message: String, mut indices: Vec<u64>) -> Anomaly {
        indices.sort_unstable();
        indices.dedup();
        Anomaly {
            kind: kind.to_string(),
            message,
            indices,
        }
    }
}

/// A named number a checker reports, such as how many operations it read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub name: String,
    pub value: u64,
}

/// Builds the count list from (name, value) pairs, keeping their order.
pub fn counts(pairs: &[(&str, u64)]) -> Vec<Count> {
    pairs
        .iter()
        .map(|&(name, value)| Count {
            name: name.to_string(),
            value,
        })
        .collect()
}

/// The result of one checker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Checker name, e.g. "linearizable".
    pub checker: String,
    pub validity: Validity,
    /// One line: the first anomaly's kind and message when invalid, the
    /// reason when unknown, "no anomaly" when valid.
    pub summary: String,
    /// Counts of what the checker looked at, in display order.
    pub counts: Vec<Count>,
    /// Every violation found, the most severe first.
    pub anomalies: Vec<Anomaly>,
}

impl Verdict {
    /// Builds a verdict that is valid when `anomalies` is empty and invalid
    /// otherwise. The summary names the first anomaly and how many of each
    /// kind follow it, so callers should order anomalies by severity.
    pub fn from_anomalies(checker: &str, counts: Vec<Count>, anomalies: Vec<Anomaly>) -> Verdict {
        let (validity, summary) = match anomalies.first() {
            None => (Validity::Valid, "no anomaly".to_string()),
            Some(first) => (Validity::Invalid, summarize(first, &anomalies[1..])),
        };
        Verdict {
            checker: checker.to_string(),
            validity,
            summary,
            counts,
            anomalies,
        }
    }

    /// Builds a verdict for a check that could not decide.
    pub fn unknown(checker: &str, counts: Vec<Count>, reason: String) -> Verdict {
        Verdict {
            checker: checker.to_string(),
            validity: Validity::Unknown,
            summary: reason,
            counts,
            anomalies: Vec::new(),
        }
    }

    /// Formats the verdict as one line, e.g.
    /// `linearizable  valid    (12345 ops, 40 keys)`. The summary is shown
    /// only when the verdict is not valid.
    pub fn line(&self) -> String {
        let counts = self
            .counts
            .iter()
            .map(|count| format!("{} {}", count.value, count.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut line = format!(
            "{:<13} {:<8} ({counts})",
            self.checker,
            self.validity.as_str()
        );
        if self.validity != Validity::Valid {
            line.push_str("  ");
            line.push_str(&self.summary);
        }
        line
    }
}

/// Writes one line per verdict (see `Verdict::line`).
pub fn write_lines(out: &mut dyn Write, verdicts: &[Verdict]) -> std::io::Result<()> {
    for verdict in verdicts {
        writeln!(out, "{}", verdict.line())?;
    }
    Ok(())
}

/// Combines the validity of all verdicts; an empty list is unknown.
pub fn overall(verdicts: &[Verdict]) -> Validity {
    verdicts
        .iter()
        .map(|verdict| verdict.validity)
        .reduce(Validity::combine)
        .unwrap_or(Validity::Unknown)
}

/// Formats "kind: message" of the first anomaly, followed by how many
/// anomalies of each kind come after it.
fn summarize(first: &Anomaly, rest: &[Anomaly]) -> String {
    let mut summary = format!("{}: {}", first.kind, first.message);
    if rest.is_empty() {
        return summary;
    }
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    for anomaly in rest {
        match kinds.iter_mut().find(|(kind, _)| *kind == anomaly.kind) {
            Some((_, count)) => *count += 1,
            None => kinds.push((&anomaly.kind, 1)),
        }
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|(kind, count)| format!("{count} {kind}"))
        .collect();
    summary.push_str(&format!(" (and {} more: {})", rest.len(), kinds.join(", ")));
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anomaly(kind: &str) -> Anomaly {
        Anomaly::new(kind, format!("a {kind}"), vec![3, 1, 3])
    }

    #[test]
    fn anomaly_indices_sorted_and_unique() {
        assert_eq!(anomaly("x").indices, vec![1, 3]);
    }

    #[test]
    fn valid_line_shows_counts() {
        let verdict = Verdict::from_anomalies(
            "linearizable",
            counts(&[("ops", 12345), ("keys", 40)]),
            Vec::new(),
        );
        assert_eq!(verdict.validity, Validity::Valid);
        assert_eq!(
            verdict.line(),
            "linearizable  valid    (12345 ops, 40 keys)"
        );
    }

    #[test]
    fn invalid_summary_names_first_and_rest() {
        let anomalies = vec![
            anomaly("lost write"),
            anomaly("stale read"),
            anomaly("stale read"),
        ];
        let verdict = Verdict::from_anomalies("linearizable", counts(&[("ops", 9)]), anomalies);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert_eq!(
            verdict.summary,
            "lost write: a lost write (and 2 more: 2 stale read)"
        );
        assert!(verdict
            .line()
            .starts_with("linearizable  invalid  (9 ops)  lost write:"));
    }

    #[test]
    fn overall_prefers_invalid_then_unknown() {
        let valid = Verdict::from_anomalies("a", Vec::new(), Vec::new());
        let unknown = Verdict::unknown("b", Vec::new(), "budget".to_string());
        let invalid = Verdict::from_anomalies("c", Vec::new(), vec![anomaly("x")]);
        assert_eq!(overall(&[valid.clone()]), Validity::Valid);
        assert_eq!(
            overall(&[valid.clone(), unknown.clone()]),
            Validity::Unknown
        );
        assert_eq!(overall(&[unknown, invalid, valid]), Validity::Invalid);
        assert_eq!(overall(&[]), Validity::Unknown);
    }

    #[test]
    fn verdict_serializes_to_json() {
        let verdict =
            Verdict::from_anomalies("set", counts(&[("ok", 2)]), vec![anomaly("lost create")]);
        let json = serde_json::to_value(&verdict).expect("a verdict serializes");
        assert_eq!(json["validity"], "invalid");
        assert_eq!(json["anomalies"][0]["kind"], "lost create");
        assert_eq!(json["anomalies"][0]["indices"], serde_json::json!([1, 3]));
        let back: Verdict = serde_json::from_value(json).expect("a verdict deserializes");
        assert_eq!(back, verdict);
    }
}
