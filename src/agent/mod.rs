//! The host agent: registers its host with the zone, sends heartbeats with
//! the domains, volumes and tenant networks libvirt reports, and executes
//! the leader's orders through the `Hypervisor` trait.
//!
//! START and DEFINE make a domain's definition carry the order's disks and
//! NICs, defining the NICs' networks first. STOP and DESTROY power a domain
//! off or remove it. CREATE_VOLUME and DELETE_VOLUME manage volumes in the
//! host's ccs pools. MIGRATE moves a domain to another host (see `migration`).
//! Every order is checked (see `order`), then passes the fence (see `fence`)
//! before any side effect, and is idempotent, because a domain's UUID is its
//! instance id and a volume's name is its id.
//! One lock serializes orders on a host, so removing a network no domain
//! uses cannot race an order that is about to use it. After DESTROY,
//! MIGRATE and device changes, such unused networks are removed.
//!
//! Every executed order is logged at info level with its order id, leader id
//! and outcome, and appended to the ledger when one is configured.
//!
//! gRPC codes of failed orders, as the leader reads them:
//!
//! | code                | meaning                                                     |
//! |---------------------|-------------------------------------------------------------|
//! | FAILED_PRECONDITION | fenced: the order's leader is older than one already obeyed |
//! | INVALID_ARGUMENT    | malformed order, or one for another zone; nothing was done  |
//! | ABORTED             | host state forbids it (SAN pool missing, network or volume  |
//! |                     | in use), or a migration destination rejected its order      |
//! | UNAVAILABLE         | a migration destination's agent could not be reached        |
//! | INTERNAL            | libvirt failed; the order may have partly run, so retry it  |
//!
//! Only FAILED_PRECONDITION means "fenced", so a destination's rejection is
//! never passed on with that code.

pub mod fence;
pub mod ledger;
mod migration;
mod order;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Mutex, MutexGuard};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::client::ZoneConnector;
use crate::config::{self, AgentConfig};
use crate::hypervisor::{
    DeviceChange, DomainRunState, DomainSpec, Hypervisor, HypervisorError, Libvirt,
    LibvirtSettings, PoolKind,
};
use crate::proto::agent::agent_server::{Agent, AgentServer};
use crate::proto::agent::{Domain, DomainList, ListDomainsRequest, Order, OrderResult};
use crate::proto::zone::{HeartbeatRequest, HostDomain, RegisterHostRequest};
use crate::zone::model::LeaderStamp;
use fence::{Fence, FenceError};
use ledger::{Ledger, LedgerEntry};
use order::{Outcome, Task, VolumeTask};

/// The note of an order whose device change waits for the domain's next start.
const NEXT_START_NOTE: &str = "device changes apply at the next start: the hypervisor \
    (libvirt's test driver) has no hot-plug, so the running domain keeps its old devices \
    until it is stopped and started";

pub struct AgentService {
    host_id: String,
    zone: String,
    hypervisor: Arc<dyn Hypervisor>,
    fence: Arc<Fence>,
    /// Held by every order while it runs, network clean-up included.
    order_lock: Mutex<()>,
    /// Whether this agent fronts its pod's shared array and so takes SAN volume orders.
    fronts_san: bool,
    /// Record of executed orders, when the config names a ledger file.
    ledger: Option<Ledger>,
    /// The `skip_fencing` canary: execute orders from stale leaders too.
    skip_fencing: bool,
}

/// The identity of one order while it runs.
pub(crate) struct OrderContext {
    order_id: u64,
    stamp: LeaderStamp,
    /// The newest leader accepted before this order arrived.
    accepted_before: Option<LeaderStamp>,
    /// The ledger's name of the order's action.
    action: &'static str,
    /// The instance id, or the volume id of a volume order.
    subject: String,
}

/// The right to change the host for one order: the fence admitted its
/// leader and no other order runs.
pub(crate) struct Admitted<'a> {
    _fence: Option<MutexGuard<'a, Option<LeaderStamp>>>,
    _order: MutexGuard<'a, ()>,
}

impl AgentService {
    pub fn new(
        host_id: String,
        zone: String,
        hypervisor: Arc<dyn Hypervisor>,
        fence: Arc<Fence>,
    ) -> Self {
        AgentService {
            host_id,
            zone,
            hypervisor,
            fence,
            order_lock: Mutex::new(()),
            fronts_san: false,
            ledger: None,
            skip_fencing: false,
        }
    }

    /// Appends every executed order to `ledger`.
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Turns fencing off, which breaks safety on purpose. For canary runs only.
    pub fn with_fencing_skipped(mut self, skip: bool) -> Self {
        self.skip_fencing = skip;
        self
    }

    /// Makes this agent the one that fronts its pod's shared array.
    pub fn with_san_front(mut self, fronts_san: bool) -> Self {
        self.fronts_san = fronts_san;
        self
    }

    /// Runs a hypervisor call on a blocking thread.
    async fn blocking<T, F>(&self, call: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
    {
        let hypervisor = self.hypervisor.clone();
        tokio::task::spawn_blocking(move || call(hypervisor.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("libvirt task failed: {e}")))?
            .map_err(hypervisor_status)
    }

    async fn list(&self) -> Result<Vec<Domain>, Status> {
        let domains = self.blocking(|h| h.list_domains()).await?;
        Ok(domains
            .into_iter()
            .map(|d| Domain {
                uuid: d.uuid,
                name: d.name,
                state: d.state.as_str().to_string(),
                vcpus: d.vcpus,
                memory_mib: d.memory_mib,
            })
            .collect())
    }

    /// Passes the fence for the order's leader, then takes the order lock.
    async fn admit(&self, context: &OrderContext) -> Result<Admitted<'_>, Status> {
        let stamp = context.stamp;
        let fence = match self.fence.admit(stamp).await {
            Ok(guard) => Some(guard),
            Err(FenceError::Stale { .. }) if self.skip_fencing => {
                tracing::warn!(
                    order_id = context.order_id,
                    term = stamp.term,
                    leader = stamp.node_id,
                    "executing order from stale leader: fencing is off (canary)"
                );
                None
            }
            Err(error @ FenceError::Stale { .. }) => {
                tracing::warn!(
                    order_id = context.order_id,
                    term = stamp.term,
                    leader = stamp.node_id,
                    %error,
                    "rejected order from stale leader"
                );
                metrics::counter!("ccs_agent_orders_total", "outcome" => "fenced").increment(1);
                return Err(Status::failed_precondition(error.to_string()));
            }
            Err(error) => return Err(Status::internal(error.to_string())),
        };
        Ok(Admitted {
            _fence: fence,
            _order: self.order_lock.lock().await,
        })
    }

    /// Appends one side effect of an order to the ledger, if there is one.
    fn record(&self, context: &OrderContext, before: &str, after: &str) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        ledger.record(&LedgerEntry {
            time_unix_ns: unix_time_ns(),
            host_id: self.host_id.clone(),
            order_id: context.order_id,
            leader: context.stamp,
            accepted_before: context.accepted_before,
            instance_id: context.subject.clone(),
            action: context.action.to_string(),
            before: before.to_string(),
            after: after.to_string(),
        });
    }

    /// Removes networks no domain uses. A failure is logged, not returned:
    /// the order already ran, and the next clean-up retries.
    async fn remove_unused_networks(&self) {
        if let Err(status) = self.blocking(|h| h.remove_unused_networks()).await {
            tracing::warn!(error = status.message(), "removing unused networks failed");
        }
    }

    /// Defines and starts the libvirt networks of a domain's NICs.
    async fn ensure_networks(&self, spec: &DomainSpec) -> Result<(), Status> {
        let networks: BTreeMap<String, _> = spec
            .nics
            .iter()
            .map(|nic| (nic.network.clone(), nic.network_spec()))
            .collect();
        for network in networks.into_values() {
            self.blocking(move |h| h.ensure_network(&network)).await?;
        }
        Ok(())
    }

    /// Runs an order that stays on this host, under the fence and the order lock.
    async fn run_local(&self, context: &OrderContext, task: Task) -> Result<Outcome, Status> {
        let _admitted = self.admit(context).await?;
        match task {
            Task::Start(spec) => self.define(context, spec, true).await,
            Task::Define(spec) => self.define(context, spec, false).await,
            Task::Stop(uuid) => {
                let before = self.blocking(move |h| h.ensure_stopped(&uuid)).await?;
                let after = match before {
                    DomainRunState::Absent => DomainRunState::Absent,
                    _ => DomainRunState::Stopped,
                };
                Ok(self.domain_outcome(context, before, after))
            }
            Task::Destroy(uuid) => {
                let before = self.blocking(move |h| h.ensure_absent(&uuid)).await?;
                let outcome = self.domain_outcome(context, before, DomainRunState::Absent);
                self.remove_unused_networks().await;
                Ok(outcome)
            }
            Task::CreateVolume(volume) => self.create_volume(context, volume).await,
            Task::DeleteVolume(volume) => self.delete_volume(context, volume).await,
            Task::Migrate(..) => unreachable!("MIGRATE runs in `migration`, not here"),
        }
    }

    fn domain_outcome(
        &self,
        context: &OrderContext,
        before: DomainRunState,
        after: DomainRunState,
    ) -> Outcome {
        self.record(context, before.as_str(), after.as_str());
        Outcome {
            before: before.as_str().to_string(),
            after: after.as_str().to_string(),
            already_done: before == after,
            note: String::new(),
        }
    }

    async fn define(
        &self,
        context: &OrderContext,
        spec: DomainSpec,
        start: bool,
    ) -> Result<Outcome, Status> {
        self.ensure_networks(&spec).await?;
        let defined = self.blocking(move |h| h.define(&spec, start)).await?;
        let changed_existing =
            defined.before != DomainRunState::Absent && defined.devices != DeviceChange::Unchanged;
        if changed_existing {
            self.remove_unused_networks().await;
        }
        let mut outcome = self.domain_outcome(context, defined.before, defined.after);
        outcome.already_done =
            defined.before == defined.after && defined.devices == DeviceChange::Unchanged;
        if defined.devices == DeviceChange::NextStart {
            outcome.note = NEXT_START_NOTE.to_string();
        }
        Ok(outcome)
    }

    fn check_san(&self, volume: &VolumeTask) -> Result<(), Status> {
        if volume.pool == PoolKind::San && !self.fronts_san {
            return Err(Status::invalid_argument(format!(
                "volume {:?} is in the SAN pool, but host {} does not front its pod's shared \
                 array (san_pool_gib is 0); send SAN volume orders to the agent that does",
                volume.volume_id, self.host_id
            )));
        }
        Ok(())
    }

    async fn create_volume(
        &self,
        context: &OrderContext,
        volume: VolumeTask,
    ) -> Result<Outcome, Status> {
        self.check_san(&volume)?;
        let created = self
            .blocking(move |h| h.ensure_volume(volume.pool, &volume.volume_id, volume.size_gib))
            .await?;
        Ok(self.volume_outcome(context, !created, true))
    }

    async fn delete_volume(
        &self,
        context: &OrderContext,
        volume: VolumeTask,
    ) -> Result<Outcome, Status> {
        self.check_san(&volume)?;
        let deleted = self
            .blocking(move |h| h.delete_volume(volume.pool, &volume.volume_id))
            .await?;
        Ok(self.volume_outcome(context, deleted, false))
    }

    fn volume_outcome(
        &self,
        context: &OrderContext,
        present_before: bool,
        present_after: bool,
    ) -> Outcome {
        let state = |present| if present { "present" } else { "absent" };
        self.record(context, state(present_before), state(present_after));
        Outcome {
            before: state(present_before).to_string(),
            after: state(present_after).to_string(),
            already_done: present_before == present_after,
            note: String::new(),
        }
    }

    /// Checks that the order names a leader and this host's zone.
    fn check_order(&self, order: &Order) -> Result<LeaderStamp, Status> {
        let Some(leader) = order.leader else {
            return Err(Status::invalid_argument(format!(
                "order {} has no leader id",
                order.order_id
            )));
        };
        if order.zone != self.zone {
            return Err(Status::invalid_argument(format!(
                "order {} is for zone {:?}, but this host is in zone {:?}",
                order.order_id, order.zone, self.zone
            )));
        }
        Ok(LeaderStamp {
            term: leader.term,
            node_id: leader.node_id,
        })
    }
}

/// Maps a hypervisor failure to the gRPC status table in this module's doc.
fn hypervisor_status(error: HypervisorError) -> Status {
    match error {
        HypervisorError::Libvirt { .. } | HypervisorError::MigrationUnsupported { .. } => {
            Status::internal(error.to_string())
        }
        HypervisorError::PoolMissing { .. }
        | HypervisorError::NetworkConflict { .. }
        | HypervisorError::VolumeInUse { .. }
        | HypervisorError::MigrationSourceMissing { .. } => Status::aborted(error.to_string()),
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn execute(&self, request: Request<Order>) -> Result<Response<OrderResult>, Status> {
        let order = request.into_inner();
        let stamp = self.check_order(&order)?;
        let task = Task::from_order(&order)?;
        let context = OrderContext {
            order_id: order.order_id,
            stamp,
            accepted_before: self.fence.accepted().await,
            action: task.action(),
            subject: task.subject().to_string(),
        };
        let result = match &task {
            Task::Migrate(spec, destination) => {
                migration::migrate(self, &context, &order, spec, destination).await
            }
            _ => self.run_local(&context, task).await,
        };
        match result {
            Ok(outcome) => {
                tracing::info!(
                    order_id = order.order_id, term = stamp.term, leader = stamp.node_id,
                    instance_id = %context.subject, action = context.action,
                    before = %outcome.before, after = %outcome.after,
                    already_done = outcome.already_done, note = %outcome.note,
                    "executed order"
                );
                metrics::counter!("ccs_agent_orders_total", "outcome" => "done").increment(1);
                Ok(Response::new(OrderResult {
                    order_id: order.order_id,
                    domain_state: outcome.after,
                    already_done: outcome.already_done,
                    note: outcome.note,
                }))
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Err(status),
            Err(status) => {
                tracing::warn!(
                    order_id = order.order_id,
                    instance_id = %context.subject,
                    action = context.action,
                    code = ?status.code(),
                    error = status.message(),
                    "order failed"
                );
                metrics::counter!("ccs_agent_orders_total", "outcome" => "failed").increment(1);
                Err(status)
            }
        }
    }

    async fn list_domains(
        &self,
        _request: Request<ListDomainsRequest>,
    ) -> Result<Response<DomainList>, Status> {
        Ok(Response::new(DomainList {
            host_id: self.host_id.clone(),
            domains: self.list().await?,
        }))
    }
}

fn unix_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// Returns a value that differs at every agent start: nanoseconds since the epoch.
fn new_boot_id() -> u64 {
    unix_time_ns()
}

/// Registers the host, retrying until the zone accepts it.
async fn register(connector: &ZoneConnector, request: RegisterHostRequest) {
    let mut delay = Duration::from_millis(200);
    loop {
        let message = request.clone();
        match connector
            .call(|mut c| {
                let m = message.clone();
                async move { c.register_host(m).await }
            })
            .await
        {
            Ok(host) => {
                tracing::info!(host_id = %host.id, pod = %host.pod, cpus = host.cpus, memory_mib = host.memory_mib, "registered with zone");
                return;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "registration failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Lists what the host has for a heartbeat: domains, volumes and networks.
async fn host_report(service: &AgentService) -> Result<HeartbeatRequest, Status> {
    let domains = service.list().await?;
    let volumes = service.blocking(|h| h.list_volumes()).await?;
    let networks = service.blocking(|h| h.list_networks()).await?;
    Ok(HeartbeatRequest {
        host_id: service.host_id.clone(),
        domains: domains
            .into_iter()
            .map(|d| HostDomain {
                uuid: d.uuid,
                name: d.name,
                state: d.state,
                vcpus: d.vcpus,
                memory_mib: d.memory_mib,
            })
            .collect(),
        volumes,
        networks,
    })
}

/// Sends heartbeats with the host's domains, volumes and networks until
/// the process stops. A period whose listing fails sends no heartbeat,
/// because a partial list would read as missing volumes or networks.
async fn heartbeat_loop(connector: ZoneConnector, service: Arc<AgentService>, period: Duration) {
    let mut failures: u64 = 0;
    loop {
        tokio::time::sleep(period).await;
        let request = match host_report(&service).await {
            Ok(request) => request,
            Err(status) => {
                tracing::warn!(
                    message = status.message(),
                    "listing the host for heartbeat failed"
                );
                continue;
            }
        };
        let sent = connector
            .call(|mut c| {
                let r = request.clone();
                async move { c.heartbeat(r).await }
            })
            .await;
        match sent {
            Ok(_) => failures = 0,
            Err(status) => {
                failures += 1;
                // Log the first failure and then every tenth, not every period.
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(failures, code = ?status.code(), message = status.message(), "heartbeat failed");
                }
            }
        }
    }
}

/// Runs an agent from its config file until SIGINT or SIGTERM.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config: AgentConfig = config::load(config_path)?;
    config.validate(config_path)?;
    crate::telemetry::init_tracing(config.log_json);
    // Every log line of this process, including spawned tasks, carries the zone and host id.
    let span = tracing::info_span!("agent", zone = %config.zone, host_id = %config.host_id);
    serve(config).instrument(span).await
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    let uri = config.libvirt_uri.clone();
    let settings = LibvirtSettings {
        local_pool: config.local_pool.clone(),
        local_pool_dir: config.local_pool_path(),
        san_pool: config.san_pool.clone(),
        fronts_san: config.san_pool_gib > 0,
        network_bridge: config.network_bridge.clone(),
    };
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(
        tokio::task::spawn_blocking(move || Libvirt::open(&uri, settings))
            .await?
            .with_context(|| format!("opening libvirt at {}", config.libvirt_uri))?,
    );
    let capacity = {
        let hypervisor = hypervisor.clone();
        tokio::task::spawn_blocking(move || hypervisor.capacity()).await??
    };
    // The pools this host owns must be usable before it takes orders: a
    // missing SAN pool stops the agent with an error naming it.
    let mut pools = vec![PoolKind::Local];
    if config.san_pool_gib > 0 {
        pools.push(PoolKind::San);
    }
    for pool in pools {
        let hypervisor = hypervisor.clone();
        tokio::task::spawn_blocking(move || hypervisor.ensure_pool(pool))
            .await?
            .with_context(|| format!("preparing the {} storage pool", pool.as_str()))?;
    }
    let fence = Arc::new(Fence::open(&config.data_dir)?);
    let mut service = AgentService::new(
        config.host_id.clone(),
        config.zone.clone(),
        hypervisor,
        fence,
    )
    .with_fencing_skipped(config.unsafe_canary.skip_fencing)
    .with_san_front(config.san_pool_gib > 0);
    if config.unsafe_canary.skip_fencing {
        tracing::warn!("UNSAFE CANARY ON: fencing is off; never use it on a real host");
    }
    if let Some(path) = &config.ledger {
        let ledger =
            Ledger::open(path).with_context(|| format!("opening ledger {}", path.display()))?;
        service = service.with_ledger(ledger);
    }
    let service = Arc::new(service);

    let registered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ready_flag = registered.clone();
    let readiness: crate::telemetry::Readiness = Arc::new(move || {
        if ready_flag.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else {
            Err("not registered with the zone yet".to_string())
        }
    });
    let grpc_listener = crate::telemetry::bind(config.listen, "the agent API").await?;
    let metrics_listener = crate::telemetry::bind(config.metrics_listen, "metrics").await?;
    tokio::spawn(
        async move {
            if let Err(e) = crate::telemetry::serve_metrics(metrics_listener, readiness).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        }
        .in_current_span(),
    );

    let connector = ZoneConnector::new(&config.controllers.join(","), Duration::from_secs(10))
        .map_err(anyhow::Error::msg)?;
    let registration = RegisterHostRequest {
        host_id: config.host_id.clone(),
        pod: config.pod.clone(),
        libvirt_uri: config.libvirt_uri.clone(),
        agent_endpoint: config.advertise_addr(),
        cpus: capacity.cpus,
        memory_mib: capacity.memory_mib,
        disk_gib: config.disk_gib,
        boot_id: new_boot_id(),
        san_pool_gib: config.san_pool_gib,
    };
    let server = tonic::transport::Server::builder()
        .add_service(AgentServer::from_arc(service.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            crate::controller::shutdown_signal(),
        );
    tracing::info!(listen = %config.listen, uri = %config.libvirt_uri, "agent serving");
    let heartbeat_period = config.heartbeat_interval;
    tokio::spawn(
        async move {
            register(&connector, registration).await;
            registered.store(true, std::sync::atomic::Ordering::Relaxed);
            heartbeat_loop(connector, service, heartbeat_period).await;
        }
        .in_current_span(),
    );
    server.await?;
    tracing::info!("agent stopped");
    Ok(())
}
