//! Clients that drive a zone and record what they see.
//!
//! Each client task sends one call at a time to one controller, chosen at
//! random, with its own timeout and without the connector's retries: a retry
//! of a compare-and-swap that may already have applied would compare against
//! its own write and be recorded wrongly. A completion is `fail` only when
//! the zone's reason code says the write was refused before it was proposed;
//! anything else that is not a success is `info`, and the client then takes a
//! fresh process id.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ccs::proto::zone::zone_client::ZoneClient;
use ccs::proto::zone::{
    CompareAndSwapKeyRequest, CreateInstanceRequest, CreateNetworkRequest, GetKeyRequest, PutKeyRequest, ReadRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::history::{Call, InstanceSeen, NetworkSeen, OpType, Process};
use crate::recorder::Recorder;

/// Reason codes that mean the zone refused a call before proposing it.
const DEFINITE_FAILURES: [&str; 9] = [
    "NOT_LEADER",
    "NO_LEADER",
    "CAS_MISMATCH",
    "INVALID_ARGUMENT",
    "NAME_TAKEN",
    "NO_CAPACITY",
    "CONFLICT",
    "POD_NOT_FOUND",
    "RANGE_EXHAUSTED",
];

/// Operations on one key before the key is retired and a fresh one takes
/// its place. Short per-key histories keep the linearizability search small.
const OPS_PER_KEY: u64 = 200;

/// Instance shape of the set workload: small enough for thousands per host.
const INSTANCE_VCPUS: u32 = 1;
const INSTANCE_MEMORY_MIB: u64 = 64;
const INSTANCE_DISK_GIB: u64 = 1;

/// State shared by every client task.
pub struct Clients {
    pub recorder: Arc<Recorder>,
    /// Controllers that are zone members now; the runner refreshes the list.
    endpoints: std::sync::RwLock<Vec<String>>,
    /// Per-call timeout; past it the outcome is unknown.
    pub timeout: Duration,
    /// Pause between one client's calls.
    pub think_time: Duration,
    next_process: AtomicU64,
    keys: Mutex<KeySpace>,
    next_name: AtomicU64,
    next_network: AtomicU64,
    /// The pod networks are created in.
    pub pod: String,
}

/// The register keys in use and how many operations each has had.
struct KeySpace {
    active: Vec<(String, u64)>,
    next: u64,
    every_key: BTreeSet<String>,
}

impl KeySpace {
    fn pick(&mut self, rng: &mut StdRng) -> String {
        let slot = rng.gen_range(0..self.active.len());
        let (key, uses) = &mut self.active[slot];
        *uses += 1;
        let chosen = key.clone();
        if *uses >= OPS_PER_KEY {
            let fresh = format!("r{}", self.next);
            self.next += 1;
            self.every_key.insert(fresh.clone());
            self.active[slot] = (fresh, 0);
        }
        chosen
    }
}

impl Clients {
    pub fn new(recorder: Arc<Recorder>, endpoints: Vec<String>, timeout: Duration, active_keys: usize) -> Clients {
        let active: Vec<(String, u64)> = (0..active_keys.max(1)).map(|i| (format!("r{i}"), 0)).collect();
        let every_key = active.iter().map(|(k, _)| k.clone()).collect();
        Clients {
            recorder,
            endpoints: std::sync::RwLock::new(endpoints),
            timeout,
            think_time: Duration::from_millis(10),
            next_process: AtomicU64::new(0),
            keys: Mutex::new(KeySpace {
                next: active.len() as u64,
                active,
                every_key,
            }),
            next_name: AtomicU64::new(0),
            next_network: AtomicU64::new(0),
            pod: crate::cluster::POD.to_string(),
        }
    }

    pub fn new_process(&self) -> Process {
        Process::Client(self.next_process.fetch_add(1, Ordering::Relaxed))
    }

    /// Returns every register key any client has used.
    pub fn keys_used(&self) -> Vec<String> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.every_key.iter().cloned().collect()
    }

    fn client_for(&self, endpoint: &str) -> ZoneClient<Channel> {
        let channel = ccs::client::channel(endpoint, self.timeout).expect("harness endpoints are valid host:port");
        ZoneClient::new(channel)
    }

    fn pick_endpoint(&self, rng: &mut StdRng) -> String {
        let endpoints = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        endpoints[rng.gen_range(0..endpoints.len())].clone()
    }

    /// Replaces the controllers clients pick from; an empty list is ignored.
    pub fn set_endpoints(&self, endpoints: Vec<String>) {
        if !endpoints.is_empty() {
            *self.endpoints.write().unwrap_or_else(|p| p.into_inner()) = endpoints;
        }
    }
}

/// Classifies a failed call as `fail` (certainly not applied) or `info`.
fn outcome_of(status: &tonic::Status) -> OpType {
    match ccs::client::reason(status) {
        Some(reason) if DEFINITE_FAILURES.contains(&reason) => OpType::Fail,
        // No connection was made, so the request never left the client.
        None if ccs::client::is_connect_failure(status) => OpType::Fail,
        _ => OpType::Info,
    }
}

fn describe(status: &tonic::Status) -> String {
    match ccs::client::reason(status) {
        Some(reason) => format!("{reason}: {}", status.message()),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// Runs a register client until `stop` turns true: reads, writes and
/// compare-and-swaps on a rotating set of keys. Written values are unique
/// per run, so a read names the write it observed.
pub async fn register_client(clients: Arc<Clients>, seed: u64, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut process = clients.new_process();
    let mut endpoint = clients.pick_endpoint(&mut rng);
    let mut client = clients.client_for(&endpoint);
    let mut sequence: i64 = 0;
    let mut last_read: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    while !*stop.borrow() {
        let key = clients.keys.lock().unwrap_or_else(|p| p.into_inner()).pick(&mut rng);
        sequence += 1;
        let unique = seed as i64 * 10_000_000 + sequence;
        let roll: f64 = rng.gen();
        let call = match last_read.get(&key) {
            Some(&from) if roll < 0.25 => Call::Cas { key: key.clone(), from, to: unique },
            _ if roll < 0.55 => Call::Write { key: key.clone(), value: unique },
            _ => Call::Read { key: key.clone(), value: None },
        };
        clients.recorder.record(process, OpType::Invoke, call.clone(), None);
        let (kind, completed, error) = perform_register(&clients, &mut client, call).await;
        if let (OpType::Ok, Call::Read { key, value: Some(v) }) = (kind, &completed) {
            last_read.insert(key.clone(), *v);
        }
        clients.recorder.record(process, kind, completed, error);
        if kind == OpType::Info {
            process = clients.new_process();
        }
        if kind != OpType::Ok {
            // Try another controller after a failure, as a client library would.
            endpoint = clients.pick_endpoint(&mut rng);
            client = clients.client_for(&endpoint);
        }
        pause(&clients, &mut stop).await;
    }
}

async fn pause(clients: &Clients, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(clients.think_time) => {}
        _ = stop.changed() => {}
    }
}

/// Sends one register call; returns the completion type, the call with its
/// result filled in, and the error message.
async fn perform_register(clients: &Clients, client: &mut ZoneClient<Channel>, call: Call) -> (OpType, Call, Option<String>) {
    let timeout = clients.timeout;
    match call {
        Call::Read { key, .. } => {
            let request = GetKeyRequest { key: key.clone(), stale: false };
            match tokio::time::timeout(timeout, client.get_key(request)).await {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    match parse_value(&reply) {
                        Ok(value) => (OpType::Ok, Call::Read { key, value }, None),
                        // A value no client wrote: record it so that the checker reports it.
                        Err(message) => (OpType::Ok, Call::Read { key, value: Some(i64::MIN) }, Some(message)),
                    }
                }
                // A read changes nothing, so any failed read is a definite `fail`.
                Ok(Err(status)) => (OpType::Fail, Call::Read { key, value: None }, Some(describe(&status))),
                Err(_) => (OpType::Fail, Call::Read { key, value: None }, Some("timed out".into())),
            }
        }
        Call::Write { key, value } => {
            let request = PutKeyRequest { key: key.clone(), value: value.to_string() };
            let result = tokio::time::timeout(timeout, client.put_key(request)).await;
            let (kind, error) = write_outcome(result.map(|r| r.map(|_| ())));
            (kind, Call::Write { key, value }, error)
        }
        Call::Cas { key, from, to } => {
            let request = CompareAndSwapKeyRequest {
                key: key.clone(),
                expected: Some(from.to_string()),
                value: to.to_string(),
            };
            let result = tokio::time::timeout(timeout, client.compare_and_swap_key(request)).await;
            let (kind, error) = write_outcome(result.map(|r| r.map(|_| ())));
            (kind, Call::Cas { key, from, to }, error)
        }
        other => (OpType::Fail, other, Some("not a register call".into())),
    }
}

fn write_outcome(result: Result<Result<(), tonic::Status>, tokio::time::error::Elapsed>) -> (OpType, Option<String>) {
    match result {
        Ok(Ok(())) => (OpType::Ok, None),
        Ok(Err(status)) => (outcome_of(&status), Some(describe(&status))),
        Err(_) => (OpType::Info, Some("timed out".into())),
    }
}

fn parse_value(reply: &ccs::proto::zone::KeyReply) -> Result<Option<i64>, String> {
    if !reply.found {
        return Ok(None);
    }
    reply
        .value
        .parse::<i64>()
        .map(Some)
        .map_err(|_| format!("key {} holds {:?}, which no client wrote", reply.key, reply.value))
}

/// Runs a set client until `stop`: creates small instances. Names come from
/// one counter, and one create in five reuses a recent name on purpose, so
/// clients race for names and the uniqueness checker has collisions to judge.
pub async fn set_client(clients: Arc<Clients>, seed: u64, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e7);
    let mut process = clients.new_process();
    let mut client = clients.client_for(&clients.pick_endpoint(&mut rng));
    while !*stop.borrow() {
        let fresh = clients.next_name.fetch_add(1, Ordering::Relaxed);
        let number = if fresh > 5 && rng.gen_bool(0.2) { fresh - rng.gen_range(1..=5) } else { fresh };
        let name = format!("j{number}");
        let request_id = format!("{:032x}", rng.gen::<u128>());
        let call = Call::Create { name: name.clone(), request_id: request_id.clone(), id: None, host: None };
        clients.recorder.record(process, OpType::Invoke, call, None);
        let request = CreateInstanceRequest {
            name: name.clone(),
            vcpus: INSTANCE_VCPUS,
            memory_mib: INSTANCE_MEMORY_MIB,
            disk_gib: INSTANCE_DISK_GIB,
            pod: String::new(),
            request_id: request_id.clone(),
            ..Default::default()
        };
        let result = tokio::time::timeout(clients.timeout, client.create_instance(request)).await;
        let (kind, id, host, error) = match result {
            Ok(Ok(reply)) => {
                let instance = reply.into_inner();
                (OpType::Ok, Some(instance.id), Some(instance.host), None)
            }
            Ok(Err(status)) => (outcome_of(&status), None, None, Some(describe(&status))),
            Err(_) => (OpType::Info, None, None, Some("timed out".to_string())),
        };
        let call = Call::Create { name, request_id, id, host };
        clients.recorder.record(process, kind, call, error);
        if kind == OpType::Info {
            process = clients.new_process();
        }
        if kind != OpType::Ok {
            client = clients.client_for(&clients.pick_endpoint(&mut rng));
        }
        // Creates pause five times longer than register calls, which keeps a
        // long run within the pod's capacity.
        for _ in 0..5 {
            pause(&clients, &mut stop).await;
        }
    }
}

/// Reads every register key once more, through `endpoint`, recording each
/// read; run after the cluster has healed so that lost writes show up.
pub async fn final_reads(clients: &Clients, endpoint: &str) -> usize {
    let mut client = clients.client_for(endpoint);
    let mut failures = 0;
    for key in clients.keys_used() {
        let process = clients.new_process();
        let call = Call::Read { key, value: None };
        clients.recorder.record(process, OpType::Invoke, call.clone(), None);
        let (kind, completed, error) = perform_register(clients, &mut client, call).await;
        if kind != OpType::Ok {
            failures += 1;
        }
        clients.recorder.record(process, kind, completed, error);
    }
    failures
}

/// Lists every instance through `endpoint` with a linearizable read and
/// records the listing. Returns whether the read succeeded.
pub async fn final_listing(clients: &Clients, endpoint: &str) -> bool {
    let mut client = clients.client_for(endpoint);
    let process = clients.new_process();
    clients.recorder.record(process, OpType::Invoke, Call::ListInstances { instances: None }, None);
    let listing = tokio::time::timeout(clients.timeout * 4, client.list_instances(ReadRequest { stale: false })).await;
    match listing {
        Ok(Ok(reply)) => {
            let instances = reply
                .into_inner()
                .instances
                .into_iter()
                .map(|i| InstanceSeen { id: i.id, name: i.name, host: i.host, request_id: i.request_id })
                .collect();
            let call = Call::ListInstances { instances: Some(instances) };
            clients.recorder.record(process, OpType::Ok, call, None);
            true
        }
        Ok(Err(status)) => {
            let call = Call::ListInstances { instances: None };
            clients.recorder.record(process, OpType::Fail, call, Some(describe(&status)));
            false
        }
        Err(_) => {
            let call = Call::ListInstances { instances: None };
            clients.recorder.record(process, OpType::Fail, call, Some("timed out".into()));
            false
        }
    }
}

/// Runs a network client until `stop`: creates tenant networks in the test
/// pod, one in five under a recent name, so clients race for names while the
/// zone hands out VLAN ids. Creates are spaced out so that a 10-minute run
/// stays within the pod's 4094 VLAN ids.
pub async fn network_client(clients: Arc<Clients>, seed: u64, mut stop: watch::Receiver<bool>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7e7);
    let mut process = clients.new_process();
    let mut client = clients.client_for(&clients.pick_endpoint(&mut rng));
    while !*stop.borrow() {
        let fresh = clients.next_network.fetch_add(1, Ordering::Relaxed);
        let number = if fresh > 5 && rng.gen_bool(0.2) { fresh - rng.gen_range(1..=5) } else { fresh };
        let name = format!("net{number}");
        let call = Call::CreateNetwork { name: name.clone(), segmentation_id: None };
        clients.recorder.record(process, OpType::Invoke, call, None);
        let request = CreateNetworkRequest {
            name: name.clone(),
            pod: clients.pod.clone(),
            cidr: format!("10.{}.{}.0/24", (number / 256) % 256, number % 256),
        };
        let result = tokio::time::timeout(clients.timeout, client.create_network(request)).await;
        let (kind, segmentation_id, error) = match result {
            Ok(Ok(reply)) => (OpType::Ok, Some(reply.into_inner().segmentation_id), None),
            Ok(Err(status)) => (outcome_of(&status), None, Some(describe(&status))),
            Err(_) => (OpType::Info, None, Some("timed out".to_string())),
        };
        clients.recorder.record(process, kind, Call::CreateNetwork { name, segmentation_id }, error);
        if kind == OpType::Info {
            process = clients.new_process();
        }
        if kind != OpType::Ok {
            client = clients.client_for(&clients.pick_endpoint(&mut rng));
        }
        for _ in 0..20 {
            pause(&clients, &mut stop).await;
        }
    }
}

/// Lists every network through `endpoint` with a linearizable read and
/// records the listing. Returns whether the read succeeded.
pub async fn final_network_listing(clients: &Clients, endpoint: &str) -> bool {
    let mut client = clients.client_for(endpoint);
    let process = clients.new_process();
    clients.recorder.record(process, OpType::Invoke, Call::ListNetworks { networks: None }, None);
    let listing = tokio::time::timeout(clients.timeout * 4, client.list_networks(ReadRequest { stale: false })).await;
    let (kind, networks, error) = match listing {
        Ok(Ok(reply)) => {
            let networks = reply
                .into_inner()
                .networks
                .into_iter()
                .map(|n| NetworkSeen { name: n.name, segmentation_id: n.segmentation_id })
                .collect();
            (OpType::Ok, Some(networks), None)
        }
        Ok(Err(status)) => (OpType::Fail, None, Some(describe(&status))),
        Err(_) => (OpType::Fail, None, Some("timed out".to_string())),
    };
    let succeeded = kind == OpType::Ok;
    clients.recorder.record(process, kind, Call::ListNetworks { networks }, error);
    succeeded
}
