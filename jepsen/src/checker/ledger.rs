//! The side-effect checker over the agents' ledgers: the orders each agent
//! actually executed, read from every host after a run.
//!
//! - "stale-leader execution": on one host, in ledger order, an order ran
//!   whose leader stamp is older than the stamp of an earlier order on that
//!   host, or older than the newest stamp the agent had accepted before it.
//!   The agent's fence exists to prevent exactly this. The summary calls it
//!   a duplicate execution, because a deposed leader's order repeats or
//!   undoes work its successor already ordered.
//! - "instance on two hosts": with all ledgers merged by wall-clock time, an
//!   instance was running on two hosts at once. An order whose domain ends
//!   "running" puts the instance on its host; "stopped" or "absent" takes it
//!   off. Today instances never move between hosts, so this fires only on a
//!   real bug.
//!
//! The merge trusts `time_unix_ns` across hosts, which holds when every
//! agent runs on the same machine, as in the harness.

use std::collections::{BTreeMap, BTreeSet};

use ccs::agent::ledger::LedgerEntry;
use ccs::zone::model::LeaderStamp;

use crate::checker::{counts, Anomaly, Verdict};

pub const NAME: &str = "ledger";

const STALE_LEADER: &str = "stale-leader execution";
const TWO_HOSTS: &str = "instance on two hosts";

/// Checks ledger entries from all hosts, each host's entries in the order
/// of its ledger file. Anomaly indices are positions in `entries`. No
/// entries is valid, since a run without instance orders writes none; the
/// "0 entries" count shows it.
pub fn check(entries: &[LedgerEntry]) -> Verdict {
    let hosts: BTreeSet<&str> = entries.iter().map(|entry| entry.host_id.as_str()).collect();
    let instances: BTreeSet<&str> = entries
        .iter()
        .map(|entry| entry.instance_id.as_str())
        .collect();
    let counts = counts(&[
        ("entries", entries.len() as u64),
        ("hosts", hosts.len() as u64),
        ("instances", instances.len() as u64),
    ]);
    let mut anomalies = stale_leader_executions(entries);
    match instances_on_two_hosts(entries) {
        Ok(found) => anomalies.extend(found),
        Err(reason) => return Verdict::unknown(NAME, counts, reason),
    }
    let mut verdict = Verdict::from_anomalies(NAME, counts, anomalies);
    if let Some(rest) = verdict.summary.strip_prefix(STALE_LEADER) {
        verdict.summary = format!("duplicate execution{rest}");
    }
    verdict
}

fn show(stamp: LeaderStamp) -> String {
    format!("({},{})", stamp.term, stamp.node_id)
}

/// Finds orders that ran on a host after an order from a newer leader, or
/// although the agent had already accepted a newer leader.
fn stale_leader_executions(entries: &[LedgerEntry]) -> Vec<Anomaly> {
    let mut by_host: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (position, entry) in entries.iter().enumerate() {
        by_host.entry(&entry.host_id).or_default().push(position);
    }

    let mut anomalies = Vec::new();
    for (host, positions) in by_host {
        // The newest leader of an earlier entry on this host, and where.
        let mut newest: Option<(LeaderStamp, usize)> = None;
        for position in positions {
            let entry = &entries[position];
            if let Some((stamp, at)) = newest.filter(|&(stamp, _)| entry.leader < stamp) {
                let message = format!(
                    "order {} from older leader {} ran after {} (order {}) on host {host}",
                    entry.order_id,
                    show(entry.leader),
                    show(stamp),
                    entries[at].order_id
                );
                anomalies.push(Anomaly::new(
                    STALE_LEADER,
                    message,
                    vec![at as u64, position as u64],
                ));
            } else if let Some(accepted) = entry
                .accepted_before
                .filter(|&accepted| entry.leader < accepted)
            {
                let message = format!(
                    "order {} from older leader {} ran after {} had been accepted on host {host}",
                    entry.order_id,
                    show(entry.leader),
                    show(accepted)
                );
                anomalies.push(Anomaly::new(STALE_LEADER, message, vec![position as u64]));
            }
            if newest.is_none_or(|(stamp, _)| entry.leader > stamp) {
                newest = Some((entry.leader, position));
            }
        }
    }
    anomalies
}

/// Replays all ledgers in time order and reports every start that put an
/// instance on a second host while it was running on another. Returns an
/// error naming the entry when a domain state is not one the agent writes.
fn instances_on_two_hosts(entries: &[LedgerEntry]) -> Result<Vec<Anomaly>, String> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |position: usize| {
            (
                entries[position].time_unix_ns,
                &entries[position].host_id,
                position,
            )
        };
        key(a).cmp(&key(b))
    });

    // Per instance: the hosts where it runs, with the entry that started it there.
    let mut running: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut anomalies = Vec::new();
    for position in order {
        let entry = &entries[position];
        // Volume orders name a volume, whose state is "present" or "absent".
        if matches!(entry.action.as_str(), "create_volume" | "delete_volume") {
            continue;
        }
        let hosts = running.entry(&entry.instance_id).or_default();
        match entry.after.as_str() {
            "running" => {
                for (&other, &since) in hosts.iter().filter(|(&host, _)| host != entry.host_id) {
                    anomalies.push(two_hosts(entries, position, other, since));
                }
                hosts.entry(&entry.host_id).or_insert(position);
            }
            "stopped" | "absent" => {
                hosts.remove(entry.host_id.as_str());
            }
            other => {
                return Err(format!(
                "invalid ledger entry: order {} on host {} has domain state {other:?} after it; \
                     expected \"running\", \"stopped\" or \"absent\"",
                entry.order_id, entry.host_id
            ))
            }
        }
    }
    Ok(anomalies)
}

fn two_hosts(entries: &[LedgerEntry], position: usize, other_host: &str, since: usize) -> Anomaly {
    let entry = &entries[position];
    let message = format!(
        "instance {} started on host {} (order {} from leader {}) while running on host \
         {other_host} since order {} from leader {}",
        entry.instance_id,
        entry.host_id,
        entry.order_id,
        show(entry.leader),
        entries[since].order_id,
        show(entries[since].leader)
    );
    Anomaly::new(TWO_HOSTS, message, vec![since as u64, position as u64])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;

    fn stamp(term: u64, node_id: u64) -> LeaderStamp {
        LeaderStamp { term, node_id }
    }

    fn entry(
        time: u64,
        host: &str,
        order_id: u64,
        leader: LeaderStamp,
        instance: &str,
        after: &str,
    ) -> LedgerEntry {
        LedgerEntry {
            time_unix_ns: time,
            host_id: host.to_string(),
            order_id,
            leader,
            accepted_before: None,
            instance_id: instance.to_string(),
            action: if after == "running" {
                "start"
            } else {
                "destroy"
            }
            .to_string(),
            before: "absent".to_string(),
            after: after.to_string(),
        }
    }

    #[test]
    fn newer_leaders_in_order_valid() {
        let mut later = entry(30, "h1", 3, stamp(2, 2), "i1", "absent");
        later.accepted_before = Some(stamp(2, 1));
        let entries = vec![
            entry(10, "h1", 1, stamp(1, 1), "i1", "running"),
            entry(20, "h2", 2, stamp(2, 1), "i2", "running"),
            later,
            entry(40, "h2", 4, stamp(2, 2), "i1", "running"),
        ];
        let verdict = check(&entries);
        assert_eq!(verdict.validity, Validity::Valid, "{verdict:#?}");
        assert_eq!(
            verdict.line(),
            "ledger        valid    (4 entries, 2 hosts, 2 instances)"
        );
    }

    #[test]
    fn older_leader_after_newer_duplicate_execution() {
        let entries = vec![
            entry(10, "h1", 7, stamp(3, 2), "i1", "running"),
            entry(20, "h2", 8, stamp(1, 1), "i2", "running"),
            entry(30, "h1", 5, stamp(2, 1), "i1", "absent"),
        ];
        let verdict = check(&entries);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert_eq!(verdict.anomalies.len(), 1, "{verdict:#?}");
        assert_eq!(verdict.anomalies[0].kind, "stale-leader execution");
        assert_eq!(verdict.anomalies[0].indices, vec![0, 2]);
        assert_eq!(
            verdict.summary,
            "duplicate execution: order 5 from older leader (2,1) ran after (3,2) (order 7) on host h1"
        );
    }

    #[test]
    fn order_older_than_accepted_stamp_reported() {
        let mut stale = entry(10, "h1", 5, stamp(2, 1), "i1", "running");
        stale.accepted_before = Some(stamp(2, 3));
        let verdict = check(&[stale]);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert!(
            verdict.summary.contains("after (2,3) had been accepted"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn same_term_higher_node_newer() {
        let entries = vec![
            entry(10, "h1", 1, stamp(2, 1), "i1", "running"),
            entry(20, "h1", 2, stamp(2, 3), "i1", "running"),
            entry(30, "h1", 3, stamp(2, 1), "i1", "running"),
        ];
        assert_eq!(check(&entries).validity, Validity::Invalid);
    }

    #[test]
    fn instance_running_on_two_hosts() {
        let entries = vec![
            entry(10, "h1", 1, stamp(1, 1), "i1", "running"),
            entry(20, "h2", 2, stamp(1, 1), "i1", "running"),
            entry(30, "h1", 3, stamp(1, 1), "i1", "absent"),
        ];
        let verdict = check(&entries);
        assert_eq!(verdict.validity, Validity::Invalid);
        assert_eq!(verdict.anomalies.len(), 1, "{verdict:#?}");
        assert_eq!(verdict.anomalies[0].kind, "instance on two hosts");
        assert!(
            verdict.summary.contains("started on host h2"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn merge_uses_time_not_input_order() {
        // h2's file comes first, but its start happened after h1 stopped it.
        let entries = vec![
            entry(30, "h2", 3, stamp(2, 1), "i1", "running"),
            entry(10, "h1", 1, stamp(1, 1), "i1", "running"),
            entry(20, "h1", 2, stamp(2, 1), "i1", "stopped"),
        ];
        assert_eq!(check(&entries).validity, Validity::Valid);
    }

    #[test]
    fn unknown_domain_state_unknown() {
        let verdict = check(&[entry(10, "h1", 1, stamp(1, 1), "i1", "paused")]);
        assert_eq!(verdict.validity, Validity::Unknown);
        assert!(
            verdict.summary.contains("\"paused\""),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn no_entries_valid_with_zero_count() {
        let verdict = check(&[]);
        assert_eq!(verdict.validity, Validity::Valid);
        assert_eq!(
            verdict.line(),
            "ledger        valid    (0 entries, 0 hosts, 0 instances)"
        );
    }
}
