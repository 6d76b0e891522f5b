//! The zone status report: replicas, leader, term, and each replica's
//! position in the log, read from openraft's metrics.

use crate::proto::zone::{Replica, ZoneStatusReply};

use super::node::Node;

/// Computes the commit index from the leader's replication state: the highest log index
/// that a majority of voters have. Returns 0 when this replica is not the leader.
fn leader_commit_index(node: &Node) -> u64 {
    let metrics = node.raft.metrics().borrow().clone();
    let Some(replication) = &metrics.replication else {
        return 0;
    };
    let membership = metrics.membership_config.membership().clone();
    let mut matched: Vec<u64> = membership
        .voter_ids()
        .map(|id| {
            if id == node.id {
                metrics.last_log_index.unwrap_or(0)
            } else {
                replication.get(&id).and_then(|m| m.as_ref()).map_or(0, |l| l.index)
            }
        })
        .collect();
    if matched.is_empty() {
        return 0;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2]
}

/// Returns the leader's commit index if this replica leads, else the highest
/// index this replica has applied, which is a lower bound of the leader's.
pub fn known_commit_index(node: &Node) -> u64 {
    if node.is_leader() {
        leader_commit_index(node)
    } else {
        node.applied_index()
    }
}

pub fn zone_status(node: &Node) -> ZoneStatusReply {
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let commit_index = if node.is_leader() { leader_commit_index(node) } else { 0 };
    let last_log = metrics.last_log_index.unwrap_or(0);
    let replicas = membership
        .nodes()
        .map(|(id, basic)| {
            let matched_index = if *id == node.id {
                Some(last_log)
            } else {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned())
                    .map(|m| m.map_or(0, |l| l.index))
            };
            Replica {
                node_id: *id,
                addr: basic.addr.clone(),
                role: if voters.contains(id) { "voter" } else { "learner" }.to_string(),
                matched_index,
                lag: matched_index.map_or(0, |m| last_log.saturating_sub(m)),
            }
        })
        .collect();
    let (leader_id, leader_addr) = node.leader().unwrap_or((0, String::new()));
    let membership_log = metrics.membership_config.log_id().as_ref().map(|l| l.index);
    let applied = metrics.last_applied.map(|l| l.index);
    let joint = membership.get_joint_config().len() > 1;
    let membership_committed = !joint && membership_log.is_some() && membership_log <= applied;
    ZoneStatusReply {
        zone: node.zone.clone(),
        leader_id,
        leader_addr,
        term: metrics.current_term,
        commit_index,
        applied_index: metrics.last_applied.map_or(0, |l| l.index),
        last_log_index: last_log,
        replicas,
        snapshot_index: metrics.snapshot.map_or(0, |l| l.index),
        purged_index: metrics.purged.map_or(0, |l| l.index),
        membership_index: membership_log.unwrap_or(0),
        membership_committed,
    }
}
