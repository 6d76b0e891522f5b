//! Client subcommands of `ccs`: they call the zone API through a
//! `ZoneConnector` and print tables, or JSON with `-o json`.
//!
//! Most handlers have one shape: build the request, send it with [`call`],
//! and print the reply through its [`Record`] impl with [`print_one`],
//! [`print_read`] or [`print_list`]. The file is past 800 lines because it
//! contains the arguments of every client command next to their handlers and
//! renderers, which no other module uses.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use tonic::transport::Channel;

use crate::client::{reason, ZoneConnector};
use crate::proto::zone::zone_client::ZoneClient;
use crate::proto::zone::*;

#[derive(Clone, Copy, Debug, Default, PartialEq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Serve the read from any replica's local state, without a read index.
    #[arg(long)]
    pub stale: bool,
}

#[derive(Subcommand, Debug)]
pub enum InstanceCommand {
    /// Create an instance; the zone places it on a host and boots it.
    Create {
        name: String,
        /// Virtual CPUs.
        #[arg(long)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long = "memory-mib")]
        memory_mib: u64,
        /// Disk in GiB.
        #[arg(long = "disk-gib", default_value_t = 10)]
        disk_gib: u64,
        /// Place only in this pod.
        #[arg(long)]
        pod: Option<String>,
        /// Attach this volume (name or id); repeat for more. In a DAS pod
        /// all volumes must be on one host, and the instance is placed there.
        #[arg(long = "volume", value_name = "VOLUME")]
        volumes: Vec<String>,
        /// Attach a NIC on this network; repeat for more NICs.
        #[arg(long = "network", value_name = "NETWORK")]
        networks: Vec<String>,
        /// Idempotency key: a create with a request id already applied
        /// returns the first instance. Default: a new random id, reused on retries.
        #[arg(long = "request-id")]
        request_id: Option<String>,
        /// Wait until the instance runs.
        #[arg(long)]
        wait: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List instances.
    List(ReadArgs),
    /// Show one instance by name or id, with its volumes and NICs.
    Show {
        name: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Delete an instance; its domain is destroyed and its capacity freed.
    Delete {
        name: String,
        /// Wait until the instance is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Attach a NIC on a network to an instance; its address is leased from
    /// the network's CIDR.
    AttachNic {
        name: String,
        network: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach an instance's NIC on a network and release its address.
    DetachNic {
        name: String,
        network: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Move a running instance of a SAN pod to another host of its pod.
    Migrate {
        name: String,
        /// Destination host id. Default: the scheduler chooses.
        #[arg(long = "to", value_name = "HOST")]
        to: Option<String>,
        /// Wait until the migration ends, then print the instance's host.
        #[arg(long)]
        wait: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// List hosts with capacity, use and health.
    List(ReadArgs),
    /// List the domains libvirt reports on a host, asked through its agent.
    Domains {
        host: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop placing instances on a host and migrate its instances away.
    /// Fails on a host of a DAS pod, whose instances cannot move.
    Drain {
        host: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Let the scheduler place instances on a drained host again.
    Undrain {
        host: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume: in a DAS pod in one host's local pool, in a SAN pod
    /// in the pod's shared pool.
    Create {
        name: String,
        /// The pod whose storage contains the volume.
        #[arg(long)]
        pod: String,
        /// Size in GiB.
        #[arg(long = "size", value_name = "GIB")]
        size_gib: u64,
        /// DAS pods only: the host whose local pool stores the volume.
        /// Default: the host of the pod with the most free disk.
        #[arg(long)]
        host: Option<String>,
        /// Wait until the pool contains the volume and it is available.
        #[arg(long)]
        wait: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List volumes.
    List(ReadArgs),
    /// Show one volume by name or id.
    Show {
        name: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Attach a volume to an instance. A DAS volume attaches only to
    /// instances on its own host.
    Attach {
        volume: String,
        instance: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Detach a volume from its instance.
    Detach {
        volume: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete a detached volume and free its space.
    Delete {
        volume: String,
        /// Wait until the pool no longer contains the volume.
        #[arg(long)]
        wait: bool,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Create a pod.
    Create {
        name: String,
        /// Schedulable vCPUs per physical CPU, 0.1 to 64 [default: 1].
        #[arg(long = "cpu-ratio")]
        cpu_ratio: Option<f64>,
        /// Schedulable memory per unit of physical memory, 0.1 to 64 [default: 1].
        #[arg(long = "memory-ratio")]
        memory_ratio: Option<f64>,
        /// Schedulable disk per unit of physical disk, 0.1 to 64 [default: 1].
        #[arg(long = "storage-ratio")]
        storage_ratio: Option<f64>,
        /// "pack" fills hosts one by one; "spread" balances them.
        #[arg(long, default_value = "pack")]
        placement: String,
        /// "das": every host has local disks; "san": one shared array serves every host.
        #[arg(long, default_value = "das")]
        storage: String,
        /// Host id of the agent that fronts the array; required with --storage san.
        #[arg(long = "san-agent")]
        san_agent: Option<String>,
        /// Free text naming what the pod's hosts are for.
        #[arg(long = "workload-class", default_value = "general")]
        workload_class: String,
        /// Tenant network isolation: "vlan" (802.1Q) or "vxlan" (overlay).
        #[arg(long = "network-mode", default_value = "vlan")]
        network_mode: String,
        /// VLAN ids or VNIs the pod's networks draw from, FIRST..LAST inclusive
        /// [default: 1..4094 for vlan, 1..16777215 for vxlan].
        #[arg(long = "segmentation-range", value_parser = parse_range)]
        segmentation_range: Option<(u32, u32)>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List pods.
    List(ReadArgs),
    /// Show one pod.
    Show {
        name: String,
        #[command(flatten)]
        read: ReadArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a tenant network; the zone allocates its VLAN id or VNI from the pod's range.
    Create {
        name: String,
        /// The pod whose hosts carry the network.
        #[arg(long)]
        pod: String,
        /// IPv4 subnet, e.g. 10.0.0.0/24 (prefix length 8 to 30, host bits zero).
        #[arg(long)]
        cidr: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List networks.
    List(ReadArgs),
    /// Show one network.
    Show {
        name: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Delete a network and release its VLAN id or VNI.
    Delete { name: String },
}

/// Parses "FIRST..LAST" into its two ends.
fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let invalid = || format!("invalid range {text:?}: use FIRST..LAST, e.g. 100..199");
    let (first, last) = text.split_once("..").ok_or_else(invalid)?;
    let first = first.trim().parse().map_err(|_| invalid())?;
    let last = last.trim().parse().map_err(|_| invalid())?;
    Ok((first, last))
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Print a zone key's value.
    Get {
        key: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Set a zone key.
    Put { key: String, value: String },
    /// Set a zone key only if it contains the expected value.
    Cas {
        key: String,
        value: String,
        /// The value the key must hold now.
        #[arg(long, required_unless_present = "absent", conflicts_with = "absent")]
        expected: Option<String>,
        /// Require that the key does not exist yet.
        #[arg(long)]
        absent: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ZoneCommand {
    /// Show replicas, leader, term, commit and applied index, and lag.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Add a replica: it joins as a learner, catches up, then becomes a voter.
    /// Start its controller first, with an empty bootstrap list.
    AddReplica {
        #[arg(long = "node-id")]
        node_id: u64,
        /// The new replica's gRPC address, host:port.
        #[arg(long)]
        addr: String,
    },
    /// Remove a voting replica from the zone.
    RemoveReplica {
        #[arg(long = "node-id")]
        node_id: u64,
    },
    /// Report what hosts run that the zone does not know, and what the zone
    /// expects that hosts do not report. Exits 0 whatever it finds.
    Drift {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// A failed call, printed by `main` with its reason code.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct CallError(pub tonic::Status);

fn describe(status: &tonic::Status) -> String {
    match reason(status) {
        Some(reason) => format!("{} ({reason}, {:?})", status.message(), status.code()),
        None => format!("{} ({:?})", status.message(), status.code()),
    }
}

/// How long the CLI retries a zone that has no leader.
const RETRY_WINDOW: Duration = Duration::from_secs(20);
/// How long `--wait` waits for an instance.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends `request` with `method`, retrying an unavailable zone for
/// `RETRY_WINDOW`. Each attempt sends a clone of the request, so the call
/// must be safe to repeat: a read, or a write that a retry cannot double.
pub(crate) async fn call<Req, T, F, Fut>(
    connector: &ZoneConnector,
    request: Req,
    method: F,
) -> Result<T, CallError>
where
    Req: Clone,
    F: Fn(ZoneClient<Channel>, Req) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    connector
        .call_until(RETRY_WINDOW, |client| method(client, request.clone()))
        .await
        .map_err(CallError)
}

/// Builds a row of table cells from values that implement `Display`.
macro_rules! cells {
    ($($cell:expr),* $(,)?) => { vec![$($cell.to_string()),*] };
}

/// A text table whose columns are as wide as their widest cell, two spaces
/// apart, under upper-case headers.
struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        assert_eq!(
            cells.len(),
            self.headers.len(),
            "a table row has one cell per column"
        );
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths = self.widths();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (cell, width) in row.iter().zip(&widths) {
                write!(line, "{cell:<width$}  ")?;
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// A reply the CLI prints as a JSON object or as table text.
trait Record: Sized {
    /// Key of the JSON array in a list of records of this kind.
    const LIST_KEY: &'static str;
    fn json(&self) -> Value;
    /// Table text of `records`, ending in a newline.
    fn table(records: &[Self]) -> String;
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values always serialize")
    );
}

/// Prints the reply of a write.
fn print_one<R: Record>(output: Output, record: &R) {
    match output {
        Output::Json => print_json(&record.json()),
        Output::Table => print!("{}", R::table(std::slice::from_ref(record))),
    }
}

/// Prints one record that a read returned, with how stale the read may be.
fn print_read<R: Record>(output: Output, record: &R, read: &Option<ReadInfo>) {
    match output {
        Output::Json => {
            let mut value = record.json();
            value["read"] = read_json(read);
            print_json(&value);
        }
        Output::Table => {
            print!("{}", R::table(std::slice::from_ref(record)));
            note_staleness(read);
        }
    }
}

/// Prints the records of a list read, with how stale the read may be.
fn print_list<R: Record>(output: Output, records: &[R], read: &Option<ReadInfo>) {
    match output {
        Output::Json => print_json(&list_json(records, read)),
        Output::Table => {
            print!("{}", R::table(records));
            note_staleness(read);
        }
    }
}

/// JSON of a list read: the records under `R::LIST_KEY`, and the read's staleness.
fn list_json<R: Record>(records: &[R], read: &Option<ReadInfo>) -> Value {
    let mut value = serde_json::Map::new();
    value.insert(
        R::LIST_KEY.to_string(),
        records.iter().map(R::json).collect(),
    );
    value.insert("read".to_string(), read_json(read));
    Value::Object(value)
}

fn read_json(read: &Option<ReadInfo>) -> Value {
    match read {
        Some(r) => json!({
            "stale": r.stale, "applied_index": r.applied_index,
            "leader_commit_index": r.leader_commit_index, "serving_node_id": r.serving_node_id,
        }),
        None => Value::Null,
    }
}

/// Prints how far a stale read may be behind, on stderr so tables stay clean.
fn note_staleness(read: &Option<ReadInfo>) {
    if let Some(r) = read.as_ref().filter(|r| r.stale) {
        eprintln!(
            "stale read from node {}: applied index {}, {} entries behind the last known commit index {}",
            r.serving_node_id,
            r.applied_index,
            r.leader_commit_index.saturating_sub(r.applied_index),
            r.leader_commit_index
        );
    }
}

/// Returns `text`, or "-" when it is empty, for table cells.
fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

impl Record for Instance {
    const LIST_KEY: &'static str = "instances";

    fn json(&self) -> Value {
        let nics: Vec<_> = self
            .nics
            .iter()
            .map(|n| json!({ "network": n.network, "ip": n.ip, "mac": n.mac }))
            .collect();
        json!({
            "id": self.id, "name": self.name, "vcpus": self.vcpus, "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib, "pod": self.pod, "host": self.host,
            "desired_state": self.desired_state, "observed_state": self.observed_state,
            "generation": self.generation, "created_index": self.created_index,
            "request_id": self.request_id, "last_error": self.last_error,
            "volumes": self.volumes, "nics": nics, "migrating_to": self.migrating_to,
        })
    }

    fn table(instances: &[Instance]) -> String {
        let mut table = Table::new(&[
            "ID", "NAME", "VCPUS", "MEM_MIB", "DISK", "POD", "HOST", "DESIRED", "OBSERVED",
        ]);
        for i in instances {
            let host = match i.migrating_to.as_str() {
                "" => i.host.clone(),
                to => format!("{}->{to}", i.host),
            };
            table.row(cells![
                i.id,
                i.name,
                i.vcpus,
                i.memory_mib,
                i.disk_gib,
                i.pod,
                host,
                i.desired_state,
                i.observed_state,
            ]);
        }
        table.to_string()
    }
}

/// Formats the lines that `ccs instance show` prints under the instance's
/// row: volumes, NICs, a migration in progress and the last error.
fn instance_details(instance: &Instance) -> String {
    let mut text = String::new();
    let volumes = if instance.volumes.is_empty() {
        "none".to_string()
    } else {
        instance.volumes.join(", ")
    };
    text.push_str(&format!("volumes: {volumes}\n"));
    if instance.nics.is_empty() {
        text.push_str("nics: none\n");
    } else {
        let mut nics = Table::new(&["NETWORK", "IP", "MAC"]);
        for nic in &instance.nics {
            nics.row(cells![nic.network, or_dash(&nic.ip), or_dash(&nic.mac)]);
        }
        text.push_str(&format!("nics:\n{nics}"));
    }
    if !instance.migrating_to.is_empty() {
        text.push_str(&format!("migrating to: {}\n", instance.migrating_to));
    }
    if !instance.last_error.is_empty() {
        text.push_str(&format!("last error: {}\n", instance.last_error));
    }
    text
}

impl Record for Volume {
    const LIST_KEY: &'static str = "volumes";

    fn json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "pod": self.pod, "pool": self.pool,
            "host": self.host, "size_gib": self.size_gib, "state": self.state,
            "attached_to": self.attached_to, "created_index": self.created_index,
            "last_error": self.last_error,
        })
    }

    fn table(volumes: &[Volume]) -> String {
        let mut table = Table::new(&[
            "ID",
            "NAME",
            "POD",
            "POOL",
            "HOST",
            "SIZE_GIB",
            "STATE",
            "ATTACHED_TO",
        ]);
        for v in volumes {
            table.row(cells![
                v.id,
                v.name,
                v.pod,
                v.pool,
                v.host,
                v.size_gib,
                v.state,
                or_dash(&v.attached_to),
            ]);
        }
        table.to_string()
    }
}

impl Record for DeviceChangeReply {
    const LIST_KEY: &'static str = "changes";

    fn json(&self) -> Value {
        json!({
            "instance": self.instance.as_ref().map(Instance::json),
            "applies": self.applies, "message": self.message,
        })
    }

    fn table(replies: &[DeviceChangeReply]) -> String {
        let mut text = String::new();
        for reply in replies {
            if let Some(instance) = &reply.instance {
                text.push_str(&Instance::table(std::slice::from_ref(instance)));
                text.push_str(&instance_details(instance));
            }
            text.push_str(&format!("applies {}: {}\n", reply.applies, reply.message));
        }
        text
    }
}

impl Record for Host {
    const LIST_KEY: &'static str = "hosts";

    fn json(&self) -> Value {
        json!({
            "id": self.id, "pod": self.pod, "libvirt_uri": self.libvirt_uri,
            "agent_endpoint": self.agent_endpoint, "cpus": self.cpus,
            "memory_mib": self.memory_mib, "disk_gib": self.disk_gib,
            "used_vcpus": self.used_vcpus, "used_memory_mib": self.used_memory_mib,
            "used_disk_gib": self.used_disk_gib, "health": self.health,
            "instances": self.instances,
        })
    }

    fn table(hosts: &[Host]) -> String {
        let mut table = Table::new(&[
            "HOST",
            "POD",
            "HEALTH",
            "VCPUS",
            "MEMORY_MIB",
            "INSTANCES",
            "AGENT",
        ]);
        for h in hosts {
            table.row(cells![
                h.id,
                h.pod,
                h.health,
                format!("{}/{}", h.used_vcpus, h.cpus),
                format!("{}/{}", h.used_memory_mib, h.memory_mib),
                h.instances,
                h.agent_endpoint,
            ]);
        }
        table.to_string()
    }
}

impl Record for DrainReply {
    const LIST_KEY: &'static str = "drains";

    fn json(&self) -> Value {
        json!({
            "host": self.host.as_ref().map(Host::json),
            "migrating": self.migrating.iter().map(Instance::json).collect::<Vec<_>>(),
        })
    }

    fn table(replies: &[DrainReply]) -> String {
        let mut text = String::new();
        for reply in replies {
            let host = reply.host.as_ref().map_or("-", |h| h.id.as_str());
            if reply.migrating.is_empty() {
                text.push_str(&format!(
                    "host {host} is draining; no instances to migrate\n"
                ));
                continue;
            }
            let count = reply.migrating.len();
            text.push_str(&format!(
                "host {host} is draining; {count} instances migrating\n"
            ));
            let mut table = Table::new(&["ID", "NAME", "FROM", "TO"]);
            for i in &reply.migrating {
                table.row(cells![i.id, i.name, i.host, or_dash(&i.migrating_to)]);
            }
            text.push_str(&table.to_string());
        }
        text
    }
}

impl Record for ZoneDriftReply {
    const LIST_KEY: &'static str = "drifts";

    fn json(&self) -> Value {
        let items: Vec<_> = self
            .items
            .iter()
            .map(|d| {
                json!({
                    "host": d.host, "kind": d.kind, "name": d.name,
                    "problem": d.problem, "detail": d.detail,
                })
            })
            .collect();
        json!({
            "items": items, "hosts_checked": self.hosts_checked, "unreported": self.unreported,
        })
    }

    fn table(replies: &[ZoneDriftReply]) -> String {
        let mut text = String::new();
        for reply in replies {
            let checked = reply.hosts_checked;
            if reply.items.is_empty() {
                text.push_str(&format!("no drift on the {checked} hosts checked\n"));
            } else {
                let mut table = Table::new(&["HOST", "KIND", "NAME", "PROBLEM", "DETAIL"]);
                for d in &reply.items {
                    table.row(cells![d.host, d.kind, d.name, d.problem, d.detail]);
                }
                text.push_str(&table.to_string());
                let count = reply.items.len();
                text.push_str(&format!(
                    "{count} drift items on the {checked} hosts checked\n"
                ));
            }
            if !reply.unreported.is_empty() {
                let hosts = reply.unreported.join(", ");
                text.push_str(&format!(
                    "not compared (not up, or no report since the leader took over): {hosts}\n"
                ));
            }
        }
        text
    }
}

impl Record for Pod {
    const LIST_KEY: &'static str = "pods";

    fn json(&self) -> Value {
        json!({
            "name": self.name, "cpu_ratio": self.cpu_ratio, "memory_ratio": self.memory_ratio,
            "storage_ratio": self.storage_ratio, "placement": self.placement,
            "storage": self.storage, "san_agent": self.san_agent,
            "workload_class": self.workload_class, "network_mode": self.network_mode,
            "segmentation_first": self.segmentation_first,
            "segmentation_last": self.segmentation_last,
        })
    }

    fn table(pods: &[Pod]) -> String {
        let mut table = Table::new(&[
            "POD",
            "CPU",
            "MEM",
            "DISK",
            "PLACEMENT",
            "STORAGE",
            "SAN_AGENT",
            "CLASS",
            "NETWORK",
            "SEGMENTS",
        ]);
        for p in pods {
            table.row(cells![
                p.name,
                p.cpu_ratio,
                p.memory_ratio,
                p.storage_ratio,
                p.placement,
                p.storage,
                or_dash(&p.san_agent),
                p.workload_class,
                p.network_mode,
                format!("{}..{}", p.segmentation_first, p.segmentation_last),
            ]);
        }
        table.to_string()
    }
}

impl Record for Network {
    const LIST_KEY: &'static str = "networks";

    fn json(&self) -> Value {
        json!({
            "name": self.name, "pod": self.pod, "mode": self.mode,
            "segmentation_id": self.segmentation_id, "cidr": self.cidr,
            "created_index": self.created_index, "state": self.state,
        })
    }

    fn table(networks: &[Network]) -> String {
        let mut table = Table::new(&["NETWORK", "POD", "MODE", "SEGMENT", "CIDR", "STATE"]);
        for n in networks {
            table.row(cells![
                n.name,
                n.pod,
                n.mode,
                n.segmentation_id,
                n.cidr,
                n.state
            ]);
        }
        table.to_string()
    }
}

/// Describes where an instance is and what it does, for timeout messages.
fn describe_progress(instance: &Instance) -> String {
    let mut text = format!("{} on host {}", instance.observed_state, instance.host);
    if !instance.migrating_to.is_empty() {
        text.push_str(&format!(", migrating to {}", instance.migrating_to));
    }
    if !instance.last_error.is_empty() {
        text.push_str(&format!(", last error: {}", instance.last_error));
    }
    text
}

/// Polls an instance until `done` accepts it (`None`: the instance is gone),
/// for up to `WAIT_TIMEOUT`.
/// Reads a record every 200 ms until `done` is true for it (`None`: not
/// found), and fails with `timed_out`'s message about the last read once
/// WAIT_TIMEOUT has passed.
async fn poll_until<T, Fetch, Fut>(
    mut fetch: Fetch,
    done: impl Fn(Option<&T>) -> bool,
    timed_out: impl Fn(Option<&T>) -> String,
) -> Result<Option<T>, CallError>
where
    Fetch: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, CallError>>,
{
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let record = match fetch().await {
            Ok(record) => record,
            Err(CallError(status)) if status.code() == tonic::Code::NotFound => None,
            Err(error) => return Err(error),
        };
        if done(record.as_ref()) {
            return Ok(record);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CallError(tonic::Status::deadline_exceeded(timed_out(record.as_ref()))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls a volume until `done` is true for it (`None`: it is gone), and
/// fails naming its last state and error when the wait times out.
async fn wait_for_volume<F>(connector: &ZoneConnector, id: &str, done: F) -> Result<Option<Volume>, CallError>
where
    F: Fn(Option<&Volume>) -> bool,
{
    let fetch = || async {
        let request = GetVolumeRequest {
            name: id.to_string(),
            stale: false,
        };
        let reply = call(connector, request, |mut c, r| async move { c.get_volume(r).await }).await?;
        Ok(reply.volume)
    };
    let timed_out = |volume: Option<&Volume>| {
        let last_seen = volume.map_or("gone".to_string(), |v| {
            let error = if v.last_error.is_empty() { String::new() } else { format!(", last error: {}", v.last_error) };
            format!("{} on host {}{error}", v.state, v.host)
        });
        format!("volume {id:?} did not reach the awaited state within {WAIT_TIMEOUT:?}; it is {last_seen}")
    };
    poll_until(fetch, done, timed_out).await
}

async fn wait_for<F>(
    connector: &ZoneConnector,
    name: &str,
    done: F,
) -> Result<Option<Instance>, CallError>
where
    F: Fn(Option<&Instance>) -> bool,
{
    let fetch = || async {
        let request = GetInstanceRequest {
            name: name.to_string(),
            stale: false,
        };
        let reply = call(connector, request, |mut c, r| async move { c.get_instance(r).await }).await?;
        Ok(reply.instance)
    };
    let timed_out = |instance: Option<&Instance>| {
        let last_seen = instance.map_or("gone".to_string(), describe_progress);
        format!(
            "instance {name:?} did not reach the awaited state within {WAIT_TIMEOUT:?}; \
             last seen: {last_seen}; see `ccs instance show {name}`"
        )
    };
    poll_until(fetch, done, timed_out).await
}

pub async fn instance(
    connector: &ZoneConnector,
    command: InstanceCommand,
) -> Result<(), CallError> {
    match command {
        InstanceCommand::Create {
            name,
            vcpus,
            memory_mib,
            disk_gib,
            pod,
            volumes,
            networks,
            request_id,
            wait,
            output,
        } => {
            let request = CreateInstanceRequest {
                name,
                vcpus,
                memory_mib,
                disk_gib,
                pod: pod.unwrap_or_default(),
                // A generated id makes the CLI's own retries safe.
                request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                volumes,
                networks,
            };
            let mut instance = call(connector, request, |mut c, r| async move {
                c.create_instance(r).await
            })
            .await?;
            if wait {
                let running =
                    |i: Option<&Instance>| i.is_some_and(|i| i.observed_state == "running");
                instance = wait_for(connector, &instance.id, running)
                    .await?
                    .expect("wait_for returns only once the instance runs");
            }
            print_one(output, &instance);
        }
        InstanceCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = call(connector, request, |mut c, r| async move {
                c.list_instances(r).await
            })
            .await?;
            print_list(read.output, &list.instances, &list.read);
        }
        InstanceCommand::Show { name, read } => {
            let request = GetInstanceRequest {
                name,
                stale: read.stale,
            };
            let reply = call(connector, request, |mut c, r| async move {
                c.get_instance(r).await
            })
            .await?;
            let instance = reply.instance.unwrap_or_default();
            match read.output {
                Output::Json => print_read(Output::Json, &instance, &reply.read),
                Output::Table => {
                    print!("{}", Instance::table(std::slice::from_ref(&instance)));
                    print!("{}", instance_details(&instance));
                    note_staleness(&reply.read);
                }
            }
        }
        InstanceCommand::Delete { name, wait } => {
            let request = InstanceRef { name };
            let instance = call(connector, request, |mut c, r| async move {
                c.delete_instance(r).await
            })
            .await?;
            if wait {
                wait_for(connector, &instance.id, |i| i.is_none()).await?;
                println!("deleted {} ({})", instance.name, instance.id);
            } else {
                println!("deleting {} ({})", instance.name, instance.id);
            }
        }
        // A retry of an attach or detach that was applied fails: the NIC
        // exists, or is gone, and the message names the instance and network.
        InstanceCommand::AttachNic {
            name,
            network,
            output,
        } => {
            let request = NicRequest {
                instance: name,
                network,
            };
            let reply = call(connector, request, |mut c, r| async move {
                c.attach_nic(r).await
            })
            .await?;
            print_one(output, &reply);
        }
        InstanceCommand::DetachNic {
            name,
            network,
            output,
        } => {
            let request = NicRequest {
                instance: name,
                network,
            };
            let reply = call(connector, request, |mut c, r| async move {
                c.detach_nic(r).await
            })
            .await?;
            print_one(output, &reply);
        }
        InstanceCommand::Migrate {
            name,
            to,
            wait,
            output,
        } => {
            migrate(connector, name, to, wait, output).await?;
        }
    }
    Ok(())
}

/// Starts a migration and, with `wait`, waits until it ends and fails
/// unless the instance left its source host.
async fn migrate(
    connector: &ZoneConnector,
    name: String,
    to: Option<String>,
    wait: bool,
    output: Output,
) -> Result<(), CallError> {
    let request = MigrateInstanceRequest {
        instance: name,
        to_host: to.unwrap_or_default(),
    };
    // A retry of a migration that was applied fails because the instance
    // is already migrating, and the message names the destination.
    let instance = call(connector, request, |mut c, r| async move {
        c.migrate_instance(r).await
    })
    .await?;
    if !wait {
        match output {
            Output::Json => print_json(&instance.json()),
            Output::Table => println!(
                "migrating {} from host {} to host {}",
                instance.name,
                instance.host,
                or_dash(&instance.migrating_to)
            ),
        }
        return Ok(());
    }
    let source = instance.host.clone();
    let ended = |i: Option<&Instance>| i.is_none_or(|i| i.migrating_to.is_empty());
    let Some(moved) = wait_for(connector, &instance.id, ended).await? else {
        return Err(CallError(tonic::Status::not_found(format!(
            "instance {:?} was deleted during its migration",
            instance.name
        ))));
    };
    if moved.host == source {
        let error = or_dash(&moved.last_error);
        return Err(CallError(tonic::Status::aborted(format!(
            "the migration of instance {:?} ended with the instance still on host {source:?} \
             (last error: {error}); see `ccs instance show {}`",
            moved.name, moved.name
        ))));
    }
    match output {
        Output::Json => print_json(&moved.json()),
        Output::Table => {
            println!(
                "{} moved from host {source} to host {}",
                moved.name, moved.host
            );
            print!("{}", Instance::table(std::slice::from_ref(&moved)));
        }
    }
    Ok(())
}

pub async fn host(connector: &ZoneConnector, command: HostCommand) -> Result<(), CallError> {
    match command {
        HostCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = call(connector, request, |mut c, r| async move {
                c.list_hosts(r).await
            })
            .await?;
            print_list(read.output, &list.hosts, &list.read);
        }
        HostCommand::Domains { host, output } => {
            let request = HostRef { host };
            let reply = call(connector, request, |mut c, r| async move {
                c.host_domains(r).await
            })
            .await?;
            print_domains(&reply, output);
        }
        // On a DAS host the zone fails the drain with HOST_NOT_DRAINABLE and
        // names the instances that cannot move; `main` prints that error.
        HostCommand::Drain { host, output } => {
            let request = HostRef { host };
            let reply = call(connector, request, |mut c, r| async move {
                c.drain_host(r).await
            })
            .await?;
            print_one(output, &reply);
        }
        HostCommand::Undrain { host, output } => {
            let request = HostRef { host };
            let host = call(connector, request, |mut c, r| async move {
                c.undrain_host(r).await
            })
            .await?;
            print_one(output, &host);
        }
    }
    Ok(())
}

fn print_domains(reply: &HostDomainsReply, output: Output) {
    match output {
        Output::Json => {
            let domains: Vec<_> = reply
                .domains
                .iter()
                .map(|d| {
                    json!({
                        "uuid": d.uuid, "name": d.name, "state": d.state,
                        "vcpus": d.vcpus, "memory_mib": d.memory_mib,
                    })
                })
                .collect();
            print_json(&json!({ "host": reply.host, "domains": domains }));
        }
        Output::Table => {
            let mut table = Table::new(&["UUID", "NAME", "STATE", "VCPUS", "MEM_MIB"]);
            for d in &reply.domains {
                table.row(cells![d.uuid, d.name, d.state, d.vcpus, d.memory_mib]);
            }
            print!("{table}");
        }
    }
}

pub async fn volume(connector: &ZoneConnector, command: VolumeCommand) -> Result<(), CallError> {
    match command {
        VolumeCommand::Create {
            name,
            pod,
            size_gib,
            host,
            wait,
            output,
        } => {
            let request = CreateVolumeRequest {
                name,
                pod,
                size_gib,
                host: host.unwrap_or_default(),
            };
            // A retry of a create that was applied fails with "name already
            // taken", so after that error `ccs volume show` shows whether this
            // create made it.
            let mut volume = call(connector, request, |mut c, r| async move {
                c.create_volume(r).await
            })
            .await?;
            if wait {
                volume = wait_for_volume(connector, &volume.id, |v| v.is_some_and(|v| v.state == "available"))
                    .await?
                    .unwrap_or(volume);
            }
            print_one(output, &volume);
        }
        VolumeCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = call(connector, request, |mut c, r| async move {
                c.list_volumes(r).await
            })
            .await?;
            print_list(read.output, &list.volumes, &list.read);
        }
        VolumeCommand::Show { name, read } => {
            let request = GetVolumeRequest {
                name,
                stale: read.stale,
            };
            let reply = call(connector, request, |mut c, r| async move {
                c.get_volume(r).await
            })
            .await?;
            let volume = reply.volume.unwrap_or_default();
            print_read(read.output, &volume, &reply.read);
            if read.output == Output::Table && !volume.last_error.is_empty() {
                println!("last error: {}", volume.last_error);
            }
        }
        // A retry of an attach that was applied fails because the volume is
        // attached, and the message names the instance.
        VolumeCommand::Attach {
            volume,
            instance,
            output,
        } => {
            let request = AttachVolumeRequest { volume, instance };
            let reply = call(connector, request, |mut c, r| async move {
                c.attach_volume(r).await
            })
            .await?;
            print_one(output, &reply);
        }
        VolumeCommand::Detach { volume, output } => {
            let request = VolumeRef { name: volume };
            let reply = call(connector, request, |mut c, r| async move {
                c.detach_volume(r).await
            })
            .await?;
            print_one(output, &reply);
        }
        VolumeCommand::Delete { volume, wait, output } => {
            let request = VolumeRef { name: volume };
            let volume = call(connector, request, |mut c, r| async move {
                c.delete_volume(r).await
            })
            .await?;
            if wait {
                wait_for_volume(connector, &volume.id, |v| v.is_none()).await?;
            }
            match output {
                Output::Json => print_json(&volume.json()),
                Output::Table if wait => println!("deleted volume {} ({})", volume.name, volume.id),
                Output::Table => println!("deleting volume {} ({})", volume.name, volume.id),
            }
        }
    }
    Ok(())
}

pub async fn pod(connector: &ZoneConnector, command: PodCommand) -> Result<(), CallError> {
    match command {
        PodCommand::Create {
            name,
            cpu_ratio,
            memory_ratio,
            storage_ratio,
            placement,
            storage,
            san_agent,
            workload_class,
            network_mode,
            segmentation_range,
            output,
        } => {
            let request = CreatePodRequest {
                name,
                cpu_ratio,
                memory_ratio,
                placement,
                storage,
                san_agent: san_agent.unwrap_or_default(),
                workload_class,
                storage_ratio,
                network_mode,
                segmentation_first: segmentation_range.map(|(first, _)| first),
                segmentation_last: segmentation_range.map(|(_, last)| last),
            };
            let pod = call(connector, request, |mut c, r| async move {
                c.create_pod(r).await
            })
            .await?;
            print_one(output, &pod);
        }
        PodCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = call(connector, request, |mut c, r| async move {
                c.list_pods(r).await
            })
            .await?;
            print_list(read.output, &list.pods, &list.read);
        }
        PodCommand::Show { name, read } => {
            let request = GetPodRequest {
                name,
                stale: read.stale,
            };
            let reply = call(
                connector,
                request,
                |mut c, r| async move { c.get_pod(r).await },
            )
            .await?;
            print_read(read.output, &reply.pod.unwrap_or_default(), &reply.read);
        }
    }
    Ok(())
}

pub async fn network(connector: &ZoneConnector, command: NetworkCommand) -> Result<(), CallError> {
    match command {
        NetworkCommand::Create {
            name,
            pod,
            cidr,
            output,
        } => {
            let request = CreateNetworkRequest { name, pod, cidr };
            // A retry of a create that was applied fails with NAME_TAKEN, so
            // after that error `ccs network show` shows whether this create made it.
            let network = call(connector, request, |mut c, r| async move {
                c.create_network(r).await
            })
            .await?;
            print_one(output, &network);
        }
        NetworkCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = call(connector, request, |mut c, r| async move {
                c.list_networks(r).await
            })
            .await?;
            print_list(read.output, &list.networks, &list.read);
        }
        NetworkCommand::Show { name, read } => {
            let request = GetNetworkRequest {
                name,
                stale: read.stale,
            };
            let reply = call(connector, request, |mut c, r| async move {
                c.get_network(r).await
            })
            .await?;
            print_read(read.output, &reply.network.unwrap_or_default(), &reply.read);
        }
        NetworkCommand::Delete { name } => {
            let request = NetworkRef { name };
            let network = call(connector, request, |mut c, r| async move {
                c.delete_network(r).await
            })
            .await?;
            let mode = if network.mode == "vxlan" {
                "VNI"
            } else {
                "VLAN id"
            };
            println!(
                "network {} is deleting; its {mode} {} is freed once no host carries the network",
                network.name, network.segmentation_id
            );
        }
    }
    Ok(())
}

pub async fn key(connector: &ZoneConnector, command: KeyCommand) -> Result<(), CallError> {
    match command {
        KeyCommand::Get { key, read } => {
            let request = GetKeyRequest {
                key,
                stale: read.stale,
            };
            let reply = call(
                connector,
                request,
                |mut c, r| async move { c.get_key(r).await },
            )
            .await?;
            match read.output {
                Output::Json => print_json(&json!({
                    "key": reply.key, "found": reply.found, "value": reply.value,
                    "modified_index": reply.modified_index, "read": read_json(&reply.read),
                })),
                Output::Table if reply.found => println!("{}", reply.value),
                Output::Table => {
                    let message =
                        format!("key {:?} not found; set it with `ccs key put`", reply.key);
                    return Err(CallError(tonic::Status::not_found(message)));
                }
            }
            if matches!(read.output, Output::Table) {
                note_staleness(&reply.read);
            }
        }
        KeyCommand::Put { key, value } => {
            let request = PutKeyRequest { key, value };
            // A put is idempotent, so retrying one that may have been applied is safe.
            let reply = call(
                connector,
                request,
                |mut c, r| async move { c.put_key(r).await },
            )
            .await?;
            println!("set {} at index {}", reply.key, reply.modified_index);
        }
        KeyCommand::Cas {
            key,
            value,
            expected,
            absent,
        } => {
            let expected = if absent { None } else { expected };
            let request = CompareAndSwapKeyRequest {
                key,
                expected,
                value,
            };
            // Not retried after an indeterminate error: a second attempt
            // would compare against this attempt's own write.
            let reply = connector
                .call(|mut c| {
                    let r = request.clone();
                    async move { c.compare_and_swap_key(r).await }
                })
                .await
                .map_err(CallError)?;
            println!("set {} at index {}", reply.key, reply.modified_index);
        }
    }
    Ok(())
}

fn print_status(status: &ZoneStatusReply, output: Output) {
    match output {
        Output::Json => {
            let replicas: Vec<_> = status
                .replicas
                .iter()
                .map(|r| {
                    json!({
                        "node_id": r.node_id, "addr": r.addr, "role": r.role,
                        "matched_index": r.matched_index, "lag": r.lag,
                    })
                })
                .collect();
            print_json(&json!({
                "zone": status.zone, "leader_id": status.leader_id, "leader_addr": status.leader_addr,
                "term": status.term, "commit_index": status.commit_index,
                "applied_index": status.applied_index, "last_log_index": status.last_log_index,
                "snapshot_index": status.snapshot_index, "purged_index": status.purged_index,
                "replicas": replicas,
            }));
        }
        Output::Table => {
            println!(
                "zone {}  leader {} ({})  term {}",
                status.zone, status.leader_id, status.leader_addr, status.term
            );
            println!(
                "commit index {}  applied index {}  last log index {}  snapshot {}  purged {}",
                status.commit_index,
                status.applied_index,
                status.last_log_index,
                status.snapshot_index,
                status.purged_index
            );
            println!(
                "{:>7}  {:<21}  {:<7}  {:>13}  {:>6}",
                "NODE", "ADDR", "ROLE", "MATCHED_INDEX", "LAG"
            );
            for r in &status.replicas {
                let matched = r.matched_index.map_or("-".to_string(), |m| m.to_string());
                println!(
                    "{:>7}  {:<21}  {:<7}  {:>13}  {:>6}",
                    r.node_id, r.addr, r.role, matched, r.lag
                );
            }
        }
    }
}

pub async fn zone(connector: &ZoneConnector, command: ZoneCommand) -> Result<(), CallError> {
    let status = match command {
        ZoneCommand::Status { output } => {
            let request = ZoneStatusRequest {};
            let status = call(connector, request, |mut c, r| async move {
                c.zone_status(r).await
            })
            .await?;
            print_status(&status, output);
            return Ok(());
        }
        // Drift is a report: finding some is not an error.
        ZoneCommand::Drift { output } => {
            let request = ZoneDriftRequest {};
            let reply = call(connector, request, |mut c, r| async move {
                c.zone_drift(r).await
            })
            .await?;
            print_one(output, &reply);
            return Ok(());
        }
        ZoneCommand::AddReplica { node_id, addr } => {
            let request = AddReplicaRequest { node_id, addr };
            call(connector, request, |mut c, r| async move {
                c.add_replica(r).await
            })
            .await?
        }
        ZoneCommand::RemoveReplica { node_id } => {
            let request = RemoveReplicaRequest { node_id };
            call(connector, request, |mut c, r| async move {
                c.remove_replica(r).await
            })
            .await?
        }
    };
    print_status(&status, Output::Table);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The client subcommands under test, parsed as `ccs` parses them.
    #[derive(Parser, Debug)]
    enum TestCli {
        #[command(subcommand)]
        Instance(InstanceCommand),
        #[command(subcommand)]
        Volume(VolumeCommand),
        #[command(subcommand)]
        Host(HostCommand),
        #[command(subcommand)]
        Zone(ZoneCommand),
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("ccs").chain(args.iter().copied()))
    }

    fn instance(name: &str, host: &str) -> Instance {
        Instance {
            id: format!("id-{name}"),
            name: name.to_string(),
            vcpus: 2,
            memory_mib: 1024,
            disk_gib: 10,
            pod: "pod-b".to_string(),
            host: host.to_string(),
            desired_state: "running".to_string(),
            observed_state: "running".to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn volume_create_parses_size_and_host() {
        let parsed = parse(&["volume", "create", "data", "--pod", "pod-a", "--size", "20"]);
        let Ok(TestCli::Volume(VolumeCommand::Create {
            name,
            pod,
            size_gib,
            host,
            output,
            ..
        })) = parsed
        else {
            panic!("not a volume create: {parsed:?}");
        };
        assert_eq!(name, "data");
        assert_eq!(pod, "pod-a");
        assert_eq!(size_gib, 20);
        assert_eq!(host, None);
        assert_eq!(output, Output::Table);

        let parsed = parse(&[
            "volume", "create", "data", "--pod", "pod-a", "--size", "20", "--host", "host-2",
        ]);
        let Ok(TestCli::Volume(VolumeCommand::Create { host, .. })) = parsed else {
            panic!("not a volume create: {parsed:?}");
        };
        assert_eq!(host.as_deref(), Some("host-2"));
    }

    #[test]
    fn volume_create_requires_size() {
        let error = parse(&["volume", "create", "data", "--pod", "pod-a"]).expect_err("no size");
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn volume_attach_takes_volume_then_instance() {
        let parsed = parse(&["volume", "attach", "data", "web-1", "-o", "json"]);
        let Ok(TestCli::Volume(VolumeCommand::Attach {
            volume,
            instance,
            output,
        })) = parsed
        else {
            panic!("not a volume attach: {parsed:?}");
        };
        assert_eq!(volume, "data");
        assert_eq!(instance, "web-1");
        assert_eq!(output, Output::Json);
    }

    #[test]
    fn instance_create_repeats_devices() {
        let parsed = parse(&[
            "instance",
            "create",
            "web-1",
            "--vcpus",
            "1",
            "--memory-mib",
            "512",
            "--volume",
            "a",
            "--network",
            "n1",
            "--volume",
            "b",
            "--network",
            "n2",
        ]);
        let Ok(TestCli::Instance(InstanceCommand::Create {
            volumes, networks, ..
        })) = parsed
        else {
            panic!("not an instance create: {parsed:?}");
        };
        assert_eq!(volumes, vec!["a", "b"]);
        assert_eq!(networks, vec!["n1", "n2"]);
    }

    #[test]
    fn instance_migrate_takes_destination() {
        let parsed = parse(&["instance", "migrate", "web-1", "--to", "host-4", "--wait"]);
        let Ok(TestCli::Instance(InstanceCommand::Migrate { name, to, wait, .. })) = parsed else {
            panic!("not an instance migrate: {parsed:?}");
        };
        assert_eq!(name, "web-1");
        assert_eq!(to.as_deref(), Some("host-4"));
        assert!(wait);

        let parsed = parse(&["instance", "migrate", "web-1"]);
        let Ok(TestCli::Instance(InstanceCommand::Migrate { to, wait, .. })) = parsed else {
            panic!("not an instance migrate: {parsed:?}");
        };
        assert_eq!(to, None, "the scheduler chooses");
        assert!(!wait);
    }

    #[test]
    fn nic_commands_take_instance_and_network() {
        let parsed = parse(&["instance", "attach-nic", "web-1", "net-a"]);
        let Ok(TestCli::Instance(InstanceCommand::AttachNic { name, network, .. })) = parsed else {
            panic!("not an attach-nic: {parsed:?}");
        };
        assert_eq!((name.as_str(), network.as_str()), ("web-1", "net-a"));
        let parsed = parse(&["instance", "detach-nic", "web-1", "net-a"]);
        assert!(matches!(
            parsed,
            Ok(TestCli::Instance(InstanceCommand::DetachNic { .. }))
        ));
    }

    #[test]
    fn host_and_zone_commands_parse() {
        let parsed = parse(&["host", "drain", "host-3"]);
        assert!(
            matches!(parsed, Ok(TestCli::Host(HostCommand::Drain { host, .. })) if host == "host-3")
        );
        let parsed = parse(&["host", "undrain", "host-3", "-o", "json"]);
        assert!(matches!(
            parsed,
            Ok(TestCli::Host(HostCommand::Undrain { .. }))
        ));
        let parsed = parse(&["zone", "drift", "-o", "json"]);
        assert!(matches!(
            parsed,
            Ok(TestCli::Zone(ZoneCommand::Drift {
                output: Output::Json
            }))
        ));
    }

    #[test]
    fn table_pads_columns_to_widest_cell() {
        let mut table = Table::new(&["NAME", "HOST"]);
        table.row(cells!["a-long-name", "host-1"]);
        table.row(cells!["b", ""]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME         HOST");
        assert_eq!(lines[1], "a-long-name  host-1");
        assert_eq!(lines[2], "b", "trailing spaces are trimmed");
    }

    #[test]
    fn instance_table_shows_migration() {
        let mut moving = instance("web-1", "host-3");
        moving.migrating_to = "host-4".to_string();
        let text = Instance::table(&[moving, instance("web-2", "host-4")]);
        assert!(text.contains("host-3->host-4"), "{text}");
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn instance_details_list_devices() {
        let mut web = instance("web-1", "host-3");
        web.volumes = vec!["vol-1".to_string(), "vol-2".to_string()];
        web.nics = vec![InstanceNic {
            network: "net-b".to_string(),
            mac: "52:54:00:00:00:01".to_string(),
            ip: "10.0.0.2".to_string(),
        }];
        web.migrating_to = "host-4".to_string();
        let text = instance_details(&web);
        assert!(text.contains("volumes: vol-1, vol-2"), "{text}");
        assert!(
            text.contains("net-b    10.0.0.2  52:54:00:00:00:01"),
            "{text}"
        );
        assert!(text.contains("migrating to: host-4"), "{text}");
        assert!(!text.contains("last error"), "{text}");

        let bare = instance_details(&instance("web-2", "host-1"));
        assert_eq!(bare, "volumes: none\nnics: none\n");
    }

    #[test]
    fn progress_names_migration_and_error() {
        let mut moving = instance("web-1", "host-3");
        moving.migrating_to = "host-4".to_string();
        moving.last_error = "copy failed".to_string();
        assert_eq!(
            describe_progress(&moving),
            "running on host host-3, migrating to host-4, last error: copy failed"
        );
        assert_eq!(
            describe_progress(&instance("web-2", "host-1")),
            "running on host host-1"
        );
    }

    #[test]
    fn device_change_prints_applies_and_message() {
        let reply = DeviceChangeReply {
            instance: Some(instance("web-1", "host-1")),
            applies: "next start".to_string(),
            message: "the test driver has no hot-plug".to_string(),
        };
        let text = DeviceChangeReply::table(std::slice::from_ref(&reply));
        assert!(
            text.ends_with("applies next start: the test driver has no hot-plug\n"),
            "{text}"
        );
        let value = reply.json();
        assert_eq!(value["applies"], "next start");
        assert_eq!(value["instance"]["name"], "web-1");
    }

    #[test]
    fn drain_table_lists_destinations() {
        let mut moving = instance("web-1", "host-3");
        moving.migrating_to = "host-4".to_string();
        let host = Host {
            id: "host-3".to_string(),
            ..Default::default()
        };
        let reply = DrainReply {
            host: Some(host.clone()),
            migrating: vec![moving],
        };
        let text = DrainReply::table(std::slice::from_ref(&reply));
        assert!(
            text.starts_with("host host-3 is draining; 1 instances migrating\n"),
            "{text}"
        );
        assert!(text.contains("web-1  host-3  host-4"), "{text}");

        let idle = DrainReply {
            host: Some(host),
            migrating: Vec::new(),
        };
        let text = DrainReply::table(std::slice::from_ref(&idle));
        assert_eq!(text, "host host-3 is draining; no instances to migrate\n");
    }

    #[test]
    fn drift_table_lists_items_and_unreported_hosts() {
        let reply = ZoneDriftReply {
            items: vec![DriftItem {
                host: "host-2".to_string(),
                kind: "domain".to_string(),
                name: "0f3c".to_string(),
                problem: "unknown".to_string(),
                detail: "libvirt runs a domain the zone does not know".to_string(),
            }],
            hosts_checked: 3,
            unreported: vec!["host-4".to_string()],
        };
        let text = ZoneDriftReply::table(std::slice::from_ref(&reply));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "HOST    KIND    NAME  PROBLEM  DETAIL");
        assert!(
            lines[1].starts_with("host-2  domain  0f3c  unknown  libvirt"),
            "{text}"
        );
        assert_eq!(lines[2], "1 drift items on the 3 hosts checked");
        assert!(lines[3].ends_with(": host-4"), "{text}");
        let value = reply.json();
        assert_eq!(value["items"][0]["problem"], "unknown");
        assert_eq!(value["unreported"][0], "host-4");

        let clean = ZoneDriftReply {
            hosts_checked: 4,
            ..Default::default()
        };
        let text = ZoneDriftReply::table(std::slice::from_ref(&clean));
        assert_eq!(text, "no drift on the 4 hosts checked\n");
    }

    #[test]
    fn list_json_nests_records_under_their_key() {
        let volume = Volume {
            id: "v1".to_string(),
            name: "data".to_string(),
            ..Default::default()
        };
        let value = list_json(&[volume], &None);
        assert_eq!(value["volumes"][0]["name"], "data");
        assert_eq!(value["read"], Value::Null);
    }
}
