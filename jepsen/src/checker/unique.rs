//! The uniqueness checker for instance creates. Clients choose names that
//! collide on purpose, so at most one create per name may succeed. Ids are
//! chosen by the zone and must never be handed out twice.
//!
//! Attempts that share a request id are one create (a client retries under
//! the same request id), so they may return the same id and name. Checks:
//! - "duplicate id": two requests acknowledged with the same instance id,
//!   or the final listing contains one id twice;
//! - "duplicate name": two requests acknowledged with the same name, or the
//!   final listing contains one name twice;
//! - "duplicate request": one request acknowledged with two ids, or listed
//!   twice, which means the zone ran it twice.

use std::collections::BTreeMap;

use crate::checker::set::{create_attempts, final_listing, CreateAttempt};
use crate::checker::{counts, Anomaly, Verdict};
use crate::history::{Op, OpType};

pub const NAME: &str = "unique";

const DUPLICATE_ID: &str = "duplicate id";
const DUPLICATE_NAME: &str = "duplicate name";
const DUPLICATE_REQUEST: &str = "duplicate request";

/// Checks that acknowledged creates and the final listing hand out each
/// instance id and name once.
pub fn check(history: &[Op]) -> Verdict {
    let acknowledged: Vec<CreateAttempt> = create_attempts(history)
        .into_iter()
        .filter(|attempt| attempt.outcome == OpType::Ok)
        .collect();
    let listing = final_listing(history);
    let mut anomalies = Vec::new();

    // Acknowledged creates, grouped by what must be unique.
    let by_request = group(&acknowledged, |attempt| Some(attempt.request_id));
    for (request_id, attempts) in &by_request {
        let ids = distinct(attempts, |attempt| attempt.id);
        if ids.len() > 1 {
            let message = format!(
                "request {request_id} was acknowledged with ids {}",
                ids.join(", ")
            );
            anomalies.push(Anomaly::new(DUPLICATE_REQUEST, message, indices(attempts)));
        }
    }
    for (id, attempts) in group(&acknowledged, |attempt| attempt.id) {
        anomalies.extend(shared_by_requests(DUPLICATE_ID, "id", id, &attempts));
    }
    let by_name = group(&acknowledged, |attempt| Some(attempt.name));
    for (name, attempts) in &by_name {
        anomalies.extend(shared_by_requests(DUPLICATE_NAME, "name", name, attempts));
    }

    // The final listing.
    let listed = listing
        .as_ref()
        .map_or(0, |listing| listing.instances.len() as u64);
    if let Some(listing) = &listing {
        let fields: [(&str, &str, fn(&crate::history::InstanceSeen) -> &str); 3] = [
            (DUPLICATE_ID, "id", |seen| &seen.id),
            (DUPLICATE_NAME, "name", |seen| &seen.name),
            (DUPLICATE_REQUEST, "request id", |seen| &seen.request_id),
        ];
        for (kind, field, value_of) in fields {
            let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
            for instance in listing.instances {
                *seen.entry(value_of(instance)).or_default() += 1;
            }
            for (value, times) in seen.into_iter().filter(|(_, times)| *times > 1) {
                let message = format!(
                    "the final listing at op {} contains {field} {value} {times} times",
                    listing.completed
                );
                anomalies.push(Anomaly::new(
                    kind,
                    message,
                    vec![listing.invoked, listing.completed],
                ));
            }
        }
    }

    let counts = counts(&[
        ("acknowledged requests", by_request.len() as u64),
        ("names acknowledged", by_name.len() as u64),
        ("listed", listed),
    ]);
    if acknowledged.is_empty() && listing.is_none() {
        let reason = "no acknowledged creates and no listing in the history".to_string();
        return Verdict::unknown(NAME, counts, reason);
    }
    Verdict::from_anomalies(NAME, counts, anomalies)
}

/// Groups attempts by a field, skipping attempts where it is `None`.
fn group<'a, 'h>(
    attempts: &'a [CreateAttempt<'h>],
    field: impl Fn(&CreateAttempt<'h>) -> Option<&'h str>,
) -> BTreeMap<&'h str, Vec<&'a CreateAttempt<'h>>> {
    let mut groups: BTreeMap<&str, Vec<&CreateAttempt>> = BTreeMap::new();
    for attempt in attempts {
        if let Some(value) = field(attempt) {
            groups.entry(value).or_default().push(attempt);
        }
    }
    groups
}

/// Returns the distinct values of a field among `attempts`, sorted.
fn distinct<'h>(
    attempts: &[&CreateAttempt<'h>],
    field: impl Fn(&CreateAttempt<'h>) -> Option<&'h str>,
) -> Vec<&'h str> {
    let mut values: Vec<&str> = attempts
        .iter()
        .filter_map(|attempt| field(attempt))
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}

fn indices(attempts: &[&CreateAttempt]) -> Vec<u64> {
    attempts
        .iter()
        .flat_map(|attempt| attempt.indices())
        .collect()
}

/// Reports `value` when acknowledged creates of more than one request got it.
fn shared_by_requests(
    kind: &str,
    field: &str,
    value: &str,
    attempts: &[&CreateAttempt],
) -> Option<Anomaly> {
    let requests = distinct(attempts, |attempt| Some(attempt.request_id));
    if requests.len() < 2 {
        return None;
    }
    let message = format!(
        "{field} {value} was acknowledged to {} requests: {}",
        requests.len(),
        requests.join(", ")
    );
    Some(Anomaly::new(kind, message, indices(attempts)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::set::tests::History;
    use crate::checker::Validity;

    fn kinds(verdict: &Verdict) -> Vec<&str> {
        verdict
            .anomalies
            .iter()
            .map(|anomaly| anomaly.kind.as_str())
            .collect()
    }

    #[test]
    fn distinct_names_and_ids_valid() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Ok)
            .create(2, "a", "r2", OpType::Fail)
            .create(3, "b", "r3", OpType::Info)
            .create(3, "b", "r3", OpType::Ok)
            .create(4, "c", "r4", OpType::Ok)
            .listing(
                1,
                &[
                    ("id-r1", "a", "r1"),
                    ("id-r3", "b", "r3"),
                    ("id-r4", "c", "r4"),
                ],
            );
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
        assert_eq!(verdict.counts[0].value, 3);
    }

    #[test]
    fn retry_with_same_id_valid() {
        let mut history = History::default();
        history
            .create_with_id(1, "a", "r1", "i1")
            .create_with_id(2, "a", "r1", "i1");
        assert_eq!(check(&history.ops).validity, Validity::Valid);
    }

    #[test]
    fn same_id_two_requests_duplicate() {
        let mut history = History::default();
        history
            .create_with_id(1, "a", "r1", "i1")
            .create_with_id(2, "b", "r2", "i1");
        let verdict = check(&history.ops);
        assert_eq!(kinds(&verdict), vec!["duplicate id"]);
        assert_eq!(verdict.anomalies[0].indices, vec![0, 1, 2, 3]);
        assert!(verdict
            .summary
            .starts_with("duplicate id: id i1 was acknowledged to 2 requests"));
    }

    #[test]
    fn same_name_two_requests_duplicate() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Ok)
            .create(2, "a", "r2", OpType::Ok);
        assert_eq!(kinds(&check(&history.ops)), vec!["duplicate name"]);
    }

    #[test]
    fn one_request_two_ids_duplicate() {
        let mut history = History::default();
        history
            .create_with_id(1, "a", "r1", "i1")
            .create_with_id(2, "a", "r1", "i2");
        assert_eq!(kinds(&check(&history.ops)), vec!["duplicate request"]);
    }

    #[test]
    fn listing_duplicates_reported() {
        let mut history = History::default();
        history.listing(
            1,
            &[("i1", "a", "r1"), ("i1", "b", "r2"), ("i3", "b", "r3")],
        );
        let verdict = check(&history.ops);
        assert_eq!(kinds(&verdict), vec!["duplicate id", "duplicate name"]);
        assert!(
            verdict.anomalies[1].message.contains("name b 2 times"),
            "{verdict:#?}"
        );
    }

    #[test]
    fn empty_history_unknown() {
        assert_eq!(check(&[]).validity, Validity::Unknown);
    }
}
