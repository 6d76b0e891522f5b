//! The shared fixture of the integration tests: a zone of `ccs` controller
//! and agent processes on free loopback ports, with every config, database
//! and log in one temporary directory.
//!
//! Each test owns its `Cluster`, so tests run in parallel. Dropping the
//! cluster kills every process it started. When the test is panicking, the
//! drop first prints how each process ended and the end of its log, so a
//! failed assertion comes with what the zone was doing. Set
//! `CCS_KEEP_TEST_DIR=1` to keep a failed test's directory and full logs.
//!
//! Every agent reaches the zone, and the zone reaches every agent, through
//! TCP proxies that run as tasks of the test process on 127.0.0.1. A test
//! cuts one host off with `partition` and restores it with `heal`, without
//! iptables or namespaces. Each agent also appends its executed orders to a
//! ledger file in the cluster directory (`ledger`).

// Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ccs::agent::ledger::{self, LedgerEntry};
use ccs::client::{reason, ZoneConnector};
use ccs::config::{AgentConfig, ControllerConfig, FencingConfig, Member, RaftTuning};
use ccs::proto::zone::{
    CreateInstanceRequest, CreatePodRequest, GetInstanceRequest, HostDomain, HostRef, Instance,
    ReadRequest, ZoneStatusReply, ZoneStatusRequest,
};
use futures::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::{Code, Status};

pub const ZONE: &str = "test-zone";
/// The one pod of the single-pod layout. All agents register in it.
pub const POD: &str = "pod-a";
/// The DAS pod of the storage layout: host-1 and host-2.
pub const DAS_POD: &str = "das-pod";
/// The SAN pod of the storage layout: host-3, host-4 and host-5.
pub const SAN_POD: &str = "san-pod";
/// The host whose agent fronts the SAN pod's shared array.
pub const SAN_AGENT: &str = "host-3";
/// Capacity of the SAN pod's shared array, in GiB.
pub const SAN_POOL_GIB: u64 = 2000;
/// File in the cluster directory that the "test" fencing driver appends to,
/// unless the options name another.
pub const FENCE_FILE: &str = "fences.jsonl";
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
/// Environment variable naming a `ccs` binary to run instead of the one
/// cargo built with this test binary. Worktrees that share a cargo target
/// directory overwrite each other's `ccs`, so a run that must test one
/// checkout copies its binary away and names the copy here.
const BINARY_VARIABLE: &str = "CCS_TEST_BINARY";
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
    /// Agents of the single-pod layout, with host ids "host-1" to "host-N".
    /// The storage layout ignores it and always has five.
    pub agents: usize,
    pub pods: PodLayout,
    pub raft: RaftTuning,
    pub host_timeout: Duration,
    /// The controllers' fencing driver. With driver "test" and no
    /// `record_file`, fences are recorded in `FENCE_FILE` in the cluster
    /// directory.
    pub fencing: FencingConfig,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            controllers: 3,
            agents: 2,
            pods: PodLayout::Single,
            raft: fast_raft(),
            host_timeout: Duration::from_secs(3),
            fencing: FencingConfig::default(),
        }
    }
}

/// The pods of a test cluster and the hosts in each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodLayout {
    /// One DAS pod, `POD`, with every agent in it.
    Single,
    /// `DAS_POD` with host-1 and host-2, and `SAN_POD` with host-3, host-4
    /// and host-5, where host-3 fronts the shared array of `SAN_POOL_GIB`.
    Storage,
}

/// One agent of a test cluster, as the layout places it.
struct HostSpec {
    id: String,
    pod: &'static str,
    san_pool_gib: u64,
}

impl PodLayout {
    /// Lists the pods to create before any agent starts, with spread placement.
    fn pods(self) -> Vec<CreatePodRequest> {
        let pod = |name: &str, storage: &str, san_agent: &str| CreatePodRequest {
            name: name.to_string(),
            cpu_ratio: Some(POD_CPU_RATIO),
            memory_ratio: Some(1.0),
            placement: "spread".to_string(),
            storage: storage.to_string(),
            san_agent: san_agent.to_string(),
            ..CreatePodRequest::default()
        };
        match self {
            PodLayout::Single => vec![pod(POD, "", "")],
            PodLayout::Storage => vec![pod(DAS_POD, "das", ""), pod(SAN_POD, "san", SAN_AGENT)],
        }
    }

    fn hosts(self, agents: usize) -> Vec<HostSpec> {
        let host = |n: usize, pod: &'static str| {
            let id = format!("host-{n}");
            let san_pool_gib = if id == SAN_AGENT { SAN_POOL_GIB } else { 0 };
            HostSpec { id, pod, san_pool_gib }
        };
        match self {
            PodLayout::Single => (1..=agents).map(|n| host(n, POD)).collect(),
            PodLayout::Storage => {
                let das = (1..=2).map(|n| host(n, DAS_POD));
                das.chain((3..=5).map(|n| host(n, SAN_POD))).collect()
            }
        }
    }
}

/// Options for a cluster of 3 controllers in the storage layout.
pub fn storage_options() -> ClusterOptions {
    ClusterOptions {
        pods: PodLayout::Storage,
        ..ClusterOptions::default()
    }
}

/// Returns the "test" fencing driver, which records fences in `FENCE_FILE`,
/// set to fence a host once it has been suspect for `after`.
pub fn test_fencing(after: Duration) -> FencingConfig {
    FencingConfig {
        driver: "test".to_string(),
        after,
        ..FencingConfig::default()
    }
}

/// One line of the "test" fencing driver's record file.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct FenceRecord {
    pub host: String,
    pub pod: String,
    /// Wall-clock time of the fence, in nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
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
        let binary = std::env::var_os(BINARY_VARIABLE)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_ccs").into());
        let child = Command::new(binary)
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
    /// gRPC address the agent listens on, `127.0.0.1:port`. The zone
    /// reaches the agent through a proxy instead.
    pub addr: String,
    process: Process,
    links: Links,
}

/// The proxies between one agent and the zone: one in front of the
/// agent's gRPC port, which the agent advertises, and one per controller,
/// which the agent's config lists instead of the controllers.
struct Links {
    /// True while the host is partitioned.
    cut: watch::Sender<bool>,
    /// Listeners bound before any agent port is chosen, so that no proxy
    /// can take a port that `free_ports` released for an agent.
    unused: Vec<TcpListener>,
    /// The proxies' accept loops, aborted when the cluster is dropped.
    proxies: Vec<JoinHandle<()>>,
}

impl Links {
    /// Binds `count` proxy listeners on free loopback ports.
    fn bind(count: usize) -> Links {
        let unused = (0..count)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a proxy port on loopback"))
            .collect();
        Links {
            cut: watch::channel(false).0,
            unused,
            proxies: Vec::new(),
        }
    }

    /// Starts a proxy to `target` on one of the bound listeners and returns
    /// its address.
    fn proxy_to(&mut self, target: SocketAddr) -> SocketAddr {
        let listener = self
            .unused
            .pop()
            .expect("Links::bind reserves a listener per proxy");
        let (addr, task) = start_proxy(listener, target, self.cut.subscribe());
        self.proxies.push(task);
        addr
    }
}

/// Starts a TCP proxy on `listener` that forwards each connection to
/// `target`. While `cut` is true it closes every accepted connection at
/// once and drops the ones it forwards, so the peers see closed connections
/// rather than a silent network.
fn start_proxy(
    listener: TcpListener,
    target: SocketAddr,
    cut: watch::Receiver<bool>,
) -> (SocketAddr, JoinHandle<()>) {
    listener
        .set_nonblocking(true)
        .expect("making the proxy listener non-blocking");
    let addr = listener.local_addr().expect("local address of a bound listener");
    let listener = tokio::net::TcpListener::from_std(listener)
        .expect("registering the proxy listener with tokio");
    let task = tokio::spawn(async move {
        loop {
            let inbound = match listener.accept().await {
                Ok((inbound, _)) => inbound,
                Err(_) => {
                    // Out of file descriptors, for example: try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if *cut.borrow() {
                continue;
            }
            tokio::spawn(forward(inbound, target, cut.clone()));
        }
    });
    (addr, task)
}

/// Copies bytes both ways between `inbound` and a new connection to
/// `target` until either side closes or the link is cut.
async fn forward(mut inbound: TcpStream, target: SocketAddr, mut cut: watch::Receiver<bool>) {
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
        // Also ends when the cluster, and with it the sender, is dropped.
        _ = cut.wait_for(|cut| *cut) => {}
    }
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

/// Builds an agent config from its required fields. It goes through serde,
/// so every optional field takes the default its `#[serde(default)]` names.
fn agent_config(
    host: &str,
    pod: &str,
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    libvirt_uri: &str,
    data_dir: &Path,
    controllers: Vec<String>,
) -> AgentConfig {
    let mut table = toml::Table::new();
    let mut set = |key: &str, value: toml::Value| {
        table.insert(key.to_string(), value);
    };
    set("zone", ZONE.into());
    set("host_id", host.into());
    set("pod", pod.into());
    set("listen", listen.to_string().into());
    set("metrics_listen", metrics_listen.to_string().into());
    set("libvirt_uri", libvirt_uri.into());
    set("disk_gib", i64::try_from(HOST_DISK_GIB).expect("disk fits i64").into());
    set("data_dir", data_dir.display().to_string().into());
    set("controllers", controllers.into());
    table
        .try_into()
        .unwrap_or_else(|e| panic!("the test agent config for {host} does not parse: {e}"))
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
        for pod in cluster.options.pods.pods() {
            cluster.create_pod(pod).await;
        }

        // Each agent has a proxy in front of it and one per controller.
        let hosts = cluster.options.pods.hosts(cluster.options.agents);
        let proxies_per_agent = 1 + cluster.controllers.len();
        let links: Vec<Links> = hosts.iter().map(|_| Links::bind(proxies_per_agent)).collect();
        let ports = free_ports(hosts.len() * 2);
        for ((host, pair), links) in hosts.iter().zip(ports.chunks(2)).zip(links) {
            cluster.add_agent(host, pair[0], pair[1], links);
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
            fencing: self.controller_fencing(),
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

    /// Returns the fencing config of every controller, with the record file
    /// of the "test" driver defaulted to `FENCE_FILE` in the cluster directory.
    fn controller_fencing(&self) -> FencingConfig {
        let mut fencing = self.options.fencing.clone();
        if fencing.driver == "test" && fencing.record_file.is_none() {
            fencing.record_file = Some(self.dir.path().join(FENCE_FILE));
        }
        fencing
    }

    /// Starts an agent behind its own proxies (see `Links`).
    fn add_agent(&mut self, spec: &HostSpec, port: u16, metrics_port: u16, mut links: Links) {
        let host = spec.id.as_str();
        let advertised = links.proxy_to(loopback(port));
        let controller_addrs: Vec<SocketAddr> = self
            .controllers
            .values()
            .map(|c| c.addr.parse().expect("controller addresses are ip:port"))
            .collect();
        let controllers: Vec<String> = controller_addrs
            .into_iter()
            .map(|addr| links.proxy_to(addr).to_string())
            .collect();

        let host_xml = self.dir.path().join("host.xml");
        let mut config = agent_config(
            host,
            spec.pod,
            loopback(port),
            loopback(metrics_port),
            &format!("test://{}", host_xml.display()),
            &self.dir.path().join(format!("agent-{host}")),
            controllers,
        );
        config.advertise = Some(advertised.to_string());
        config.heartbeat_interval = Duration::from_millis(500);
        config.ledger = Some(self.ledger_path(host));
        config.san_pool_gib = spec.san_pool_gib;
        let config_path = self.dir.path().join(format!("agent-{host}.toml"));
        write_toml(&config_path, &config);
        let name = format!("agent-{host}");
        let mut process = Process::new(name, "agent", config_path, self.dir.path());
        process.start();
        let handle = AgentHandle {
            host: host.to_string(),
            addr: config.listen.to_string(),
            process,
            links,
        };
        self.agents.insert(host.to_string(), handle);
    }

    fn ledger_path(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("ledger-{host}.jsonl"))
    }

    async fn create_pod(&self, request: CreatePodRequest) {
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
            Err(status) => panic!("creating pod {} failed: {status:?}", request.name),
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

    /// Cuts `host` off the zone: its agent's connections to the
    /// controllers and the zone's connections to it are dropped, and new
    /// ones are closed as soon as they are accepted. Other agents still
    /// reach it through its advertised address (a migration's destination),
    /// but nothing of the zone does.
    pub fn partition(&self, host: &str) {
        self.agent(host).links.cut.send_replace(true);
    }

    /// Ends the partition of `host`.
    pub fn heal(&self, host: &str) {
        self.agent(host).links.cut.send_replace(false);
    }

    /// Reads the ledger of `host`'s agent: one entry per executed order,
    /// over every start of the agent. Empty before its first order.
    pub fn ledger(&self, host: &str) -> Vec<LedgerEntry> {
        let path = self.ledger_path(host);
        if !path.exists() {
            return Vec::new();
        }
        ledger::read(&path).unwrap_or_else(|e| panic!("reading ledger {}: {e:#}", path.display()))
    }

    /// Reads the fences the "test" fencing driver recorded, oldest first.
    pub fn fences(&self) -> Vec<FenceRecord> {
        let path = self
            .controller_fencing()
            .record_file
            .expect("fences() needs the \"test\" fencing driver in ClusterOptions::fencing");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading fence records {}: {e}", path.display()),
        };
        text.lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("invalid fence record {line:?} in {}: {e}", path.display())
                })
            })
            .collect()
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
            for proxy in &agent.links.proxies {
                proxy.abort();
            }
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
