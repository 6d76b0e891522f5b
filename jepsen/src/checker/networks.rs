//! The checker for tenant network creates: VLAN ids are allocated inside
//! the zone's apply, so two networks must never share one, and every
//! acknowledged network must survive the faults.
//!
//! Checks:
//! - "duplicate vlan": two different network names were acknowledged with
//!   the same segmentation id, or the final listing shows one id twice;
//! - "duplicate network name": one name was acknowledged with two ids, or
//!   the final listing shows one name twice;
//! - "lost network": an acknowledged network is missing from the final
//!   listing.
//!
//! Clients choose colliding names on purpose, so a name acknowledged twice
//! is not an anomaly by itself when both acknowledgements carry the same id:
//! a create whose acknowledgement was lost and that was retried returns
//! NAME_TAKEN, never a second id.

use std::collections::{BTreeMap, BTreeSet};

use crate::checker::{counts, Anomaly, Verdict};
use crate::history::{pairs, Call, NetworkSeen, OpType};
use crate::history::Op;

pub const NAME: &str = "networks";

const DUPLICATE_VLAN: &str = "duplicate vlan";
const DUPLICATE_NAME: &str = "duplicate network name";
const LOST_NETWORK: &str = "lost network";

/// Checks acknowledged network creates and the last successful listing.
pub fn check(history: &[Op]) -> Verdict {
    let mut acknowledged: BTreeMap<u32, BTreeMap<String, Vec<u64>>> = BTreeMap::new();
    let mut acknowledged_names: BTreeMap<String, u32> = BTreeMap::new();
    let mut ids_by_name: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut attempts = 0u64;
    let mut listing: Option<(Vec<NetworkSeen>, u64)> = None;
    for pair in pairs(history) {
        match (&pair.invoke.call, pair.completion) {
            (Call::CreateNetwork { .. }, completion) => {
                attempts += 1;
                let Some(done) = completion.filter(|op| op.kind == OpType::Ok) else {
                    continue;
                };
                if let Call::CreateNetwork { name, segmentation_id: Some(id) } = &done.call {
                    let names = acknowledged.entry(*id).or_default();
                    names.entry(name.clone()).or_default().push(done.index);
                    acknowledged_names.insert(name.clone(), *id);
                    ids_by_name.entry(name.clone()).or_default().insert(*id);
                }
            }
            (Call::ListNetworks { .. }, Some(done)) if done.kind == OpType::Ok => {
                if let Call::ListNetworks { networks: Some(networks) } = &done.call {
                    listing = Some((networks.clone(), pair.invoke.index));
                }
            }
            _ => {}
        }
    }
    if attempts == 0 {
        return Verdict::unknown(NAME, Vec::new(), "no network creates in the history".into());
    }

    let mut anomalies = Vec::new();
    for (id, names) in &acknowledged {
        if names.len() > 1 {
            let listed: Vec<&str> = names.keys().map(String::as_str).collect();
            let message = format!("VLAN id {id} was acknowledged to networks {}", listed.join(", "));
            let indices = names.values().flatten().copied().collect();
            anomalies.push(Anomaly::new(DUPLICATE_VLAN, message, indices));
        }
    }
    for (name, ids) in &ids_by_name {
        if ids.len() > 1 {
            let message = format!("network name {name} was acknowledged with VLAN ids {ids:?}");
            anomalies.push(Anomaly::new(DUPLICATE_NAME, message, Vec::new()));
        }
    }
    let Some((networks, listing_index)) = listing else {
        let reason = "no successful ListNetworks in the history; the run must end with a final listing";
        let counts = counts(&[("creates", attempts), ("acknowledged", acknowledged_names.len() as u64)]);
        return match anomalies.is_empty() {
            true => Verdict::unknown(NAME, counts, reason.to_string()),
            false => Verdict::from_anomalies(NAME, counts, anomalies),
        };
    };
    let mut listed_ids: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    let mut listed_names: BTreeMap<&str, u32> = BTreeMap::new();
    for network in &networks {
        listed_ids.entry(network.segmentation_id).or_default().insert(network.name.clone());
        if listed_names.insert(&network.name, network.segmentation_id).is_some() {
            let message = format!("the final listing shows network {} twice", network.name);
            anomalies.push(Anomaly::new(DUPLICATE_NAME, message, vec![listing_index]));
        }
    }
    for (id, names) in &listed_ids {
        if names.len() > 1 {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let message = format!("the final listing shows VLAN id {id} on networks {}", names.join(", "));
            anomalies.push(Anomaly::new(DUPLICATE_VLAN, message, vec![listing_index]));
        }
    }
    for (name, id) in &acknowledged_names {
        if listed_names.get(name.as_str()) != Some(id) {
            let message = format!("network {name} was acknowledged with VLAN id {id} but the final listing does not show it");
            anomalies.push(Anomaly::new(LOST_NETWORK, message, vec![listing_index]));
        }
    }
    let counts = counts(&[
        ("creates", attempts),
        ("acknowledged", acknowledged_names.len() as u64),
        ("listed", networks.len() as u64),
    ]);
    Verdict::from_anomalies(NAME, counts, anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;
    use crate::history::Process;

    fn op(index: u64, process: u64, kind: OpType, call: Call) -> Op {
        Op { index, time_ns: index * 1000, process: Process::Client(process), kind, call, error: None }
    }

    fn create(name: &str, id: Option<u32>) -> Call {
        Call::CreateNetwork { name: name.into(), segmentation_id: id }
    }

    fn listing(networks: &[(&str, u32)]) -> Call {
        let networks = networks
            .iter()
            .map(|(name, id)| NetworkSeen { name: name.to_string(), segmentation_id: *id })
            .collect();
        Call::ListNetworks { networks: Some(networks) }
    }

    fn history(creates: &[(&str, u32)], listed: &[(&str, u32)]) -> Vec<Op> {
        let mut ops = Vec::new();
        for (process, (name, id)) in creates.iter().enumerate() {
            let index = ops.len() as u64;
            ops.push(op(index, process as u64, OpType::Invoke, create(name, None)));
            ops.push(op(index + 1, process as u64, OpType::Ok, create(name, Some(*id))));
        }
        let index = ops.len() as u64;
        ops.push(op(index, 99, OpType::Invoke, Call::ListNetworks { networks: None }));
        ops.push(op(index + 1, 99, OpType::Ok, listing(listed)));
        ops
    }

    #[test]
    fn distinct_vlans_are_valid() {
        let creates = [("a", 1), ("b", 2), ("c", 3)];
        let verdict = check(&history(&creates, &creates));
        assert_eq!(verdict.validity, Validity::Valid, "{}", verdict.line());
    }

    #[test]
    fn shared_vlan_is_duplicate() {
        let creates = [("a", 1), ("b", 1)];
        let verdict = check(&history(&creates, &creates));
        assert_eq!(verdict.validity, Validity::Invalid);
        assert!(verdict.summary.contains(DUPLICATE_VLAN), "{}", verdict.summary);
    }

    #[test]
    fn missing_network_is_lost() {
        let verdict = check(&history(&[("a", 1), ("b", 2)], &[("a", 1)]));
        assert_eq!(verdict.validity, Validity::Invalid);
        assert!(verdict.summary.contains(LOST_NETWORK), "{}", verdict.summary);
    }

    #[test]
    fn listing_with_shared_vlan_is_duplicate() {
        let verdict = check(&history(&[("a", 1)], &[("a", 1), ("z", 1)]));
        assert_eq!(verdict.validity, Validity::Invalid);
        assert!(verdict.summary.contains(DUPLICATE_VLAN), "{}", verdict.summary);
    }

    #[test]
    fn no_listing_is_unknown() {
        let ops = vec![op(0, 1, OpType::Invoke, create("a", None)), op(1, 1, OpType::Ok, create("a", Some(1)))];
        assert_eq!(check(&ops).validity, Validity::Unknown);
    }
}
