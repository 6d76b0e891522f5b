//! The leader's reconciler: it drives every instance's domain toward the
//! instance's desired state through the host agents.
//!
//! For each instance that needs work it journals an order (a Raft write),
//! sends it to the host's agent stamped with this leader's id, and records
//! the outcome (another Raft write). A deposed leader cannot journal, so it
//! cannot send; an agent that has seen a newer leader rejects the order
//! anyway. Orders left open by an earlier leader are superseded by a fresh
//! order from this one, which resumes them; every order is idempotent.
//! The reconciler also marks hosts suspect when their heartbeats stop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::{DashMap, DashSet};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;
use tonic::transport::Channel;

use super::ops::Zone;
use crate::proto::agent::agent_client::AgentClient;
use crate::proto::agent::{self, Order};
use crate::zone::command::{Command, CommandResult};
use crate::zone::model::{
    DesiredState, HostHealth, Instance, JournalEntry, LeaderStamp, ObservedState, OrderAction,
    OrderOutcome,
};

/// Orders in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// Wait before a failed order is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long an agent has to execute one order.
const ORDER_TIMEOUT: Duration = Duration::from_secs(15);
/// Scan period when nothing is applied in between.
const SCAN_PERIOD: Duration = Duration::from_millis(500);

pub struct Reconciler {
    zone: Arc<Zone>,
    stamp: LeaderStamp,
    in_flight: Arc<DashSet<String>>,
    permits: Arc<Semaphore>,
    /// When each instance's last failed order may be retried.
    retry_after: Arc<DashMap<String, Instant>>,
    agents: HashMap<String, AgentClient<Channel>>,
}

/// Returns the action an instance's domain needs, if any, ignoring open orders.
fn needed_action(instance: &Instance) -> Option<OrderAction> {
    match instance.desired {
        DesiredState::Deleted => Some(OrderAction::Destroy),
        DesiredState::Running
            if instance.observed == ObservedState::Running && instance.open_order.is_none() =>
        {
            None
        }
        DesiredState::Running => Some(OrderAction::Start),
    }
}

/// What the reconciler does for one instance.
enum Work {
    /// Journal a new order, superseding any order an older leader left open.
    Open(OrderAction),
    /// Send again an order this leader journaled but did not close, for
    /// example because recording its outcome timed out.
    Resend(JournalEntry),
}

impl Reconciler {
    pub fn new(zone: Arc<Zone>, stamp: LeaderStamp) -> Reconciler {
        Reconciler {
            zone,
            stamp,
            in_flight: Arc::new(DashSet::new()),
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            retry_after: Arc::new(DashMap::new()),
            agents: HashMap::new(),
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
            let _ = tokio::time::timeout(SCAN_PERIOD, applied.changed()).await;
        }
    }

    async fn scan(&mut self) -> Result<(), super::error::ApiError> {
        let node = self.zone.node.clone();
        let hosts: HashMap<String, crate::zone::model::Host> =
            node.hosts()?.into_iter().map(|h| (h.id.clone(), h)).collect();
        for instance in node.instances()? {
            if self.in_flight.contains(&instance.id) {
                continue;
            }
            if self.retry_after.get(&instance.id).is_some_and(|t| Instant::now() < *t.value()) {
                continue;
            }
            let open = match instance.open_order {
                Some(order) => node.order(order)?,
                None => None,
            };
            let work = match open {
                Some(entry) if entry.leader == self.stamp => Work::Resend(entry),
                // A newer leader exists; this replica is about to step down.
                Some(entry) if entry.leader > self.stamp => continue,
                _ => match needed_action(&instance) {
                    Some(action) => Work::Open(action),
                    None => continue,
                },
            };
            let Some(host) = hosts.get(&instance.host) else {
                continue;
            };
            if host.health != HostHealth::Up {
                continue;
            }
            let Some(client) = self.agent(&host.agent_endpoint) else {
                continue;
            };
            self.spawn_order(instance, work, client);
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

    fn spawn_order(&mut self, instance: Instance, work: Work, client: AgentClient<Channel>) {
        self.in_flight.insert(instance.id.clone());
        let zone = self.zone.clone();
        let stamp = self.stamp;
        let in_flight = self.in_flight.clone();
        let permits = self.permits.clone();
        let retry_after = self.retry_after.clone();
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore is never closed");
            let id = instance.id.clone();
            match execute_order(&zone, stamp, &instance, work, client).await {
                Ok(true) => {
                    retry_after.remove(&id);
                }
                Ok(false) => {
                    retry_after.insert(id.clone(), Instant::now() + RETRY_DELAY);
                }
                Err(e) => {
                    tracing::warn!(instance_id = %id, error = %e, "order did not complete");
                    retry_after.insert(id.clone(), Instant::now() + RETRY_DELAY);
                }
            }
            in_flight.remove(&id);
        }.in_current_span());
    }

    /// Marks hosts suspect whose heartbeats stopped. A host gets the full
    /// timeout from the moment this replica became leader.
    async fn check_liveness(&self, leader_since: Instant) {
        let timeout = self.zone.node.config.host_timeout;
        let Ok(hosts) = self.zone.node.hosts() else {
            return;
        };
        for host in hosts.into_iter().filter(|h| h.health == HostHealth::Up) {
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
}

/// Journals an order (unless resending one), sends it and records its
/// outcome. Returns whether the agent executed it.
async fn execute_order(
    zone: &Zone,
    stamp: LeaderStamp,
    instance: &Instance,
    work: Work,
    mut client: AgentClient<Channel>,
) -> Result<bool, super::error::ApiError> {
    let entry = match work {
        Work::Resend(entry) => entry,
        Work::Open(action) => {
            let open = Command::OpenOrder {
                instance_id: instance.id.clone(),
                action,
                generation: instance.generation,
                leader: stamp,
            };
            match zone.node.propose(open).await? {
                CommandResult::Order(entry) => entry,
                CommandResult::Rejected(rejection) => {
                    tracing::debug!(instance_id = %instance.id, %rejection, "order not opened");
                    return Ok(false);
                }
                other => {
                    let message = format!("unexpected result {other:?}");
                    return Err(super::error::ApiError::Internal(message));
                }
            }
        }
    };
    let action = entry.action;
    let order = Order {
        order_id: entry.id,
        leader: Some(agent::LeaderId {
            term: stamp.term,
            node_id: stamp.node_id,
        }),
        action: match action {
            OrderAction::Start => agent::OrderAction::Start as i32,
            OrderAction::Destroy => agent::OrderAction::Destroy as i32,
        },
        instance_id: instance.id.clone(),
        instance_name: instance.name.clone(),
        vcpus: instance.vcpus,
        memory_mib: instance.memory_mib,
        disk_gib: instance.disk_gib,
        zone: zone.node.zone.clone(),
    };
    tracing::debug!(order_id = entry.id, instance_id = %instance.id, host_id = %entry.host_id, action = action.as_str(), "sending order");
    let outcome = match client.execute(order).await {
        Ok(reply) => OrderOutcome::Done {
            domain_state: reply.into_inner().domain_state,
        },
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
