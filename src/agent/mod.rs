//! The host agent: registers its host with the zone, sends heartbeats with
//! the domains libvirt reports, and executes the leader's orders through the
//! `Hypervisor` trait. Orders are fenced by leader id (see `fence`) and
//! idempotent, because a domain's UUID is its instance id.
//!
//! Every executed order is logged at info level with its order id, leader id
//! and outcome, which makes the log a ledger of side effects.

pub mod fence;
pub mod ledger;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::Instrument;
use tonic::{Request, Response, Status};

use crate::client::ZoneConnector;
use crate::config::{self, AgentConfig};
use crate::hypervisor::{DomainRunState, DomainSpec, Hypervisor, Libvirt};
use crate::proto::agent::agent_server::{Agent, AgentServer};
use crate::proto::agent::{Domain, DomainList, ListDomainsRequest, Order, OrderAction, OrderResult};
use crate::proto::zone::{HeartbeatRequest, HostDomain, RegisterHostRequest};
use crate::zone::model::LeaderStamp;
use fence::{Fence, FenceError};
use ledger::{Ledger, LedgerEntry};

pub struct AgentService {
    host_id: String,
    zone: String,
    hypervisor: Arc<dyn Hypervisor>,
    fence: Arc<Fence>,
    /// Record of executed orders, when the config names a ledger file.
    ledger: Option<Ledger>,
    /// The `skip_fencing` canary: execute orders from stale leaders too.
    skip_fencing: bool,
}

impl AgentService {
    pub fn new(host_id: String, zone: String, hypervisor: Arc<dyn Hypervisor>, fence: Arc<Fence>) -> Self {
        AgentService {
            host_id,
            zone,
            hypervisor,
            fence,
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

    async fn list(&self) -> Result<Vec<Domain>, Status> {
        let hypervisor = self.hypervisor.clone();
        let domains = tokio::task::spawn_blocking(move || hypervisor.list_domains())
            .await
            .map_err(|e| Status::internal(format!("libvirt task failed: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
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
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn execute(&self, request: Request<Order>) -> Result<Response<OrderResult>, Status> {
        let order = request.into_inner();
        let Some(leader) = order.leader else {
            return Err(Status::invalid_argument(format!("order {} has no leader id", order.order_id)));
        };
        if order.zone != self.zone {
            return Err(Status::invalid_argument(format!(
                "order {} is for zone {:?}, but this host is in zone {:?}",
                order.order_id, order.zone, self.zone
            )));
        }
        let stamp = LeaderStamp {
            term: leader.term,
            node_id: leader.node_id,
        };
        let accepted_before = self.fence.accepted().await;
        let guard = match self.fence.admit(stamp).await {
            Ok(guard) => Some(guard),
            Err(FenceError::Stale { .. }) if self.skip_fencing => {
                tracing::warn!(order_id = order.order_id, term = stamp.term, leader = stamp.node_id, "executing order from stale leader: fencing is off (canary)");
                None
            }
            Err(error @ FenceError::Stale { .. }) => {
                tracing::warn!(order_id = order.order_id, term = stamp.term, leader = stamp.node_id, %error, "rejected order from stale leader");
                metrics::counter!("ccs_agent_orders_total", "outcome" => "fenced").increment(1);
                return Err(Status::failed_precondition(error.to_string()));
            }
            Err(error) => return Err(Status::internal(error.to_string())),
        };
        let action = OrderAction::try_from(order.action).unwrap_or(OrderAction::Unspecified);
        let hypervisor = self.hypervisor.clone();
        let spec = DomainSpec {
            uuid: order.instance_id.clone(),
            name: order.instance_name.clone(),
            vcpus: order.vcpus,
            memory_mib: order.memory_mib,
        };
        let outcome = tokio::task::spawn_blocking(move || match action {
            OrderAction::Start => hypervisor.ensure_running(&spec).map(|before| (before, DomainRunState::Running)),
            OrderAction::Destroy | OrderAction::Stop => {
                hypervisor.ensure_absent(&spec.uuid).map(|before| (before, DomainRunState::Absent))
            }
            // Replaced by the agent work of issue 4.
            OrderAction::Unspecified | _ => Err(crate::hypervisor::HypervisorError::Libvirt {
                operation: "order",
                message: format!("unknown order action {}", order.action),
            }),
        })
        .await
        .map_err(|e| Status::internal(format!("libvirt task failed: {e}")))?;
        drop(guard);
        match outcome {
            Ok((before, after)) => {
                let already_done = before == after;
                if let Some(ledger) = &self.ledger {
                    ledger.record(&LedgerEntry {
                        time_unix_ns: unix_time_ns(),
                        host_id: self.host_id.clone(),
                        order_id: order.order_id,
                        leader: stamp,
                        accepted_before,
                        instance_id: order.instance_id.clone(),
                        action: ledger_action(action).to_string(),
                        before: before.as_str().to_string(),
                        after: after.as_str().to_string(),
                    });
                }
                tracing::info!(
                    order_id = order.order_id, term = stamp.term, leader = stamp.node_id,
                    instance_id = %order.instance_id, action = action.as_str_name(),
                    before = before.as_str(), after = after.as_str(), already_done,
                    "executed order"
                );
                metrics::counter!("ccs_agent_orders_total", "outcome" => "done").increment(1);
                Ok(Response::new(OrderResult {
                    order_id: order.order_id,
                    domain_state: after.as_str().to_string(),
                    already_done,
                    ..Default::default()
                }))
            }
            Err(error) => {
                tracing::warn!(order_id = order.order_id, instance_id = %order.instance_id, %error, "order failed");
                metrics::counter!("ccs_agent_orders_total", "outcome" => "failed").increment(1);
                Err(Status::internal(error.to_string()))
            }
        }
    }

    async fn list_domains(&self, _request: Request<ListDomainsRequest>) -> Result<Response<DomainList>, Status> {
        Ok(Response::new(DomainList {
            host_id: self.host_id.clone(),
            domains: self.list().await?,
        }))
    }
}

fn ledger_action(action: OrderAction) -> &'static str {
    match action {
        OrderAction::Start => "start",
        OrderAction::Stop => "stop",
        OrderAction::Destroy => "destroy",
        _ => "unspecified",
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
        match connector.call(|mut c| { let m = message.clone(); async move { c.register_host(m).await } }).await {
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

/// Sends heartbeats with the host's domains until the process stops.
async fn heartbeat_loop(connector: ZoneConnector, service: Arc<AgentService>, period: Duration) {
    let mut failures: u64 = 0;
    loop {
        tokio::time::sleep(period).await;
        let domains = match service.list().await {
            Ok(domains) => domains,
            Err(status) => {
                tracing::warn!(message = status.message(), "listing domains for heartbeat failed");
                continue;
            }
        };
        let request = HeartbeatRequest {
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
            ..Default::default()
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
    let hypervisor: Arc<dyn Hypervisor> = Arc::new(
        tokio::task::spawn_blocking(move || Libvirt::open(&uri))
            .await?
            .with_context(|| format!("opening libvirt at {}", config.libvirt_uri))?,
    );
    let capacity = {
        let hypervisor = hypervisor.clone();
        tokio::task::spawn_blocking(move || hypervisor.capacity()).await??
    };
    let fence = Arc::new(Fence::open(&config.data_dir)?);
    let mut service = AgentService::new(config.host_id.clone(), config.zone.clone(), hypervisor, fence)
        .with_fencing_skipped(config.unsafe_canary.skip_fencing);
    if config.unsafe_canary.skip_fencing {
        tracing::warn!("UNSAFE CANARY ON: fencing is off; never use it on a real host");
    }
    if let Some(path) = &config.ledger {
        let ledger = Ledger::open(path).with_context(|| format!("opening ledger {}", path.display()))?;
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
        ..Default::default()
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
