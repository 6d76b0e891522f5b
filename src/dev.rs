//! `ccs dev`: a local cloud of 3 controllers and 4 agents on 127.0.0.1,
//! each a child process of the current executable, with libvirt's test
//! driver standing in for the hypervisors.
//!
//! This module owns the layout of the data directory, the config and host
//! files it writes there, the child processes and their shutdown, and the
//! zone's two pods. It does not touch a zone's state beyond creating those
//! pods: a restart on an existing directory reuses its config files, and the
//! controllers recover from their own data. pod-a is a DAS pod (hosts 1 and
//! 2), pod-b a SAN pod (hosts 3 and 4) whose shared array host-3 fronts.
//!
//! Layout under the data directory: `controller-N/` and `agent-N/` (data),
//! `config/*.toml`, `hosts/host-N.xml`, `logs/*.log`, `fences.jsonl` (the
//! test fencing driver's record), and `cloud.json`, which lists every
//! process once all of them have started.
//!
//! The file is past 800 lines because it contains the whole launcher (data
//! layout, config files, child processes and signals) and its tests. No
//! other module uses these parts.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::{de::DeserializeOwned, Serialize};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;
use tonic::Code;

use crate::client::ZoneConnector;
use crate::config::{AgentConfig, ControllerConfig, FencingConfig, Member, RaftTuning};
use crate::proto::zone::{CreatePodRequest, GetPodRequest, ReadRequest, ZoneStatusRequest};

/// Options of `ccs dev`.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Directory of every process's data, configs and logs.
    pub data_dir: PathBuf,
    /// Replay the first N trace requests, print the summary and stop.
    pub demo: Option<usize>,
    /// Controllers listen on base+1..=base+3, agents on base+101..=base+104,
    /// and their metrics servers 2000 ports above.
    pub base_port: u16,
    /// The Azure trace (`requests.csv`) that the demo replays.
    pub trace: PathBuf,
    /// Time compression of the demo replay.
    pub speedup: f64,
}

const ZONE: &str = "dev";
const CONTROLLERS: u16 = 3;
const AGENTS: u16 = 4;
/// Port offsets from `base_port`.
const CONTROLLER_PORT_OFFSET: u16 = 1;
const AGENT_PORT_OFFSET: u16 = 101;
const METRICS_PORT_OFFSET: u16 = 2000;
/// Local disk of each dev host, in GiB.
const HOST_DISK_GIB: u64 = 4000;
/// Capacity of pod-b's shared array, in GiB.
const SAN_POOL_GIB: u64 = 20_000;
/// File under the data directory that the test fencing driver appends to.
const FENCE_RECORD: &str = "fences.jsonl";
/// Per-call timeout of dev's own calls to the zone.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long startup waits for a leader, and then for the hosts to come up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child has to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Shape of each dev host: 2 sockets of 12 cores with 2 threads (48 CPUs)
/// and 384 GiB of memory, like a common two-socket server.
const HOST_XML: &str = "<node>
  <cpu>
    <mhz>2600</mhz><model>x86_64</model><active>48</active><max>48</max>
    <nodes>1</nodes><sockets>2</sockets><cores>12</cores><threads>2</threads>
  </cpu>
  <memory>402653184</memory>
</node>
";

/// A pod of the dev zone and the agents (1-based) that register into it.
struct PodPlan {
    name: &'static str,
    placement: &'static str,
    cpu_ratio: f64,
    memory_ratio: f64,
    /// "das" or "san", as CreatePodRequest takes it.
    storage: &'static str,
    /// The agent that fronts a SAN pod's shared array; `None` in a DAS pod.
    san_agent: Option<u16>,
    agents: [u16; 2],
}

const PODS: [PodPlan; 2] = [
    PodPlan {
        name: "pod-a",
        placement: "pack",
        cpu_ratio: 4.0,
        memory_ratio: 1.0,
        storage: "das",
        san_agent: None,
        agents: [1, 2],
    },
    PodPlan {
        name: "pod-b",
        placement: "spread",
        cpu_ratio: 2.0,
        memory_ratio: 1.0,
        storage: "san",
        san_agent: Some(3),
        agents: [3, 4],
    },
];

/// Host id of dev agent `n`.
fn host_id(n: u16) -> String {
    format!("host-{n}")
}

impl PodPlan {
    /// Host id of the SAN agent, empty in a DAS pod, as CreatePodRequest takes it.
    fn san_agent_id(&self) -> String {
        self.san_agent.map(host_id).unwrap_or_default()
    }
}

/// Starts the local cloud and runs it until a signal arrives, or until the
/// demo finishes when `options.demo` is set.
///
/// Returns an error if startup fails or the demo lost or failed a request.
/// Every child is stopped before this returns.
pub async fn run(options: DevOptions) -> anyhow::Result<()> {
    let layout = Layout::create(&options.data_dir)?;
    let restart = layout.root.join("controller-1").exists();
    if restart {
        println!("restarting the zone in {}", layout.root.display());
    } else {
        println!("creating a new zone in {}", layout.root.display());
    }
    let plan = CloudPlan::prepare(&layout, options.base_port)?;
    plan.check_san_agents(&layout)?;
    plan.check_ports_free()?;
    let mut signals = ShutdownSignals::install()?;
    let mut cloud = Cloud::default();

    let outcome = tokio::select! {
        result = start(&mut cloud, &layout, &plan) => result,
        name = signals.recv() => Err(anyhow!("startup interrupted by {name}")),
    };
    let outcome = match outcome {
        Ok(connector) => serve(&mut cloud, &mut signals, &connector, &options).await,
        Err(error) => Err(error),
    };
    cloud.stop().await;
    outcome
}

/// Starts the controllers, creates the pods, starts the agents, waits for
/// their hosts and writes `cloud.json`.
async fn start(
    cloud: &mut Cloud,
    layout: &Layout,
    plan: &CloudPlan,
) -> anyhow::Result<ZoneConnector> {
    for spec in &plan.controllers {
        cloud.spawn(spec)?;
    }
    let connector =
        ZoneConnector::new(&plan.endpoints(), CALL_TIMEOUT).map_err(anyhow::Error::msg)?;
    wait_for_leader(cloud, &connector).await?;
    create_pods(&connector, layout).await?;
    for spec in &plan.agents {
        cloud.spawn(spec)?;
    }
    wait_for_hosts(cloud, &connector, plan.agents.len()).await?;
    cloud.write_manifest(&layout.root.join("cloud.json"))?;

    for process in &cloud.processes {
        println!("{process}");
    }
    println!("export CCS_ENDPOINT={}", plan.endpoints());
    Ok(connector)
}

/// Runs the demo if one was requested (the trace replay, then the storage
/// and network walk-through), else waits for a signal. Warns about children
/// that exit meanwhile.
async fn serve(
    cloud: &mut Cloud,
    signals: &mut ShutdownSignals,
    connector: &ZoneConnector,
    options: &DevOptions,
) -> anyhow::Result<()> {
    let Some(count) = options.demo else {
        println!("the cloud is running; press Ctrl-C to stop it");
        supervise(cloud, signals, std::future::pending::<()>()).await;
        return Ok(());
    };
    let demo = crate::demo::run_demo(connector, &options.trace, count, options.speedup);
    let Some(summary) = supervise(cloud, signals, demo).await else {
        bail!("the demo was interrupted");
    };
    let summary = summary?;
    println!("{summary}");
    let logs = options.data_dir.join("logs");
    if !summary.ok() {
        bail!(
            "the demo failed {} requests and lost {} instances (logs in {})",
            summary.failed,
            summary.lost,
            logs.display()
        );
    }
    let walkthrough = crate::demo_devices::run(connector);
    let Some(outcome) = supervise(cloud, signals, walkthrough).await else {
        bail!("the demo was interrupted");
    };
    outcome.with_context(|| {
        format!(
            "the storage and network part of the demo failed (logs in {})",
            logs.display()
        )
    })
}

/// Drives `work` to completion while checking the children each second.
/// Returns `None` if a shutdown signal arrived first.
async fn supervise<T>(
    cloud: &mut Cloud,
    signals: &mut ShutdownSignals,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            output = &mut work => return Some(output),
            name = signals.recv() => {
                tracing::info!(signal = name, "stopping the cloud");
                return None;
            }
            _ = ticks.tick() => {
                for process in cloud.reap_exited() {
                    tracing::warn!(
                        role = process.role.as_str(),
                        id = %process.id,
                        status = %process.exit_status(),
                        log = %process.log.display(),
                        "process exited unexpectedly"
                    );
                }
            }
        }
    }
}

/// Polls ZoneStatus until the zone reports a leader.
async fn wait_for_leader(cloud: &mut Cloud, connector: &ZoneConnector) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        cloud.check_startup()?;
        let status = connector
            .call(|mut client| async move { client.zone_status(ZoneStatusRequest {}).await })
            .await;
        match status {
            Ok(status) if status.leader_id != 0 => {
                tracing::info!(
                    node_id = status.leader_id,
                    term = status.term,
                    "zone has a leader"
                );
                return Ok(());
            }
            Ok(_) => tracing::debug!("zone has no leader yet"),
            Err(status) => tracing::debug!(message = status.message(), "zone status failed"),
        }
        if Instant::now() >= deadline {
            bail!("the zone elected no leader within {STARTUP_TIMEOUT:?}; see the controller logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the dev pods and leaves any pod that already exists unchanged,
/// after checking that it has the storage model of the plan.
async fn create_pods(connector: &ZoneConnector, layout: &Layout) -> anyhow::Result<()> {
    for pod in &PODS {
        let request = CreatePodRequest {
            name: pod.name.to_string(),
            cpu_ratio: Some(pod.cpu_ratio),
            memory_ratio: Some(pod.memory_ratio),
            placement: pod.placement.to_string(),
            storage: pod.storage.to_string(),
            san_agent: pod.san_agent_id(),
            ..CreatePodRequest::default()
        };
        let result = connector
            .call_until(STARTUP_TIMEOUT, |mut client| {
                let request = request.clone();
                async move { client.create_pod(request).await }
            })
            .await;
        match result {
            Ok(_) => tracing::info!(pod = pod.name, "created pod"),
            Err(status) if status.code() == Code::AlreadyExists => {
                check_existing_pod(connector, pod, layout).await?
            }
            Err(status) => bail!("creating pod {} failed: {}", pod.name, status.message()),
        }
    }
    Ok(())
}

/// Fails, saying what to do, if a pod the zone already has differs from the
/// plan in its storage model, as a pod-b made by an older `ccs dev` (DAS) does.
async fn check_existing_pod(
    connector: &ZoneConnector,
    pod: &PodPlan,
    layout: &Layout,
) -> anyhow::Result<()> {
    let request = GetPodRequest {
        name: pod.name.to_string(),
        stale: false,
    };
    let reply = connector
        .call_until(STARTUP_TIMEOUT, |mut client| {
            let request = request.clone();
            async move { client.get_pod(request).await }
        })
        .await
        .map_err(|status| anyhow!("reading pod {} failed: {}", pod.name, status.message()))?;
    let existing = reply.pod.unwrap_or_default();
    let found = (existing.storage.as_str(), existing.san_agent.as_str());
    let planned = (pod.storage, pod.san_agent_id());
    if found != (planned.0, planned.1.as_str()) {
        bail!(
            "pod {} in {} has storage {:?} with SAN agent {:?}, but this ccs dev makes it \
             {:?} with SAN agent {:?}; the zone was made by an older ccs dev, so stop it and \
             remove the directory (rm -r {}) to start a new zone, or pass another --data-dir",
            pod.name,
            layout.root.display(),
            found.0,
            found.1,
            planned.0,
            planned.1,
            layout.root.display()
        );
    }
    Ok(())
}

/// Polls ListHosts until `count` hosts are up.
async fn wait_for_hosts(
    cloud: &mut Cloud,
    connector: &ZoneConnector,
    count: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        cloud.check_startup()?;
        let hosts = connector
            .call(|mut client| async move { client.list_hosts(ReadRequest { stale: false }).await })
            .await;
        let up = match hosts {
            Ok(list) => list.hosts.iter().filter(|host| host.health == "up").count(),
            Err(status) => {
                tracing::debug!(message = status.message(), "listing hosts failed");
                0
            }
        };
        if up >= count {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{up} of {count} hosts are up after {STARTUP_TIMEOUT:?}; see the agent logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Absolute paths of the data directory's parts.
struct Layout {
    root: PathBuf,
    config: PathBuf,
    hosts: PathBuf,
    logs: PathBuf,
}

impl Layout {
    /// Creates the directory tree, leaving existing files in place.
    fn create(data_dir: &Path) -> anyhow::Result<Layout> {
        fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
        let root = data_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve the data directory {}", data_dir.display()))?;
        let layout = Layout {
            config: root.join("config"),
            hosts: root.join("hosts"),
            logs: root.join("logs"),
            root,
        };
        for dir in [&layout.config, &layout.hosts, &layout.logs] {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(layout)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Controller,
    Agent,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
        }
    }
}

/// How to start one child process, and where it serves.
#[derive(Clone, Debug)]
struct ProcessSpec {
    role: Role,
    /// Node id of a controller, host id of an agent.
    id: String,
    grpc: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

/// The processes of the cloud, read back from their config files.
struct CloudPlan {
    controllers: Vec<ProcessSpec>,
    agents: Vec<ProcessSpec>,
}

impl CloudPlan {
    /// Writes the config and host files that do not exist yet and reads all
    /// config files back, so a restart keeps the ports it first used.
    fn prepare(layout: &Layout, base_port: u16) -> anyhow::Result<CloudPlan> {
        let ports = Ports::new(base_port)?;
        let controllers = (1..=CONTROLLERS)
            .map(|n| {
                let path = layout.config.join(format!("controller-{n}.toml"));
                write_if_missing(&path, || toml_text(&controller_config(layout, &ports, n)))?;
                let config: ControllerConfig = load_config(&path)?;
                Ok(ProcessSpec {
                    role: Role::Controller,
                    id: config.node_id.to_string(),
                    grpc: config.listen,
                    metrics: config.metrics_listen,
                    config: path,
                    log: layout.logs.join(format!("controller-{n}.log")),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let agents = (1..=AGENTS)
            .map(|n| {
                let host_file = layout.hosts.join(format!("host-{n}.xml"));
                write_if_missing(&host_file, || Ok(HOST_XML.to_string()))?;
                let path = layout.config.join(format!("host-{n}.toml"));
                let config = agent_config(layout, &ports, n, &host_file)?;
                write_if_missing(&path, || toml_text(&config))?;
                let config: AgentConfig = load_config(&path)?;
                Ok(ProcessSpec {
                    role: Role::Agent,
                    log: layout.logs.join(format!("{}.log", config.host_id)),
                    id: config.host_id,
                    grpc: config.listen,
                    metrics: config.metrics_listen,
                    config: path,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(CloudPlan {
            controllers,
            agents,
        })
    }

    /// Fails, saying what to do, if the config of a SAN pod's agent has no
    /// array capacity, as the configs of an older `ccs dev` (whose pod-b was
    /// a DAS pod) have: that agent could not serve the pod's volumes.
    fn check_san_agents(&self, layout: &Layout) -> anyhow::Result<()> {
        for pod in &PODS {
            let Some(agent) = pod.san_agent else { continue };
            let spec = &self.agents[usize::from(agent - 1)];
            let config: AgentConfig = load_config(&spec.config)?;
            if config.san_pool_gib == 0 {
                bail!(
                    "{} has san_pool_gib = 0, but {} fronts the shared array of SAN pod {}; \
                     the directory {} was made by an older ccs dev whose {} is a DAS pod, so \
                     remove it (rm -r {}) to start a new zone, or pass another --data-dir",
                    spec.config.display(),
                    spec.id,
                    pod.name,
                    layout.root.display(),
                    pod.name,
                    layout.root.display()
                );
            }
        }
        Ok(())
    }

    /// Fails, naming the address, if any port of the plan is in use, so that
    /// the demo never talks to a cloud that another process started.
    fn check_ports_free(&self) -> anyhow::Result<()> {
        for spec in self.controllers.iter().chain(&self.agents) {
            for addr in [spec.grpc, spec.metrics] {
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    bail!(
                        "{addr} for {} {} is not free ({e}); stop the process using it, \
                         or start this cloud on other ports with --base-port",
                        spec.role.as_str(),
                        spec.id
                    );
                }
            }
        }
        Ok(())
    }

    /// Returns the controllers' addresses, comma-separated as CCS_ENDPOINT takes them.
    fn endpoints(&self) -> String {
        let addrs: Vec<String> = self
            .controllers
            .iter()
            .map(|spec| spec.grpc.to_string())
            .collect();
        addrs.join(",")
    }
}

/// Ports derived from `base_port`, checked to fit in 16 bits.
struct Ports {
    base: u16,
}

impl Ports {
    fn new(base: u16) -> anyhow::Result<Ports> {
        let highest = u32::from(base)
            + u32::from(METRICS_PORT_OFFSET)
            + u32::from(AGENT_PORT_OFFSET)
            + u32::from(AGENTS);
        if highest > u32::from(u16::MAX) {
            bail!("base port {base} is too high: ports up to {highest} would be needed");
        }
        Ok(Ports { base })
    }

    fn grpc(&self, offset: u16, n: u16) -> SocketAddr {
        loopback(self.base + offset + n - 1)
    }

    fn metrics(&self, offset: u16, n: u16) -> SocketAddr {
        loopback(self.base + METRICS_PORT_OFFSET + offset + n - 1)
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn controller_config(layout: &Layout, ports: &Ports, n: u16) -> ControllerConfig {
    let bootstrap = (1..=CONTROLLERS)
        .map(|m| Member {
            id: u64::from(m),
            addr: ports.grpc(CONTROLLER_PORT_OFFSET, m).to_string(),
        })
        .collect();
    ControllerConfig {
        zone: ZONE.to_string(),
        node_id: u64::from(n),
        listen: ports.grpc(CONTROLLER_PORT_OFFSET, n),
        advertise: None,
        metrics_listen: ports.metrics(CONTROLLER_PORT_OFFSET, n),
        data_dir: layout.root.join(format!("controller-{n}")),
        bootstrap,
        raft: RaftTuning::default(),
        host_timeout: Duration::from_secs(5),
        log_json: false,
        // The test driver only records the fence, because a dev host is a
        // libvirt test driver connection that nothing can power off.
        fencing: FencingConfig {
            driver: "test".to_string(),
            record_file: Some(layout.root.join(FENCE_RECORD)),
            ..FencingConfig::default()
        },
        unsafe_canary: Default::default(),
    }
}

fn agent_config(
    layout: &Layout,
    ports: &Ports,
    n: u16,
    host_file: &Path,
) -> anyhow::Result<AgentConfig> {
    let pod = PODS
        .iter()
        .find(|pod| pod.agents.contains(&n))
        .with_context(|| format!("no dev pod lists agent {n}"))?;
    let controllers = (1..=CONTROLLERS)
        .map(|m| ports.grpc(CONTROLLER_PORT_OFFSET, m).to_string())
        .collect();
    Ok(AgentConfig {
        zone: ZONE.to_string(),
        host_id: host_id(n),
        pod: pod.name.to_string(),
        listen: ports.grpc(AGENT_PORT_OFFSET, n),
        advertise: None,
        metrics_listen: ports.metrics(AGENT_PORT_OFFSET, n),
        libvirt_uri: format!("test://{}", host_file.display()),
        disk_gib: HOST_DISK_GIB,
        data_dir: layout.root.join(format!("agent-{n}")),
        controllers,
        heartbeat_interval: Duration::from_secs(1),
        log_json: false,
        ledger: None,
        san_pool_gib: if pod.san_agent == Some(n) {
            SAN_POOL_GIB
        } else {
            0
        },
        ..Default::default()
    })
}

fn toml_text<T: Serialize>(config: &T) -> anyhow::Result<String> {
    toml::to_string(config).context("cannot serialize a config file")
}

fn load_config<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    Ok(crate::config::load(path)?)
}

/// Writes `contents()` to `path` unless the file exists.
fn write_if_missing(
    path: &Path,
    contents: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    write_atomically(path, contents()?.as_bytes())
}

/// Writes to a temporary file beside `path`, then renames it into place, so
/// a reader sees either the old file or the whole new one.
fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file =
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} into place", tmp.display()))
}

/// A started child process.
struct Process {
    role: Role,
    id: String,
    grpc: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    pid: Option<u32>,
    child: Child,
    /// Set once the child's exit has been observed.
    exited: Option<ExitStatus>,
}

impl Process {
    fn exit_status(&self) -> String {
        self.exited
            .map_or_else(|| "running".to_string(), |status| status.to_string())
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pid = self
            .pid
            .map_or_else(|| "-".to_string(), |pid| pid.to_string());
        write!(
            f,
            "{:<10} {:<6} pid {:<7} grpc {:<15} metrics {:<15} log {}",
            self.role.as_str(),
            self.id,
            pid,
            self.grpc,
            self.metrics,
            self.log.display()
        )
    }
}

/// The running children. Dropping it kills any still running.
#[derive(Default)]
struct Cloud {
    processes: Vec<Process>,
}

impl Cloud {
    /// Starts `ccs <role> --config FILE`, with stdout and stderr appended to
    /// the process's log file.
    fn spawn(&mut self, spec: &ProcessSpec) -> anyhow::Result<()> {
        let executable = std::env::current_exe().context("cannot locate the ccs executable")?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .with_context(|| format!("cannot open the log file {}", spec.log.display()))?;
        let stderr = log
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        let child = Command::new(&executable)
            .arg(spec.role.as_str())
            .arg("--config")
            .arg(&spec.config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            // Its own process group keeps a terminal's Ctrl-C away from the
            // children, so that dev stops them in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} {}", spec.role.as_str(), spec.id))?;
        let pid = child.id();
        tracing::debug!(role = spec.role.as_str(), id = %spec.id, ?pid, "started process");
        self.processes.push(Process {
            role: spec.role,
            id: spec.id.clone(),
            grpc: spec.grpc,
            metrics: spec.metrics,
            config: spec.config.clone(),
            log: spec.log.clone(),
            pid: child.id(),
            child,
            exited: None,
        });
        Ok(())
    }

    /// Records the children that exited since the last call and returns them.
    fn reap_exited(&mut self) -> Vec<&Process> {
        let mut newly_exited = Vec::new();
        for (index, process) in self.processes.iter_mut().enumerate() {
            if process.exited.is_some() {
                continue;
            }
            match process.child.try_wait() {
                Ok(Some(status)) => {
                    process.exited = Some(status);
                    newly_exited.push(index);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(id = %process.id, %error, "cannot poll a child process")
                }
            }
        }
        newly_exited
            .into_iter()
            .map(|index| &self.processes[index])
            .collect()
    }

    /// Fails if any child has exited, naming its log file.
    fn check_startup(&mut self) -> anyhow::Result<()> {
        if let Some(process) = self.reap_exited().first() {
            bail!(
                "{} {} exited during startup with {}, see its log {}",
                process.role.as_str(),
                process.id,
                process.exit_status(),
                process.log.display()
            );
        }
        Ok(())
    }

    /// Writes `cloud.json`, which lists every process.
    fn write_manifest(&self, path: &Path) -> anyhow::Result<()> {
        let processes: Vec<serde_json::Value> = self
            .processes
            .iter()
            .map(|process| {
                serde_json::json!({
                    "role": process.role.as_str(),
                    "id": process.id,
                    "pid": process.pid,
                    "grpc": process.grpc.to_string(),
                    "metrics": process.metrics.to_string(),
                    "config": process.config,
                    "log": process.log,
                })
            })
            .collect();
        let manifest = serde_json::json!({ "zone": ZONE, "processes": processes });
        let text =
            serde_json::to_string_pretty(&manifest).context("cannot serialize cloud.json")?;
        write_atomically(path, text.as_bytes())
    }

    /// Stops the agents, then the controllers: SIGTERM first, SIGKILL for
    /// any child still running after `STOP_TIMEOUT`.
    async fn stop(&mut self) {
        for role in [Role::Agent, Role::Controller] {
            let group: Vec<&mut Process> = self
                .processes
                .iter_mut()
                .filter(|process| process.role == role && process.exited.is_none())
                .collect();
            stop_group(group).await;
        }
    }
}

async fn stop_group(mut group: Vec<&mut Process>) {
    let pids: Vec<String> = group
        .iter()
        .filter_map(|process| process.pid)
        .map(|pid| pid.to_string())
        .collect();
    if pids.is_empty() {
        return;
    }
    // NOTE: `kill(1)` sends the SIGTERM because the crate forbids the unsafe
    // code that calling libc::kill directly needs.
    let sent = Command::new("kill").arg("-TERM").args(&pids).status().await;
    if !matches!(&sent, Ok(status) if status.success()) {
        tracing::warn!(?sent, ?pids, "sending SIGTERM failed");
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for process in group.iter_mut() {
        let waited = tokio::time::timeout_at(deadline, process.child.wait()).await;
        if let Ok(Ok(status)) = waited {
            process.exited = Some(status);
            continue;
        }
        let role = process.role.as_str();
        tracing::warn!(role, id = %process.id, "killing a process still running after SIGTERM");
        if let Err(error) = process.child.kill().await {
            tracing::warn!(id = %process.id, %error, "killing a child process failed");
        }
    }
}

/// The signals that stop `ccs dev`: SIGINT (Ctrl-C), SIGTERM and SIGHUP
/// (the terminal closed). The children run in their own process group, so
/// dev must stop them itself.
struct ShutdownSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<ShutdownSignals> {
        let install = |kind: SignalKind| signal(kind).context("cannot install a signal handler");
        Ok(ShutdownSignals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// Waits for the next signal and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(root: &Path) -> Layout {
        Layout::create(root).expect("creating the layout")
    }

    #[test]
    fn configs_round_trip_and_validate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = layout(dir.path());
        let plan = CloudPlan::prepare(&layout, 7100).expect("preparing the plan");
        for spec in &plan.controllers {
            let config: ControllerConfig = load_config(&spec.config).expect("controller config");
            config
                .validate(&spec.config)
                .expect("valid controller config");
            assert_eq!(config.bootstrap.len(), 3);
        }
        for spec in &plan.agents {
            let config: AgentConfig = load_config(&spec.config).expect("agent config");
            config.validate(&spec.config).expect("valid agent config");
            assert!(
                config.libvirt_uri.starts_with("test:///"),
                "{}",
                config.libvirt_uri
            );
        }
    }

    #[test]
    fn plan_assigns_ports() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = CloudPlan::prepare(&layout(dir.path()), 7100).expect("preparing the plan");
        let grpc: Vec<u16> = plan
            .controllers
            .iter()
            .map(|spec| spec.grpc.port())
            .collect();
        let metrics: Vec<u16> = plan.agents.iter().map(|spec| spec.metrics.port()).collect();
        assert_eq!(grpc, vec![7101, 7102, 7103]);
        assert_eq!(plan.agents[3].grpc.port(), 7204);
        assert_eq!(plan.controllers[0].metrics.port(), 9101);
        assert_eq!(metrics, vec![9201, 9202, 9203, 9204]);
        assert_eq!(
            plan.endpoints(),
            "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
        );
    }

    #[test]
    fn agents_join_their_pods() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = CloudPlan::prepare(&layout(dir.path()), 7100).expect("preparing the plan");
        let pods: Vec<String> = plan
            .agents
            .iter()
            .map(|spec| {
                load_config::<AgentConfig>(&spec.config)
                    .expect("agent config")
                    .pod
            })
            .collect();
        assert_eq!(pods, vec!["pod-a", "pod-a", "pod-b", "pod-b"]);
    }

    #[test]
    fn restart_keeps_existing_configs() {
        let dir = tempfile::tempdir().expect("temp dir");
        CloudPlan::prepare(&layout(dir.path()), 7100).expect("first start");
        let plan = CloudPlan::prepare(&layout(dir.path()), 8100).expect("restart");
        assert_eq!(plan.controllers[0].grpc.port(), 7101);
    }

    #[test]
    fn pod_plan_makes_das_and_san_pods() {
        assert_eq!(PODS[0].name, "pod-a");
        assert_eq!(PODS[0].storage, "das");
        assert_eq!(PODS[0].san_agent_id(), "");
        assert_eq!(PODS[1].name, "pod-b");
        assert_eq!(PODS[1].storage, "san");
        assert_eq!(PODS[1].san_agent_id(), "host-3");
        for pod in &PODS {
            if let Some(agent) = pod.san_agent {
                assert!(
                    pod.agents.contains(&agent),
                    "{} fronts another pod",
                    pod.name
                );
            }
        }
    }

    #[test]
    fn only_san_agent_gets_pool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = CloudPlan::prepare(&layout(dir.path()), 7100).expect("preparing the plan");
        let pools: Vec<(String, u64)> = plan
            .agents
            .iter()
            .map(|spec| {
                let config: AgentConfig = load_config(&spec.config).expect("agent config");
                (config.host_id, config.san_pool_gib)
            })
            .collect();
        let expected = [
            ("host-1", 0),
            ("host-2", 0),
            ("host-3", SAN_POOL_GIB),
            ("host-4", 0),
        ];
        let expected: Vec<(String, u64)> = expected
            .iter()
            .map(|(host, gib)| (host.to_string(), *gib))
            .collect();
        assert_eq!(pools, expected);
    }

    #[test]
    fn controllers_use_test_fencing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = layout(dir.path());
        let plan = CloudPlan::prepare(&layout, 7100).expect("preparing the plan");
        for spec in &plan.controllers {
            let config: ControllerConfig = load_config(&spec.config).expect("controller config");
            assert_eq!(config.fencing.driver, "test");
            assert_eq!(
                config.fencing.record_file,
                Some(layout.root.join("fences.jsonl"))
            );
        }
    }

    #[test]
    fn old_data_dir_without_san_pool_fails() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = layout(dir.path());
        let plan = CloudPlan::prepare(&layout, 7100).expect("preparing the plan");
        plan.check_san_agents(&layout)
            .expect("a new plan has a SAN pool");

        // An older ccs dev wrote agent configs without san_pool_gib.
        let path = &plan.agents[2].config;
        let mut config: AgentConfig = load_config(path).expect("agent config");
        config.san_pool_gib = 0;
        fs::write(path, toml_text(&config).expect("toml")).expect("rewriting the config");

        let restarted = CloudPlan::prepare(&layout, 7100).expect("restart");
        let error = restarted.check_san_agents(&layout).expect_err("old config");
        let message = format!("{error:#}");
        assert!(message.contains("host-3"), "{message}");
        assert!(message.contains("rm -r"), "{message}");
    }

    #[test]
    fn ports_reject_high_base() {
        assert!(Ports::new(65000).is_err());
        assert!(Ports::new(7100).is_ok());
    }
}
