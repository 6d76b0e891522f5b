//! Nemeses: the faults a verification run injects while its clients work,
//! drawn from a seeded random schedule, and their record in the history.
//!
//! The main schedule keeps one fault at a time: it waits about `interval`,
//! draws a kind, puts the fault in place, waits `fault_duration` and heals
//! it. Membership changes run on a second schedule and may overlap a main
//! fault; the two never pick the same node at once. When the stop signal
//! comes, the active fault is healed and then `Cluster::heal_all` undoes
//! whatever is left.
//!
//! Each fault appears in the history as two nemesis operations: `start`
//! (an `invoke` when it begins, an `info` once it is in place) and `stop`
//! (an `invoke` when healing begins, an `info` once healed). An `info` that
//! carries an error means the step failed partway. Stop repeats the start's
//! detail, except for order replay, whose stop detail adds the agent's reply.
//!
//! The file is past 800 lines because target selection, the two schedules
//! and their multi-process tests are read together.
//!
//! The schedule depends on the seed and also on timing (who leads, which
//! ledger entries exist), so one seed gives similar runs, not identical ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use ccs::agent::ledger::{self, LedgerEntry};
use ccs::client::ZoneConnector;
use ccs::proto::agent::agent_client::AgentClient;
use ccs::proto::agent::{LeaderId, Order, OrderAction};
use ccs::proto::zone::ReadRequest;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::cluster::{self, Cluster, ClusterSpec, NodeInfo, Role, ZONE};
use crate::history::{Call, FaultAction, OpType, Process};
use crate::netns::Cut;
use crate::recorder::Recorder;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NemesisKind {
    /// Cut one random node, controller or agent, from all others.
    PartitionOne,
    /// Cut the current leader from all other nodes.
    PartitionLeader,
    /// Split the member controllers into two halves.
    PartitionHalves,
    /// Majorities ring: every controller reaches a majority, and no two reach the same one.
    PartitionRing,
    /// Two halves of the controllers, and one controller that reaches both.
    PartitionBridge,
    /// Drop the leader's traffic to the other controllers, or theirs to it,
    /// in one direction only. No TCP call completes either way, because
    /// replies and acknowledgements are lost, but open connections still
    /// deliver requests (votes, appends) in the other direction.
    PartitionOneWay,
    /// SIGKILL 1 or 2 controllers, or an agent, and restart them later.
    Kill,
    /// SIGSTOP 1 or 2 controllers, or an agent, and SIGCONT them later.
    Pause,
    /// Move the clocks of 1 or 2 controllers by up to 5 minutes.
    ClockJump,
    /// Run the clocks of 1 or 2 controllers between 4 times slower and 4 times faster.
    ClockRate,
    /// Add, remove or replace a controller.
    Membership,
    /// Cut power to a majority of the controllers: SIGKILL and drop their
    /// unsynced writes, then restart them.
    PowerLoss,
    /// Deliver an old order late: send an agent an order that an earlier
    /// leader gave it, after a newer leader has given it orders.
    OrderReplay,
}

impl NemesisKind {
    pub const ALL: [NemesisKind; 13] = [
        NemesisKind::PartitionOne,
        NemesisKind::PartitionLeader,
        NemesisKind::PartitionHalves,
        NemesisKind::PartitionRing,
        NemesisKind::PartitionBridge,
        NemesisKind::PartitionOneWay,
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::ClockJump,
        NemesisKind::ClockRate,
        NemesisKind::Membership,
        NemesisKind::PowerLoss,
        NemesisKind::OrderReplay,
    ];

    /// Returns the name used in flags, history entries and counts, e.g. "partition-leader".
    pub fn name(self) -> &'static str {
        match self {
            NemesisKind::PartitionOne => "partition-one",
            NemesisKind::PartitionLeader => "partition-leader",
            NemesisKind::PartitionHalves => "partition-halves",
            NemesisKind::PartitionRing => "partition-ring",
            NemesisKind::PartitionBridge => "partition-bridge",
            NemesisKind::PartitionOneWay => "partition-one-way",
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::ClockJump => "clock-jump",
            NemesisKind::ClockRate => "clock-rate",
            NemesisKind::Membership => "membership",
            NemesisKind::PowerLoss => "power-loss",
            NemesisKind::OrderReplay => "order-replay",
        }
    }

    /// Returns why a cluster built from `spec` cannot have this fault, if it cannot.
    pub fn unsupported_reason(self, spec: &ClusterSpec) -> Option<String> {
        match self {
            NemesisKind::ClockJump | NemesisKind::ClockRate if spec.faketime.is_none() => {
                Some("clock faults need libfaketime (ClusterSpec::faketime)".to_string())
            }
            NemesisKind::PowerLoss if spec.lossy_fs.is_none() => {
                Some("power loss needs the lossy filesystem (ClusterSpec::lossy_fs)".to_string())
            }
            NemesisKind::Membership if spec.spare_controllers == 0 => {
                Some("membership changes need at least one spare controller".to_string())
            }
            _ => None,
        }
    }
}

/// Parses a comma-separated list of nemesis names and groups:
/// "partition" (all six partition kinds), "clock" (jump and rate), "kill",
/// "pause", "membership", "power-loss", "order-replay", any single kind
/// name, "all", or "none".
pub fn parse_kinds(text: &str) -> anyhow::Result<Vec<NemesisKind>> {
    let mut kinds = BTreeSet::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let group: Vec<NemesisKind> = match word {
            "all" => NemesisKind::ALL.to_vec(),
            "none" => Vec::new(),
            "partition" => NemesisKind::ALL[..6].to_vec(),
            "clock" => vec![NemesisKind::ClockJump, NemesisKind::ClockRate],
            name => match NemesisKind::ALL.iter().find(|k| k.name() == name) {
                Some(kind) => vec![*kind],
                None => {
                    let names: Vec<&str> = NemesisKind::ALL.iter().map(|k| k.name()).collect();
                    bail!(
                        "unknown nemesis {word:?}; use all, none, partition, clock or one of: {}",
                        names.join(", ")
                    );
                }
            },
        };
        kinds.extend(group);
    }
    Ok(kinds.into_iter().collect())
}

/// Kinds, timing and seed of a nemesis run.
#[derive(Clone, Debug)]
pub struct NemesisPlan {
    pub kinds: Vec<NemesisKind>,
    /// Mean pause between faults, on the main schedule and on the
    /// membership schedule alike; each pause is drawn from 0.5 to 1.5 times it.
    pub interval: Duration,
    /// How long each main fault lasts before it is healed.
    pub fault_duration: Duration,
    pub seed: u64,
}

/// Faults per nemesis name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Faults put in place.
    pub injected: BTreeMap<String, u64>,
    /// Faults whose start or heal failed.
    pub failed: BTreeMap<String, u64>,
    /// Draws that found nothing to act on: no leader, no eligible node, no
    /// older order in any ledger.
    pub skipped: BTreeMap<String, u64>,
}

/// Choices of the clock faults.
const CLOCK_JUMPS_S: [f64; 7] = [-60.0, -10.0, -2.0, 2.0, 10.0, 60.0, 300.0];
const CLOCK_RATES: [f64; 4] = [0.25, 0.5, 2.0, 4.0];
/// Probability that a kill or pause hits an agent instead of controllers.
const AGENT_SHARE: f64 = 0.25;
/// Probability that a pause or clock fault includes the leader.
const LEADER_SHARE: f64 = 0.3;
/// Deadline of a replayed Execute call.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);
/// Mixed into the seed of the membership schedule.
const MEMBERSHIP_SEED: u64 = 0x6d65_6d62;

/// Runs `plan` against `cluster` until `stop` turns true (or its sender is
/// dropped), then heals everything and returns the fault counts. Fails at
/// once when the plan has a kind the cluster cannot do.
pub async fn run(
    cluster: Arc<Mutex<Cluster>>,
    plan: NemesisPlan,
    recorder: Arc<Recorder>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<FaultCounts> {
    if plan.interval.is_zero() || plan.fault_duration.is_zero() {
        bail!("nemesis interval and fault duration must be above zero");
    }
    {
        let cluster = cluster.lock().await;
        let reasons: Vec<String> = plan
            .kinds
            .iter()
            .filter_map(|k| {
                k.unsupported_reason(cluster.spec())
                    .map(|r| format!("{}: {r}", k.name()))
            })
            .collect();
        if !reasons.is_empty() {
            bail!("unsupported nemeses: {}", reasons.join("; "));
        }
    }
    let nemesis = Arc::new(Nemesis {
        cluster,
        recorder,
        plan: plan.clone(),
        busy: std::sync::Mutex::new(BTreeSet::new()),
        counts: std::sync::Mutex::new(FaultCounts::default()),
    });
    let membership = plan.kinds.contains(&NemesisKind::Membership).then(|| {
        let nemesis = nemesis.clone();
        let stop = stop.clone();
        tokio::spawn(async move { nemesis.membership_schedule(stop).await })
    });
    let main_kinds: Vec<NemesisKind> = plan
        .kinds
        .iter()
        .copied()
        .filter(|k| *k != NemesisKind::Membership)
        .collect();
    nemesis.main_schedule(&main_kinds, &mut stop).await;
    let membership = match membership {
        Some(task) => task.await,
        None => Ok(()),
    };
    nemesis.heal_everything().await;
    membership.map_err(|e| anyhow!("membership schedule failed: {e}"))?;
    let counts = nemesis.counts.lock().expect("counts lock").clone();
    Ok(counts)
}

/// Sleeps for `duration` unless the stop signal comes first, and returns
/// whether it came. A dropped sender counts as a stop.
async fn sleep_or_stop(duration: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if *stop.borrow() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return *stop.borrow(),
            changed = stop.changed() => if changed.is_err() { return true; },
        }
    }
}

fn jittered(interval: Duration, rng: &mut StdRng) -> Duration {
    interval.mul_f64(rng.gen_range(0.5..1.5))
}

/// A fault in place and how to undo it.
struct Active {
    kind: NemesisKind,
    detail: String,
    heal: Heal,
    /// Nodes marked busy until the fault is healed.
    targets: Vec<String>,
}

enum Heal {
    Network,
    Restart(Vec<String>),
    Resume(Vec<String>),
    ResetClock(Vec<String>),
    /// Nothing to undo; the stop entry gets this detail.
    Done(String),
}

/// The steps of a main fault, chosen before it starts.
enum Action {
    Partition(Cut),
    Kill(Vec<String>),
    Pause(Vec<String>),
    ClockJump(Vec<String>, f64),
    ClockRate(Vec<String>, f64),
    PowerOff(Vec<String>),
    Replay(Replay),
}

/// An old order to deliver again.
struct Replay {
    agent: String,
    endpoint: String,
    order: Order,
}

struct Nemesis {
    cluster: Arc<Mutex<Cluster>>,
    recorder: Arc<Recorder>,
    plan: NemesisPlan,
    /// Nodes that a main fault or a membership change is acting on; the
    /// other schedule leaves them alone.
    busy: std::sync::Mutex<BTreeSet<String>>,
    counts: std::sync::Mutex<FaultCounts>,
}

impl Nemesis {
    fn record(
        &self,
        kind: &str,
        action: FaultAction,
        op: OpType,
        detail: &str,
        error: Option<String>,
    ) {
        let call = Call::Fault {
            nemesis: kind.to_string(),
            action,
            detail: detail.to_string(),
        };
        self.recorder.record(Process::Nemesis, op, call, error);
    }

    fn count(&self, kind: &str, pick: fn(&mut FaultCounts) -> &mut BTreeMap<String, u64>) {
        let mut counts = self.counts.lock().expect("counts lock");
        *pick(&mut counts).entry(kind.to_string()).or_default() += 1;
    }

    fn busy(&self) -> BTreeSet<String> {
        self.busy.lock().expect("busy lock").clone()
    }

    fn set_busy(&self, nodes: &[String], busy: bool) {
        let mut set = self.busy.lock().expect("busy lock");
        for node in nodes {
            if busy {
                set.insert(node.clone());
            } else {
                set.remove(node);
            }
        }
    }

    async fn main_schedule(&self, kinds: &[NemesisKind], stop: &mut watch::Receiver<bool>) {
        let mut rng = StdRng::seed_from_u64(self.plan.seed);
        loop {
            if sleep_or_stop(jittered(self.plan.interval, &mut rng), stop).await {
                return;
            }
            let Some(kind) = kinds.choose(&mut rng).copied() else {
                continue;
            };
            let Some(active) = self.start(kind, &mut rng).await else {
                self.count(kind.name(), |c| &mut c.skipped);
                continue;
            };
            let stopped = sleep_or_stop(self.plan.fault_duration, stop).await;
            self.stop(active).await;
            if stopped {
                return;
            }
        }
    }

    /// Chooses targets, records the start and puts the fault in place.
    /// Returns `None` when there was nothing to act on.
    async fn start(&self, kind: NemesisKind, rng: &mut StdRng) -> Option<Active> {
        let (action, detail) = match self.choose(kind, rng).await {
            Ok(Some(chosen)) => chosen,
            Ok(None) => return None,
            Err(error) => {
                let error = format!("{error:#}");
                tracing::warn!(nemesis = kind.name(), %error, "choosing a fault failed");
                return None;
            }
        };
        let targets = action_targets(&action);
        self.set_busy(&targets, true);
        self.record(
            kind.name(),
            FaultAction::Start,
            OpType::Invoke,
            &detail,
            None,
        );
        let (heal, result) = self.apply(action).await;
        let error = result.err().map(|e| format!("{e:#}"));
        self.record(
            kind.name(),
            FaultAction::Start,
            OpType::Info,
            &detail,
            error.clone(),
        );
        match &error {
            None => {
                tracing::info!(nemesis = kind.name(), %detail, "fault started");
                self.count(kind.name(), |c| &mut c.injected);
            }
            Some(error) => {
                tracing::warn!(nemesis = kind.name(), %detail, %error, "fault start failed");
                self.count(kind.name(), |c| &mut c.failed);
            }
        }
        Some(Active {
            kind,
            detail,
            heal,
            targets,
        })
    }

    /// Heals an active fault and records the stop.
    async fn stop(&self, active: Active) {
        let name = active.kind.name();
        let detail = match &active.heal {
            Heal::Done(outcome) => format!("{} -> {outcome}", active.detail),
            _ => active.detail.clone(),
        };
        self.record(name, FaultAction::Stop, OpType::Invoke, &detail, None);
        let result = self.heal(active.heal).await;
        self.set_busy(&active.targets, false);
        let error = result.err().map(|e| format!("{e:#}"));
        self.record(
            name,
            FaultAction::Stop,
            OpType::Info,
            &detail,
            error.clone(),
        );
        if let Some(error) = error {
            tracing::warn!(nemesis = name, %detail, %error, "healing failed");
            self.count(name, |c| &mut c.failed);
        } else {
            tracing::info!(nemesis = name, %detail, "fault healed");
        }
    }

    async fn choose(
        &self,
        kind: NemesisKind,
        rng: &mut StdRng,
    ) -> anyhow::Result<Option<(Action, String)>> {
        if kind == NemesisKind::OrderReplay {
            return self.choose_replay(rng).await;
        }
        let view = {
            let cluster = self.cluster.lock().await;
            View::new(&cluster, self.busy(), needs_leader(kind, rng)).await
        };
        Ok(view.choose(kind, rng))
    }

    async fn apply(&self, action: Action) -> (Heal, anyhow::Result<()>) {
        if let Action::Replay(replay) = action {
            return replay_order(replay).await;
        }
        let mut cluster = self.cluster.lock().await;
        match action {
            Action::Partition(cut) => (Heal::Network, cluster.partition(&cut).await),
            Action::Kill(nodes) => {
                let result = for_each(&mut cluster, &nodes, Step::Kill).await;
                (Heal::Restart(nodes), result)
            }
            Action::Pause(nodes) => {
                let result = for_each(&mut cluster, &nodes, Step::Pause).await;
                (Heal::Resume(nodes), result)
            }
            Action::ClockJump(nodes, seconds) => {
                let result = for_each(&mut cluster, &nodes, Step::ClockOffset(seconds)).await;
                (Heal::ResetClock(nodes), result)
            }
            Action::ClockRate(nodes, rate) => {
                let result = for_each(&mut cluster, &nodes, Step::ClockRate(rate)).await;
                (Heal::ResetClock(nodes), result)
            }
            Action::PowerOff(nodes) => {
                let result = for_each(&mut cluster, &nodes, Step::PowerOff).await;
                (Heal::Restart(nodes), result)
            }
            Action::Replay(_) => unreachable!("handled above"),
        }
    }

    /// Undoes one fault. Steps that are no longer needed (a node already
    /// running or resumed) are skipped.
    async fn heal(&self, heal: Heal) -> anyhow::Result<()> {
        let mut cluster = self.cluster.lock().await;
        let state: BTreeMap<String, NodeInfo> = cluster
            .nodes()
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        match heal {
            Heal::Network => cluster.heal_network().await,
            Heal::Restart(nodes) => {
                let down: Vec<String> = nodes
                    .into_iter()
                    .filter(|n| state[n].member && !state[n].running)
                    .collect();
                for_each(&mut cluster, &down, Step::Restart).await
            }
            Heal::Resume(nodes) => {
                let paused: Vec<String> = nodes.into_iter().filter(|n| state[n].paused).collect();
                for_each(&mut cluster, &paused, Step::Resume).await
            }
            Heal::ResetClock(nodes) => {
                let running: Vec<String> = nodes.into_iter().filter(|n| state[n].running).collect();
                for_each(&mut cluster, &running, Step::ClockReset).await
            }
            Heal::Done(_) => Ok(()),
        }
    }

    /// Heals whatever is left when the run stops, retires controllers that
    /// run outside the membership, and records it as a "heal-all" stop.
    async fn heal_everything(&self) {
        let detail = "heal every fault";
        self.record("heal-all", FaultAction::Stop, OpType::Invoke, detail, None);
        let mut failures = Vec::new();
        if let Err(e) = self.cluster.lock().await.heal_all().await {
            failures.push(format!("{e:#}"));
        }
        if self.plan.kinds.contains(&NemesisKind::Membership) {
            if let Err(e) = self.sync_membership().await {
                failures.push(format!("{e:#}"));
            }
        }
        let error = (!failures.is_empty()).then(|| failures.join("; "));
        if let Some(error) = &error {
            tracing::error!(%error, "healing at the end of the run failed");
        }
        self.record("heal-all", FaultAction::Stop, OpType::Info, detail, error);
    }

    /// Finds an agent whose ledger contains an order from a leader older than
    /// the newest leader that agent obeyed, and prepares that order again,
    /// unchanged.
    async fn choose_replay(&self, rng: &mut StdRng) -> anyhow::Result<Option<(Action, String)>> {
        let (mut agents, connector) = {
            let cluster = self.cluster.lock().await;
            let busy = self.busy();
            let mut agents = Vec::new();
            for node in cluster.nodes() {
                if node.role == Role::Agent
                    && node.running
                    && !node.paused
                    && !busy.contains(&node.name)
                {
                    let ledger = cluster.ledger_path(&node.name)?;
                    agents.push((
                        node.name.clone(),
                        cluster.agent_endpoint(&node.name)?,
                        ledger,
                    ));
                }
            }
            (agents, cluster.connector())
        };
        agents.shuffle(rng);
        for (agent, endpoint, path) in agents {
            if !path.exists() {
                continue;
            }
            let entries = ledger::read(&path)?;
            let Some((entry, newest)) = pick_stale_entry(&entries, rng) else {
                continue;
            };
            let order = rebuild_order(&connector, entry).await;
            let detail = format!(
                "replay order {} (leader term {} node {}, {} {}) to {agent} \
                 after leader term {} node {}",
                entry.order_id,
                entry.leader.term,
                entry.leader.node_id,
                entry.action,
                entry.instance_id,
                newest.term,
                newest.node_id
            );
            return Ok(Some((
                Action::Replay(Replay {
                    agent,
                    endpoint,
                    order,
                }),
                detail,
            )));
        }
        Ok(None)
    }

    async fn membership_schedule(&self, mut stop: watch::Receiver<bool>) {
        let mut rng = StdRng::seed_from_u64(self.plan.seed ^ MEMBERSHIP_SEED);
        while !sleep_or_stop(jittered(self.plan.interval, &mut rng), &mut stop).await {
            self.change_membership(&mut rng).await;
        }
    }

    /// Adds a spare, removes a voter above the initial count, or replaces a
    /// voter with a spare.
    async fn change_membership(&self, rng: &mut StdRng) {
        let name = NemesisKind::Membership.name();
        if let Err(error) = self.sync_membership().await {
            let error = format!("{error:#}");
            tracing::warn!(%error, "reading the membership failed");
            self.count(name, |c| &mut c.skipped);
            return;
        }
        let change = {
            let cluster = self.cluster.lock().await;
            choose_membership_change(&cluster.nodes(), cluster.spec().voters, &self.busy(), rng)
        };
        let Some(change) = change else {
            self.count(name, |c| &mut c.skipped);
            return;
        };

        let nodes: Vec<String> = change
            .add
            .iter()
            .chain(change.remove.iter())
            .cloned()
            .collect();
        let detail = change.describe();
        self.set_busy(&nodes, true);
        self.record(name, FaultAction::Start, OpType::Invoke, &detail, None);
        self.record(name, FaultAction::Start, OpType::Info, &detail, None);

        let result = self.apply_membership_change(&change).await;
        self.record(name, FaultAction::Stop, OpType::Invoke, &detail, None);
        let error = result.err().map(|e| format!("{e:#}"));
        self.record(
            name,
            FaultAction::Stop,
            OpType::Info,
            &detail,
            error.clone(),
        );
        self.set_busy(&nodes, false);
        match error {
            None => self.count(name, |c| &mut c.injected),
            Some(error) => {
                tracing::warn!(%detail, %error, "membership change failed");
                self.count(name, |c| &mut c.failed);
            }
        }
    }

    /// Reads the zone's membership into the cluster, and retires controllers
    /// that run outside it (left over from a failed or late change). The
    /// cluster lock is not held while the zone is asked, because during a
    /// partition that can take until `cluster::MEMBERSHIP_TIMEOUT`.
    async fn sync_membership(&self) -> anyhow::Result<()> {
        let connector = self.cluster.lock().await.connector();
        let members = cluster::zone_members(&connector).await?;
        let mut cluster = self.cluster.lock().await;
        cluster.set_membership(&members);
        let strays: Vec<String> = cluster
            .nodes()
            .into_iter()
            .filter(|n| n.role == Role::Controller && n.running && !n.member)
            .map(|n| n.name)
            .collect();
        for stray in strays {
            cluster.retire(&stray).await?;
        }
        Ok(())
    }

    /// Runs the change without holding the cluster lock during the
    /// AddReplica and RemoveReplica calls, then reconciles the harness's
    /// view with the membership the zone reports.
    async fn apply_membership_change(&self, change: &MembershipChange) -> anyhow::Result<()> {
        let mut failure = None;
        if let Some(spare) = &change.add {
            let (node_id, addr, connector) = {
                let mut cluster = self.cluster.lock().await;
                let (node_id, addr) = cluster.start_spare(spare).await?;
                (node_id, addr, cluster.connector())
            };
            if let Err(status) = cluster::request_add_replica(&connector, node_id, &addr).await {
                failure = Some(anyhow!(
                    "AddReplica of {spare} (node {node_id}) failed: {status:?}"
                ));
            }
        }
        if let (Some(voter), None) = (&change.remove, &failure) {
            let (node_id, connector) = {
                let cluster = self.cluster.lock().await;
                let node = cluster.nodes().into_iter().find(|n| &n.name == voter);
                (node.map_or(0, |n| n.node_id), cluster.connector())
            };
            if let Err(status) = cluster::request_remove_replica(&connector, node_id).await {
                failure = Some(anyhow!(
                    "RemoveReplica of {voter} (node {node_id}) failed: {status:?}"
                ));
            }
        }
        self.sync_membership().await?;
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// One per-node step of a fault or its heal.
#[derive(Clone, Copy)]
enum Step {
    Kill,
    Restart,
    Pause,
    Resume,
    ClockOffset(f64),
    ClockRate(f64),
    ClockReset,
    PowerOff,
}

/// Runs `step` on each node in turn, continuing past failures, and
/// returns every failure in one error.
async fn for_each(cluster: &mut Cluster, nodes: &[String], step: Step) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for node in nodes {
        let result = match step {
            Step::Kill => cluster.kill(node).await,
            Step::Restart => cluster.restart(node).await,
            Step::Pause => cluster.pause(node).await,
            Step::Resume => cluster.resume(node).await,
            Step::ClockOffset(seconds) => cluster.clock_offset(node, seconds).await,
            Step::ClockRate(rate) => cluster.clock_rate(node, rate).await,
            Step::ClockReset => cluster.clock_reset(node).await,
            Step::PowerOff => cluster.power_off(node).await,
        };
        if let Err(e) = result {
            failures.push(format!("{node}: {e:#}"));
        }
    }
    match failures.is_empty() {
        true => Ok(()),
        false => Err(anyhow!(failures.join("; "))),
    }
}

fn action_targets(action: &Action) -> Vec<String> {
    match action {
        Action::Kill(nodes)
        | Action::Pause(nodes)
        | Action::ClockJump(nodes, _)
        | Action::ClockRate(nodes, _)
        | Action::PowerOff(nodes) => nodes.clone(),
        Action::Replay(replay) => vec![replay.agent.clone()],
        Action::Partition(_) => Vec::new(),
    }
}

/// Returns whether a draw of `kind` needs the current leader. Pause and
/// clock faults include it only sometimes.
fn needs_leader(kind: NemesisKind, rng: &mut StdRng) -> bool {
    match kind {
        NemesisKind::PartitionLeader | NemesisKind::PartitionOneWay => true,
        NemesisKind::Pause | NemesisKind::ClockJump | NemesisKind::ClockRate => {
            rng.gen_bool(LEADER_SHARE)
        }
        _ => false,
    }
}

/// The cluster state that a fault draw chooses from.
struct View {
    nodes: Vec<NodeInfo>,
    leader: Option<String>,
    /// Whether the draw wants the leader among its targets.
    target_leader: bool,
    busy: BTreeSet<String>,
}

impl View {
    async fn new(cluster: &Cluster, busy: BTreeSet<String>, target_leader: bool) -> View {
        let leader = match target_leader {
            true => cluster.leader_node().await,
            false => None,
        };
        View {
            nodes: cluster.nodes(),
            leader,
            target_leader,
            busy,
        }
    }

    fn names(&self, keep: impl Fn(&NodeInfo) -> bool) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| keep(n))
            .map(|n| n.name.clone())
            .collect()
    }

    /// Member controllers, running or not.
    fn members(&self) -> Vec<String> {
        self.names(|n| n.role == Role::Controller && n.member)
    }

    /// Running, unpaused nodes of `role` that no other fault is acting on.
    fn healthy(&self, role: Role) -> Vec<String> {
        self.names(|n| {
            n.role == role && n.member && n.running && !n.paused && !self.busy.contains(&n.name)
        })
    }

    fn all_but(&self, node: &str) -> Vec<String> {
        self.names(|n| n.name != node)
    }

    /// 1 or 2 healthy controllers, the leader first when the draw targets it.
    fn some_controllers(&self, rng: &mut StdRng) -> Vec<String> {
        let mut healthy = self.healthy(Role::Controller);
        healthy.shuffle(rng);
        if let (true, Some(leader)) = (self.target_leader, &self.leader) {
            if let Some(at) = healthy.iter().position(|n| n == leader) {
                healthy.swap(0, at);
            }
        }
        healthy.truncate(rng.gen_range(1..=2));
        healthy
    }

    fn choose(&self, kind: NemesisKind, rng: &mut StdRng) -> Option<(Action, String)> {
        match kind {
            NemesisKind::PartitionOne => {
                let candidates =
                    [self.healthy(Role::Controller), self.healthy(Role::Agent)].concat();
                let node = candidates.choose(rng)?;
                self.isolate(node)
            }
            NemesisKind::PartitionLeader => self.isolate(self.leader.as_ref()?),
            NemesisKind::PartitionHalves => {
                let mut members = self.members();
                (members.len() >= 2).then_some(())?;
                members.shuffle(rng);
                let (left, right) = members.split_at(members.len() / 2);
                let detail = format!("split {} | {}", left.join(","), right.join(","));
                Some((Action::Partition(Cut::split(left, right)), detail))
            }
            NemesisKind::PartitionRing => {
                let mut members = self.members();
                (members.len() >= 3).then_some(())?;
                members.shuffle(rng);
                let detail = format!("majorities ring {}", members.join("-"));
                Some((Action::Partition(ring_cut(&members)), detail))
            }
            NemesisKind::PartitionBridge => {
                let mut members = self.members();
                (members.len() >= 3).then_some(())?;
                members.shuffle(rng);
                let (bridge, rest) = members.split_first()?;
                let (left, right) = rest.split_at(rest.len() / 2);
                let detail = format!(
                    "bridge {bridge} between {} and {}",
                    left.join(","),
                    right.join(",")
                );
                Some((Action::Partition(Cut::split(left, right)), detail))
            }
            NemesisKind::PartitionOneWay => self.one_way(rng),
            NemesisKind::Kill => {
                let nodes = self.kill_or_pause_targets(rng)?;
                let detail = format!("kill -9 {}", nodes.join(","));
                Some((Action::Kill(nodes), detail))
            }
            NemesisKind::Pause => {
                let nodes = self.kill_or_pause_targets(rng)?;
                let detail = format!("pause {}", nodes.join(","));
                Some((Action::Pause(nodes), detail))
            }
            NemesisKind::ClockJump => {
                let nodes = self.some_controllers(rng);
                (!nodes.is_empty()).then_some(())?;
                let seconds = *CLOCK_JUMPS_S.choose(rng)?;
                let detail = format!("move clock of {} by {seconds:+} s", nodes.join(","));
                Some((Action::ClockJump(nodes, seconds), detail))
            }
            NemesisKind::ClockRate => {
                let nodes = self.some_controllers(rng);
                (!nodes.is_empty()).then_some(())?;
                let rate = *CLOCK_RATES.choose(rng)?;
                let detail = format!("run clock of {} at x{rate}", nodes.join(","));
                Some((Action::ClockRate(nodes, rate), detail))
            }
            NemesisKind::PowerLoss => {
                let majority = self.members().len() / 2 + 1;
                let mut nodes = self.healthy(Role::Controller);
                (nodes.len() >= majority).then_some(())?;
                nodes.shuffle(rng);
                nodes.truncate(rng.gen_range(majority..=nodes.len()));
                nodes.sort();
                let detail = format!("power loss on {}", nodes.join(","));
                Some((Action::PowerOff(nodes), detail))
            }
            NemesisKind::Membership | NemesisKind::OrderReplay => None,
        }
    }

    fn isolate(&self, node: &str) -> Option<(Action, String)> {
        let others = self.all_but(node);
        let detail = format!("isolate {node} from {}", others.join(","));
        Some((Action::Partition(Cut::isolate(node, &others)), detail))
    }

    fn one_way(&self, rng: &mut StdRng) -> Option<(Action, String)> {
        let leader = self.leader.as_ref()?;
        let others: Vec<String> = self.members().into_iter().filter(|n| n != leader).collect();
        (!others.is_empty()).then_some(())?;
        let mut cut = Cut::new();
        let outbound = rng.gen_bool(0.5);
        for other in &others {
            match outbound {
                true => cut.drop_one_way(leader, other),
                false => cut.drop_one_way(other, leader),
            }
        }
        let detail = match outbound {
            true => format!("drop {leader} -> {}", others.join(",")),
            false => format!("drop {} -> {leader}", others.join(",")),
        };
        Some((Action::Partition(cut), detail))
    }

    /// Picks an agent now and then, otherwise 1 or 2 controllers.
    fn kill_or_pause_targets(&self, rng: &mut StdRng) -> Option<Vec<String>> {
        if rng.gen_bool(AGENT_SHARE) {
            if let Some(agent) = self.healthy(Role::Agent).choose(rng) {
                return Some(vec![agent.clone()]);
            }
        }
        let nodes = self.some_controllers(rng);
        (!nodes.is_empty()).then_some(nodes)
    }
}

/// Majorities ring: the nodes in the given order form a ring, and each one
/// reaches only its neighbours within `majority / 2` steps, which with
/// itself make a majority, different for every node. With 3 nodes every
/// pair is adjacent, so one edge is cut instead and the middle node
/// bridges the other two.
pub fn ring_cut(nodes: &[String]) -> Cut {
    let n = nodes.len();
    let reach = (n / 2 + 1) / 2;
    let mut cut = Cut::new();
    for i in 0..n {
        for j in i + 1..n {
            let distance = (j - i).min(n - (j - i));
            if distance > reach {
                cut.drop_both_ways(&nodes[i], &nodes[j]);
            }
        }
    }
    if cut.is_empty() && n >= 3 {
        cut.drop_both_ways(&nodes[0], &nodes[n - 1]);
    }
    cut
}

/// One membership change: add a spare, remove a voter, or both (a replace).
#[derive(Debug, PartialEq, Eq)]
struct MembershipChange {
    add: Option<String>,
    remove: Option<String>,
}

impl MembershipChange {
    fn describe(&self) -> String {
        match (&self.add, &self.remove) {
            (Some(add), Some(remove)) => format!("replace {remove} with {add}"),
            (Some(add), None) => format!("add {add}"),
            (None, Some(remove)) => format!("remove {remove}"),
            (None, None) => "no change".to_string(),
        }
    }
}

/// Draws a change that keeps at least `min_voters` members: add when a
/// spare slot is free, remove when there are more members than
/// `min_voters`, replace when both a spare and a removable voter exist.
fn choose_membership_change(
    nodes: &[NodeInfo],
    min_voters: usize,
    busy: &BTreeSet<String>,
    rng: &mut StdRng,
) -> Option<MembershipChange> {
    let controllers = nodes.iter().filter(|n| n.role == Role::Controller);
    let members = controllers.clone().filter(|n| n.member).count();
    let spares: Vec<&NodeInfo> = controllers
        .clone()
        .filter(|n| !n.member && !n.running)
        .collect();
    let removable: Vec<&NodeInfo> = controllers
        .filter(|n| n.member && n.running && !n.paused && !busy.contains(&n.name))
        .collect();

    let spare = spares.choose(rng).map(|n| n.name.clone());
    let voter = removable.choose(rng).map(|n| n.name.clone());
    let mut options = Vec::new();
    if spare.is_some() {
        options.push(MembershipChange {
            add: spare.clone(),
            remove: None,
        });
    }
    if voter.is_some() && members > min_voters {
        options.push(MembershipChange {
            add: None,
            remove: voter.clone(),
        });
    }
    if spare.is_some() && voter.is_some() {
        options.push(MembershipChange {
            add: spare,
            remove: voter,
        });
    }
    let at = (!options.is_empty()).then(|| rng.gen_range(0..options.len()))?;
    Some(options.swap_remove(at))
}

/// Picks an entry whose leader is older than the newest leader in the
/// ledger, preferring starts, whose late delivery would run a domain.
/// Returns it with that newest leader.
fn pick_stale_entry<'a>(
    entries: &'a [LedgerEntry],
    rng: &mut StdRng,
) -> Option<(&'a LedgerEntry, ccs::zone::model::LeaderStamp)> {
    let newest = entries.iter().map(|e| e.leader).max()?;
    let stale: Vec<&LedgerEntry> = entries.iter().filter(|e| e.leader < newest).collect();
    let starts: Vec<&LedgerEntry> = stale
        .iter()
        .copied()
        .filter(|e| parse_action(&e.action) == Some(OrderAction::Start))
        .collect();
    let pool = if starts.is_empty() { &stale } else { &starts };
    pool.choose(rng).map(|entry| (*entry, newest))
}

/// Parses a ledger action: "start", or the protobuf name in any case
/// ("ORDER_ACTION_START", "order_action_start").
fn parse_action(text: &str) -> Option<OrderAction> {
    let upper = text.to_ascii_uppercase();
    OrderAction::from_str_name(&upper)
        .or_else(|| OrderAction::from_str_name(&format!("ORDER_ACTION_{upper}")))
}

/// Rebuilds the whole order from a ledger entry. The ledger has no size
/// or name, so they come from the zone's instance record (a stale read).
/// When the instance is gone, the order requests a 1-vCPU, 128 MiB domain
/// named after the id, which is what a late start of a deleted instance
/// would run.
async fn rebuild_order(connector: &ZoneConnector, entry: &LedgerEntry) -> Order {
    let listed = connector
        .call(|mut c| async move { c.list_instances(ReadRequest { stale: true }).await })
        .await;
    let instance = listed.ok().and_then(|list| {
        list.instances
            .into_iter()
            .find(|i| i.id == entry.instance_id)
    });
    let (name, vcpus, memory_mib, disk_gib) = match instance {
        Some(i) => (i.name, i.vcpus, i.memory_mib, i.disk_gib),
        None => (format!("replayed-{}", entry.instance_id), 1, 128, 1),
    };
    Order {
        order_id: entry.order_id,
        leader: Some(LeaderId {
            term: entry.leader.term,
            node_id: entry.leader.node_id,
        }),
        action: parse_action(&entry.action).unwrap_or(OrderAction::Unspecified) as i32,
        instance_id: entry.instance_id.clone(),
        instance_name: name,
        vcpus,
        memory_mib,
        disk_gib,
        zone: ZONE.to_string(),
        ..Default::default()
    }
}

/// Sends the old order to the agent's Execute. The fault is in place once
/// the agent replied, and the reply becomes the stop detail.
async fn replay_order(replay: Replay) -> (Heal, anyhow::Result<()>) {
    let channel = match ccs::client::channel(&replay.endpoint, REPLAY_TIMEOUT) {
        Ok(channel) => channel,
        Err(status) => return (Heal::Done("not sent".into()), Err(anyhow!("{status:?}"))),
    };
    let mut client = AgentClient::new(channel);
    let reply = tokio::time::timeout(REPLAY_TIMEOUT, client.execute(replay.order)).await;
    match reply {
        Ok(Ok(result)) => {
            let result = result.into_inner();
            let outcome = format!(
                "{} executed it: domain {}",
                replay.agent, result.domain_state
            );
            let agent = &replay.agent;
            tracing::warn!(%agent, %outcome, "agent executed a replayed stale order");
            (Heal::Done(outcome), Ok(()))
        }
        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
            let outcome = format!("{} rejected it: {}", replay.agent, status.message());
            (Heal::Done(outcome), Ok(()))
        }
        Ok(Err(status)) => {
            let outcome = format!(
                "{} failed it: {:?} {}",
                replay.agent,
                status.code(),
                status.message()
            );
            (Heal::Done(outcome), Ok(()))
        }
        Err(_) => (
            Heal::Done("no reply".into()),
            Err(anyhow!(
                "Execute on {} timed out after {REPLAY_TIMEOUT:?}",
                replay.agent
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{create, test_spec, NETWORK};
    use crate::history::Op;
    use ccs::proto::zone::CreateInstanceRequest;
    use ccs::zone::model::LeaderStamp;
    use std::path::Path;

    fn names(count: usize) -> Vec<String> {
        (1..=count).map(|k| format!("n{k}")).collect()
    }

    #[test]
    fn parse_kinds_groups_and_names() {
        assert_eq!(parse_kinds("all").unwrap(), NemesisKind::ALL.to_vec());
        assert_eq!(parse_kinds("none").unwrap(), Vec::<NemesisKind>::new());
        assert_eq!(parse_kinds("partition").unwrap().len(), 6);
        assert_eq!(
            parse_kinds("kill, clock,kill").unwrap(),
            vec![
                NemesisKind::Kill,
                NemesisKind::ClockJump,
                NemesisKind::ClockRate
            ]
        );
        assert_eq!(
            parse_kinds("power-loss").unwrap(),
            vec![NemesisKind::PowerLoss]
        );
        let error = parse_kinds("partition,explode").unwrap_err().to_string();
        assert!(error.contains("\"explode\""), "{error}");
        for kind in NemesisKind::ALL {
            assert_eq!(parse_kinds(kind.name()).unwrap(), vec![kind]);
        }
    }

    #[test]
    fn ring_gives_each_node_a_different_majority() {
        for n in 3..=7 {
            let nodes = names(n);
            let cut = ring_cut(&nodes);
            assert!(!cut.is_empty(), "{n} nodes: empty cut");
            let majority = n / 2 + 1;
            let mut views = BTreeSet::new();
            for node in &nodes {
                let view: BTreeSet<&String> =
                    nodes.iter().filter(|o| !cut.blocks(o, node)).collect();
                assert!(view.len() >= majority, "{n} nodes: {node} sees {view:?}");
                views.insert(view);
            }
            assert!(
                views.len() > 1,
                "{n} nodes: every node sees the same majority"
            );
            for (from, to) in cut.drops() {
                assert!(
                    cut.blocks(to, from),
                    "{n} nodes: {from} -> {to} is cut one way only"
                );
            }
        }
    }

    fn controller(name: &str, member: bool, running: bool) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            role: Role::Controller,
            ip: std::net::Ipv4Addr::LOCALHOST,
            node_id: 1,
            member,
            running,
            paused: false,
        }
    }

    #[test]
    fn membership_keeps_the_initial_voter_count() {
        let mut rng = StdRng::seed_from_u64(7);
        let three = [
            controller("n1", true, true),
            controller("n2", true, true),
            controller("n3", true, true),
            controller("n4", false, false),
        ];
        for _ in 0..50 {
            let change =
                choose_membership_change(&three, 3, &BTreeSet::new(), &mut rng).expect("a change");
            assert_eq!(change.add.as_deref(), Some("n4"), "{change:?}");
        }
        let no_spare = &three[..3];
        assert_eq!(
            choose_membership_change(no_spare, 3, &BTreeSet::new(), &mut rng),
            None
        );
        let busy: BTreeSet<String> = ["n1", "n2"].iter().map(|s| s.to_string()).collect();
        for _ in 0..50 {
            let change = choose_membership_change(&three, 2, &busy, &mut rng).expect("a change");
            assert_ne!(change.remove.as_deref(), Some("n1"));
            assert_ne!(change.remove.as_deref(), Some("n2"));
        }
    }

    fn entry(order_id: u64, term: u64, action: &str) -> LedgerEntry {
        LedgerEntry {
            time_unix_ns: order_id,
            host_id: "h1".to_string(),
            order_id,
            leader: LeaderStamp { term, node_id: 1 },
            accepted_before: None,
            instance_id: format!("i-{order_id}"),
            action: action.to_string(),
            before: "absent".to_string(),
            after: "running".to_string(),
        }
    }

    #[test]
    fn stale_entry_is_from_an_older_leader() {
        let mut rng = StdRng::seed_from_u64(1);
        let one_leader = [entry(1, 2, "start"), entry(2, 2, "destroy")];
        assert!(pick_stale_entry(&one_leader, &mut rng).is_none());
        let two_leaders = [
            entry(1, 2, "destroy"),
            entry(2, 2, "order_action_start"),
            entry(3, 5, "start"),
        ];
        for _ in 0..20 {
            let (picked, newest) = pick_stale_entry(&two_leaders, &mut rng).expect("a stale entry");
            assert_eq!(picked.order_id, 2, "a start is preferred");
            assert_eq!(newest.term, 5);
        }
    }

    #[test]
    fn ledger_actions_parse() {
        assert_eq!(parse_action("start"), Some(OrderAction::Start));
        assert_eq!(
            parse_action("order_action_destroy"),
            Some(OrderAction::Destroy)
        );
        assert_eq!(parse_action("ORDER_ACTION_STOP"), Some(OrderAction::Stop));
        assert_eq!(parse_action("reboot"), None);
    }

    /// Creates instances one after another until `stop`, ignoring
    /// failures, and returns how many were acknowledged.
    async fn create_load(connector: ZoneConnector, stop: watch::Receiver<bool>) -> u64 {
        let mut created = 0;
        for n in 0.. {
            if *stop.borrow() {
                break;
            }
            let request = CreateInstanceRequest {
                name: format!("load-{n}"),
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
                pod: String::new(),
                request_id: format!("load-request-{n}"),
                ..Default::default()
            };
            let result = connector
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.create_instance(request).await }
                })
                .await;
            created += u64::from(result.is_ok());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        created
    }

    /// Returns the details of the nemesis entries with `action` and `op`, per nemesis name.
    fn fault_details(history: &[Op], action: FaultAction, op: OpType) -> Vec<(String, String)> {
        history
            .iter()
            .filter(|entry| entry.kind == op)
            .filter_map(|entry| match &entry.call {
                Call::Fault {
                    nemesis,
                    action: a,
                    detail,
                } if *a == action => Some((nemesis.clone(), detail.clone())),
                _ => None,
            })
            .collect()
    }

    /// Scenario: 3 voters on lossy filesystems, 2 spares and 2 agents under
    /// a stream of creates; every kind the cluster supports, a fault about
    /// every second for 45 s.
    /// Then: faults of several kinds were injected, every started fault was
    /// stopped, no replayed order ran, and after the final heal every member
    /// runs and no process exited on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, iproute2, iptables and a built ccs binary"]
    async fn nemesis_runs_supported_kinds() {
        let _network = NETWORK.lock().await;
        let mut spec = test_spec("nemesis");
        let lossyfs = spec.ccs_binary.with_file_name("ccs-jepsen");
        spec.lossy_fs = Some(cluster::LossyFsSpec { binary: lossyfs });
        let run_dir = spec.run_dir.clone();
        let cluster = Cluster::start(spec).await.expect("cluster starts");
        let connector = cluster.connector();
        let mut kinds = NemesisKind::ALL.to_vec();
        kinds.retain(|k| k.unsupported_reason(cluster.spec()).is_none());
        let cluster = Arc::new(Mutex::new(cluster));
        let recorder = Arc::new(Recorder::new());
        let (stop_sender, stop) = watch::channel(false);
        let load = tokio::spawn(create_load(connector, stop.clone()));
        let plan = NemesisPlan {
            kinds,
            interval: Duration::from_secs(1),
            fault_duration: Duration::from_secs(2),
            seed: 42,
        };
        let nemesis = tokio::spawn(run(cluster.clone(), plan, recorder.clone(), stop));
        tokio::time::sleep(Duration::from_secs(45)).await;
        stop_sender.send(true).expect("stop");
        let created = load.await.expect("load task");
        let counts = nemesis.await.expect("nemesis task").expect("nemesis run");
        eprintln!("created {created} instances; fault counts {counts:?}");

        let injected: u64 = counts.injected.values().sum();
        assert!(
            injected >= 10,
            "only {injected} faults injected: {counts:?}"
        );
        assert!(counts.injected.len() >= 5, "few kinds injected: {counts:?}");
        assert!(created > 0, "no create succeeded");
        let history = recorder.snapshot();
        let starts = fault_details(&history, FaultAction::Start, OpType::Invoke);
        let stops = fault_details(&history, FaultAction::Stop, OpType::Invoke);
        let stops: Vec<_> = stops
            .into_iter()
            .filter(|(nemesis, _)| nemesis != "heal-all")
            .collect();
        assert_eq!(
            starts.len(),
            stops.len(),
            "starts {starts:?}\nstops {stops:?}"
        );
        let executed: Vec<_> = stops
            .iter()
            .filter(|(_, d)| d.contains("executed it"))
            .collect();
        assert!(executed.is_empty(), "replayed orders ran: {executed:?}");

        let mut cluster = Arc::try_unwrap(cluster)
            .ok()
            .expect("the nemesis task has released the cluster")
            .into_inner();
        let crashes = cluster.check_exits();
        assert!(
            crashes.is_empty(),
            "processes exited on their own: {crashes:?}"
        );
        let down: Vec<String> = cluster
            .nodes()
            .into_iter()
            .filter(|n| n.member && !n.running)
            .map(|n| n.name)
            .collect();
        assert!(
            down.is_empty(),
            "members not running after the final heal: {down:?}"
        );
        cluster.teardown().await.expect("teardown");
        std::fs::remove_dir_all(&run_dir).expect("remove run dir");
    }

    /// Returns whether the ledger at `path` has orders from two leaders.
    fn has_two_leaders(path: &Path) -> bool {
        let entries = ledger::read(path).unwrap_or_default();
        let leaders: BTreeSet<LeaderStamp> = entries.iter().map(|e| e.leader).collect();
        leaders.len() >= 2
    }

    /// Kills the leader, waits until another controller leads, and starts
    /// the old leader again. An immediate restart would not do, because a
    /// restarted openraft 0.9 leader whose vote is committed resumes leading
    /// in the same term.
    async fn kill_leader_until_replaced(cluster: &mut Cluster) {
        let old = cluster.leader().await.expect("a leader");
        let old_name = cluster.node_name(old).expect("leader slot");
        cluster.kill(&old_name).await.expect("kill the leader");
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.leader().await.is_none_or(|id| id == old) {
            assert!(Instant::now() < deadline, "no new leader within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster
            .restart(&old_name)
            .await
            .expect("restart the old leader");
    }

    /// Runs order replay against a zone whose agents have orders from two
    /// leaders, and returns the replay outcomes (stop details).
    ///
    /// Scenario: create instances until an agent's ledger has an order;
    /// kill the leader; create more until a ledger has orders from two
    /// leaders; run only the order-replay nemesis for 5 s.
    async fn replay_outcomes(test: &str, skip_fencing: bool) -> Vec<String> {
        let mut spec = test_spec(test);
        spec.agent_canary.skip_fencing = skip_fencing;
        let run_dir = spec.run_dir.clone();
        let mut cluster = Cluster::start(spec).await.expect("cluster starts");
        let connector = cluster.connector();
        let ledgers = cluster.ledger_paths();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        let mut killed = false;
        while !ledgers.iter().any(|p| has_two_leaders(p)) {
            assert!(
                Instant::now() < deadline,
                "no ledger got orders from two leaders"
            );
            let has_orders = ledgers
                .iter()
                .any(|p| !ledger::read(p).unwrap_or_default().is_empty());
            if has_orders && !killed {
                kill_leader_until_replaced(&mut cluster).await;
                killed = true;
            }
            n += 1;
            let _ = create(&connector, &format!("{test}-{n}")).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let cluster = Arc::new(Mutex::new(cluster));
        let recorder = Arc::new(Recorder::new());
        let (stop_sender, stop) = watch::channel(false);
        let plan = NemesisPlan {
            kinds: vec![NemesisKind::OrderReplay],
            interval: Duration::from_millis(300),
            fault_duration: Duration::from_millis(300),
            seed: 7,
        };
        let nemesis = tokio::spawn(run(cluster.clone(), plan, recorder.clone(), stop));
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop_sender.send(true).expect("stop");
        let counts = nemesis.await.expect("nemesis task").expect("nemesis run");
        let replays = counts.injected.get("order-replay").copied().unwrap_or(0);
        assert!(replays >= 1, "no order was replayed: {counts:?}");

        let cluster = Arc::try_unwrap(cluster)
            .ok()
            .expect("the nemesis task has released the cluster")
            .into_inner();
        cluster.teardown().await.expect("teardown");
        std::fs::remove_dir_all(&run_dir).expect("remove run dir");
        fault_details(&recorder.snapshot(), FaultAction::Stop, OpType::Info)
            .into_iter()
            .filter(|(nemesis, _)| nemesis == "order-replay")
            .map(|(_, detail)| detail)
            .collect()
    }

    /// With fencing on, every replayed order is rejected as stale.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, iproute2, iptables and a built ccs binary"]
    async fn order_replay_rejected_when_fenced() {
        let _network = NETWORK.lock().await;
        let outcomes = replay_outcomes("replay-fenced", false).await;
        assert!(!outcomes.is_empty());
        for outcome in &outcomes {
            assert!(outcome.contains("rejected it"), "{outcome}");
        }
    }

    /// With the skip_fencing canary, the agent runs replayed orders.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, iproute2, iptables and a built ccs binary"]
    async fn order_replay_runs_without_fencing() {
        let _network = NETWORK.lock().await;
        let outcomes = replay_outcomes("replay-unfenced", true).await;
        assert!(
            outcomes.iter().any(|o| o.contains("executed it")),
            "{outcomes:?}"
        );
    }
}
