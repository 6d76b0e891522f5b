//! Client subcommands of `ccs`: they call the zone API through a
//! `ZoneConnector` and print tables, or JSON with `-o json`.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use crate::client::{reason, ZoneConnector};
use crate::proto::zone::*;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
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
    /// Show one instance by name or id.
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

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values always serialize"));
}

fn instance_json(i: &Instance) -> serde_json::Value {
    json!({
        "id": i.id, "name": i.name, "vcpus": i.vcpus, "memory_mib": i.memory_mib,
        "disk_gib": i.disk_gib, "pod": i.pod, "host": i.host,
        "desired_state": i.desired_state, "observed_state": i.observed_state,
        "generation": i.generation, "created_index": i.created_index,
        "request_id": i.request_id, "last_error": i.last_error,
    })
}

fn read_json(read: &Option<ReadInfo>) -> serde_json::Value {
    match read {
        Some(r) => json!({
            "stale": r.stale, "applied_index": r.applied_index,
            "leader_commit_index": r.leader_commit_index, "serving_node_id": r.serving_node_id,
        }),
        None => serde_json::Value::Null,
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

fn print_instances(instances: &[Instance]) {
    println!(
        "{:<36}  {:<20}  {:>5}  {:>8}  {:>6}  {:<8}  {:<10}  {:<8}  {:<8}",
        "ID", "NAME", "VCPUS", "MEM_MIB", "DISK", "POD", "HOST", "DESIRED", "OBSERVED"
    );
    for i in instances {
        println!(
            "{:<36}  {:<20}  {:>5}  {:>8}  {:>6}  {:<8}  {:<10}  {:<8}  {:<8}",
            i.id, i.name, i.vcpus, i.memory_mib, i.disk_gib, i.pod, i.host, i.desired_state, i.observed_state
        );
    }
}

async fn wait_for<F>(connector: &ZoneConnector, name: &str, done: F) -> Result<Option<Instance>, CallError>
where
    F: Fn(Option<&Instance>) -> bool,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let request = GetInstanceRequest { name: name.to_string(), stale: false };
        let found = connector
            .call_until(RETRY_WINDOW, |mut c| {
                let r = request.clone();
                async move { c.get_instance(r).await }
            })
            .await;
        let instance = match found {
            Ok(reply) => reply.instance,
            Err(status) if status.code() == tonic::Code::NotFound => None,
            Err(status) => return Err(CallError(status)),
        };
        if done(instance.as_ref()) {
            return Ok(instance);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CallError(tonic::Status::deadline_exceeded(format!(
                "instance {name:?} did not reach the awaited state within 120s; last seen: {:?}",
                instance.map(|i| i.observed_state)
            ))));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn instance(connector: &ZoneConnector, command: InstanceCommand) -> Result<(), CallError> {
    match command {
        InstanceCommand::Create { name, vcpus, memory_mib, disk_gib, pod, request_id, wait, output } => {
            let request = CreateInstanceRequest {
                name: name.clone(),
                vcpus,
                memory_mib,
                disk_gib,
                pod: pod.unwrap_or_default(),
                // A generated id makes the CLI's own retries safe.
                request_id: request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                ..Default::default()
            };
            let mut instance = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.create_instance(r).await }
                })
                .await
                .map_err(CallError)?;
            if wait {
                let running = |i: Option<&Instance>| i.is_some_and(|i| i.observed_state == "running");
                instance = wait_for(connector, &instance.id, running).await?.expect("a running instance exists");
            }
            match output {
                Output::Json => print_json(&instance_json(&instance)),
                Output::Table => print_instances(std::slice::from_ref(&instance)),
            }
        }
        InstanceCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = connector
                .call_until(RETRY_WINDOW, |mut c| async move { c.list_instances(request).await })
                .await
                .map_err(CallError)?;
            match read.output {
                Output::Json => print_json(&json!({
                    "instances": list.instances.iter().map(instance_json).collect::<Vec<_>>(),
                    "read": read_json(&list.read),
                })),
                Output::Table => {
                    print_instances(&list.instances);
                    note_staleness(&list.read);
                }
            }
        }
        InstanceCommand::Show { name, read } => {
            let request = GetInstanceRequest { name, stale: read.stale };
            let reply = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.get_instance(r).await }
                })
                .await
                .map_err(CallError)?;
            let instance = reply.instance.unwrap_or_default();
            match read.output {
                Output::Json => {
                    let mut value = instance_json(&instance);
                    value["read"] = read_json(&reply.read);
                    print_json(&value);
                }
                Output::Table => {
                    print_instances(std::slice::from_ref(&instance));
                    if !instance.last_error.is_empty() {
                        println!("last error: {}", instance.last_error);
                    }
                    note_staleness(&reply.read);
                }
            }
        }
        InstanceCommand::Delete { name, wait } => {
            let request = InstanceRef { name: name.clone() };
            let instance = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.delete_instance(r).await }
                })
                .await
                .map_err(CallError)?;
            if wait {
                wait_for(connector, &instance.id, |i| i.is_none()).await?;
                println!("deleted {} ({})", instance.name, instance.id);
            } else {
                println!("deleting {} ({})", instance.name, instance.id);
            }
        }
    }
    Ok(())
}

pub async fn host(connector: &ZoneConnector, command: HostCommand) -> Result<(), CallError> {
    match command {
        HostCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = connector
                .call_until(RETRY_WINDOW, |mut c| async move { c.list_hosts(request).await })
                .await
                .map_err(CallError)?;
            match read.output {
                Output::Json => {
                    let hosts: Vec<_> = list.hosts.iter().map(|h| json!({
                        "id": h.id, "pod": h.pod, "libvirt_uri": h.libvirt_uri,
                        "agent_endpoint": h.agent_endpoint, "cpus": h.cpus, "memory_mib": h.memory_mib,
                        "disk_gib": h.disk_gib, "used_vcpus": h.used_vcpus,
                        "used_memory_mib": h.used_memory_mib, "used_disk_gib": h.used_disk_gib,
                        "health": h.health, "instances": h.instances,
                    })).collect();
                    print_json(&json!({ "hosts": hosts, "read": read_json(&list.read) }));
                }
                Output::Table => {
                    println!(
                        "{:<10}  {:<8}  {:<8}  {:>11}  {:>15}  {:>9}  {:<21}",
                        "HOST", "POD", "HEALTH", "VCPUS", "MEMORY_MIB", "INSTANCES", "AGENT"
                    );
                    for h in &list.hosts {
                        println!(
                            "{:<10}  {:<8}  {:<8}  {:>11}  {:>15}  {:>9}  {:<21}",
                            h.id, h.pod, h.health,
                            format!("{}/{}", h.used_vcpus, h.cpus),
                            format!("{}/{}", h.used_memory_mib, h.memory_mib),
                            h.instances, h.agent_endpoint
                        );
                    }
                    note_staleness(&list.read);
                }
            }
        }
        HostCommand::Domains { host, output } => {
            let request = HostRef { host };
            let reply = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.host_domains(r).await }
                })
                .await
                .map_err(CallError)?;
            match output {
                Output::Json => {
                    let domains: Vec<_> = reply.domains.iter().map(|d| json!({
                        "uuid": d.uuid, "name": d.name, "state": d.state,
                        "vcpus": d.vcpus, "memory_mib": d.memory_mib,
                    })).collect();
                    print_json(&json!({ "host": reply.host, "domains": domains }));
                }
                Output::Table => {
                    println!("{:<36}  {:<20}  {:<8}  {:>5}  {:>8}", "UUID", "NAME", "STATE", "VCPUS", "MEM_MIB");
                    for d in &reply.domains {
                        println!("{:<36}  {:<20}  {:<8}  {:>5}  {:>8}", d.uuid, d.name, d.state, d.vcpus, d.memory_mib);
                    }
                }
            }
        }
    }
    Ok(())
}

fn pod_json(p: &Pod) -> serde_json::Value {
    json!({
        "name": p.name, "cpu_ratio": p.cpu_ratio, "memory_ratio": p.memory_ratio,
        "storage_ratio": p.storage_ratio, "placement": p.placement, "storage": p.storage,
        "san_agent": p.san_agent, "workload_class": p.workload_class,
        "network_mode": p.network_mode, "segmentation_first": p.segmentation_first,
        "segmentation_last": p.segmentation_last,
    })
}

fn print_pods(pods: &[Pod]) {
    println!(
        "{:<12}  {:>5}  {:>5}  {:>5}  {:<9}  {:<7}  {:<10}  {:<12}  {:<7}  {:<12}",
        "POD", "CPU", "MEM", "DISK", "PLACEMENT", "STORAGE", "SAN_AGENT", "CLASS", "NETWORK",
        "SEGMENTS"
    );
    for p in pods {
        let san_agent = if p.san_agent.is_empty() { "-" } else { p.san_agent.as_str() };
        println!(
            "{:<12}  {:>5}  {:>5}  {:>5}  {:<9}  {:<7}  {:<10}  {:<12}  {:<7}  {:<12}",
            p.name, p.cpu_ratio, p.memory_ratio, p.storage_ratio, p.placement, p.storage, san_agent,
            p.workload_class, p.network_mode,
            format!("{}..{}", p.segmentation_first, p.segmentation_last)
        );
    }
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
            let pod = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.create_pod(r).await }
                })
                .await
                .map_err(CallError)?;
            match output {
                Output::Json => print_json(&pod_json(&pod)),
                Output::Table => print_pods(std::slice::from_ref(&pod)),
            }
        }
        PodCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = connector
                .call_until(RETRY_WINDOW, |mut c| async move { c.list_pods(request).await })
                .await
                .map_err(CallError)?;
            match read.output {
                Output::Json => {
                    let pods: Vec<_> = list.pods.iter().map(pod_json).collect();
                    print_json(&json!({ "pods": pods, "read": read_json(&list.read) }));
                }
                Output::Table => {
                    print_pods(&list.pods);
                    note_staleness(&list.read);
                }
            }
        }
        PodCommand::Show { name, read } => {
            let request = GetPodRequest { name, stale: read.stale };
            let reply = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.get_pod(r).await }
                })
                .await
                .map_err(CallError)?;
            let pod = reply.pod.unwrap_or_default();
            match read.output {
                Output::Json => {
                    let mut value = pod_json(&pod);
                    value["read"] = read_json(&reply.read);
                    print_json(&value);
                }
                Output::Table => {
                    print_pods(std::slice::from_ref(&pod));
                    note_staleness(&reply.read);
                }
            }
        }
    }
    Ok(())
}

fn network_json(n: &Network) -> serde_json::Value {
    json!({
        "name": n.name, "pod": n.pod, "mode": n.mode, "segmentation_id": n.segmentation_id,
        "cidr": n.cidr, "created_index": n.created_index, "state": n.state,
    })
}

fn print_networks(networks: &[Network]) {
    println!(
        "{:<20}  {:<12}  {:<5}  {:>8}  {:<18}  {:<8}",
        "NETWORK", "POD", "MODE", "SEGMENT", "CIDR", "STATE"
    );
    for n in networks {
        println!(
            "{:<20}  {:<12}  {:<5}  {:>8}  {:<18}  {:<8}",
            n.name, n.pod, n.mode, n.segmentation_id, n.cidr, n.state
        );
    }
}

pub async fn network(connector: &ZoneConnector, command: NetworkCommand) -> Result<(), CallError> {
    match command {
        NetworkCommand::Create { name, pod, cidr, output } => {
            let request = CreateNetworkRequest { name, pod, cidr };
            // A retry of a create that was applied fails with NAME_TAKEN, so
            // after that error `ccs network show` shows whether this create made it.
            let network = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.create_network(r).await }
                })
                .await
                .map_err(CallError)?;
            match output {
                Output::Json => print_json(&network_json(&network)),
                Output::Table => print_networks(std::slice::from_ref(&network)),
            }
        }
        NetworkCommand::List(read) => {
            let request = ReadRequest { stale: read.stale };
            let list = connector
                .call_until(RETRY_WINDOW, |mut c| async move { c.list_networks(request).await })
                .await
                .map_err(CallError)?;
            match read.output {
                Output::Json => {
                    let networks: Vec<_> = list.networks.iter().map(network_json).collect();
                    print_json(&json!({ "networks": networks, "read": read_json(&list.read) }));
                }
                Output::Table => {
                    print_networks(&list.networks);
                    note_staleness(&list.read);
                }
            }
        }
        NetworkCommand::Show { name, read } => {
            let request = GetNetworkRequest { name, stale: read.stale };
            let reply = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.get_network(r).await }
                })
                .await
                .map_err(CallError)?;
            let network = reply.network.unwrap_or_default();
            match read.output {
                Output::Json => {
                    let mut value = network_json(&network);
                    value["read"] = read_json(&reply.read);
                    print_json(&value);
                }
                Output::Table => {
                    print_networks(std::slice::from_ref(&network));
                    note_staleness(&reply.read);
                }
            }
        }
        NetworkCommand::Delete { name } => {
            let request = NetworkRef { name };
            let network = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.delete_network(r).await }
                })
                .await
                .map_err(CallError)?;
            let mode = if network.mode == "vxlan" { "VNI" } else { "VLAN id" };
            println!("deleted {}; {mode} {} is free", network.name, network.segmentation_id);
        }
    }
    Ok(())
}

pub async fn key(connector: &ZoneConnector, command: KeyCommand) -> Result<(), CallError> {
    match command {
        KeyCommand::Get { key, read } => {
            let request = GetKeyRequest { key, stale: read.stale };
            let reply = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.get_key(r).await }
                })
                .await
                .map_err(CallError)?;
            match read.output {
                Output::Json => print_json(&json!({
                    "key": reply.key, "found": reply.found, "value": reply.value,
                    "modified_index": reply.modified_index, "read": read_json(&reply.read),
                })),
                Output::Table if reply.found => println!("{}", reply.value),
                Output::Table => {
                    let message = format!("key {:?} not found; set it with `ccs key put`", reply.key);
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
            let reply = connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.put_key(r).await }
                })
                .await
                .map_err(CallError)?;
            println!("set {} at index {}", reply.key, reply.modified_index);
        }
        KeyCommand::Cas { key, value, expected, absent } => {
            let expected = if absent { None } else { expected };
            let request = CompareAndSwapKeyRequest { key, expected, value };
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
            let replicas: Vec<_> = status.replicas.iter().map(|r| json!({
                "node_id": r.node_id, "addr": r.addr, "role": r.role,
                "matched_index": r.matched_index, "lag": r.lag,
            })).collect();
            print_json(&json!({
                "zone": status.zone, "leader_id": status.leader_id, "leader_addr": status.leader_addr,
                "term": status.term, "commit_index": status.commit_index,
                "applied_index": status.applied_index, "last_log_index": status.last_log_index,
                "snapshot_index": status.snapshot_index, "purged_index": status.purged_index,
                "replicas": replicas,
            }));
        }
        Output::Table => {
            println!("zone {}  leader {} ({})  term {}", status.zone, status.leader_id, status.leader_addr, status.term);
            println!(
                "commit index {}  applied index {}  last log index {}  snapshot {}  purged {}",
                status.commit_index, status.applied_index, status.last_log_index, status.snapshot_index, status.purged_index
            );
            println!("{:>7}  {:<21}  {:<7}  {:>13}  {:>6}", "NODE", "ADDR", "ROLE", "MATCHED_INDEX", "LAG");
            for r in &status.replicas {
                let matched = r.matched_index.map_or("-".to_string(), |m| m.to_string());
                println!("{:>7}  {:<21}  {:<7}  {:>13}  {:>6}", r.node_id, r.addr, r.role, matched, r.lag);
            }
        }
    }
}

pub async fn zone(connector: &ZoneConnector, command: ZoneCommand) -> Result<(), CallError> {
    let status = match command {
        ZoneCommand::Status { output } => {
            let status = connector
                .call_until(RETRY_WINDOW, |mut c| async move { c.zone_status(ZoneStatusRequest {}).await })
                .await
                .map_err(CallError)?;
            print_status(&status, output);
            return Ok(());
        }
        ZoneCommand::AddReplica { node_id, addr } => {
            let request = AddReplicaRequest { node_id, addr };
            connector
                .call_until(RETRY_WINDOW, |mut c| {
                    let r = request.clone();
                    async move { c.add_replica(r).await }
                })
                .await
        }
        ZoneCommand::RemoveReplica { node_id } => {
            let request = RemoveReplicaRequest { node_id };
            connector
                .call_until(RETRY_WINDOW, |mut c| async move { c.remove_replica(request).await })
                .await
        }
    };
    print_status(&status.map_err(CallError)?, Output::Table);
    Ok(())
}
