//! One controller replica: opens its RocksDB store, runs its openraft node,
//! serves the zone API and the Raft transport on one gRPC port, and runs
//! the reconciler while it leads.

pub mod drift;
pub mod error;
pub mod fencing;
pub mod node;
pub mod ops;
pub mod reconciler;
pub mod resources;
pub mod service;
pub mod status;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tracing::Instrument;
use openraft::{BasicNode, ServerState, SnapshotPolicy};

use crate::config::{self, ControllerConfig};
use crate::proto::raft::raft_transport_server::RaftTransportServer;
use crate::proto::zone::zone_server::ZoneServer;
use crate::raft::network::{Network, TransportService};
use crate::raft::types::Raft;
use crate::store::{db, log_store::LogStore, state_machine::StateMachine};
use crate::zone::model::LeaderStamp;

use node::Node;
use ops::Zone;

fn raft_config(config: &ControllerConfig) -> anyhow::Result<openraft::Config> {
    let tuning = &config.raft;
    let raft = openraft::Config {
        cluster_name: config.zone.clone(),
        heartbeat_interval: tuning.heartbeat_interval.as_millis() as u64,
        election_timeout_min: tuning.election_timeout_min.as_millis() as u64,
        election_timeout_max: tuning.election_timeout_max.as_millis() as u64,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_after_entries),
        max_in_snapshot_log_to_keep: tuning.keep_entries_after_snapshot,
        snapshot_max_chunk_size: 1024 * 1024,
        ..Default::default()
    };
    Ok(raft.validate()?)
}

/// Opens the replica's storage and starts its Raft node.
pub async fn open_node(config: ControllerConfig) -> anyhow::Result<(Arc<Node>, StateMachine)> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let database = db::open(&config.data_dir.join("db"))
        .with_context(|| format!("opening RocksDB under {}", config.data_dir.display()))?;
    let canary = &config.unsafe_canary;
    if canary.any() {
        tracing::warn!(skip_fsync = canary.skip_fsync, local_reads = canary.local_reads,
            "UNSAFE CANARY ON: this replica breaks safety on purpose; never use it for a real zone");
    }
    let log_store = LogStore::with_fsync(database.clone(), !canary.skip_fsync);
    let state_machine = StateMachine::open(database.clone(), &config.data_dir.join("snapshots"))?;
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config(&config)?),
        Network,
        log_store,
        state_machine.clone(),
    )
    .await?;
    if !config.bootstrap.is_empty() && !raft.is_initialized().await? {
        let members: BTreeMap<u64, BasicNode> = config
            .bootstrap
            .iter()
            .map(|m| (m.id, BasicNode { addr: m.addr.clone() }))
            .collect();
        tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initializing zone");
        if let Err(e) = raft.initialize(members).await {
            // Another bootstrap member may have initialized the zone first.
            tracing::info!(error = %e, "zone initialization skipped");
        }
    }
    let node = Node {
        id: config.node_id,
        zone: config.zone.clone(),
        addr: config.advertise_addr(),
        raft,
        db: database,
        config,
    };
    Ok((Arc::new(node), state_machine))
}

/// Runs a controller replica from its config file until SIGINT or SIGTERM.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    let config: ControllerConfig = config::load(config_path)?;
    config.validate(config_path)?;
    crate::telemetry::init_tracing(config.log_json);
    // Every log line of this process, including spawned tasks, carries the zone and node id.
    let span = tracing::info_span!("controller", zone = %config.zone, node_id = config.node_id);
    serve(config).instrument(span).await
}

async fn serve(config: ControllerConfig) -> anyhow::Result<()> {
    // Bind both ports before touching the Raft log, so that a taken port
    // stops the replica before it initializes or campaigns.
    let grpc_listener = crate::telemetry::bind(config.listen, "the zone API").await?;
    let metrics_listener = crate::telemetry::bind(config.metrics_listen, "metrics").await?;
    let listen = config.listen;
    let (node, state_machine) = open_node(config).await?;
    let zone = Arc::new(Zone::new(node.clone()));

    let ready_node = node.clone();
    let readiness: crate::telemetry::Readiness = Arc::new(move || match ready_node.leader() {
        Some(_) => Ok(()),
        None => Err("no known leader".to_string()),
    });
    tokio::spawn(
        async move {
            if let Err(e) = crate::telemetry::serve_metrics(metrics_listener, readiness).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        }
        .in_current_span(),
    );
    tokio::spawn(lead_while_leader(zone.clone(), state_machine.subscribe_applied()).in_current_span());

    let transport = RaftTransportServer::new(TransportService { raft: node.raft.clone() })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let api = ZoneServer::new(service::ZoneService::new(zone.clone()));
    tracing::info!(%listen, "serving zone API and raft transport");
    tonic::transport::Server::builder()
        .add_service(transport)
        .add_service(api)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            shutdown_signal(),
        )
        .await?;
    tracing::info!("shutting down");
    node.raft.shutdown().await.ok();
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Starts the reconciler each time this replica becomes leader and stops it
/// when it steps down; also exports Raft state as metrics.
async fn lead_while_leader(zone: Arc<Zone>, applied: tokio::sync::watch::Receiver<u64>) {
    let mut metrics_rx = zone.node.raft.metrics();
    let mut reconciler: Option<(tokio::task::JoinHandle<()>, LeaderStamp)> = None;
    let mut last_leader = None;
    loop {
        let metrics = metrics_rx.borrow_and_update().clone();
        metrics::gauge!("ccs_raft_term").set(metrics.current_term as f64);
        metrics::gauge!("ccs_raft_last_log_index").set(metrics.last_log_index.unwrap_or(0) as f64);
        metrics::gauge!("ccs_raft_commit_index").set(status::known_commit_index(&zone.node) as f64);
        metrics::gauge!("ccs_raft_is_leader").set(f64::from(u8::from(metrics.state == ServerState::Leader)));
        if metrics.current_leader != last_leader {
            metrics::counter!("ccs_raft_leader_changes_total").increment(1);
            tracing::info!(term = metrics.current_term, leader = ?metrics.current_leader, "leader changed");
            last_leader = metrics.current_leader;
        }
        let stamp = zone.node.leader_stamp();
        let running = reconciler.as_ref().map(|(_, running)| *running);
        if running != stamp {
            if let Some((task, _)) = reconciler.take() {
                tracing::info!(term = metrics.current_term, "leadership changed; stopping reconciler");
                task.abort();
            }
            if let Some(stamp) = stamp {
                let task = reconciler::Reconciler::new(zone.clone(), stamp).run(applied.clone());
                reconciler = Some((tokio::spawn(task.in_current_span()), stamp));
                tokio::spawn(finish_joint_membership(zone.clone()).in_current_span());
            }
        }
        if metrics_rx.changed().await.is_err() {
            return;
        }
    }
}

/// Finishes a membership change that a previous leader left in its joint
/// phase. openraft does not leave a joint configuration on its own, and
/// while one is in effect every further AddReplica or RemoveReplica is
/// refused, so a new leader moves the zone to the newer of the two configs.
async fn finish_joint_membership(zone: Arc<Zone>) {
    let membership = zone.node.raft.metrics().borrow().membership_config.membership().clone();
    let configs = membership.get_joint_config();
    if configs.len() < 2 {
        return;
    }
    let Some(target) = configs.last().cloned() else {
        return;
    };
    tracing::info!(voters = ?target, "finishing a membership change left in its joint phase");
    let change = openraft::ChangeMembers::ReplaceAllVoters(target.clone());
    match zone.node.raft.change_membership(change, false).await {
        Ok(_) => tracing::info!(voters = ?target, "membership change finished"),
        Err(error) => tracing::warn!(voters = ?target, %error, "finishing the membership change failed; the next leader or change retries"),
    }
}
