//! The leader's reconciler: it drives the hosts toward the zone's state
//! through their agents: instances' domains and devices, migrations,
//! volumes in pools, and stale copies left on fenced hosts.
//!
//! For each subject that needs work it journals an order (a Raft write),
//! sends it to the host's agent stamped with this leader's id, and records
//! the outcome (another Raft write). A deposed leader cannot journal, so it
//! cannot send; an agent that has seen a newer leader rejects the order
//! anyway. Orders left open by an earlier leader are superseded by a fresh
//! order from this one, which resumes them; every order is idempotent.
//!
//! It also handles hosts. It marks them suspect when their heartbeats stop
//! and fences them through the configured driver after `fencing.after`.
//! Once a fence is committed, it restarts the host's SAN instances
//! elsewhere. It releases deleted networks once no host carries them, and
//! publishes drift counts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;
use tonic::transport::Channel;

use super::fencing::{self, FenceDriver};
use super::ops::Zone;
use crate::proto::agent::agent_client::AgentClient;
use crate::proto::agent::{self, Order};
use crate::zone::command::{Command, CommandResult};
use crate::zone::model::{
    DesiredState, Host, HostHealth, Instance, InstanceDevices, JournalEntry, LeaderStamp, Network,
    NetworkState, ObservedState, OrderAction, OrderOutcome, StorageModel, Volume, VolumeState,
};

/// Orders in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// Wait before a failed order is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long an agent has to execute one order.
const ORDER_TIMEOUT: Duration = Duration::from_secs(15);
/// Scan period when nothing is applied in between.
const SCAN_PERIOD: Duration = Duration::from_millis(500);
/// Shortest wait between two creates of a volume missing from its pool.
const RECREATE_DELAY: Duration = Duration::from_secs(10);
/// Period of the drift check that feeds the `ccs_drift_items` metric.
const DRIFT_PERIOD: Duration = Duration::from_secs(10);

pub struct Reconciler {
    zone: Arc<Zone>,
    stamp: LeaderStamp,
    /// Keys of the jobs in flight: an instance id, "volume:<id>" or
    /// "evict:<host>:<instance>".
    in_flight: Arc<DashSet<String>>,
    permits: Arc<Semaphore>,
    /// When each job's last failed order may be retried.
    retry_after: Arc<DashMap<String, Instant>>,
    agents: HashMap<String, AgentClient<Channel>>,
    /// Since when this leader has seen each host suspect.
    suspect_since: HashMap<String, Instant>,
    /// Since when this leader has seen each network deleting.
    deleting_since: HashMap<String, Instant>,
    fence_driver: Option<Arc<dyn FenceDriver>>,
    /// Hosts whose fence is in progress.
    fencing: Arc<DashSet<String>>,
    last_drift_check: Instant,
    /// Volumes this leader has seen, so a new one is not taken for missing
    /// before the next heartbeats of its pool's host.
    volumes_seen: std::collections::HashSet<String>,
}

/// Returns the action an instance's domain needs, if any, ignoring open orders.
fn needed_action(instance: &Instance, migrating: bool, devices_behind: bool) -> Option<OrderAction> {
    // A migration finishes first, even for a deleted instance: the domain
    // may already be on the destination, where the destroy must then go.
    if migrating {
        return Some(OrderAction::Migrate);
    }
    match instance.desired {
        DesiredState::Deleted => Some(OrderAction::Destroy),
        DesiredState::Running
            if instance.observed == ObservedState::Running
                && instance.open_order.is_none()
                && !devices_behind =>
        {
            None
        }
        DesiredState::Running => Some(OrderAction::Start),
    }
}

/// The reconciler's work for one subject.
enum Work {
    /// Journal a new order with this command, superseding any order an
    /// older leader left open.
    Open(Command),
    /// Send again an order this leader journaled but did not close, for
    /// example because recording its outcome timed out.
    Resend(JournalEntry),
}

/// One order to journal (or resend), send and close.
struct Job {
    key: String,
    work: Work,
    /// The order to send, without its id and leader id.
    order: Order,
    client: AgentClient<Channel>,
}

impl Reconciler {
    pub fn new(zone: Arc<Zone>, stamp: LeaderStamp) -> Reconciler {
        let fence_driver = fencing::driver(&zone.node.config.fencing);
        Reconciler {
            zone,
            stamp,
            in_flight: Arc::new(DashSet::new()),
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            retry_after: Arc::new(DashMap::new()),
            agents: HashMap::new(),
            suspect_since: HashMap::new(),
            deleting_since: HashMap::new(),
            fence_driver,
            fencing: Arc::new(DashSet::new()),
            last_drift_check: Instant::now(),
            volumes_seen: Default::default(),
        }
    }

    /// Runs until the task is aborted when this replica stops leading.
    pub async fn run(mut self, mut applied: tokio::sync::watch::Receiver<u64>) {
        tracing::info!(term = self.stamp.term, "reconciler started");
        let started = Instant::now();
        loop {
            if let Err(e) = self.scan().await {
                tracing::warn!(error = %e, "reconciler scan failed");
            }
            self.check_liveness(started).await;
            if let Err(e) = self.handle_failed_hosts().await {
                tracing::warn!(error = %e, "handling failed hosts failed");
            }
            if let Err(e) = self.release_networks().await {
                tracing::warn!(error = %e, "releasing deleted networks failed");
            }
            if self.last_drift_check.elapsed() >= DRIFT_PERIOD {
                self.last_drift_check = Instant::now();
                self.export_drift();
            }
            let _ = tokio::time::timeout(SCAN_PERIOD, applied.changed()).await;
        }
    }

    /// Whether a job may start now: not in flight, not waiting for a retry.
    fn ready(&self, key: &str) -> bool {
        !self.in_flight.contains(key)
            && !self.retry_after.get(key).is_some_and(|t| Instant::now() < *t.value())
    }

    /// Decides between resending this leader's open order, leaving a newer
    /// leader's alone, and opening a new one.
    fn work_for(&self, open: Option<JournalEntry>, new: impl FnOnce() -> Option<Command>) -> Option<Work> {
        match open {
            Some(entry) if entry.outcome.is_none() && entry.leader == self.stamp => Some(Work::Resend(entry)),
            // A newer leader exists; this replica is about to step down.
            Some(entry) if entry.outcome.is_none() && entry.leader > self.stamp => None,
            _ => new().map(Work::Open),
        }
    }

    async fn scan(&mut self) -> Result<(), super::error::ApiError> {
        let node = self.zone.node.clone();
        let hosts: HashMap<String, Host> = node.hosts()?.into_iter().map(|h| (h.id.clone(), h)).collect();
        let moves = node.moves()?;
        let networks: HashMap<String, Network> = node.networks()?.into_iter().map(|n| (n.name.clone(), n)).collect();
        let volumes: HashMap<String, Volume> = node.volumes()?.into_iter().map(|v| (v.id.clone(), v)).collect();
        let zone_name = node.zone.clone();

        for instance in node.instances()? {
            if !self.ready(&instance.id) {
                continue;
            }
            let open = match instance.open_order {
                Some(order) => node.order(order)?,
                None => None,
            };
            let migration = moves.get(&instance.id);
            let stored_devices = node.devices(&instance.id)?;
            let devices_behind = stored_devices.applied_generation < instance.generation
                && stored_devices != InstanceDevices::default();
            let stamp = self.stamp;
            let Some(work) = self.work_for(open, || {
                needed_action(&instance, migration.is_some(), devices_behind).map(|action| Command::OpenOrder {
                    instance_id: instance.id.clone(),
                    action,
                    generation: instance.generation,
                    leader: stamp,
                })
            }) else {
                continue;
            };
            let action = match &work {
                Work::Resend(entry) => entry.action,
                Work::Open(Command::OpenOrder { action, .. }) => *action,
                Work::Open(_) => continue,
            };
            // A migration is executed by its source host, everything else by
            // the instance's host.
            let target = match (action, migration) {
                (OrderAction::Migrate, Some(m)) => &m.from,
                (OrderAction::Migrate, None) => continue,
                _ => &instance.host,
            };
            let Some(host) = hosts.get(target).filter(|h| h.health.takes_orders()) else {
                continue;
            };
            let mut order = instance_order(&zone_name, &instance, &stored_devices, &networks, &volumes);
            order.action = proto_action(action) as i32;
            if action == OrderAction::Migrate {
                let Some(to) = migration.and_then(|m| hosts.get(&m.to)) else {
                    continue;
                };
                order.destination = Some(agent::Destination {
                    host_id: to.id.clone(),
                    agent_endpoint: to.agent_endpoint.clone(),
                    libvirt_uri: to.libvirt_uri.clone(),
                });
            }
            let Some(client) = self.agent(&host.agent_endpoint) else {
                continue;
            };
            self.spawn_job(Job {
                key: instance.id.clone(),
                work,
                order,
                client,
            });
        }

        self.volumes_seen.retain(|id| volumes.contains_key(id));
        for volume in volumes.values() {
            let key = format!("volume:{}", volume.id);
            if !self.ready(&key) {
                continue;
            }
            let open = match volume.open_order {
                Some(order) => node.order(order)?,
                None => None,
            };
            // A pool that lost a volume (a host whose storage was rebuilt, or
            // an agent restart under the test driver) gets it created again.
            // The create is idempotent and is tried at most every RECREATE_DELAY.
            let recreate_key = format!("recreate:{}", volume.id);
            if volume.state == VolumeState::Creating || self.volumes_seen.insert(volume.id.clone()) {
                // Heartbeats sent before the create may lack the volume.
                self.retry_after.insert(recreate_key.clone(), Instant::now() + RECREATE_DELAY);
            }
            let missing = self.ready(&recreate_key)
                && self
                    .zone
                    .liveness
                    .get(&volume.host)
                    .and_then(|l| l.report.clone())
                    .is_some_and(|report| !report.volumes.contains(&volume.id));
            let stamp = self.stamp;
            let Some(work) = self.work_for(open, || {
                let action = match volume.state {
                    VolumeState::Creating => OrderAction::CreateVolume,
                    VolumeState::Deleting => OrderAction::DeleteVolume,
                    VolumeState::Available | VolumeState::Detaching if missing => OrderAction::CreateVolume,
                    VolumeState::Available | VolumeState::Detaching => return None,
                };
                Some(Command::OpenVolumeOrder {
                    volume_id: volume.id.clone(),
                    action,
                    leader: stamp,
                })
            }) else {
                continue;
            };
            let action = match &work {
                Work::Resend(entry) => entry.action,
                Work::Open(Command::OpenVolumeOrder { action, .. }) => *action,
                Work::Open(_) => continue,
            };
            let Some(host) = hosts.get(&volume.host).filter(|h| h.health.takes_orders()) else {
                continue;
            };
            let Some(client) = self.agent(&host.agent_endpoint) else {
                continue;
            };
            if missing && matches!(volume.state, VolumeState::Available | VolumeState::Detaching) {
                tracing::warn!(volume = %volume.name, host_id = %volume.host, "volume is missing from its pool; creating it again");
                self.retry_after.insert(recreate_key, Instant::now() + RECREATE_DELAY);
            }
            let order = Order {
                action: proto_action(action) as i32,
                instance_id: volume.id.clone(),
                zone: zone_name.clone(),
                volume: Some(agent::VolumeSpec {
                    volume_id: volume.id.clone(),
                    pool: volume.pool.as_str().to_string(),
                    size_gib: volume.size_gib,
                }),
                ..Default::default()
            };
            self.spawn_job(Job { key, work, order, client });
        }

        for copy in node.stale_copies()? {
            let key = format!("evict:{}:{}", copy.host, copy.instance_id);
            if !self.ready(&key) {
                continue;
            }
            let Some(host) = hosts.get(&copy.host).filter(|h| h.health.takes_orders()) else {
                continue;
            };
            let open = match copy.open_order {
                Some(order) => node.order(order)?,
                None => None,
            };
            let stamp = self.stamp;
            let Some(work) = self.work_for(open, || {
                Some(Command::OpenEvictOrder {
                    instance_id: copy.instance_id.clone(),
                    host: copy.host.clone(),
                    leader: stamp,
                })
            }) else {
                continue;
            };
            let Some(client) = self.agent(&host.agent_endpoint) else {
                continue;
            };
            let order = Order {
                action: agent::OrderAction::Destroy as i32,
                instance_id: copy.instance_id.clone(),
                zone: zone_name.clone(),
                ..Default::default()
            };
            self.spawn_job(Job { key, work, order, client });
        }
        Ok(())
    }

    /// Returns a client for an agent, or `None` (logged) when its endpoint
    /// is not a valid address, so that one bad host does not stop the others.
    fn agent(&mut self, endpoint: &str) -> Option<AgentClient<Channel>> {
        if let Some(client) = self.agents.get(endpoint) {
            return Some(client.clone());
        }
        let channel = match crate::client::channel(endpoint, ORDER_TIMEOUT) {
            Ok(channel) => channel,
            Err(status) => {
                tracing::warn!(endpoint, message = status.message(), "skipping host with invalid agent endpoint");
                return None;
            }
        };
        let client = AgentClient::new(channel);
        self.agents.insert(endpoint.to_string(), client.clone());
        Some(client)
    }

    fn spawn_job(&mut self, job: Job) {
        self.in_flight.insert(job.key.clone());
        let zone = self.zone.clone();
        let stamp = self.stamp;
        let in_flight = self.in_flight.clone();
        let permits = self.permits.clone();
        let retry_after = self.retry_after.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore is never closed");
            let key = job.key.clone();
            match execute_order(&zone, stamp, job).await {
                Ok(true) => {
                    retry_after.remove(&key);
                }
                Ok(false) => {
                    retry_after.insert(key.clone(), Instant::now() + RETRY_DELAY);
                }
                Err(e) => {
                    tracing::warn!(job = %key, error = %e, "order did not complete");
                    retry_after.insert(key.clone(), Instant::now() + RETRY_DELAY);
                }
            }
            in_flight.remove(&key);
        }.in_current_span());
    }

    /// Marks hosts suspect whose heartbeats stopped. A host gets the full
    /// timeout from the moment this replica became leader.
    async fn check_liveness(&self, leader_since: Instant) {
        let timeout = self.zone.node.config.host_timeout;
        let Ok(hosts) = self.zone.node.hosts() else {
            return;
        };
        for host in hosts.into_iter().filter(|h| h.health.takes_orders()) {
            let last = self
                .zone
                .liveness
                .get(&host.id)
                .map_or(leader_since, |l| l.last_heartbeat.max(leader_since));
            if last.elapsed() < timeout {
                continue;
            }
            tracing::warn!(host_id = %host.id, silent_for = ?last.elapsed(), "host missed heartbeats; marking it suspect");
            let command = Command::SetHostHealth {
                host_id: host.id.clone(),
                up: false,
            };
            if let Err(e) = self.zone.node.propose(command).await {
                tracing::warn!(host_id = %host.id, error = %e, "marking host suspect failed");
            }
        }
    }

    /// Fences hosts suspect for longer than `fencing.after`, then restarts
    /// the SAN instances of fenced hosts on other hosts of their pods.
    /// Without a fencing driver nothing of a suspect host moves.
    async fn handle_failed_hosts(&mut self) -> Result<(), super::error::ApiError> {
        let node = self.zone.node.clone();
        let hosts = node.hosts()?;
        let suspect: Vec<&Host> = hosts.iter().filter(|h| h.health == HostHealth::Suspect).collect();
        self.suspect_since.retain(|id, _| suspect.iter().any(|h| &h.id == id));
        for host in suspect {
            let since = *self.suspect_since.entry(host.id.clone()).or_insert_with(Instant::now);
            let Some(driver) = self.fence_driver.clone() else {
                continue;
            };
            if since.elapsed() < node.config.fencing.after || !self.fencing.insert(host.id.clone()) {
                continue;
            }
            let zone = self.zone.clone();
            let stamp = self.stamp;
            let fencing = self.fencing.clone();
            let host = host.clone();
            tokio::spawn(
                async move {
                    fence(&zone, stamp, driver.as_ref(), &host).await;
                    fencing.remove(&host.id);
                }
                .in_current_span(),
            );
        }

        let fenced: HashMap<&str, &Host> = hosts
            .iter()
            .filter(|h| h.health == HostHealth::Fenced)
            .map(|h| (h.id.as_str(), h))
            .collect();
        if fenced.is_empty() {
            return Ok(());
        }
        for instance in node.instances()? {
            if !fenced.contains_key(instance.host.as_str())
                || instance.desired != DesiredState::Running
                || node.pod_profile(&instance.pod)?.storage != StorageModel::San
            {
                continue;
            }
            // A pod without room is tried again after a delay, not every scan.
            let key = format!("evacuate:{}", instance.id);
            if !self.ready(&key) {
                continue;
            }
            let to = match self.zone.destination_for(&instance) {
                Ok(to) => to,
                Err(e) => {
                    tracing::warn!(instance = %instance.name, error = %e, "no host can take the instance of a fenced host yet");
                    self.retry_after.insert(key, Instant::now() + RETRY_DELAY * 5);
                    continue;
                }
            };
            let command = Command::EvacuateInstance {
                instance_id: instance.id.clone(),
                to: to.clone(),
            };
            match node.propose(command).await? {
                CommandResult::Devices(..) => {
                    tracing::info!(instance = %instance.name, from = %instance.host, to = %to, "restarting instance of fenced host elsewhere");
                    metrics::counter!("ccs_evacuations_total").increment(1);
                }
                CommandResult::Rejected(rejection) => {
                    tracing::warn!(instance = %instance.name, %rejection, "evacuation rejected; retrying later");
                    self.retry_after.insert(key, Instant::now() + RETRY_DELAY);
                }
                other => tracing::warn!(?other, "unexpected evacuation result"),
            }
        }
        Ok(())
    }

    /// Removes deleting networks that no host reports any more, which frees
    /// their segmentation ids. Every host of the pod must have reported
    /// since this leader saw the network deleting. A host that is not
    /// taking orders keeps the id reserved until it reports again.
    async fn release_networks(&mut self) -> Result<(), super::error::ApiError> {
        let node = self.zone.node.clone();
        let deleting: Vec<Network> = node
            .networks()?
            .into_iter()
            .filter(|n| n.state == NetworkState::Deleting)
            .collect();
        self.deleting_since.retain(|name, _| deleting.iter().any(|n| &n.name == name));
        if deleting.is_empty() {
            return Ok(());
        }
        let hosts = node.hosts()?;
        for network in deleting {
            let since = *self.deleting_since.entry(network.name.clone()).or_insert_with(Instant::now);
            let gone_everywhere = hosts.iter().filter(|h| h.pod == network.pod).all(|host| {
                self.zone.liveness.get(&host.id).and_then(|l| l.report.clone()).is_some_and(|report| {
                    report.received > since && !report.networks.contains(&network.name)
                })
            });
            if !gone_everywhere {
                continue;
            }
            match node.propose(Command::ReleaseNetwork { name: network.name.clone() }).await? {
                CommandResult::Network(network) => {
                    tracing::info!(network = %network.name, segmentation_id = network.segmentation_id, "released deleted network");
                }
                CommandResult::Rejected(rejection) => {
                    tracing::debug!(network = %network.name, %rejection, "network not released yet");
                }
                other => tracing::warn!(?other, "unexpected release result"),
            }
        }
        Ok(())
    }

    /// Publishes the drift counts as metrics.
    fn export_drift(&self) {
        match self.zone.drift() {
            Ok(report) => {
                for kind in ["domain", "volume", "network"] {
                    for problem in ["unknown", "missing"] {
                        let count = report.items.iter().filter(|i| i.kind == kind && i.problem == problem).count();
                        metrics::gauge!("ccs_drift_items", "kind" => kind, "problem" => problem).set(count as f64);
                    }
                }
                if !report.items.is_empty() {
                    tracing::warn!(items = report.items.len(), "hosts drifted from the zone's state; see `ccs zone drift`");
                }
            }
            Err(e) => tracing::warn!(error = %e, "drift check failed"),
        }
    }
}

/// Powers a suspect host off through the driver and commits the fence.
async fn fence(zone: &Zone, stamp: LeaderStamp, driver: &dyn FenceDriver, host: &Host) {
    // The host may have sent a heartbeat while the fence waited its turn.
    match zone.node.host(&host.id) {
        Ok(Some(current)) if current.health == HostHealth::Suspect => {}
        _ => return,
    }
    tracing::warn!(host_id = %host.id, "fencing suspect host");
    let method = match driver.fence(host).await {
        Ok(method) => method,
        Err(e) => {
            tracing::error!(host_id = %host.id, error = %e, "fencing failed; the host's instances stay where they are");
            metrics::counter!("ccs_fences_total", "outcome" => "failed").increment(1);
            return;
        }
    };
    let command = Command::FenceHost {
        host_id: host.id.clone(),
        leader: stamp,
        method: method.clone(),
    };
    match zone.node.propose(command).await {
        Ok(CommandResult::Fence(record)) => {
            tracing::warn!(host_id = %host.id, index = record.index, %method, "host fenced");
            metrics::counter!("ccs_fences_total", "outcome" => "done").increment(1);
        }
        Ok(CommandResult::Rejected(rejection)) => {
            tracing::warn!(host_id = %host.id, %rejection, "fence not recorded");
        }
        Ok(other) => tracing::warn!(?other, "unexpected fence result"),
        Err(e) => tracing::warn!(host_id = %host.id, error = %e, "recording the fence failed"),
    }
}

fn proto_action(action: OrderAction) -> agent::OrderAction {
    match action {
        OrderAction::Start => agent::OrderAction::Start,
        OrderAction::Destroy | OrderAction::Evict => agent::OrderAction::Destroy,
        OrderAction::CreateVolume => agent::OrderAction::CreateVolume,
        OrderAction::DeleteVolume => agent::OrderAction::DeleteVolume,
        OrderAction::Migrate => agent::OrderAction::Migrate,
    }
}

/// Builds an instance's order with its devices; the caller sets the action.
fn instance_order(
    zone: &str,
    instance: &Instance,
    devices: &InstanceDevices,
    networks: &HashMap<String, Network>,
    volumes: &HashMap<String, Volume>,
) -> Order {
    Order {
        instance_id: instance.id.clone(),
        instance_name: instance.name.clone(),
        vcpus: instance.vcpus,
        memory_mib: instance.memory_mib,
        disk_gib: instance.disk_gib,
        zone: zone.to_string(),
        disks: devices
            .volumes
            .iter()
            .filter_map(|id| volumes.get(id))
            .map(|v| agent::Disk {
                volume_id: v.id.clone(),
                pool: v.pool.as_str().to_string(),
                size_gib: v.size_gib,
            })
            .collect(),
        nics: devices
            .nics
            .iter()
            .filter_map(|nic| {
                let network = networks.get(&nic.network)?;
                Some(agent::Nic {
                    network: nic.network.clone(),
                    mode: network.mode.as_str().to_string(),
                    segmentation_id: network.segmentation_id,
                    mac: nic.mac.clone(),
                    ip: nic.ip.clone(),
                    prefix_len: crate::zone::nics::prefix_len(&network.cidr),
                })
            })
            .collect(),
        ..Default::default()
    }
}

/// Journals an order (unless resending one), sends it and records its
/// outcome. Returns whether the agent executed it.
async fn execute_order(zone: &Zone, stamp: LeaderStamp, job: Job) -> Result<bool, super::error::ApiError> {
    let Job { key, work, mut order, mut client } = job;
    let entry = match work {
        Work::Resend(entry) => entry,
        Work::Open(command) => match zone.node.propose(command).await? {
            CommandResult::Order(entry) => entry,
            CommandResult::Rejected(rejection) => {
                tracing::debug!(job = %key, %rejection, "order not opened");
                return Ok(false);
            }
            other => {
                let message = format!("unexpected result {other:?}");
                return Err(super::error::ApiError::Internal(message));
            }
        },
    };
    let action = entry.action;
    order.order_id = entry.id;
    order.leader = Some(agent::LeaderId {
        term: stamp.term,
        node_id: stamp.node_id,
    });
    order.action = proto_action(action) as i32;
    tracing::debug!(order_id = entry.id, subject = %entry.subject, host_id = %entry.host_id, action = action.as_str(), "sending order");
    let outcome = match client.execute(order).await {
        Ok(reply) => {
            let reply = reply.into_inner();
            if !reply.note.is_empty() {
                tracing::info!(order_id = entry.id, subject = %entry.subject, host_id = %entry.host_id, note = %reply.note, "agent note");
            }
            OrderOutcome::Done {
                domain_state: reply.domain_state,
            }
        }
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            tracing::warn!(order_id = entry.id, host_id = %entry.host_id, message = status.message(), "agent fenced order");
            OrderOutcome::Fenced
        }
        Err(status) => OrderOutcome::Failed {
            error: format!("{}: {}", entry.host_id, status.message()),
        },
    };
    let label = match &outcome {
        OrderOutcome::Done { .. } => "done",
        OrderOutcome::Failed { .. } => "failed",
        OrderOutcome::Fenced => "fenced",
        OrderOutcome::Superseded => "superseded",
    };
    metrics::counter!("ccs_orders_total", "action" => action.as_str(), "outcome" => label).increment(1);
    let done = matches!(outcome, OrderOutcome::Done { .. });
    zone.node
        .propose(Command::CloseOrder {
            order_id: entry.id,
            outcome,
        })
        .await?;
    Ok(done)
}
