//! The shared fixture of the integration tests: a zone of `ccs` controller
//! and agent processes on free loopback ports, with every config, database
//! and log in one temporary directory.
//!
//! Each test owns its `Cluster`, so tests run in parallel. Dropping the
//! cluster kills every process it started. When the test is panicking, the
//! drop first prints how each process ended and the end of its log, so a
//! failed assertion comes with what the zone was doing. Set
//! `CCS_KEEP_TEST_DIR=1` to keep a failed test's directory and full logs.

// Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ccs::client::{reason, ZoneConnector};
use ccs::config::{AgentConfig, ControllerConfig, Member, RaftTuning};
use ccs::proto::zone::{
    CreateInstanceRequest, CreatePodRequest, GetInstanceRequest, HostDomain, HostRef, Instance,
    ReadRequest, ZoneStatusReply, ZoneStatusRequest,
};
use futures::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::{Code, Status};

pub const ZONE: &str = "test-zone";
/// The one pod of every test cluster. All agents register in it.
pub const POD: &str = "pod-a";
/// Per-call timeout of the connectors the tests use. It is above the
/// controller's 8 s write timeout, so a slow commit comes back as the
/// server's TIMEOUT rather than a client-side deadline.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long cluster start-up may take to elect a leader or see every host up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of each process log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;
/// Environment variable that keeps a failed test's directory, with every
/// config, database and full log, instead of removing it.
const KEEP_DIR_VARIABLE: &str = "CCS_KEEP_TEST_DIR";
/// Each test host: 32 CPUs and 128 GiB of memory (the test driver counts memory in KiB).
const HOST_XML: &str = "<node><cpu><mhz>2600</mhz><model>x86_64</model><active>32</active>\
<max>32</max><nodes>1</nodes><sockets>2</sockets><cores>8</cores><threads>2</threads></cpu>\
<memory>134217728</memory></node>";
/// Disk each test host offers, in GiB.
const HOST_DISK_GIB: u64 = 10_000;
/// CPU oversubscription of the test pod: 32 CPUs give 256 schedulable vCPUs per host.
const POD_CPU_RATIO: f64 = 8.0;

/// Shape of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Controller replicas, with node ids 1 to `controllers`.
    pub controllers: u64,
    /// Agents, with host ids "host-1" to "host-N".
    pub agents: usize,
    pub raft: RaftTuning,
    pub host_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            controllers: 3,
            agents: 2,
            raft: fast_raft(),
            host_timeout: Duration::from_secs(3),
        }
    }
}

/// Raft timings short enough for fast failover, and long enough that two
/// cores running several clusters at once do not cause spurious elections.
pub fn fast_raft() -> RaftTuning {
    RaftTuning {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(500),
        election_timeout_max: Duration::from_millis(1000),
        ..RaftTuning::default()
    }
}

/// One `ccs` child process that the fixture can stop and start again.
struct Process {
    /// Name in log file names and failure output, e.g. "controller-2".
    name: String,
    /// The `ccs` subcommand: "controller" or "agent".
    role: &'static str,
    config_path: PathBuf,
    log_dir: PathBuf,
    /// Starts so far. Each start logs to its own file.
    starts: u32,
    child: Option<Child>,
    /// Whether the test killed the current child on purpose.
    killed: bool,
}

impl Process {
    fn new(name: String, role: &'static str, config_path: PathBuf, log_dir: &Path) -> Process {
        Process {
            name,
            role,
            config_path,
            log_dir: log_dir.to_path_buf(),
            starts: 0,
            child: None,
            killed: false,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.log_dir
            .join(format!("{}.start-{}.log", self.name, self.starts))
    }

    /// Starts the process, for the first time or after the test killed it.
    fn start(&mut self) {
        assert!(
            self.child.is_none() || self.killed,
            "{} is already running",
            self.name
        );
        self.starts += 1;
        let log_path = self.log_path();
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("creating log file {}: {e}", log_path.display()));
        let stderr = log.try_clone().expect("duplicating the log file handle");
        let child = Command::new(env!("CARGO_BIN_EXE_ccs"))
            .arg(self.role)
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
        self.killed = false;
    }

    /// Sends SIGKILL and waits for the process to exit.
    async fn kill(&mut self) {
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        child
            .kill()
            .await
            .unwrap_or_else(|e| panic!("killing {}: {e}", self.name));
        self.killed = true;
    }

    fn is_live(&self) -> bool {
        self.child.is_some() && !self.killed
    }

    /// Returns how the process ended, or "running" while it runs.
    fn describe_exit(&mut self) -> String {
        let Some(child) = self.child.as_mut() else {
            return "not started".to_string();
        };
        match child.try_wait() {
            Ok(None) => "running".to_string(),
            Ok(Some(_)) if self.killed => "killed by the test".to_string(),
            Ok(Some(status)) => format!("exited on its own: {status}"),
            Err(e) => format!("unknown: {e}"),
        }
    }

    /// Kills the process without waiting on the async runtime, then waits
    /// up to 2 s for it to exit so its files are closed before the
    /// temporary directory goes.
    fn kill_now(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let _ = child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub struct ControllerHandle {
    pub id: u64,
    /// gRPC address, `127.0.0.1:port`.
    pub addr: String,
    pub metrics_addr: SocketAddr,
    process: Process,
}

pub struct AgentHandle {
    pub host: String,
    /// gRPC address, `127.0.0.1:port`.
    pub addr: String,
    process: Process,
}

pub struct Cluster {
    options: ClusterOptions,
    controllers: BTreeMap<u64, ControllerHandle>,
    agents: BTreeMap<String, AgentHandle>,
    /// Declared last so that it is removed after the processes are dropped.
    dir: tempfile::TempDir,
}

/// Reserves `count` distinct free loopback ports. The listeners are held
/// until all ports are chosen, then closed so the processes can bind them.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local address of a bound listener")
                .port()
        })
        .collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn write_toml<T: serde::Serialize>(path: &Path, config: &T) {
    let text = toml::to_string(config).expect("test configs serialize to TOML");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Cluster {
    /// Starts a cluster: controllers, a leader, the test pod, agents, and
    /// every host "up" in the zone.
    pub async fn start(options: ClusterOptions) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ccs-test-")
            .tempdir()
            .expect("creating the cluster's temporary directory");
        std::fs::write(dir.path().join("host.xml"), HOST_XML).expect("writing host.xml");
        let mut cluster = Cluster {
            options,
            controllers: BTreeMap::new(),
            agents: BTreeMap::new(),
            dir,
        };

        let ids: Vec<u64> = (1..=cluster.options.controllers).collect();
        let ports = free_ports(ids.len() * 2);
        let bootstrap: Vec<Member> = ids
            .iter()
            .zip(ports.chunks(2))
            .map(|(id, pair)| Member {
                id: *id,
                addr: loopback(pair[0]).to_string(),
            })
            .collect();
        for (id, pair) in ids.iter().zip(ports.chunks(2)) {
            cluster.add_controller(*id, pair[0], pair[1], bootstrap.clone());
        }
        cluster.leader_id().await;
        cluster.create_pod().await;

        let ports = free_ports(cluster.options.agents * 2);
        for (n, pair) in ports.chunks(2).enumerate() {
            cluster.add_agent(&format!("host-{}", n + 1), pair[0], pair[1]);
        }
        cluster.wait_hosts_up().await;
        cluster
    }

    fn add_controller(&mut self, id: u64, port: u16, metrics_port: u16, bootstrap: Vec<Member>) {
        let config = ControllerConfig {
            zone: ZONE.to_string(),
            node_id: id,
            listen: loopback(port),
            advertise: None,
            metrics_listen: loopback(metrics_port),
            data_dir: self.dir.path().join(format!("controller-{id}")),
            bootstrap,
            raft: self.options.raft.clone(),
            host_timeout: self.options.host_timeout,
            log_json: false,
            fencing: Default::default(),
            unsafe_canary: Default::default(),
        };
        let config_path = self.dir.path().join(format!("controller-{id}.toml"));
        write_toml(&config_path, &config);
        let name = format!("controller-{id}");
        let mut process = Process::new(name, "controller", config_path, self.dir.path());
        process.start();
        let handle = ControllerHandle {
            id,
            addr: config.listen.to_string(),
            metrics_addr: config.metrics_listen,
            process,
        };
        self.controllers.insert(id, handle);
    }

    fn add_agent(&mut self, host: &str, port: u16, metrics_port: u16) {
        let host_xml = self.dir.path().join("host.xml");
        let config = AgentConfig {
            zone: ZONE.to_string(),
            host_id: host.to_string(),
            pod: POD.to_string(),
            listen: loopback(port),
            advertise: None,
            metrics_listen: loopback(metrics_port),
            libvirt_uri: format!("test://{}", host_xml.display()),
            disk_gib: HOST_DISK_GIB,
            data_dir: self.dir.path().join(format!("agent-{host}")),
            controllers: self.controllers.values().map(|c| c.addr.clone()).collect(),
            heartbeat_interval: Duration::from_millis(500),
            log_json: false,
            ledger: None,
            san_pool_gib: 0,
            unsafe_canary: Default::default(),
            ..Default::default()
        };
        let config_path = self.dir.path().join(format!("agent-{host}.toml"));
        write_toml(&config_path, &config);
        let name = format!("agent-{host}");
        let mut process = Process::new(name, "agent", config_path, self.dir.path());
        process.start();
        let handle = AgentHandle {
            host: host.to_string(),
            addr: config.listen.to_string(),
            process,
        };
        self.agents.insert(host.to_string(), handle);
    }

    async fn create_pod(&self) {
        let request = CreatePodRequest {
            name: POD.to_string(),
            cpu_ratio: Some(POD_CPU_RATIO),
            memory_ratio: Some(1.0),
            placement: "spread".to_string(),
            ..CreatePodRequest::default()
        };
        let created = self
            .connector()
            .call_until(START_TIMEOUT, |mut client| {
                let request = request.clone();
                async move { client.create_pod(request).await }
            })
            .await;
        match created {
            Ok(_) => {}
            // A retry after a lost reply finds the pod already made.
            Err(status) if reason(&status) == Some("POD_EXISTS") => {}
            Err(status) => panic!("creating pod {POD} failed: {status:?}"),
        }
    }

    async fn wait_hosts_up(&self) {
        let connector = self.connector();
        let expected: BTreeSet<String> = self.agents.keys().cloned().collect();
        wait_for("every host to be up", START_TIMEOUT, async || {
            let hosts = connector
                .call(|mut c| async move { c.list_hosts(ReadRequest { stale: false }).await })
                .await
                .map_err(|s| format!("ListHosts failed: {s:?}"))?;
            let up: BTreeSet<String> = hosts
                .hosts
                .iter()
                .filter(|h| h.health == "up")
                .map(|h| h.id.clone())
                .collect();
            let seen: Vec<(String, String)> = hosts
                .hosts
                .iter()
                .map(|h| (h.id.clone(), h.health.clone()))
                .collect();
            if expected.is_subset(&up) {
                Ok(())
            } else {
                Err(format!("expected {expected:?} up, hosts are {seen:?}"))
            }
        })
        .await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Builds a connector over every controller the cluster has started, live or not.
    pub fn connector(&self) -> ZoneConnector {
        let endpoints: Vec<String> = self.controllers.values().map(|c| c.addr.clone()).collect();
        ZoneConnector::new(&endpoints.join(","), CALL_TIMEOUT).expect("endpoint list is not empty")
    }

    /// Builds a connector that reaches only controller `id`.
    pub fn connector_for(&self, id: u64) -> ZoneConnector {
        ZoneConnector::new(&self.controller(id).addr, CALL_TIMEOUT)
            .expect("endpoint list is not empty")
    }

    pub fn controller(&self, id: u64) -> &ControllerHandle {
        self.controllers
            .get(&id)
            .unwrap_or_else(|| panic!("the cluster has no controller {id}"))
    }

    fn controller_mut(&mut self, id: u64) -> &mut ControllerHandle {
        self.controllers
            .get_mut(&id)
            .unwrap_or_else(|| panic!("the cluster has no controller {id}"))
    }

    /// Node ids of the controllers whose processes the test has not killed.
    pub fn live_controllers(&self) -> Vec<u64> {
        self.controllers
            .values()
            .filter(|c| c.process.is_live())
            .map(|c| c.id)
            .collect()
    }

    pub fn hosts(&self) -> Vec<String> {
        self.agents.keys().cloned().collect()
    }

    pub fn agent_addr(&self, host: &str) -> String {
        self.agent(host).addr.clone()
    }

    fn agent(&self, host: &str) -> &AgentHandle {
        self.agents
            .get(host)
            .unwrap_or_else(|| panic!("the cluster has no agent for host {host}"))
    }

    /// Waits until a live controller reports itself leader, and returns its id.
    pub async fn leader_id(&self) -> u64 {
        self.leader_status().await.leader_id
    }

    /// Waits for a leader and returns the zone status as the leader reports it.
    ///
    /// A replica forwards ZoneStatus to the leader it has learned of, so only
    /// a reply from replica X that names X as leader proves that X leads.
    pub async fn leader_status(&self) -> ZoneStatusReply {
        wait_for(
            "a live controller to lead the zone",
            START_TIMEOUT,
            async || {
                let mut seen = Vec::new();
                for id in self.live_controllers() {
                    let reply = self
                        .connector_for(id)
                        .call(|mut c| async move { c.zone_status(ZoneStatusRequest {}).await })
                        .await;
                    match reply {
                        Ok(status) if status.leader_id == id => return Ok(status),
                        Ok(status) => seen.push(format!("{id}: leader {}", status.leader_id)),
                        Err(e) => seen.push(format!("{id}: {:?} {}", e.code(), e.message())),
                    }
                }
                Err(seen.join("; "))
            },
        )
        .await
    }

    /// Kills controller `id` with SIGKILL and waits for it to exit.
    pub async fn kill_controller(&mut self, id: u64) {
        self.controller_mut(id).process.kill().await;
    }

    /// Starts a killed controller again on the same ports and data directory.
    pub fn restart_controller(&mut self, id: u64) {
        self.controller_mut(id).process.start();
    }

    /// Starts controller `id` with an empty bootstrap list, as a replica
    /// that joins the zone through AddReplica. Returns its gRPC address.
    pub fn start_extra_controller(&mut self, id: u64) -> String {
        assert!(
            !self.controllers.contains_key(&id),
            "controller {id} already exists"
        );
        let ports = free_ports(2);
        self.add_controller(id, ports[0], ports[1], Vec::new());
        self.controller(id).addr.clone()
    }

    pub async fn kill_agent(&mut self, host: &str) {
        self.agent_mut(host).process.kill().await;
    }

    /// Starts a killed agent again. The test driver's domains lived in the
    /// old process, so the new agent starts with none, like a rebooted host.
    pub fn restart_agent(&mut self, host: &str) {
        self.agent_mut(host).process.start();
    }

    fn agent_mut(&mut self, host: &str) -> &mut AgentHandle {
        self.agents
            .get_mut(host)
            .unwrap_or_else(|| panic!("the cluster has no agent for host {host}"))
    }

    /// Reads a counter or gauge from controller `id`'s `/metrics`. Returns
    /// `None` when the metric has not been recorded yet.
    pub async fn controller_metric(&self, id: u64, name: &str) -> Option<f64> {
        let text = http_get(self.controller(id).metrics_addr, "/metrics").await;
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (metric, value) = line.rsplit_once(' ')?;
                (metric == name)
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
    }

    fn print_failure_report(&mut self) {
        eprintln!("\n==== cluster in {} ====", self.dir.path().display());
        let processes = self
            .controllers
            .values_mut()
            .map(|c| &mut c.process)
            .chain(self.agents.values_mut().map(|a| &mut a.process));
        for process in processes {
            let state = process.describe_exit();
            eprintln!(
                "---- {} ({state}), {} ----",
                process.name,
                process.log_path().display()
            );
            eprintln!("{}", log_tail(&process.log_path(), LOG_TAIL_LINES));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_failure_report();
            if std::env::var_os(KEEP_DIR_VARIABLE).is_some() {
                self.dir.disable_cleanup(true);
                eprintln!(
                    "kept {} because {KEEP_DIR_VARIABLE} is set",
                    self.dir.path().display()
                );
            }
        }
        for controller in self.controllers.values_mut() {
            controller.process.kill_now();
        }
        for agent in self.agents.values_mut() {
            agent.process.kill_now();
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// Sends an HTTP/1.0 GET to a loopback address and returns the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<String, std::io::Error>(response)
    };
    let response = tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET http://{addr}{path} timed out after {CALL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET http://{addr}{path} failed: {e}"));
    match response.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => panic!("GET http://{addr}{path} returned no body: {response:?}"),
    }
}

/// Calls `check` every 100 ms until it returns `Ok`, and panics once
/// `timeout` has passed, naming the `condition` it waited for and the last
/// state `check` described in its `Err`.
pub async fn wait_for<T>(
    condition: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        // One more call is allowed to run slightly past the deadline, so a
        // check that blocks still reports its state.
        let budget = deadline.saturating_duration_since(Instant::now()) + CALL_TIMEOUT;
        let last = match tokio::time::timeout(budget, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(state)) => state,
            Err(_) => format!("the check itself did not return within {budget:?}"),
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {condition}; last state: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Builds a create request for a 1-vCPU, 128 MiB, 1 GiB instance in any pod.
pub fn small_instance(name: &str, request_id: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.to_string(),
        vcpus: 1,
        memory_mib: 128,
        disk_gib: 1,
        pod: String::new(),
        request_id: request_id.to_string(),
        ..Default::default()
    }
}

/// Returns whether a create that failed with `status` may be retried with the same
/// request id: the zone had no leader, or the write may have happened.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// Creates an instance, sending the same request again on a retryable
/// status until `timeout` has passed.
pub async fn create_with_retry(
    connector: &ZoneConnector,
    request: &CreateInstanceRequest,
    timeout: Duration,
) -> Result<Instance, Status> {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = connector
            .call_until(remaining, |mut client| {
                let request = request.clone();
                async move { client.create_instance(request).await }
            })
            .await;
        match result {
            Err(status) if is_retryable(&status) && Instant::now() < deadline => {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            other => return other,
        }
    }
}

/// Lists every instance with a linearizable read, retrying while the zone
/// has no leader.
pub async fn list_instances(connector: &ZoneConnector) -> Vec<Instance> {
    let list = connector
        .call_until(START_TIMEOUT, |mut c| async move {
            c.list_instances(ReadRequest { stale: false }).await
        })
        .await
        .unwrap_or_else(|s| panic!("ListInstances failed: {s:?}"));
    list.instances
}

/// Lists the domains libvirt has on `host`, through the host's agent.
pub async fn host_domains(
    connector: &ZoneConnector,
    host: &str,
) -> Result<Vec<HostDomain>, String> {
    let host = host.to_string();
    let reply = connector
        .call(|mut c| {
            let request = HostRef { host: host.clone() };
            async move { c.host_domains(request).await }
        })
        .await
        .map_err(|s| format!("HostDomains({host}) failed: {:?} {}", s.code(), s.message()))?;
    Ok(reply.domains)
}

/// Waits until the zone lists exactly `expected` instances, all running.
pub async fn wait_all_running(
    connector: &ZoneConnector,
    expected: usize,
    timeout: Duration,
) -> Vec<Instance> {
    let condition = format!("{expected} instances to be running");
    wait_for(&condition, timeout, async || {
        let list = connector
            .call(|mut c| async move { c.list_instances(ReadRequest { stale: false }).await })
            .await
            .map_err(|s| format!("ListInstances failed: {:?} {}", s.code(), s.message()))?;
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for instance in &list.instances {
            *states.entry(instance.observed_state.clone()).or_default() += 1;
        }
        let running = states.get("running").copied().unwrap_or(0);
        if list.instances.len() == expected && running == expected {
            Ok(list.instances)
        } else {
            Err(format!(
                "{} instances, by observed state {states:?}",
                list.instances.len()
            ))
        }
    })
    .await
}

/// Creates sent to the zone at once by the tests that create in bulk.
pub const CONCURRENCY: usize = 8;
/// How long one create may keep retrying through a failover.
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(40);

/// Creates `requests` with `CONCURRENCY` in flight, each retried with its
/// own request id, and returns the acknowledged instances in request order.
/// Panics on the first create that fails for good.
pub async fn create_all(
    connector: &ZoneConnector,
    requests: Vec<CreateInstanceRequest>,
) -> Vec<Instance> {
    stream::iter(requests)
        .map(|request| async move {
            create_with_retry(connector, &request, CREATE_TIMEOUT)
                .await
                .unwrap_or_else(|s| panic!("creating {:?} failed: {s:?}", request.name))
        })
        .buffered(CONCURRENCY)
        .collect()
        .await
}

/// Requests for instances `{prefix}-0` to `{prefix}-{count - 1}`, each with
/// request id `{prefix}-request-N`.
pub fn numbered_requests(prefix: &str, count: usize) -> Vec<CreateInstanceRequest> {
    (0..count)
        .map(|n| small_instance(&format!("{prefix}-{n}"), &format!("{prefix}-request-{n}")))
        .collect()
}

/// Checks that every acknowledged instance exists exactly once in `listed`,
/// by name and by id, and that `listed` contains nothing else.
pub fn assert_acknowledged_exist_once(acknowledged: &[Instance], listed: &[Instance]) {
    for instance in acknowledged {
        let by_name: Vec<&Instance> = listed.iter().filter(|i| i.name == instance.name).collect();
        assert_eq!(
            by_name.len(),
            1,
            "acknowledged instance {:?} should exist once by name, found {by_name:?}",
            instance.name
        );
        assert_eq!(
            by_name[0].id, instance.id,
            "instance {:?} has a different id than its create acknowledged",
            instance.name
        );
        let by_id = listed.iter().filter(|i| i.id == instance.id).count();
        assert_eq!(
            by_id, 1,
            "acknowledged id {} should exist once, found {by_id}",
            instance.id
        );
    }
    let acknowledged_ids: BTreeSet<&str> = acknowledged.iter().map(|i| i.id.as_str()).collect();
    let extra: Vec<&str> = listed
        .iter()
        .filter(|i| !acknowledged_ids.contains(i.id.as_str()))
        .map(|i| i.name.as_str())
        .collect();
    assert!(
        extra.is_empty(),
        "the zone holds instances no create acknowledged: {extra:?}"
    );
}

/// Returns the voter ids in a zone status.
pub fn voters(status: &ZoneStatusReply) -> BTreeSet<u64> {
    status
        .replicas
        .iter()
        .filter(|r| r.role == "voter")
        .map(|r| r.node_id)
        .collect()
}

/// Checks that GetInstance on `name` returns NOT_FOUND with reason INSTANCE_NOT_FOUND.
pub async fn assert_not_found(connector: &ZoneConnector, name: &str) {
    let request = GetInstanceRequest {
        name: name.to_string(),
        stale: false,
    };
    let result = connector
        .call_until(START_TIMEOUT, |mut c| {
            let request = request.clone();
            async move { c.get_instance(request).await }
        })
        .await;
    let status = result.expect_err(&format!("instance {name:?} should not exist"));
    assert_eq!(
        status.code(),
        Code::NotFound,
        "wrong code for unknown instance {name:?}: {status:?}"
    );
    assert_eq!(
        reason(&status),
        Some("INSTANCE_NOT_FOUND"),
        "wrong reason: {status:?}"
    );
}
