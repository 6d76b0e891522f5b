//! Configuration files of the controller and the agent (TOML).
//!
//! Each struct has a `validate()` that runs at startup and names the
//! offending field and value, so a malformed file stops the process before
//! it touches any state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is malformed: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field} = {value:?} is invalid: {reason}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// One member of a zone's initial Raft membership.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u64,
    /// gRPC address of the replica, `host:port`.
    pub addr: String,
}

/// Raft timing and log retention.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Leader heartbeat period. Default "100ms".
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout. Default "600ms".
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout. Default "1200ms".
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many entries since the last one. Default 10000.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind the last snapshot. Default 1000.
    pub keep_entries_after_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(600),
            election_timeout_max: Duration::from_millis(1200),
            snapshot_after_entries: 10_000,
            keep_entries_after_snapshot: 1_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Zone name, used in logs and checked against agents' registrations.
    pub zone: String,
    /// This replica's Raft node id; unique in the zone, never reused.
    pub node_id: u64,
    /// Address the gRPC server (public API and Raft transport) listens on.
    pub listen: SocketAddr,
    /// Address other replicas and clients use to reach `listen`. Default: `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Address of the HTTP server for `/metrics` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// Directory of the RocksDB database and snapshot files.
    pub data_dir: PathBuf,
    /// The zone's first members. A replica listed here initializes the zone
    /// on first start; a replica added later with `ccs zone add-replica`
    /// leaves this empty.
    #[serde(default)]
    pub bootstrap: Vec<Member>,
    #[serde(default)]
    pub raft: RaftTuning,
    /// A host whose agent is silent this long is marked suspect. Default "5s".
    #[serde(default = "default_host_timeout", with = "humantime_serde")]
    pub host_timeout: Duration,
    /// Log as JSON lines instead of text. Default false.
    #[serde(default)]
    pub log_json: bool,
    /// Settings of the driver that powers off a suspect host before the
    /// leader restarts the host's SAN instances elsewhere. Default: no
    /// fencing driver, so nothing restarts elsewhere.
    #[serde(default)]
    pub fencing: FencingConfig,
    /// Switches that break safety on purpose, so that verification runs can
    /// show they catch the break. Never set them on a real zone.
    #[serde(default)]
    pub unsafe_canary: ControllerCanary,
}

/// The fencing driver of a zone's leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// The driver. "none" never fences, so a silent host's instances wait
    /// for it. "command" runs `command` with the host id as its last
    /// argument, and exit status 0 means the host is powered off (a wrapper
    /// around IPMI or Redfish). "test" appends the fence to `record_file`
    /// and reports success, for clouds on libvirt's test driver. Default
    /// "none".
    pub driver: String,
    /// Program and arguments of the "command" driver.
    pub command: Vec<String>,
    /// File the "test" driver appends one JSON line per fence to.
    pub record_file: Option<PathBuf>,
    /// How long a host stays suspect before the leader fences it. Default "10s".
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    /// How long the "command" driver may run. Default "60s".
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            driver: "none".to_string(),
            command: Vec::new(),
            record_file: None,
            after: Duration::from_secs(10),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Safety breaks of a controller, all off by default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerCanary {
    /// Acknowledge Raft log appends without syncing the write-ahead log.
    pub skip_fsync: bool,
    /// Serve linearizable reads from the local state machine, without
    /// confirming leadership through a read index.
    pub local_reads: bool,
}

impl ControllerCanary {
    pub fn any(&self) -> bool {
        self.skip_fsync || self.local_reads
    }
}

fn default_host_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub zone: String,
    /// The host's id in the zone; stable across agent restarts.
    pub host_id: String,
    /// The pod the host belongs to; it must exist in the zone.
    pub pod: String,
    /// Address the agent's gRPC server listens on.
    pub listen: SocketAddr,
    /// Address the zone leader uses to reach `listen`. Default: `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    pub metrics_listen: SocketAddr,
    /// libvirt connection URI: `qemu:///system` on a real host,
    /// `test:///path/to/host.xml` for the test driver.
    pub libvirt_uri: String,
    /// Local disk available to instances, in GiB.
    pub disk_gib: u64,
    /// Directory for the agent's fencing state.
    pub data_dir: PathBuf,
    /// Controller replicas, `host:port`, tried in turn.
    pub controllers: Vec<String>,
    /// Heartbeat period. Default "1s".
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(default)]
    pub log_json: bool,
    /// File the agent appends one JSON line to per executed order. Default: none.
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// Name of the host's local libvirt storage pool, a `dir` pool the agent
    /// defines when it is missing. Default "ccs-local".
    #[serde(default = "default_local_pool")]
    pub local_pool: String,
    /// Directory of the local storage pool. Default: `<data_dir>/volumes`.
    #[serde(default)]
    pub local_pool_dir: Option<PathBuf>,
    /// Name of the libvirt storage pool of the pod's shared array (SAN pods).
    /// The operator defines it on every host of the pod, as type iscsi,
    /// logical, rbd or netfs. The agent defines a `dir` pool of this name
    /// itself only under libvirt's test driver. Default "ccs-san".
    #[serde(default = "default_san_pool")]
    pub san_pool: String,
    /// Capacity of the pod's shared array in GiB when this agent fronts it,
    /// which makes the agent own the SAN pool's volumes; 0 (the default)
    /// when it does not.
    #[serde(default)]
    pub san_pool_gib: u64,
    /// The host's uplink bridge, which carries VLAN-tagged tenant networks.
    /// libvirt tags VLANs on a network only with an Open vSwitch bridge, so
    /// on a real host this is one. Default "br-ccs".
    #[serde(default = "default_network_bridge")]
    pub network_bridge: String,
    /// Switches that break safety on purpose, for verification runs only.
    #[serde(default)]
    pub unsafe_canary: AgentCanary,
}

/// Values for building an `AgentConfig` in code: the identity fields are
/// empty and the addresses are loopback port 0, so a config built from this
/// fails `validate` until the zone, host, pod and controllers are set.
impl Default for AgentConfig {
    fn default() -> Self {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        AgentConfig {
            zone: String::new(),
            host_id: String::new(),
            pod: String::new(),
            listen: loopback,
            advertise: None,
            metrics_listen: loopback,
            libvirt_uri: String::new(),
            disk_gib: 0,
            data_dir: PathBuf::new(),
            controllers: Vec::new(),
            heartbeat_interval: default_heartbeat(),
            log_json: false,
            ledger: None,
            local_pool: default_local_pool(),
            local_pool_dir: None,
            san_pool: default_san_pool(),
            san_pool_gib: 0,
            network_bridge: default_network_bridge(),
            unsafe_canary: AgentCanary::default(),
        }
    }
}

/// Safety breaks of an agent, all off by default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentCanary {
    /// Execute orders from any leader, even one older than a leader already obeyed.
    pub skip_fencing: bool,
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}

fn default_local_pool() -> String {
    "ccs-local".to_string()
}

fn default_san_pool() -> String {
    "ccs-san".to_string()
}

fn default_network_bridge() -> String {
    "br-ccs".to_string()
}

/// Longest Linux network interface name (IFNAMSIZ is 16 with the NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// Reads and parses a TOML config file.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

struct Check<'a> {
    path: &'a Path,
}

impl Check<'_> {
    fn require(&self, ok: bool, field: &'static str, value: impl ToString, reason: &'static str) -> Result<(), ConfigError> {
        if ok {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            path: self.path.to_path_buf(),
            field,
            value: value.to_string(),
            reason,
        })
    }
}

impl ControllerConfig {
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let check = Check { path };
        check.require(!self.zone.is_empty(), "zone", &self.zone, "must not be empty")?;
        check.require(self.node_id > 0, "node_id", self.node_id, "must be at least 1")?;
        let raft = &self.raft;
        check.require(
            raft.election_timeout_min > raft.heartbeat_interval * 2,
            "raft.election_timeout_min",
            humantime::format_duration(raft.election_timeout_min),
            "must exceed twice raft.heartbeat_interval",
        )?;
        check.require(
            raft.election_timeout_max > raft.election_timeout_min,
            "raft.election_timeout_max",
            humantime::format_duration(raft.election_timeout_max),
            "must exceed raft.election_timeout_min",
        )?;
        check.require(
            raft.snapshot_after_entries > 0,
            "raft.snapshot_after_entries",
            raft.snapshot_after_entries,
            "must be at least 1",
        )?;
        if !self.bootstrap.is_empty() {
            let listed = self.bootstrap.iter().any(|m| m.id == self.node_id);
            let ids: Vec<u64> = self.bootstrap.iter().map(|m| m.id).collect();
            check.require(
                listed,
                "bootstrap",
                format!("ids {ids:?}"),
                "must list this replica's node_id, or be empty for a replica added later",
            )?;
            let mut ids: Vec<u64> = self.bootstrap.iter().map(|m| m.id).collect();
            ids.sort_unstable();
            ids.dedup();
            check.require(
                ids.len() == self.bootstrap.len(),
                "bootstrap",
                format!("{ids:?}"),
                "lists a node id twice",
            )?;
        }
        let fencing = &self.fencing;
        check.require(
            matches!(fencing.driver.as_str(), "none" | "command" | "test"),
            "fencing.driver",
            &fencing.driver,
            "must be \"none\", \"command\" or \"test\"",
        )?;
        check.require(
            fencing.driver != "command" || !fencing.command.is_empty(),
            "fencing.command",
            "[]",
            "must name the fencing program when fencing.driver is \"command\"",
        )?;
        check.require(
            fencing.driver != "test" || fencing.record_file.is_some(),
            "fencing.record_file",
            "none",
            "must name a file when fencing.driver is \"test\"",
        )?;
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

impl AgentConfig {
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let check = Check { path };
        check.require(!self.zone.is_empty(), "zone", &self.zone, "must not be empty")?;
        check.require(!self.host_id.is_empty(), "host_id", &self.host_id, "must not be empty")?;
        check.require(!self.pod.is_empty(), "pod", &self.pod, "must not be empty")?;
        check.require(
            !self.controllers.is_empty(),
            "controllers",
            "[]",
            "must list at least one controller",
        )?;
        check.require(
            !self.libvirt_uri.is_empty(),
            "libvirt_uri",
            &self.libvirt_uri,
            "must not be empty",
        )?;
        check.require(!self.local_pool.is_empty(), "local_pool", &self.local_pool, "must not be empty")?;
        check.require(!self.san_pool.is_empty(), "san_pool", &self.san_pool, "must not be empty")?;
        check.require(
            self.san_pool != self.local_pool,
            "san_pool",
            &self.san_pool,
            "must differ from local_pool",
        )?;
        let bridge = &self.network_bridge;
        check.require(
            !bridge.is_empty() && bridge.len() <= MAX_INTERFACE_NAME,
            "network_bridge",
            bridge,
            "must be a Linux interface name of 1 to 15 bytes",
        )?;
        Ok(())
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// Returns the local storage pool's directory: `local_pool_dir`, or `<data_dir>/volumes`.
    pub fn local_pool_path(&self) -> PathBuf {
        self.local_pool_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("volumes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configs in deploy/ parse and validate, so they do not rot.
    #[test]
    fn deploy_examples_are_valid() {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        for n in 1..=3 {
            let path = deploy.join(format!("controller-{n}.toml"));
            let config: ControllerConfig = load(&path).unwrap();
            config.validate(&path).unwrap();
            assert_eq!(config.fencing.driver, "command");
        }
        let path = deploy.join("agent.toml");
        let config: AgentConfig = load(&path).unwrap();
        config.validate(&path).unwrap();
    }

    const MINIMAL_AGENT: &str = r#"
        zone = "z1"
        host_id = "host-1"
        pod = "pod-a"
        listen = "127.0.0.1:7100"
        metrics_listen = "127.0.0.1:7101"
        libvirt_uri = "test:///default"
        disk_gib = 100
        data_dir = "/var/lib/ccs-agent"
        controllers = ["127.0.0.1:7000"]
    "#;

    fn parse_agent(text: &str) -> AgentConfig {
        toml::from_str(text).expect("agent config parses")
    }

    #[test]
    fn agent_storage_and_network_defaults() {
        let config = parse_agent(MINIMAL_AGENT);
        assert_eq!(config.local_pool, "ccs-local");
        assert_eq!(config.san_pool, "ccs-san");
        assert_eq!(config.san_pool_gib, 0);
        assert_eq!(config.network_bridge, "br-ccs");
        assert_eq!(config.local_pool_path(), PathBuf::from("/var/lib/ccs-agent/volumes"));
        assert!(config.validate(Path::new("agent.toml")).is_ok());
    }

    #[test]
    fn agent_storage_settings_read() {
        let text = format!(
            "{MINIMAL_AGENT}\nlocal_pool_dir = \"/srv/volumes\"\nsan_pool = \"array\"\n\
             san_pool_gib = 4096\nnetwork_bridge = \"ovsbr0\"\n"
        );
        let config = parse_agent(&text);
        assert_eq!(config.local_pool_path(), PathBuf::from("/srv/volumes"));
        assert_eq!(config.san_pool, "array");
        assert_eq!(config.san_pool_gib, 4096);
        assert_eq!(config.network_bridge, "ovsbr0");
    }

    #[test]
    fn agent_long_bridge_name_rejected() {
        let mut config = parse_agent(MINIMAL_AGENT);
        config.network_bridge = "b".repeat(16);
        let error = config.validate(Path::new("agent.toml")).expect_err("16 bytes is too long");
        assert!(error.to_string().contains("network_bridge"), "{error}");
    }

    #[test]
    fn agent_same_pool_names_rejected() {
        let mut config = parse_agent(MINIMAL_AGENT);
        config.san_pool = config.local_pool.clone();
        let error = config.validate(Path::new("agent.toml")).expect_err("pools must differ");
        assert!(error.to_string().contains("san_pool"), "{error}");
    }

    #[test]
    fn agent_default_fails_validation() {
        let error = AgentConfig::default()
            .validate(Path::new("agent.toml"))
            .expect_err("the default has no zone");
        assert!(error.to_string().contains("zone"), "{error}");
    }
}
