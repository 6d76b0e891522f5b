//! Drift: what hosts report that the zone's state does not explain, and
//! what the state expects that hosts do not report.
//!
//! The leader compares each host's latest heartbeat (its libvirt domains,
//! the volumes of its ccs pools and its ccs networks) with the state. It
//! reads no agent directly, so a check costs no RPC; a report is as fresh as
//! the host's heartbeat period.
//!
//! NOTE: a report sent before a change can show a new volume or instance as
//! missing for up to one heartbeat period.

use std::collections::{BTreeMap, BTreeSet};

use super::error::ApiError;
use super::ops::Zone;
use crate::zone::model::{DesiredState, ObservedState, VolumeState};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DriftItem {
    pub host: String,
    /// "domain", "volume" or "network".
    pub kind: &'static str,
    pub name: String,
    /// "unknown" or "missing".
    pub problem: &'static str,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
pub struct DriftReport {
    pub items: Vec<DriftItem>,
    pub hosts_checked: u32,
    /// Hosts not compared: not up (suspect or fenced), or no heartbeat since
    /// this leader started.
    pub unreported: Vec<String>,
}

impl Zone {
    /// Compares every reporting host with the zone's state.
    pub fn drift(&self) -> Result<DriftReport, ApiError> {
        let node = &self.node;
        let hosts = node.hosts()?;
        let instances = node.instances()?;
        let moves = node.moves()?;
        let volumes = node.volumes()?;
        let networks: BTreeMap<String, _> = node.networks()?.into_iter().map(|n| (n.name.clone(), n)).collect();
        let stale: BTreeSet<(String, String)> = node
            .stale_copies()?
            .into_iter()
            .map(|c| (c.host, c.instance_id))
            .collect();

        let mut report = DriftReport::default();
        for host in &hosts {
            // A suspect or fenced host's last report is stale, so it is not compared.
            let seen = self.liveness.get(&host.id).and_then(|l| l.report.clone());
            let Some(seen) = seen.filter(|_| host.health.takes_orders()) else {
                report.unreported.push(host.id.clone());
                continue;
            };
            report.hosts_checked += 1;
            let mut item = |kind, name: &str, problem, detail: String| {
                report.items.push(DriftItem {
                    host: host.id.clone(),
                    kind,
                    name: name.to_string(),
                    problem,
                    detail,
                });
            };

            // Domains: every one must be an instance of this host, the
            // destination of its migration, or a stale copy awaiting eviction.
            let mut expected_networks = BTreeSet::new();
            let mut explained = BTreeSet::new();
            for instance in &instances {
                let migrating_here = moves.get(&instance.id).is_some_and(|m| m.to == host.id);
                if instance.host == host.id || migrating_here {
                    explained.insert(instance.id.clone());
                }
                if instance.host != host.id {
                    continue;
                }
                if seen.domains.get(&instance.id).is_some_and(|state| state == "running") {
                    for nic in node.devices(&instance.id)?.nics {
                        expected_networks.insert(nic.network);
                    }
                }
                let expected_running = instance.desired == DesiredState::Running
                    && instance.observed == ObservedState::Running
                    && instance.open_order.is_none()
                    && !moves.contains_key(&instance.id);
                if expected_running && !seen.domains.contains_key(&instance.id) {
                    item(
                        "domain",
                        &instance.id,
                        "missing",
                        format!("instance {:?} should run here; the reconciler will start it again", instance.name),
                    );
                }
            }
            for uuid in seen.domains.keys() {
                if explained.contains(uuid) || stale.contains(&(host.id.clone(), uuid.clone())) {
                    continue;
                }
                item(
                    "domain",
                    uuid,
                    "unknown",
                    "libvirt has this domain but the zone has no instance for it here; it was created \
                     outside ccs or outlived its instance"
                        .to_string(),
                );
            }

            // Volumes of this host's pools.
            let reported: BTreeSet<&String> = seen.volumes.iter().collect();
            let mut known = BTreeSet::new();
            for volume in volumes.iter().filter(|v| v.host == host.id) {
                known.insert(volume.id.clone());
                if volume.state == VolumeState::Available && !reported.contains(&volume.id) {
                    item(
                        "volume",
                        &volume.id,
                        "missing",
                        format!(
                            "volume {:?} exists in the zone but is absent from this host's pool; the leader creates it again",
                            volume.name
                        ),
                    );
                }
            }
            for name in &seen.volumes {
                if !known.contains(name) {
                    item(
                        "volume",
                        name,
                        "unknown",
                        "the host's ccs pool holds a volume the zone does not know".to_string(),
                    );
                }
            }

            // Networks: a host carries the networks of its instances' NICs.
            for name in &seen.networks {
                if !networks.contains_key(name) {
                    item(
                        "network",
                        name,
                        "unknown",
                        "the host defines a ccs network the zone does not know".to_string(),
                    );
                }
            }
            for name in expected_networks {
                if !seen.networks.contains(&name) {
                    item(
                        "network",
                        &name,
                        "missing",
                        "running domains here have NICs on this network but the host does not define it".to_string(),
                    );
                }
            }
        }
        report.items.sort();
        Ok(report)
    }
}
