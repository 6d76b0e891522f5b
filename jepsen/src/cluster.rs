//! A zone of real `ccs` processes for a verification run, and the faults
//! the harness can inject into it. They are kill, pause, network
//! partitions, clock jumps and rate changes through libfaketime, membership
//! changes, and power loss on a filesystem that drops unsynced writes.
//!
//! Every controller (`n1`..) and agent (`h1`..) runs in its own network
//! namespace on the run's bridge (see `netns`). Controllers listen on
//! 10.231.0.11.., agents on 10.231.0.31..; the harness reaches them all
//! from the root namespace through 10.231.0.1. A partition is a set of
//! iptables DROP rules in the receiving namespaces.
//!
//! Layout of the run directory: `config/` (TOML files and the libvirt host
//! XML), `data/<node>/`, `logs/<node>.log` (every start of a node, each
//! opened by a header line), `logs/<node>.lossyfs.log`, `clock/<node>`
//! (libfaketime control files) and `ledger-<agent>.jsonl` (the agents'
//! side-effect ledgers).
//!
//! Snapshot pressure is not a runtime fault: `ClusterSpec::raft` sets how
//! often replicas snapshot and how much log they keep, so that lagging and
//! restarted replicas catch up through snapshot install.
//!
//! The file is past 800 lines because one type owns the whole life of the
//! zone's processes (configs, starts, faults, membership, teardown), and
//! the multi-process tests exercise them together. The Linux plumbing is
//! in `netns`.
//!
//! Controller slots beyond the first `voters` are spares. A spare joins
//! through AddReplica with a fresh node id, because a zone never reuses a
//! node id. A removed replica is killed, its data is deleted, and its slot
//! becomes a spare again.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ccs::client::{reason, ZoneConnector};
use ccs::config::{
    AgentCanary, AgentConfig, ControllerCanary, ControllerConfig, Member, RaftTuning,
};
use ccs::proto::zone::zone_client::ZoneClient;
use ccs::proto::zone::{
    AddReplicaRequest, CreatePodRequest, ReadRequest, RemoveReplicaRequest, ZoneStatusReply,
    ZoneStatusRequest,
};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::netns::{self, Cut, Network, Registration};

/// Zone name of every verification cluster.
pub const ZONE: &str = "jepsen";
/// The one pod; every agent registers in it.
pub const POD: &str = "pod-j";
/// Ports, the same in every namespace because each node has its own address.
pub const CONTROLLER_PORT: u16 = 7000;
pub const AGENT_PORT: u16 = 7100;
pub const METRICS_PORT: u16 = 9000;
/// Controller `nK` gets `10.231.0.(10 + K)`, agent `hK` gets `10.231.0.(30 + K)`.
const CONTROLLER_ADDR_BASE: u8 = 10;
const AGENT_ADDR_BASE: u8 = 30;
/// Limits that keep controller and agent addresses in their ranges.
const MAX_CONTROLLERS: usize = 9;
const MAX_AGENTS: usize = 9;

/// Each host: 64 CPUs and 256 GiB of memory (the test driver counts KiB).
/// With the pod's ratios that is 4096 vCPUs and 4 TiB per host, room for
/// tens of thousands of 1-vCPU, 128 MiB instances.
const HOST_XML: &str = "<node><cpu><mhz>2600</mhz><model>x86_64</model><active>64</active>\
<max>64</max><nodes>1</nodes><sockets>2</sockets><cores>16</cores><threads>2</threads></cpu>\
<memory>268435456</memory></node>";
const HOST_DISK_GIB: u64 = 1_000_000;
/// The largest ratios a pod accepts.
const POD_CPU_RATIO: f64 = 64.0;
const POD_MEMORY_RATIO: f64 = 16.0;
const HOST_TIMEOUT: Duration = Duration::from_secs(3);
const AGENT_HEARTBEAT: Duration = Duration::from_millis(500);

/// Per-call timeout of the harness's own calls to the zone.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one ZoneStatus call when looking for the leader.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long start-up waits for a leader, the pod and every host.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a membership change may keep retrying.
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a write to its control file a controller is assumed to
/// have read it. A running controller reads its clock many times a second.
const CLOCK_PICKUP: Duration = Duration::from_millis(500);
/// How long `ip netns exec` and `env` may take to start `ccs`.
const EXEC_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the lossy filesystem may take to mount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the lossy filesystem may take to stop after SIGTERM.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(1);

/// The FUSE layer under a controller's data directory, started as
/// `BINARY lossyfs --backing DIR --mount DIR`; it drops the writes that were
/// not synced when it receives SIGUSR1.
#[derive(Clone, Debug)]
pub struct LossyFsSpec {
    pub binary: PathBuf,
}

/// Shape and settings of a verification cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The `ccs` executable.
    pub ccs_binary: PathBuf,
    /// Directory for configs, data, logs and ledgers; must be new or empty.
    pub run_dir: PathBuf,
    /// Controllers that bootstrap the zone (n1..).
    pub voters: usize,
    /// Further controller slots, started only by membership changes.
    pub spare_controllers: usize,
    /// Agents (h1..), one per simulated host.
    pub agents: usize,
    /// Raft timing and snapshot pressure of every controller.
    pub raft: RaftTuning,
    pub controller_canary: ControllerCanary,
    pub agent_canary: AgentCanary,
    /// Path of `libfaketime.so.1`; clock faults need it.
    pub faketime: Option<PathBuf>,
    /// Put each controller's data on a lossy filesystem; power loss needs it.
    pub lossy_fs: Option<LossyFsSpec>,
}

impl ClusterSpec {
    /// 3 voters, 2 spares, 2 agents, no canary, `verification_raft()`.
    pub fn new(ccs_binary: PathBuf, run_dir: PathBuf) -> ClusterSpec {
        ClusterSpec {
            ccs_binary,
            run_dir,
            voters: 3,
            spare_controllers: 2,
            agents: 2,
            raft: verification_raft(),
            controller_canary: ControllerCanary::default(),
            agent_canary: AgentCanary::default(),
            faketime: None,
            lossy_fs: None,
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let controllers = self.voters + self.spare_controllers;
        if self.voters == 0 || controllers > MAX_CONTROLLERS {
            bail!(
                "voters = {} and spare_controllers = {} are invalid: need at least 1 voter \
                 and at most {MAX_CONTROLLERS} controllers in all",
                self.voters,
                self.spare_controllers
            );
        }
        if self.agents == 0 || self.agents > MAX_AGENTS {
            bail!("agents = {} is invalid: use 1 to {MAX_AGENTS}", self.agents);
        }
        if !self.ccs_binary.is_file() {
            bail!(
                "ccs binary {} not found; build it with `cargo build` or pass its path",
                self.ccs_binary.display()
            );
        }
        if let Some(library) = &self.faketime {
            if !library.is_file() {
                bail!(
                    "libfaketime {} not found; install it with `apt-get install faketime`",
                    library.display()
                );
            }
        }
        if let Some(lossy) = &self.lossy_fs {
            if !lossy.binary.is_file() {
                bail!("lossyfs binary {} not found", lossy.binary.display());
            }
        }
        Ok(())
    }
}

/// Raft settings for verification: elections within about a second, and
/// a snapshot every 50 entries with 10 kept behind it, so that snapshot
/// building and install run all the time.
pub fn verification_raft() -> RaftTuning {
    RaftTuning {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(500),
        election_timeout_max: Duration::from_millis(1000),
        snapshot_after_entries: 50,
        keep_entries_after_snapshot: 10,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Controller,
    Agent,
}

/// A node as the harness last left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub role: Role,
    pub ip: Ipv4Addr,
    /// Raft node id of the controller's current or last incarnation; 0 for
    /// agents and for slots never started.
    pub node_id: u64,
    /// Agents always; controllers while they belong to the zone's membership.
    pub member: bool,
    pub running: bool,
    pub paused: bool,
}

/// A process that exited without the harness killing it.
#[derive(Clone, Debug)]
pub struct Crash {
    pub node: String,
    pub status: String,
    pub log: PathBuf,
}

/// One lossy filesystem process and its directories.
struct LossyFs {
    child: Child,
    mount: PathBuf,
}

struct Node {
    name: String,
    role: Role,
    ip: Ipv4Addr,
    netns: String,
    node_id: u64,
    member: bool,
    config_path: PathBuf,
    /// Everything the node stores; removed when a spare slot is reused.
    data_root: PathBuf,
    log_path: PathBuf,
    /// libfaketime control file (controllers only).
    clock_file: PathBuf,
    child: Option<Child>,
    paused: bool,
    lossyfs: Option<LossyFs>,
    /// Sources this node's namespace drops packets from.
    dropped_sources: Vec<Ipv4Addr>,
    starts: u32,
}

impl Node {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    fn grpc_addr(&self) -> String {
        let port = match self.role {
            Role::Controller => CONTROLLER_PORT,
            Role::Agent => AGENT_PORT,
        };
        format!("{}:{port}", self.ip)
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            role: self.role,
            ip: self.ip,
            node_id: self.node_id,
            member: self.member,
            running: self.child.is_some(),
            paused: self.paused,
        }
    }
}

pub struct Cluster {
    spec: ClusterSpec,
    run_id: String,
    network: Network,
    registration: Registration,
    /// Controllers and agents by name.
    nodes: BTreeMap<String, Node>,
    next_node_id: u64,
    cut: Option<Cut>,
    crashes: Vec<Crash>,
    /// Set by `teardown`, so that `Drop` has nothing left to do.
    torn_down: bool,
}

impl Cluster {
    /// Starts a cluster: removes what a crashed run left, creates the
    /// network, starts the voters, waits for a leader, creates the pod,
    /// starts the agents and waits until every host is up. On failure
    /// everything created is removed again; logs stay in the run directory.
    pub async fn start(mut spec: ClusterSpec) -> anyhow::Result<Cluster> {
        spec.validate()?;
        spec.ccs_binary = std::fs::canonicalize(&spec.ccs_binary)?;
        netns::check_tools()?;
        cleanup_leftovers().await?;
        netns::check_subnet_free()?;
        prepare_run_dir(&spec.run_dir)?;
        spec.run_dir = std::fs::canonicalize(&spec.run_dir)?;

        let run_id = netns::new_run_id();
        let registration = Registration::create(&run_id, &spec.run_dir)?;
        let network = match Network::create(&run_id) {
            Ok(network) => network,
            Err(e) => {
                registration.remove()?;
                return Err(e);
            }
        };
        tracing::info!(run = %run_id, run_dir = %spec.run_dir.display(), "starting cluster");
        let mut cluster = Cluster {
            spec,
            run_id,
            network,
            registration,
            nodes: BTreeMap::new(),
            next_node_id: 1,
            cut: None,
            crashes: Vec::new(),
            torn_down: false,
        };
        if let Err(error) = cluster.boot().await {
            let logs = cluster.spec.run_dir.join("logs");
            if let Err(teardown) = cluster.teardown().await {
                let teardown = format!("{teardown:#}");
                tracing::error!(error = %teardown, "teardown after a failed start failed");
            }
            return Err(error.context(format!(
                "cluster start failed; logs are in {}",
                logs.display()
            )));
        }
        Ok(cluster)
    }

    async fn boot(&mut self) -> anyhow::Result<()> {
        let dir = &self.spec.run_dir;
        for sub in ["config", "data", "logs", "clock"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        std::fs::write(dir.join("config/host.xml"), HOST_XML)?;
        self.create_nodes()?;

        let voters: Vec<String> = (1..=self.spec.voters).map(|k| format!("n{k}")).collect();
        let bootstrap: Vec<Member> = voters
            .iter()
            .map(|name| {
                let node = &self.nodes[name];
                Member {
                    id: node.node_id,
                    addr: node.grpc_addr(),
                }
            })
            .collect();
        for name in &voters {
            self.write_controller_config(name, bootstrap.clone())?;
            self.spawn(name).await?;
            self.node_mut(name)?.member = true;
        }
        self.wait_for_leader(START_TIMEOUT).await?;
        self.create_pod().await?;

        let agents: Vec<String> = (1..=self.spec.agents).map(|k| format!("h{k}")).collect();
        for name in &agents {
            self.write_agent_config(name)?;
            self.spawn(name).await?;
        }
        self.wait_hosts_up(START_TIMEOUT).await
    }

    /// Creates a namespace for every controller slot and agent. Voters get
    /// node ids 1..=voters; spares get theirs when they join.
    fn create_nodes(&mut self) -> anyhow::Result<()> {
        let controllers = self.spec.voters + self.spec.spare_controllers;
        let slots = (1..=controllers)
            .map(|k| {
                (
                    format!("n{k}"),
                    Role::Controller,
                    CONTROLLER_ADDR_BASE + k as u8,
                )
            })
            .chain(
                (1..=self.spec.agents)
                    .map(|k| (format!("h{k}"), Role::Agent, AGENT_ADDR_BASE + k as u8)),
            );
        for (name, role, last_octet) in slots.collect::<Vec<_>>() {
            let ip = Ipv4Addr::new(10, 231, 0, last_octet);
            let netns = self.network.add_node(&name, ip)?;
            let node_id = match role {
                Role::Controller if self.nodes.len() < self.spec.voters => self.take_node_id(),
                _ => 0,
            };
            let dir = &self.spec.run_dir;
            let node = Node {
                config_path: dir.join(format!("config/{name}.toml")),
                data_root: dir.join(format!("data/{name}")),
                log_path: dir.join(format!("logs/{name}.log")),
                clock_file: dir.join(format!("clock/{name}")),
                name: name.clone(),
                role,
                ip,
                netns,
                node_id,
                member: role == Role::Agent,
                child: None,
                paused: false,
                lossyfs: None,
                dropped_sources: Vec::new(),
                starts: 0,
            };
            self.nodes.insert(name, node);
        }
        Ok(())
    }

    fn take_node_id(&mut self) -> u64 {
        let id = self.next_node_id;
        self.next_node_id += 1;
        id
    }

    /// Returns the controller's RocksDB directory: the lossy mount, or a plain directory.
    fn controller_data_dir(&self, node: &Node) -> PathBuf {
        match self.spec.lossy_fs {
            Some(_) => node.data_root.join("mount"),
            None => node.data_root.join("db"),
        }
    }

    fn write_controller_config(&self, name: &str, bootstrap: Vec<Member>) -> anyhow::Result<()> {
        let node = self.node(name)?;
        let config = ControllerConfig {
            zone: ZONE.to_string(),
            node_id: node.node_id,
            listen: SocketAddr::from((node.ip, CONTROLLER_PORT)),
            advertise: None,
            metrics_listen: SocketAddr::from((node.ip, METRICS_PORT)),
            data_dir: self.controller_data_dir(node),
            bootstrap,
            raft: self.spec.raft.clone(),
            host_timeout: HOST_TIMEOUT,
            log_json: false,
            fencing: Default::default(),
            unsafe_canary: self.spec.controller_canary.clone(),
        };
        write_toml(&node.config_path, &config)
    }

    fn write_agent_config(&self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?;
        let controllers: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Controller)
            .map(Node::grpc_addr)
            .collect();
        let host_xml = self.spec.run_dir.join("config/host.xml");
        let config = AgentConfig {
            zone: ZONE.to_string(),
            host_id: name.to_string(),
            pod: POD.to_string(),
            listen: SocketAddr::from((node.ip, AGENT_PORT)),
            advertise: None,
            metrics_listen: SocketAddr::from((node.ip, METRICS_PORT)),
            libvirt_uri: format!("test://{}", host_xml.display()),
            disk_gib: HOST_DISK_GIB,
            data_dir: node.data_root.clone(),
            controllers,
            heartbeat_interval: AGENT_HEARTBEAT,
            log_json: false,
            ledger: Some(self.ledger_file(name)),
            san_pool_gib: 0,
            unsafe_canary: self.spec.agent_canary.clone(),
            ..Default::default()
        };
        write_toml(&node.config_path, &config)
    }

    fn ledger_file(&self, agent: &str) -> PathBuf {
        self.spec.run_dir.join(format!("ledger-{agent}.jsonl"))
    }

    /// Starts the node's process in its namespace, first mounting its lossy
    /// filesystem if it has none yet.
    async fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        let needs_mount = {
            let node = self.node(name)?;
            if node.child.is_some() {
                bail!("{name} is already running");
            }
            node.role == Role::Controller && self.spec.lossy_fs.is_some() && node.lossyfs.is_none()
        };
        if needs_mount {
            self.mount_lossyfs(name).await?;
        }

        let command = self.command_for(name)?;
        let run_id = self.run_id.clone();
        let preloaded = self.spec.faketime.is_some() && self.node(name)?.role == Role::Controller;
        let node = self.node_mut(name)?;
        node.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)?;
        writeln!(
            log,
            "==== start {} of {} (node id {}) ====",
            node.starts, node.name, node.node_id
        )?;
        let child = command
            .into_command(&node.netns, &run_id)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {name}"))?;
        let pid = child.id();
        node.child = Some(child);
        node.paused = false;
        tracing::info!(node = name, pid, "started");
        if let Some(pid) = pid {
            self.wait_for_exec(name, pid).await?;
        }

        if let (Some(pid), true) = (pid, preloaded) {
            self.registration.note_preloaded(pid)?;
        }
        Ok(())
    }

    /// Waits until `pid` has replaced `ip netns exec` and `env` with
    /// `ccs`, so that signals sent next reach `ccs` itself.
    async fn wait_for_exec(&mut self, name: &str, pid: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + EXEC_TIMEOUT;
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        while std::fs::read_link(&exe).ok().as_deref() != Some(self.spec.ccs_binary.as_path()) {
            let node = self.node_mut(name)?;
            let exited = node.child.as_mut().map(|child| child.try_wait());
            if let Some(Ok(Some(status))) = exited {
                node.child = None;
                let log = node.log_path.display();
                bail!("{name} exited at start with {status}; see {log}");
            }
            if Instant::now() >= deadline {
                bail!("{name} (pid {pid}) did not start ccs within {EXEC_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn command_for(&self, name: &str) -> anyhow::Result<NodeCommand> {
        let node = self.node(name)?;
        let mut env = Vec::new();
        if let (Role::Controller, Some(library)) = (node.role, &self.spec.faketime) {
            if !node.clock_file.exists() {
                write_atomically(&node.clock_file, "+0\n")?;
            }
            // NO_CACHE makes libfaketime read the file at every clock call,
            // which cost about 3 us per call in a Python loop of clock reads
            // on a 2-core VM.
            env.push(format!("LD_PRELOAD={}", library.display()));
            env.push(format!(
                "FAKETIME_TIMESTAMP_FILE={}",
                node.clock_file.display()
            ));
            env.push("FAKETIME_NO_CACHE=1".to_string());
            // Clock faults move the wall clock only. The kernel never steps
            // CLOCK_MONOTONIC backwards, and openraft 0.9 panics when it reads
            // such a step (utime.rs asserts `now >= utime`).
            env.push("FAKETIME_DONT_FAKE_MONOTONIC=1".to_string());
            env.push("FAKETIME_XRESET=1".to_string());
            env.push("NO_FAKE_STAT=1".to_string());
        }
        let role = match node.role {
            Role::Controller => "controller",
            Role::Agent => "agent",
        };
        Ok(NodeCommand {
            env,
            program: self.spec.ccs_binary.clone(),
            args: vec![
                role.to_string(),
                "--config".into(),
                node.config_path.display().to_string(),
            ],
        })
    }

    async fn mount_lossyfs(&mut self, name: &str) -> anyhow::Result<()> {
        let binary = match &self.spec.lossy_fs {
            Some(lossy) => lossy.binary.clone(),
            None => bail!("the cluster has no lossy filesystem"),
        };
        let run_id = self.run_id.clone();
        let node = self.node_mut(name)?;
        let backing = node.data_root.join("backing");
        let mount = node.data_root.join("mount");
        std::fs::create_dir_all(&backing)?;
        std::fs::create_dir_all(&mount)?;

        let log_path = node.log_path.with_extension("lossyfs.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(&binary)
            .arg("lossyfs")
            .arg("--backing")
            .arg(&backing)
            .arg("--mount")
            .arg(&mount)
            .env(netns::RUN_MARKER, &run_id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start lossyfs for {name}"))?;
        node.lossyfs = Some(LossyFs {
            child,
            mount: mount.clone(),
        });

        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !netns::mounts_under(&mount).contains(&mount) {
            if Instant::now() >= deadline {
                bail!(
                    "lossyfs for {name} did not mount {} within {MOUNT_TIMEOUT:?}; see {}",
                    mount.display(),
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the node's lossy filesystem and unmounts it. Every controller
    /// started after the mount has a copy of it in its own mount namespace,
    /// because `ip netns exec` copies the mounts and no unmount propagates
    /// to a copy while "/" is a private mount. lossyfs cannot finish while
    /// such copies exist. So it gets `UNMOUNT_TIMEOUT` after SIGTERM, then SIGKILL and a
    /// lazy unmount; the copies it leaves are never used and go with their
    /// processes.
    async fn unmount_lossyfs(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(mut lossy) = self.node_mut(name)?.lossyfs.take() else {
            return Ok(());
        };
        if let Some(pid) = lossy.child.id() {
            netns::send_signal(pid, "TERM").await.ok();
        }
        let exited = tokio::time::timeout(UNMOUNT_TIMEOUT, lossy.child.wait()).await;
        if exited.is_err() {
            lossy.child.kill().await.ok();
        }
        if netns::mounts_under(&lossy.mount).contains(&lossy.mount) {
            netns::run("umount", &["-l", &lossy.mount.to_string_lossy()]).await?;
        }
        Ok(())
    }

    async fn create_pod(&self) -> anyhow::Result<()> {
        let request = CreatePodRequest {
            name: POD.to_string(),
            cpu_ratio: Some(POD_CPU_RATIO),
            memory_ratio: Some(POD_MEMORY_RATIO),
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
            Ok(_) => Ok(()),
            // A retry after a lost reply finds the pod already made.
            Err(status) if reason(&status) == Some("POD_EXISTS") => Ok(()),
            Err(status) => Err(anyhow!("creating pod {POD} failed: {status:?}")),
        }
    }

    async fn wait_hosts_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let expected: BTreeSet<String> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Agent)
            .map(|n| n.name.clone())
            .collect();
        let connector = self.connector();
        let deadline = Instant::now() + timeout;
        loop {
            let listed = connector
                .call(|mut c| async move { c.list_hosts(ReadRequest { stale: false }).await })
                .await;
            let last = match listed {
                Ok(list) => {
                    let up: BTreeSet<String> = list
                        .hosts
                        .iter()
                        .filter(|h| h.health == "up")
                        .map(|h| h.id.clone())
                        .collect();
                    if expected.is_subset(&up) {
                        return Ok(());
                    }
                    format!("hosts up: {up:?}")
                }
                Err(status) => format!("ListHosts failed: {status:?}"),
            };
            if Instant::now() >= deadline {
                bail!("hosts {expected:?} were not all up after {timeout:?}; last state: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.nodes.values().map(Node::info).collect()
    }

    fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .get(name)
            .ok_or_else(|| unknown_node(name, &self.nodes))
    }

    fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        match self.nodes.get_mut(name) {
            Some(node) => Ok(node),
            None => Err(anyhow!("unknown node {name:?}")),
        }
    }

    fn controller(&self, name: &str) -> anyhow::Result<&Node> {
        let node = self.node(name)?;
        if node.role != Role::Controller {
            bail!("{name} is an agent, not a controller");
        }
        Ok(node)
    }

    /// gRPC addresses of the zone's members and of spares that run.
    pub fn controller_endpoints(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Controller && (n.member || n.child.is_some()))
            .map(Node::grpc_addr)
            .collect()
    }

    /// gRPC addresses of every controller slot, running or not. Clients
    /// that keep this list reach the zone whichever slots membership
    /// changes leave in it; a slot without a process refuses at once.
    pub fn all_controller_endpoints(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Controller)
            .map(Node::grpc_addr)
            .collect()
    }

    /// Builds a connector over `controller_endpoints()` with `CALL_TIMEOUT` per call.
    pub fn connector(&self) -> ZoneConnector {
        ZoneConnector::new(&self.controller_endpoints().join(","), CALL_TIMEOUT)
            .expect("a cluster has at least one controller")
    }

    pub fn ledger_paths(&self) -> Vec<PathBuf> {
        self.nodes
            .values()
            .filter(|n| n.role == Role::Agent)
            .map(|n| self.ledger_file(&n.name))
            .collect()
    }

    pub fn ledger_path(&self, agent: &str) -> anyhow::Result<PathBuf> {
        match self.node(agent)?.role {
            Role::Agent => Ok(self.ledger_file(agent)),
            Role::Controller => bail!("{agent} is a controller; ledgers belong to agents"),
        }
    }

    /// Returns the gRPC address of an agent, `ip:port`.
    pub fn agent_endpoint(&self, agent: &str) -> anyhow::Result<String> {
        let node = self.node(agent)?;
        match node.role {
            Role::Agent => Ok(node.grpc_addr()),
            Role::Controller => bail!("{agent} is a controller, not an agent"),
        }
    }

    /// Returns the slot whose current or last incarnation has Raft id `node_id`.
    pub fn node_name(&self, node_id: u64) -> Option<String> {
        self.nodes
            .values()
            .find(|n| n.role == Role::Controller && n.node_id == node_id && node_id != 0)
            .map(|n| n.name.clone())
    }

    /// Asks every running, unpaused controller for the zone status and
    /// returns the id of the one that reports itself leader. A replica
    /// forwards ZoneStatus to the leader it has learned of, so only a reply
    /// from X that names X proves that X leads. When a partition leaves two
    /// such replies, the one with the higher term wins.
    pub async fn leader(&self) -> Option<u64> {
        let mut queries = tokio::task::JoinSet::new();
        for node in self.nodes.values() {
            if node.role != Role::Controller || node.child.is_none() || node.paused {
                continue;
            }
            let (id, addr) = (node.node_id, node.grpc_addr());
            queries.spawn(async move { (id, zone_status_at(&addr, STATUS_TIMEOUT).await) });
        }
        let mut best: Option<(u64, u64)> = None;
        while let Some(joined) = queries.join_next().await {
            if let Ok((id, Ok(status))) = joined {
                if status.leader_id == id && best.is_none_or(|(term, _)| status.term > term) {
                    best = Some((status.term, id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// Returns the name of the leader's slot, as `leader()` finds it.
    pub async fn leader_node(&self) -> Option<String> {
        let id = self.leader().await?;
        self.node_name(id)
    }

    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(id) = self.leader().await {
                return Ok(id);
            }
            if Instant::now() >= deadline {
                bail!("no controller became leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills a node's process with SIGKILL and waits for it to exit.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        let Some(mut child) = node.child.take() else {
            bail!("{name} is not running");
        };
        let pid = child.id();
        child
            .kill()
            .await
            .with_context(|| format!("failed to kill {name}"))?;
        node.paused = false;
        if let Some(pid) = pid {
            netns::remove_faketime_files(pid);
        }
        tracing::info!(node = name, "killed");
        Ok(())
    }

    /// Starts a member whose process is not running, with its existing
    /// config and data.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?;
        if !node.member {
            bail!("{name} is not a member of the zone; add it with add_replica");
        }
        self.spawn(name).await
    }

    /// Stops a running node with SIGSTOP.
    pub async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        let pid = node.pid().ok_or_else(|| anyhow!("{name} is not running"))?;
        netns::send_signal(pid, "STOP").await?;
        node.paused = true;
        Ok(())
    }

    /// Continues a paused node with SIGCONT.
    pub async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node_mut(name)?;
        let pid = node.pid().ok_or_else(|| anyhow!("{name} is not running"))?;
        netns::send_signal(pid, "CONT").await?;
        node.paused = false;
        Ok(())
    }

    /// Replaces the network's packet filters with `cut`: each receiving
    /// node's namespace drops what the cut's senders send it. Traffic from
    /// the harness (the bridge address) always passes.
    pub async fn partition(&mut self, cut: &Cut) -> anyhow::Result<()> {
        let mut sources: BTreeMap<String, Vec<Ipv4Addr>> = self
            .nodes
            .keys()
            .map(|name| (name.clone(), Vec::new()))
            .collect();
        for (from, to) in cut.drops() {
            let from_ip = self.node(from)?.ip;
            self.node(to)?;
            sources.get_mut(to).expect("checked above").push(from_ip);
        }
        for (name, wanted) in sources {
            let node = self.node(&name)?;
            if node.dropped_sources == wanted {
                continue;
            }
            self.network.set_input_drops(&node.netns, &wanted).await?;
            self.node_mut(&name)?.dropped_sources = wanted;
        }
        self.cut = (!cut.is_empty()).then(|| cut.clone());
        Ok(())
    }

    pub fn current_cut(&self) -> Option<&Cut> {
        self.cut.as_ref()
    }

    /// Removes every packet filter.
    pub async fn heal_network(&mut self) -> anyhow::Result<()> {
        self.partition(&Cut::new()).await
    }

    /// Moves a controller's wall clock to `seconds` from real time; negative
    /// values go back. Its monotonic clock is left alone (see `spawn`).
    pub async fn clock_offset(&mut self, name: &str, seconds: f64) -> anyhow::Result<()> {
        if !seconds.is_finite() {
            bail!("clock offset {seconds} is not a finite number of seconds");
        }
        self.set_clock_rate(name, 1.0).await?;
        tokio::time::sleep(CLOCK_PICKUP).await;
        self.write_clock(name, &format!("{seconds:+.3}"))
    }

    /// Makes a controller's wall clock run `rate` times as fast as real
    /// time, continuing from its current reading.
    pub async fn clock_rate(&mut self, name: &str, rate: f64) -> anyhow::Result<()> {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("clock rate {rate} is invalid: use a positive number such as 0.5 or 2");
        }
        self.set_clock_rate(name, rate).await
    }

    /// Puts a controller's clock back to real time at real speed.
    pub async fn clock_reset(&mut self, name: &str) -> anyhow::Result<()> {
        self.clock_offset(name, 0.0).await
    }

    /// Writes a rate to the control file. With FAKETIME_XRESET, libfaketime
    /// 0.9.10 continues from the last time it reported whenever the rate in
    /// the file changes and ignores the offset on that line, and a line
    /// without a rate keeps the previous rate. So an offset is set in two
    /// steps: rate 1 first, then, once the process has read that, the offset.
    async fn set_clock_rate(&mut self, name: &str, rate: f64) -> anyhow::Result<()> {
        let node = self.controller(name)?;
        if self.spec.faketime.is_none() {
            bail!("clock faults need libfaketime; set ClusterSpec::faketime");
        }
        if node.paused {
            bail!("{name} is paused and would not read its clock file; resume it first");
        }
        self.write_clock(name, &format!("+0 x{rate:.3}"))
    }

    fn write_clock(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let node = self.controller(name)?;
        write_atomically(&node.clock_file, &format!("{text}\n"))?;
        tracing::info!(node = name, setting = text, "clock changed");
        Ok(())
    }

    /// Starts a spare controller slot as a new replica with a fresh node
    /// id, an empty bootstrap list and no data. Returns its node id and
    /// address for AddReplica.
    pub async fn start_spare(&mut self, name: &str) -> anyhow::Result<(u64, String)> {
        let node = self.controller(name)?;
        if node.member || node.child.is_some() {
            bail!("{name} is not a spare: it is a member or running");
        }
        self.unmount_lossyfs(name).await?;
        remove_dir_if_present(&self.node(name)?.data_root)?;
        let node_id = self.take_node_id();
        self.node_mut(name)?.node_id = node_id;
        self.write_controller_config(name, Vec::new())?;
        self.spawn(name).await?;
        Ok((node_id, self.node(name)?.grpc_addr()))
    }

    /// Kills a controller that no longer belongs to the zone and deletes
    /// its data, so that its slot can be a spare again.
    pub async fn retire(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.controller(name)?;
        if node.member {
            bail!("{name} is still a member; remove it with RemoveReplica first");
        }
        if node.child.is_some() {
            self.kill(name).await?;
        }
        self.unmount_lossyfs(name).await?;
        remove_dir_if_present(&self.node(name)?.data_root)
    }

    /// Marks as members exactly the controllers whose current node id is in
    /// `members` (voters and learners, as ZoneStatus lists them).
    pub fn set_membership(&mut self, members: &BTreeSet<u64>) {
        for node in self
            .nodes
            .values_mut()
            .filter(|n| n.role == Role::Controller)
        {
            node.member = node.node_id != 0 && members.contains(&node.node_id);
        }
    }

    /// Adds spare slot `name` to the zone: starts it, then AddReplica.
    /// Returns its node id.
    pub async fn add_replica(&mut self, name: &str) -> anyhow::Result<u64> {
        let (node_id, addr) = self.start_spare(name).await?;
        let added = request_add_replica(&self.connector(), node_id, &addr).await;
        if let Err(status) = added {
            let members = zone_members(&self.connector()).await?;
            self.set_membership(&members);
            if !members.contains(&node_id) {
                self.retire(name).await?;
            }
            bail!("AddReplica of {name} (node {node_id}) failed: {status:?}");
        }
        self.node_mut(name)?.member = true;
        Ok(node_id)
    }

    /// Removes member `name` from the zone with RemoveReplica, then retires it.
    pub async fn remove_replica(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.controller(name)?;
        if !node.member {
            bail!("{name} is not a member of the zone");
        }
        let node_id = node.node_id;
        let removed = request_remove_replica(&self.connector(), node_id).await;
        let members = zone_members(&self.connector()).await?;
        self.set_membership(&members);
        if let Err(status) = removed {
            if members.contains(&node_id) {
                bail!("RemoveReplica of {name} (node {node_id}) failed: {status:?}");
            }
        }
        self.retire(name).await
    }

    /// Cuts a controller's power: SIGKILL, then the lossy filesystem drops
    /// every write the controller had not synced.
    pub async fn power_off(&mut self, name: &str) -> anyhow::Result<()> {
        self.controller(name)?;
        if self.node(name)?.child.is_some() {
            self.kill(name).await?;
        }
        let pid = match &self.node(name)?.lossyfs {
            Some(lossy) => lossy.child.id(),
            None => bail!("power loss needs a lossy filesystem; set ClusterSpec::lossy_fs"),
        };
        let pid = pid.ok_or_else(|| anyhow!("the lossy filesystem of {name} has exited"))?;
        netns::send_signal(pid, "USR1").await?;
        // NOTE: lossyfs sends no acknowledgement of the drop; 500 ms is a
        // guess at how long discarding the unsynced data takes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tracing::info!(node = name, "power lost");
        Ok(())
    }

    /// `power_off`, then a restart on what the filesystem kept.
    pub async fn power_loss(&mut self, name: &str) -> anyhow::Result<()> {
        self.power_off(name).await?;
        self.restart(name).await
    }

    /// Records and returns processes that exited on their own since the
    /// last check. Their nodes count as killed afterwards.
    pub fn check_exits(&mut self) -> Vec<Crash> {
        let mut found = Vec::new();
        for node in self.nodes.values_mut() {
            let Some(child) = node.child.as_mut() else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                if let Some(pid) = child.id() {
                    netns::remove_faketime_files(pid);
                }
                node.child = None;
                node.paused = false;
                tracing::error!(
                    node = %node.name,
                    %status,
                    log = %node.log_path.display(),
                    "process exited on its own"
                );
                found.push(Crash {
                    node: node.name.clone(),
                    status: status.to_string(),
                    log: node.log_path.clone(),
                });
            }
        }
        self.crashes.extend(found.iter().cloned());
        found
    }

    /// Returns every process exit the harness did not cause so far.
    pub fn crashes(&self) -> &[Crash] {
        &self.crashes
    }

    /// Undoes every fault: removes packet filters, resumes paused nodes,
    /// resets clocks, and starts every member that is not running (killed,
    /// powered off or crashed). Tries all of them and reports every failure.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.check_exits();
        let mut failures = Vec::new();
        if let Err(e) = self.heal_network().await {
            failures.push(format!("{e:#}"));
        }
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in &names {
            if self.nodes[name].paused {
                if let Err(e) = self.resume(name).await {
                    failures.push(format!("resume {name}: {e:#}"));
                }
            }
        }
        for name in &names {
            let node = &self.nodes[name];
            if node.member && node.child.is_none() {
                if let Err(e) = self.spawn(name).await {
                    failures.push(format!("restart {name}: {e:#}"));
                }
            }
        }
        if self.spec.faketime.is_some() {
            failures.extend(self.reset_all_clocks().await);
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(anyhow!("healing failed: {}", failures.join("; "))),
        }
    }

    /// Resets the clock of every running controller, all in the same two steps.
    async fn reset_all_clocks(&mut self) -> Vec<String> {
        let running: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.role == Role::Controller && n.child.is_some())
            .map(|n| n.name.clone())
            .collect();
        let mut failures = Vec::new();
        for name in &running {
            if let Err(e) = self.set_clock_rate(name, 1.0).await {
                failures.push(format!("clock of {name}: {e:#}"));
            }
        }
        tokio::time::sleep(CLOCK_PICKUP).await;
        for name in &running {
            if let Err(e) = self.write_clock(name, "+0.000") {
                failures.push(format!("clock of {name}: {e:#}"));
            }
        }
        failures
    }

    /// Stops every process and removes the namespaces, the bridge, the
    /// rules and the registry entry. Data, logs and ledgers stay in the run
    /// directory.
    pub async fn teardown(mut self) -> anyhow::Result<()> {
        self.check_exits();
        let mut failures = Vec::new();
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in &names {
            if self.nodes[name].child.is_some() {
                if let Err(e) = self.kill(name).await {
                    failures.push(format!("{e:#}"));
                }
            }
        }

        // Only now that no controller has a copy of a mount can lossyfs
        // stop cleanly.
        for name in &names {
            if let Err(e) = self.unmount_lossyfs(name).await {
                failures.push(format!("{e:#}"));
            }
        }

        failures.extend(self.network.destroy());
        if let Err(e) = self.registration.remove() {
            failures.push(format!("{e:#}"));
        }
        self.torn_down = true;
        tracing::info!(run = %self.run_id, "cluster torn down");
        match failures.is_empty() {
            true => Ok(()),
            false => Err(anyhow!(
                "teardown left things behind: {}",
                failures.join("; ")
            )),
        }
    }
}

impl Drop for Cluster {
    /// Removes everything without the async runtime when the cluster was
    /// not torn down, e.g. after a panic or an early return.
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        for node in self.nodes.values_mut() {
            if let Some(child) = node.child.as_mut() {
                let pid = child.id();
                let _ = child.start_kill();
                wait_for_exit(child);
                if let Some(pid) = pid {
                    netns::remove_faketime_files(pid);
                }
            }
        }
        for node in self.nodes.values_mut() {
            if let Some(lossy) = node.lossyfs.as_mut() {
                let _ = lossy.child.start_kill();
                wait_for_exit(&mut lossy.child);
                let _ = netns::run_blocking("umount", &["-l", &lossy.mount.to_string_lossy()]);
            }
        }
        for failure in self.network.destroy() {
            tracing::error!(error = %failure, "network clean-up failed");
        }
        if let Err(e) = self.registration.remove() {
            tracing::error!(error = %format!("{e:#}"), "registry clean-up failed");
        }
    }
}

fn wait_for_exit(child: &mut Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The command line of a node process, run as
/// `ip netns exec NS env VAR=.. ccs ROLE --config FILE`. `env` sets the
/// libfaketime variables so that they reach only `ccs`, not `ip`.
struct NodeCommand {
    env: Vec<String>,
    program: PathBuf,
    args: Vec<String>,
}

impl NodeCommand {
    fn into_command(self, netns: &str, run_id: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns, "env"])
            .args(&self.env)
            .arg(&self.program)
            .args(&self.args)
            .env(netns::RUN_MARKER, run_id)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }
}

fn unknown_node(name: &str, nodes: &BTreeMap<String, Node>) -> anyhow::Error {
    let known: Vec<&str> = nodes.keys().map(String::as_str).collect();
    anyhow!(
        "unknown node {name:?}; the cluster has {}",
        known.join(", ")
    )
}

/// Creates the run directory, or accepts an empty one. A directory with
/// files is rejected, because old Raft data in it would join the new zone.
fn prepare_run_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut entries = std::fs::read_dir(dir)?;
    if entries.next().is_some() {
        bail!(
            "run directory {} is not empty; pass a new directory",
            dir.display()
        );
    }
    Ok(())
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("failed to remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn write_toml<T: serde::Serialize>(path: &Path, config: &T) -> anyhow::Result<()> {
    let text = toml::to_string(config).context("config does not serialize to TOML")?;
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// Writes through a temporary file and a rename, so that a reader never
/// sees a partly written file. libfaketime would read an empty control
/// file as "+0".
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    std::fs::rename(&temporary, path).with_context(|| format!("failed to write {}", path.display()))
}

/// Removes what runs whose harness died left behind (see
/// `netns::remove_leftovers`) and returns one line per removed item. Fails
/// when another run is still alive.
pub async fn cleanup_leftovers() -> anyhow::Result<Vec<String>> {
    netns::check_tools()?;
    let removed = tokio::task::spawn_blocking(netns::remove_leftovers).await??;
    for line in &removed {
        tracing::info!(item = %line, "removed leftover of an earlier run");
    }
    Ok(removed)
}

/// Calls ZoneStatus on one controller only.
pub async fn zone_status_at(
    addr: &str,
    timeout: Duration,
) -> Result<ZoneStatusReply, tonic::Status> {
    let mut client = ZoneClient::new(ccs::client::channel(addr, timeout)?);
    let call = client.zone_status(ZoneStatusRequest {});
    match tokio::time::timeout(timeout, call).await {
        Ok(reply) => reply.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "ZoneStatus at {addr} timed out"
        ))),
    }
}

/// Node ids of the voters in the zone's committed membership.
///
/// Every listed controller is asked, and the answer with the newest term
/// and membership that names a leader wins. A controller that was just
/// removed keeps the joint membership of its own removal forever and knows
/// no leader, so the connector's preferred endpoint alone can be stuck.
/// Waits while the membership is joint or not yet applied: a replica that a
/// pending change omits is still a member until the change commits, and
/// retiring it early would wipe a voter the zone still counts on.
pub async fn zone_members(connector: &ZoneConnector) -> anyhow::Result<BTreeSet<u64>> {
    let deadline = tokio::time::Instant::now() + MEMBERSHIP_TIMEOUT;
    loop {
        let mut best: Option<ZoneStatusReply> = None;
        let mut last_error = String::from("no controller answered");
        for endpoint in connector.endpoints() {
            match zone_status_at(endpoint, STATUS_TIMEOUT).await {
                Ok(status) if status.leader_id != 0 => {
                    let newer = best.as_ref().is_none_or(|b| {
                        (status.term, status.membership_index) > (b.term, b.membership_index)
                    });
                    if newer {
                        best = Some(status);
                    }
                }
                Ok(_) => last_error = format!("{endpoint} knows no leader"),
                Err(status) => last_error = format!("{endpoint}: {}", status.message()),
            }
        }
        match &best {
            Some(status) if status.membership_committed => {
                // Only voters count: a learner left by an AddReplica that
                // failed before promotion does not add to the zone's fault
                // tolerance, and counting it let the membership nemesis
                // remove voters down to one.
                let voters = status.replicas.iter().filter(|r| r.role == "voter");
                return Ok(voters.map(|r| r.node_id).collect());
            }
            Some(status) => last_error = format!(
                "the zone's membership at index {} is still joint or uncommitted",
                status.membership_index
            ),
            None => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("reading the zone's membership failed after {MEMBERSHIP_TIMEOUT:?}: {last_error}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// AddReplica, retried while the zone has no leader. Adding a replica that
/// is already a voter changes nothing, so a retry is safe.
pub async fn request_add_replica(
    connector: &ZoneConnector,
    node_id: u64,
    addr: &str,
) -> Result<(), tonic::Status> {
    let request = AddReplicaRequest {
        node_id,
        addr: addr.to_string(),
    };
    connector
        .call_until(MEMBERSHIP_TIMEOUT, |mut c| {
            let request = request.clone();
            async move { c.add_replica(request).await }
        })
        .await
        .map(|_| ())
}

/// RemoveReplica, retried while the zone has no leader.
pub async fn request_remove_replica(
    connector: &ZoneConnector,
    node_id: u64,
) -> Result<(), tonic::Status> {
    connector
        .call_until(MEMBERSHIP_TIMEOUT, |mut c| async move {
            c.remove_replica(RemoveReplicaRequest { node_id }).await
        })
        .await
        .map(|_| ())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ccs::proto::zone::CreateInstanceRequest;

    /// Serializes the tests that start clusters, because one run at a time
    /// owns the subnet.
    pub(crate) static NETWORK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Returns a spec with a fresh run directory under the temporary
    /// directory, and libfaketime when it is installed.
    pub(crate) fn test_spec(test: &str) -> ClusterSpec {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
        let run_dir = std::env::temp_dir().join(format!("ccsj-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        let mut spec = ClusterSpec::new(ccs_binary(), run_dir);
        spec.faketime = faketime_library();
        spec
    }

    /// Returns `CCS_BINARY`, or else the `ccs` binary in this test's target directory.
    fn ccs_binary() -> PathBuf {
        if let Some(path) = std::env::var_os("CCS_BINARY") {
            return PathBuf::from(path);
        }
        let test_binary = std::env::current_exe().expect("path of the test binary");
        // The test binary is <target>/debug/deps/ccs_jepsen-HASH.
        test_binary
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .join("ccs")
    }

    fn faketime_library() -> Option<PathBuf> {
        let path = PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
        path.is_file().then_some(path)
    }

    pub(crate) async fn create(
        connector: &ZoneConnector,
        name: &str,
    ) -> Result<String, tonic::Status> {
        let request = CreateInstanceRequest {
            name: name.to_string(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
            pod: String::new(),
            request_id: format!("request-{name}"),
            ..Default::default()
        };
        connector
            .call_until(Duration::from_secs(30), |mut c| {
                let request = request.clone();
                async move { c.create_instance(request).await }
            })
            .await
            .map(|instance| instance.id)
    }

    /// Waits until the leader is a controller other than `old`.
    async fn wait_for_new_leader(cluster: &Cluster, old: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cluster.leader().await {
                Some(id) if id != old => return id,
                _ if Instant::now() >= deadline => panic!("no leader other than {old} after 30 s"),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    fn input_rules(cluster: &Cluster, name: &str) -> String {
        let ns = cluster.network.namespace_name(name);
        netns::run_blocking("ip", &["netns", "exec", &ns, "iptables", "-S", "INPUT"])
            .expect("iptables -S")
    }

    async fn voters(cluster: &Cluster) -> BTreeSet<u64> {
        zone_members(&cluster.connector())
            .await
            .expect("zone members")
    }

    /// Scenario, with 3 voters and 2 agents, creating an instance at each step:
    /// 1. isolate the leader, and another controller takes over;
    /// 2. heal, and no namespace drops anything;
    /// 3. kill a follower and restart it;
    /// 4. pause and resume it;
    /// 5. move its clock, change its rate and reset it (with libfaketime);
    /// 6. add spare n4, then remove it;
    /// 7. heal_all, and every member runs;
    /// 8. tear down, and no namespace, link, rule or registry entry is left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, iproute2, iptables and a built ccs binary"]
    async fn cluster_faults_and_teardown() {
        let _network = NETWORK.lock().await;
        let spec = test_spec("cluster");
        let run_dir = spec.run_dir.clone();
        let mut cluster = Cluster::start(spec).await.expect("cluster starts");
        let run_id = cluster.run_id().to_string();
        let connector = cluster.connector();
        create(&connector, "before")
            .await
            .expect("create before faults");

        // 1. Isolate the leader from every other node.
        let old_leader = cluster.leader().await.expect("a leader");
        let leader_name = cluster.node_name(old_leader).expect("leader slot");
        let others: Vec<String> = cluster
            .nodes()
            .into_iter()
            .filter(|n| n.name != leader_name)
            .map(|n| n.name)
            .collect();
        cluster
            .partition(&Cut::isolate(&leader_name, &others))
            .await
            .expect("partition");
        assert!(
            input_rules(&cluster, &leader_name).contains("-j DROP"),
            "leader drops nothing"
        );
        assert!(
            input_rules(&cluster, "h1").contains("-j DROP"),
            "h1 does not drop the leader"
        );
        let new_leader = wait_for_new_leader(&cluster, old_leader).await;
        assert_ne!(new_leader, old_leader);
        create(&connector, "during-partition")
            .await
            .expect("create on the majority side");

        // 2. Heal.
        cluster.heal_network().await.expect("heal");
        for node in cluster.nodes() {
            assert!(
                !input_rules(&cluster, &node.name).contains("DROP"),
                "{} still drops",
                node.name
            );
        }

        // 3. Kill and restart a follower.
        let leader = cluster.leader_node().await.expect("leader after heal");
        let follower = ["n1", "n2", "n3"]
            .into_iter()
            .find(|n| *n != leader)
            .expect("a follower");
        cluster.kill(follower).await.expect("kill");
        assert!(!cluster
            .nodes()
            .iter()
            .any(|n| n.name == follower && n.running));
        create(&connector, "follower-down")
            .await
            .expect("create with a follower down");
        cluster.restart(follower).await.expect("restart");

        // 4. Pause and resume.
        cluster.pause(follower).await.expect("pause");
        create(&connector, "follower-paused")
            .await
            .expect("create with a follower paused");
        cluster.resume(follower).await.expect("resume");

        // 5. Clock faults, when libfaketime is installed.
        if cluster.spec().faketime.is_some() {
            let pid = cluster.nodes[follower].pid().expect("follower pid");
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
            assert!(
                maps.contains("libfaketime"),
                "{follower} runs without libfaketime"
            );
            cluster
                .clock_offset(follower, 30.0)
                .await
                .expect("clock offset");
            cluster.clock_rate(follower, 2.0).await.expect("clock rate");
            cluster.clock_reset(follower).await.expect("clock reset");
            let clock = std::fs::read_to_string(run_dir.join(format!("clock/{follower}")))
                .expect("clock file");
            assert_eq!(clock.trim(), "+0.000");
        }

        // 6. Membership: add spare n4, then remove it again.
        let added = cluster.add_replica("n4").await.expect("add n4");
        assert!(
            voters(&cluster).await.contains(&added),
            "n4 is not a member"
        );
        create(&connector, "four-voters")
            .await
            .expect("create with 4 voters");
        cluster.remove_replica("n4").await.expect("remove n4");
        assert!(
            !voters(&cluster).await.contains(&added),
            "n4 is still a member"
        );

        // 7. heal_all leaves every member running, and no process crashed.
        cluster.heal_all().await.expect("heal all");
        let down: Vec<String> = cluster
            .nodes()
            .into_iter()
            .filter(|n| n.member && !n.running)
            .map(|n| n.name)
            .collect();
        assert!(down.is_empty(), "members not running: {down:?}");
        assert!(
            cluster.crashes().is_empty(),
            "crashes: {:?}",
            cluster.crashes()
        );
        create(&connector, "after-heal")
            .await
            .expect("create after healing");

        // 8. Teardown leaves no namespace, link, rule or registry entry.
        cluster.teardown().await.expect("teardown");
        let prefix = format!("{}{run_id}", netns::PREFIX);
        let namespaces = netns::run_blocking("ip", &["netns", "list"]).expect("ip netns list");
        assert!(
            !namespaces.contains(&prefix),
            "namespaces left: {namespaces}"
        );
        let links = netns::run_blocking("ip", &["link"]).expect("ip link");
        assert!(!links.contains(&prefix), "links left: {links}");
        let rules = netns::run_blocking("iptables", &["-S"]).expect("iptables -S");
        assert!(!rules.contains(&prefix), "rules left: {rules}");
        assert!(
            !Path::new(netns::REGISTRY_DIR).join(&run_id).exists(),
            "registry entry left"
        );
        std::fs::remove_dir_all(&run_dir).expect("remove run dir");
    }

    /// Runs the power-loss scenario and returns the acknowledged instances
    /// that the zone no longer lists. Scenario: 3 voters on lossy
    /// filesystems; create 5 instances; cut the power of all three at once;
    /// restart them; wait for a leader; list the instances.
    async fn instances_lost_in_power_loss(test: &str, skip_fsync: bool) -> Vec<String> {
        let mut spec = test_spec(test);
        let lossyfs = spec.ccs_binary.with_file_name("ccs-jepsen");
        spec.lossy_fs = Some(LossyFsSpec { binary: lossyfs });
        spec.controller_canary.skip_fsync = skip_fsync;
        // No snapshot, because building one syncs the write-ahead log.
        spec.raft.snapshot_after_entries = 100_000;
        let run_dir = spec.run_dir.clone();
        let mut cluster = Cluster::start(spec).await.expect("cluster starts");
        let connector = cluster.connector();
        let mut acknowledged = BTreeSet::new();
        for n in 0..5 {
            let id = create(&connector, &format!("durable-{n}"))
                .await
                .expect("create");
            acknowledged.insert(id);
        }

        for name in ["n1", "n2", "n3"] {
            cluster.power_off(name).await.expect("power off");
        }
        for name in ["n1", "n2", "n3"] {
            cluster.restart(name).await.expect("restart");
        }
        cluster
            .wait_for_leader(START_TIMEOUT)
            .await
            .expect("a leader after power loss");
        let listed = connector
            .call_until(START_TIMEOUT, |mut c| async move {
                c.list_instances(ReadRequest { stale: false }).await
            })
            .await
            .expect("list instances");
        let listed: BTreeSet<String> = listed.instances.into_iter().map(|i| i.id).collect();
        assert!(
            cluster.check_exits().is_empty(),
            "a process exited on its own"
        );

        cluster.teardown().await.expect("teardown");
        assert!(
            netns::mounts_under(&run_dir).is_empty(),
            "lossyfs still mounted"
        );
        std::fs::remove_dir_all(&run_dir).expect("remove run dir");
        acknowledged.difference(&listed).cloned().collect()
    }

    /// Checks that a power loss of every controller keeps every acknowledged
    /// instance, because the log is synced before a write is acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, /dev/fuse and built ccs and ccs-jepsen binaries"]
    async fn power_loss_keeps_acknowledged_writes() {
        let _network = NETWORK.lock().await;
        let lost = instances_lost_in_power_loss("power-synced", false).await;
        assert!(
            lost.is_empty(),
            "instances lost in the power loss: {lost:?}"
        );
    }

    /// Under the skip_fsync canary the same power loss loses acknowledged
    /// instances, which shows that the fault reaches unsynced data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, /dev/fuse and built ccs and ccs-jepsen binaries"]
    async fn power_loss_loses_unsynced_writes() {
        let _network = NETWORK.lock().await;
        let lost = instances_lost_in_power_loss("power-unsynced", true).await;
        assert!(!lost.is_empty(), "no instance was lost without fsync");
    }

    /// Scenario: start a cluster, then lose it the way a crashed harness
    /// would (no teardown, no drop, owner process gone). `cleanup_leftovers`
    /// kills its processes and removes its namespaces, links, FORWARD rule
    /// and registry entry, and the subnet is free again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs root, iproute2, iptables and a built ccs binary"]
    async fn leftovers_of_crashed_run_removed() {
        let _network = NETWORK.lock().await;
        let mut spec = test_spec("leftovers");
        spec.agents = 1;
        let run_dir = spec.run_dir.clone();
        let cluster = Cluster::start(spec).await.expect("cluster starts");
        let run_id = cluster.run_id().to_string();
        let pids: Vec<u32> = cluster.nodes.values().filter_map(Node::pid).collect();
        assert_eq!(pids.len(), 4);

        // Hand the run to an owner that has exited, and forget the cluster.
        let mut exited = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let dead_pid = exited.id();
        exited.wait().expect("wait for true");
        let owner = Path::new(netns::REGISTRY_DIR).join(&run_id).join("owner");
        let text = std::fs::read_to_string(&owner).expect("owner file");
        let text = text.replacen(
            &format!("pid={}", std::process::id()),
            &format!("pid={dead_pid}"),
            1,
        );
        std::fs::write(&owner, text).expect("rewrite owner file");
        std::mem::forget(cluster);

        let removed = cleanup_leftovers().await.expect("cleanup");
        assert!(
            removed.iter().any(|line| line.contains("killed")),
            "{removed:?}"
        );
        for pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = netns::tests::stat_state(&stat);
            assert!(
                state.is_none_or(|s| s == "Z"),
                "process {pid} still runs: {stat}"
            );
        }
        let prefix = format!("{}{run_id}", netns::PREFIX);
        let namespaces = netns::run_blocking("ip", &["netns", "list"]).expect("ip netns list");
        assert!(
            !namespaces.contains(&prefix),
            "namespaces left: {namespaces}"
        );
        let links = netns::run_blocking("ip", &["link"]).expect("ip link");
        assert!(!links.contains(&prefix), "links left: {links}");
        let rules = netns::run_blocking("iptables", &["-S"]).expect("iptables -S");
        assert!(!rules.contains(&prefix), "rules left: {rules}");
        assert!(!owner.exists(), "registry entry left");
        netns::check_subnet_free().expect("subnet free after cleanup");
        std::fs::remove_dir_all(&run_dir).expect("remove run dir");
    }
}
