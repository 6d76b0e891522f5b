//! The set checker for instance creates: compares the creates of a history
//! with the instances the last successful listing returned.
//!
//! - An `ok` create that completed before the listing began must be listed,
//!   under the id it was given ("lost create").
//! - A request whose every attempt failed must not be listed ("failed
//!   create present"). Attempts are grouped by request id, since a client
//!   retries a create under the same request id.
//! - A request with no `ok` attempt and at least one indeterminate one may
//!   be listed or not; both are counted.
//!
//! Listed instances whose request id no create in the history used are
//! counted but not reported, since the run's setup may create instances.

use std::collections::{BTreeMap, HashMap};

use crate::checker::{counts, Anomaly, Verdict};
use crate::history::{pairs, Call, InstanceSeen, Op, OpType};

pub const NAME: &str = "set";

/// One attempt at a create, as the history recorded it.
#[derive(Clone, Debug)]
pub(crate) struct CreateAttempt<'a> {
    pub name: &'a str,
    pub request_id: &'a str,
    /// The instance id an `ok` completion returned.
    pub id: Option<&'a str>,
    pub outcome: OpType,
    pub invoked: u64,
    /// `Op::index` of the completion, if any.
    pub completed: Option<u64>,
}

impl CreateAttempt<'_> {
    pub fn indices(&self) -> Vec<u64> {
        std::iter::once(self.invoked)
            .chain(self.completed)
            .collect()
    }
}

/// Returns every create attempt of `history`, in invocation order.
pub(crate) fn create_attempts(history: &[Op]) -> Vec<CreateAttempt<'_>> {
    let mut attempts = Vec::new();
    for pair in pairs(history) {
        let Call::Create {
            name, request_id, ..
        } = &pair.invoke.call
        else {
            continue;
        };
        let id = match pair.completion.map(|op| &op.call) {
            Some(Call::Create { id: Some(id), .. }) if pair.outcome() == OpType::Ok => {
                Some(id.as_str())
            }
            _ => None,
        };
        attempts.push(CreateAttempt {
            name,
            request_id,
            id,
            outcome: pair.outcome(),
            invoked: pair.invoke.index,
            completed: pair.completion.map(|op| op.index),
        });
    }
    attempts
}

/// The last successful listing of instances.
pub(crate) struct Listing<'a> {
    pub invoked: u64,
    pub completed: u64,
    pub instances: &'a [InstanceSeen],
}

/// Finds the last `ok` ListInstances of `history`, by completion.
pub(crate) fn final_listing(history: &[Op]) -> Option<Listing<'_>> {
    pairs(history)
        .into_iter()
        .filter_map(|pair| {
            let completion = pair.completion.filter(|op| op.kind == OpType::Ok)?;
            let Call::ListInstances {
                instances: Some(instances),
            } = &completion.call
            else {
                return None;
            };
            Some(Listing {
                invoked: pair.invoke.index,
                completed: completion.index,
                instances,
            })
        })
        .max_by_key(|listing| listing.completed)
}

/// The attempts of one request id.
#[derive(Debug, Default)]
struct Request<'a> {
    attempts: Vec<CreateAttempt<'a>>,
}

impl Request<'_> {
    fn acknowledged(&self) -> Option<&CreateAttempt<'_>> {
        self.attempts
            .iter()
            .find(|attempt| attempt.outcome == OpType::Ok)
    }

    fn all_failed(&self) -> bool {
        self.attempts
            .iter()
            .all(|attempt| attempt.outcome == OpType::Fail)
    }

    fn indices(&self) -> Vec<u64> {
        self.attempts
            .iter()
            .flat_map(CreateAttempt::indices)
            .collect()
    }
}

/// Checks that every acknowledged create survives to the final listing and
/// no failed one appears in it.
pub fn check(history: &[Op]) -> Verdict {
    let attempts = create_attempts(history);
    let Some(listing) = final_listing(history) else {
        let reason =
            "no successful ListInstances in the history; the run must end with a final listing";
        return Verdict::unknown(NAME, Vec::new(), reason.to_string());
    };
    let mut requests: BTreeMap<&str, Request> = BTreeMap::new();
    for attempt in attempts {
        requests
            .entry(attempt.request_id)
            .or_default()
            .attempts
            .push(attempt);
    }
    let by_id: HashMap<&str, &InstanceSeen> = listing
        .instances
        .iter()
        .map(|seen| (seen.id.as_str(), seen))
        .collect();
    let by_request: HashMap<&str, &InstanceSeen> = listing
        .instances
        .iter()
        .map(|seen| (seen.request_id.as_str(), seen))
        .collect();

    let mut tally = Tally::default();
    let mut anomalies = Vec::new();
    for (request_id, request) in &requests {
        let listed = by_request.get(request_id).copied();
        if let Some(acknowledged) = request.acknowledged() {
            tally.acknowledged += 1;
            if let Some(anomaly) = check_acknowledged(acknowledged, &listing, &by_id, listed) {
                anomalies.push(anomaly);
            }
        } else if request.all_failed() {
            tally.failed += 1;
            if let Some(seen) = listed {
                anomalies.push(failed_create_present(request_id, seen, request, &listing));
            }
        } else {
            tally.indeterminate += 1;
            tally.indeterminate_listed += u64::from(listed.is_some());
        }
    }
    tally.late = requests
        .values()
        .filter_map(Request::acknowledged)
        .filter(|attempt| attempt.completed.is_some_and(|done| done > listing.invoked))
        .count() as u64;
    let unrecorded = listing
        .instances
        .iter()
        .filter(|seen| !requests.contains_key(seen.request_id.as_str()))
        .count() as u64;

    let counts = counts(&[
        ("acknowledged", tally.acknowledged),
        ("acknowledged after listing began", tally.late),
        ("failed", tally.failed),
        ("indeterminate", tally.indeterminate),
        ("indeterminate listed", tally.indeterminate_listed),
        ("listed", listing.instances.len() as u64),
        ("listed without a recorded create", unrecorded),
    ]);
    if requests.is_empty() {
        return Verdict::unknown(
            NAME,
            counts,
            "no instance creates in the history".to_string(),
        );
    }
    anomalies.sort_by_key(|anomaly| anomaly.kind != LOST_CREATE);
    Verdict::from_anomalies(NAME, counts, anomalies)
}

const LOST_CREATE: &str = "lost create";

#[derive(Default)]
struct Tally {
    acknowledged: u64,
    late: u64,
    failed: u64,
    indeterminate: u64,
    indeterminate_listed: u64,
}

/// Returns a "lost create" when an acknowledged create that completed
/// before the listing began is not listed under the id it was given.
fn check_acknowledged(
    acknowledged: &CreateAttempt,
    listing: &Listing,
    by_id: &HashMap<&str, &InstanceSeen>,
    listed: Option<&InstanceSeen>,
) -> Option<Anomaly> {
    let completed_before_listing = acknowledged
        .completed
        .is_some_and(|done| done < listing.invoked);
    if !completed_before_listing {
        return None;
    }
    let present = match acknowledged.id {
        Some(id) => by_id.contains_key(id),
        None => listed.is_some(),
    };
    if present {
        return None;
    }
    let id = acknowledged.id.unwrap_or("(none returned)");
    let elsewhere = match listed {
        Some(seen) => format!(" (its request id is listed under id {})", seen.id),
        None => String::new(),
    };
    let message = format!(
        "create of {} (request {}) was acknowledged with id {id} at op {}, but the final listing \
         at op {} does not contain it{elsewhere}",
        acknowledged.name,
        acknowledged.request_id,
        acknowledged.completed.unwrap_or(acknowledged.invoked),
        listing.completed,
    );
    let mut indices = acknowledged.indices();
    indices.push(listing.completed);
    Some(Anomaly::new(LOST_CREATE, message, indices))
}

fn failed_create_present(
    request_id: &str,
    seen: &InstanceSeen,
    request: &Request,
    listing: &Listing,
) -> Anomaly {
    let message = format!(
        "every attempt of request {request_id} failed ({} attempts), but the final listing at \
         op {} contains it as instance {} ({})",
        request.attempts.len(),
        listing.completed,
        seen.id,
        seen.name
    );
    let mut indices = request.indices();
    indices.push(listing.completed);
    Anomaly::new("failed create present", message, indices)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checker::Validity;
    use crate::history::Process;

    /// Builds a history entry by entry; each entry gets the next index.
    #[derive(Default)]
    pub(crate) struct History {
        pub ops: Vec<Op>,
    }

    impl History {
        pub fn push(&mut self, process: u64, kind: OpType, call: Call) -> &mut Self {
            let index = self.ops.len() as u64;
            self.ops.push(Op {
                index,
                time_ns: index * 1_000,
                process: Process::Client(process),
                kind,
                call,
                error: None,
            });
            self
        }

        /// Appends a create that completes with `outcome`; an `ok` one gets an id.
        pub fn create(
            &mut self,
            process: u64,
            name: &str,
            request_id: &str,
            outcome: OpType,
        ) -> &mut Self {
            let call = |id: Option<String>| Call::Create {
                name: name.to_string(),
                request_id: request_id.to_string(),
                id,
                host: None,
            };
            self.push(process, OpType::Invoke, call(None));
            let id = (outcome == OpType::Ok).then(|| format!("id-{request_id}"));
            self.push(process, outcome, call(id))
        }

        /// Appends a create acknowledged with the given id.
        pub fn create_with_id(
            &mut self,
            process: u64,
            name: &str,
            request_id: &str,
            id: &str,
        ) -> &mut Self {
            let call = |id: Option<&str>| Call::Create {
                name: name.to_string(),
                request_id: request_id.to_string(),
                id: id.map(str::to_string),
                host: id.map(|_| "h1".to_string()),
            };
            self.push(process, OpType::Invoke, call(None));
            self.push(process, OpType::Ok, call(Some(id)))
        }

        /// Appends a listing that returns (id, name, request id) triples.
        pub fn listing(&mut self, process: u64, instances: &[(&str, &str, &str)]) -> &mut Self {
            let seen = instances
                .iter()
                .map(|&(id, name, request_id)| InstanceSeen {
                    id: id.to_string(),
                    name: name.to_string(),
                    host: "h1".to_string(),
                    request_id: request_id.to_string(),
                })
                .collect();
            self.push(
                process,
                OpType::Invoke,
                Call::ListInstances { instances: None },
            );
            self.push(
                process,
                OpType::Ok,
                Call::ListInstances {
                    instances: Some(seen),
                },
            )
        }
    }

    fn count(verdict: &Verdict, name: &str) -> u64 {
        verdict
            .counts
            .iter()
            .find(|count| count.name == name)
            .expect("count exists")
            .value
    }

    #[test]
    fn all_acknowledged_listed_valid() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Ok)
            .create(2, "b", "r2", OpType::Fail)
            .create(3, "c", "r3", OpType::Info)
            .create(4, "d", "r4", OpType::Info)
            .listing(1, &[("id-r1", "a", "r1"), ("id-r3", "c", "r3")]);
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
        assert_eq!(count(&verdict, "acknowledged"), 1);
        assert_eq!(count(&verdict, "failed"), 1);
        assert_eq!(count(&verdict, "indeterminate"), 2);
        assert_eq!(count(&verdict, "indeterminate listed"), 1);
        assert_eq!(count(&verdict, "listed"), 2);
    }

    #[test]
    fn acknowledged_missing_lost() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Ok)
            .create(2, "b", "r2", OpType::Ok)
            .listing(1, &[("id-r1", "a", "r1")]);
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert_eq!(verdict.anomalies.len(), 1);
        assert_eq!(verdict.anomalies[0].kind, "lost create");
        assert_eq!(verdict.anomalies[0].indices, vec![2, 3, 5]);
        assert!(
            verdict
                .summary
                .starts_with("lost create: create of b (request r2)"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn listed_under_other_id_lost() {
        let mut history = History::default();
        history
            .create_with_id(1, "a", "r1", "i1")
            .listing(1, &[("i9", "a", "r1")]);
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert!(
            verdict.summary.contains("listed under id i9"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn failed_create_listed_invalid() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Fail)
            .create(1, "a", "r1", OpType::Fail)
            .listing(1, &[("x", "a", "r1")]);
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert_eq!(verdict.anomalies[0].kind, "failed create present");
        assert!(
            verdict.summary.contains("2 attempts"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn retry_after_failure_counts_as_acknowledged() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Fail)
            .create(1, "a", "r1", OpType::Ok)
            .listing(1, &[("id-r1", "a", "r1")]);
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
        assert_eq!(count(&verdict, "failed"), 0);
    }

    #[test]
    fn create_acknowledged_during_listing_not_required() {
        let mut history = History::default();
        history.push(1, OpType::Invoke, Call::ListInstances { instances: None });
        history.create(2, "a", "r1", OpType::Ok);
        history.push(
            1,
            OpType::Ok,
            Call::ListInstances {
                instances: Some(Vec::new()),
            },
        );
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
        assert_eq!(count(&verdict, "acknowledged after listing began"), 1);
    }

    #[test]
    fn last_listing_used() {
        let mut history = History::default();
        history
            .create(1, "a", "r1", OpType::Ok)
            .listing(2, &[("id-r1", "a", "r1")])
            .listing(2, &[]);
        assert_eq!(check(&history.ops).validity, Validity::Invalid);
    }

    #[test]
    fn no_listing_unknown() {
        let mut history = History::default();
        history.create(1, "a", "r1", OpType::Ok);
        let verdict = check(&history.ops);
        assert_eq!(verdict.validity, Validity::Unknown);
        assert!(
            verdict.summary.contains("final listing"),
            "{}",
            verdict.summary
        );
    }
}
