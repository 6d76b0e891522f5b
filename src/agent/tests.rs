//! Agent tests on libvirt's test driver: each agent has its own host file,
//! so its own private driver, and serves gRPC on an ephemeral 127.0.0.1
//! port, because an emulated migration calls the destination's agent.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request};

use super::*;
use crate::hypervisor::{DefineOutcome, DomainSummary, MigrateOutcome, NetworkSpec, NodeCapacity};
use crate::proto::agent::{Destination, Disk, LeaderId, Nic, OrderAction, VolumeSpec};

const ZONE: &str = "test-zone";
const UUID: &str = "0d7e3c5a-1f2b-4a6c-8d9e-3b4c5d6e7f80";
/// A host of 8 CPUs and 16 GiB for the test driver (memory in KiB).
const HOST_XML: &str = "<node><cpu><mhz>2600</mhz><model>x86_64</model><active>8</active>\
    <max>8</max><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>2</threads></cpu>\
    <memory>16777216</memory></node>";

/// One agent with its own test driver, served on 127.0.0.1.
struct TestAgent {
    host_id: String,
    service: Arc<AgentService>,
    hypervisor: Arc<Libvirt>,
    endpoint: String,
    dir: tempfile::TempDir,
}

async fn start_agent(host_id: &str) -> TestAgent {
    start_agent_with(host_id, |libvirt| libvirt).await
}

/// Starts an agent whose hypervisor is `wrap` around its test driver.
async fn start_agent_with(
    host_id: &str,
    wrap: impl FnOnce(Arc<Libvirt>) -> Arc<dyn Hypervisor>,
) -> TestAgent {
    let dir = tempfile::tempdir().expect("temp dir");
    let host_file = dir.path().join("host.xml");
    std::fs::write(&host_file, HOST_XML).expect("writing host XML");
    let settings = LibvirtSettings {
        local_pool: "ccs-local".to_string(),
        local_pool_dir: dir.path().join("volumes"),
        san_pool: "ccs-san".to_string(),
        fronts_san: true,
        network_bridge: "br-ccs".to_string(),
    };
    let uri = format!("test://{}", host_file.display());
    let hypervisor = Arc::new(Libvirt::open(&uri, settings).expect("opening the test driver"));
    let fence = Arc::new(Fence::open(&dir.path().join("fence")).expect("fence"));
    let ledger = Ledger::open(&dir.path().join("ledger.jsonl")).expect("ledger");
    let service = AgentService::new(
        host_id.to_string(),
        ZONE.to_string(),
        wrap(hypervisor.clone()),
        fence,
    )
    .with_ledger(ledger)
    .with_san_front(true);
    let service = Arc::new(service);

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = listener.local_addr().expect("local address").to_string();
    let server = tonic::transport::Server::builder()
        .add_service(AgentServer::from_arc(service.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    TestAgent {
        host_id: host_id.to_string(),
        service,
        hypervisor,
        endpoint,
        dir,
    }
}

/// The test driver, except that starting a domain fails: a destination
/// that accepts DEFINE and then cannot START.
struct StartFails(Arc<Libvirt>);

impl Hypervisor for StartFails {
    fn capacity(&self) -> Result<NodeCapacity, HypervisorError> {
        self.0.capacity()
    }
    fn define(&self, spec: &DomainSpec, start: bool) -> Result<DefineOutcome, HypervisorError> {
        if start {
            return Err(HypervisorError::Libvirt {
                operation: "start domain",
                message: "start failure injected by the test".to_string(),
            });
        }
        self.0.define(spec, start)
    }
    fn domain_state(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        self.0.domain_state(uuid)
    }
    fn ensure_stopped(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        self.0.ensure_stopped(uuid)
    }
    fn ensure_absent(&self, uuid: &str) -> Result<DomainRunState, HypervisorError> {
        self.0.ensure_absent(uuid)
    }
    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        self.0.list_domains()
    }
    fn ensure_pool(&self, pool: PoolKind) -> Result<(), HypervisorError> {
        self.0.ensure_pool(pool)
    }
    fn ensure_volume(
        &self,
        pool: PoolKind,
        id: &str,
        size_gib: u64,
    ) -> Result<bool, HypervisorError> {
        self.0.ensure_volume(pool, id, size_gib)
    }
    fn delete_volume(&self, pool: PoolKind, id: &str) -> Result<bool, HypervisorError> {
        self.0.delete_volume(pool, id)
    }
    fn list_volumes(&self) -> Result<Vec<String>, HypervisorError> {
        self.0.list_volumes()
    }
    fn ensure_network(&self, network: &NetworkSpec) -> Result<bool, HypervisorError> {
        self.0.ensure_network(network)
    }
    fn list_networks(&self) -> Result<Vec<String>, HypervisorError> {
        self.0.list_networks()
    }
    fn remove_unused_networks(&self) -> Result<Vec<String>, HypervisorError> {
        self.0.remove_unused_networks()
    }
    fn can_migrate(&self) -> bool {
        self.0.can_migrate()
    }
    fn migrate(&self, uuid: &str, uri: &str) -> Result<MigrateOutcome, HypervisorError> {
        self.0.migrate(uuid, uri)
    }
}

impl TestAgent {
    async fn execute(&self, order: Order) -> Result<OrderResult, Status> {
        self.service
            .execute(Request::new(order))
            .await
            .map(|r| r.into_inner())
    }

    fn state(&self) -> DomainRunState {
        self.hypervisor.domain_state(UUID).expect("domain state")
    }

    fn networks(&self) -> Vec<String> {
        self.hypervisor.list_networks().expect("list networks")
    }

    fn ledger(&self) -> Vec<(String, String, String)> {
        let entries = ledger::read(&self.dir.path().join("ledger.jsonl")).expect("ledger");
        entries
            .into_iter()
            .map(|e| (e.action, e.before, e.after))
            .collect()
    }

    /// Returns the time of the first ledger entry with `action` and state `after`.
    fn ledger_time(&self, action: &str, after: &str) -> u64 {
        let entries = ledger::read(&self.dir.path().join("ledger.jsonl")).expect("ledger");
        let entry = entries
            .iter()
            .find(|e| e.action == action && e.after == after);
        entry.expect("ledger entry").time_unix_ns
    }

    fn destination(&self) -> Destination {
        Destination {
            host_id: self.host_id.clone(),
            agent_endpoint: self.endpoint.clone(),
            libvirt_uri: "test:///unused".to_string(),
        }
    }
}

fn nic(network: &str, segmentation_id: u32, mac: &str) -> Nic {
    Nic {
        network: network.to_string(),
        mode: "vlan".to_string(),
        segmentation_id,
        mac: mac.to_string(),
        ip: "10.0.0.5".to_string(),
        prefix_len: 24,
    }
}

/// Builds an order for the test instance, with one SAN disk and one NIC on "blue".
fn order(order_id: u64, term: u64, action: OrderAction) -> Order {
    Order {
        order_id,
        leader: Some(LeaderId { term, node_id: 1 }),
        action: action as i32,
        instance_id: UUID.to_string(),
        instance_name: "web-1".to_string(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 10,
        zone: ZONE.to_string(),
        disks: vec![Disk {
            volume_id: "vol-1".to_string(),
            pool: "san".to_string(),
            size_gib: 10,
        }],
        nics: vec![nic("blue", 100, "52:54:00:00:00:01")],
        ..Default::default()
    }
}

fn volume_order(order_id: u64, action: OrderAction) -> Order {
    Order {
        order_id,
        leader: Some(LeaderId {
            term: 1,
            node_id: 1,
        }),
        action: action as i32,
        zone: ZONE.to_string(),
        volume: Some(VolumeSpec {
            volume_id: "vol-9".to_string(),
            pool: "local".to_string(),
            size_gib: 20,
        }),
        ..Default::default()
    }
}

fn migrate_order(order_id: u64, term: u64, destination: &TestAgent) -> Order {
    Order {
        destination: Some(destination.destination()),
        ..order(order_id, term, OrderAction::Migrate)
    }
}

fn entry(action: &str, before: &str, after: &str) -> (String, String, String) {
    (action.to_string(), before.to_string(), after.to_string())
}

#[tokio::test]
async fn start_then_destroy_removes_network() {
    let agent = start_agent("host-1").await;
    let started = agent
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");
    assert_eq!(started.domain_state, "running");
    assert!(!started.already_done);
    assert_eq!(agent.networks(), vec!["blue".to_string()]);

    let destroyed = agent
        .execute(order(2, 1, OrderAction::Destroy))
        .await
        .expect("destroy");
    assert_eq!(destroyed.domain_state, "absent");
    assert!(agent.networks().is_empty());
    assert_eq!(
        agent.ledger(),
        vec![
            entry("start", "absent", "running"),
            entry("destroy", "running", "absent")
        ]
    );
}

#[tokio::test]
async fn start_twice_already_done() {
    let agent = start_agent("host-1").await;
    agent
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");
    let again = agent
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start again");
    assert!(again.already_done);
    assert!(again.note.is_empty(), "{}", again.note);
}

#[tokio::test]
async fn running_device_change_notes_next_start() {
    let agent = start_agent("host-1").await;
    agent
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");

    let mut changed = order(2, 1, OrderAction::Define);
    changed.nics.push(nic("red", 200, "52:54:00:00:00:02"));
    let reply = agent.execute(changed).await.expect("define");
    assert_eq!(reply.domain_state, "running");
    assert!(!reply.already_done);
    assert!(reply.note.contains("next start"), "{}", reply.note);
    assert_eq!(
        agent.networks(),
        vec!["blue".to_string(), "red".to_string()]
    );
}

#[tokio::test]
async fn stop_keeps_domain_defined() {
    let agent = start_agent("host-1").await;
    agent
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");
    let stopped = agent
        .execute(order(2, 1, OrderAction::Stop))
        .await
        .expect("stop");
    assert_eq!(stopped.domain_state, "stopped");
    assert_eq!(agent.state(), DomainRunState::Stopped);
    assert_eq!(agent.networks(), vec!["blue".to_string()]);
}

#[tokio::test]
async fn volume_orders_idempotent() {
    let agent = start_agent("host-1").await;
    let created = agent
        .execute(volume_order(1, OrderAction::CreateVolume))
        .await
        .expect("create");
    assert_eq!(created.domain_state, "present");
    assert!(!created.already_done);
    let again = agent
        .execute(volume_order(1, OrderAction::CreateVolume))
        .await
        .expect("create again");
    assert!(again.already_done);
    assert_eq!(
        agent.hypervisor.list_volumes().expect("list"),
        vec!["vol-9".to_string()]
    );

    let deleted = agent
        .execute(volume_order(2, OrderAction::DeleteVolume))
        .await
        .expect("delete");
    assert_eq!(deleted.domain_state, "absent");
    assert!(!deleted.already_done);
    let again = agent
        .execute(volume_order(2, OrderAction::DeleteVolume))
        .await
        .expect("delete again");
    assert!(again.already_done);
    assert_eq!(
        agent.ledger().first(),
        Some(&entry("create_volume", "absent", "present"))
    );
}

#[tokio::test]
async fn stale_leader_changes_nothing() {
    let agent = start_agent("host-1").await;
    agent
        .execute(order(1, 2, OrderAction::Start))
        .await
        .expect("start");
    let stale = agent.execute(order(2, 1, OrderAction::Destroy)).await;
    assert_eq!(stale.expect_err("fenced").code(), Code::FailedPrecondition);
    assert_eq!(agent.state(), DomainRunState::Running);
}

#[tokio::test]
async fn emulated_migration_moves_domain() {
    let source = start_agent("host-1").await;
    let destination = start_agent("host-2").await;
    source
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");

    let moved = source
        .execute(migrate_order(2, 1, &destination))
        .await
        .expect("migrate");
    assert_eq!(moved.domain_state, "running");
    assert!(moved.note.contains("migration emulated"), "{}", moved.note);
    assert_eq!(source.state(), DomainRunState::Absent);
    assert_eq!(destination.state(), DomainRunState::Running);
    assert!(source.networks().is_empty());
    assert_eq!(destination.networks(), vec!["blue".to_string()]);
    assert_eq!(
        source.ledger(),
        vec![
            entry("start", "absent", "running"),
            entry("migrate", "running", "stopped"),
            entry("migrate", "stopped", "absent"),
        ]
    );
    assert_eq!(
        destination.ledger(),
        vec![
            entry("define", "absent", "stopped"),
            entry("start", "stopped", "running")
        ]
    );

    // Never running on both hosts: the source stopped before the destination started.
    let stopped_here = source.ledger_time("migrate", "stopped");
    let started_there = destination.ledger_time("start", "running");
    assert!(
        stopped_here < started_there,
        "{stopped_here} >= {started_there}"
    );
}

#[tokio::test]
async fn retried_migration_succeeds() {
    let source = start_agent("host-1").await;
    let destination = start_agent("host-2").await;
    source
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");
    source
        .execute(migrate_order(2, 1, &destination))
        .await
        .expect("migrate");

    let retried = source
        .execute(migrate_order(2, 1, &destination))
        .await
        .expect("retried migrate");
    assert_eq!(retried.domain_state, "running");
    assert!(retried.already_done);
    assert_eq!(source.state(), DomainRunState::Absent);
    assert_eq!(destination.state(), DomainRunState::Running);
}

#[tokio::test]
async fn retry_after_source_removed_starts_destination() {
    // The first attempt stopped at "undefined here, not started there":
    // here absent, there defined but stopped.
    let source = start_agent("host-1").await;
    let destination = start_agent("host-2").await;
    destination
        .execute(order(1, 1, OrderAction::Define))
        .await
        .expect("define on destination");

    let retried = source
        .execute(migrate_order(2, 1, &destination))
        .await
        .expect("retried migrate");
    assert_eq!(retried.domain_state, "running");
    assert!(!retried.already_done);
    assert_eq!(destination.state(), DomainRunState::Running);
}

#[tokio::test]
async fn fenced_destination_fails_migration() {
    let source = start_agent("host-1").await;
    let destination = start_agent("host-2").await;
    source
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");
    // The destination has obeyed a newer leader (term 5).
    let mut newer = order(8, 5, OrderAction::Stop);
    newer.instance_id = "1a2b3c4d-0000-4000-8000-000000000000".to_string();
    destination
        .execute(newer)
        .await
        .expect("newer leader admitted");

    let failed = source
        .execute(migrate_order(2, 1, &destination))
        .await
        .expect_err("destination fenced");
    assert_eq!(failed.code(), Code::Aborted);
    assert!(failed.message().contains("host-2"), "{}", failed.message());
    assert_eq!(source.state(), DomainRunState::Running);
    assert_eq!(destination.state(), DomainRunState::Absent);
}

#[tokio::test]
async fn unreachable_destination_fails_migration() {
    let source = start_agent("host-1").await;
    source
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");
    // A loopback port that was free a moment ago and has no listener now.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = closed.local_addr().expect("local address").to_string();
    drop(closed);
    let mut migrate = order(2, 1, OrderAction::Migrate);
    migrate.destination = Some(Destination {
        host_id: "host-9".to_string(),
        agent_endpoint: address,
        libvirt_uri: "test:///unused".to_string(),
    });

    let failed = source.execute(migrate).await.expect_err("unreachable");
    assert_eq!(failed.code(), Code::Unavailable);
    assert_eq!(source.state(), DomainRunState::Running);
}

#[tokio::test]
async fn failed_destination_start_restarts_source() {
    let source = start_agent("host-1").await;
    let destination = start_agent_with("host-2", |libvirt| Arc::new(StartFails(libvirt))).await;
    source
        .execute(order(1, 1, OrderAction::Start))
        .await
        .expect("start");

    let failed = source
        .execute(migrate_order(2, 1, &destination))
        .await
        .expect_err("destination cannot start");
    assert_eq!(failed.code(), Code::Aborted);
    assert!(
        failed.message().contains("ORDER_ACTION_START"),
        "{}",
        failed.message()
    );
    assert_eq!(source.state(), DomainRunState::Running);
    // The destination keeps the stopped definition; a retry or DESTROY clears it.
    assert_eq!(destination.state(), DomainRunState::Stopped);
    assert_eq!(
        source.ledger(),
        vec![
            entry("start", "absent", "running"),
            entry("migrate", "running", "stopped"),
            entry("migrate", "stopped", "running"),
        ]
    );
}
