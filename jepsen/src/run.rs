//! One test run: start the cluster, run clients and the nemesis for the
//! time limit, heal everything and require recovery within a bound, then
//! check the history and write the report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ccs::config::{AgentCanary, ControllerCanary, RaftTuning};
use ccs::proto::zone::zone_client::ZoneClient;
use ccs::proto::zone::{GetKeyRequest, ZoneStatusRequest};
use tokio::sync::{watch, Mutex};

use crate::checker::{self, Validity, Verdict};
use crate::cluster::{Cluster, ClusterSpec, LossyFsSpec};
use crate::nemesis::{self, NemesisKind, NemesisPlan};
use crate::recorder::Recorder;
use crate::report::{self, ReportVerdict, RunInfo};
use crate::workload::{self, Clients};

/// A switch that breaks one safety property on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Canary {
    /// Controllers acknowledge log appends without fsync.
    SkipFsync,
    /// Controllers serve reads without a read index.
    LocalReads,
    /// Agents execute orders from stale leaders.
    SkipFencing,
}

impl Canary {
    /// The anomaly the canary must produce, as checkers name it.
    pub fn expected_anomaly(self) -> &'static str {
        match self {
            Canary::SkipFsync => "lost write",
            Canary::LocalReads => "stale read",
            Canary::SkipFencing => "duplicate execution",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Register,
    Set,
    /// Tenant network creates: VLAN ids must be unique.
    Network,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub name: String,
    pub ccs_binary: PathBuf,
    /// Binary that provides the `lossyfs` subcommand; `None` disables power loss.
    pub lossyfs_binary: Option<PathBuf>,
    pub store: PathBuf,
    pub time_limit: Duration,
    pub nemeses: Vec<NemesisKind>,
    pub workloads: Vec<Workload>,
    pub seed: u64,
    pub concurrency: usize,
    pub canary: Option<Canary>,
    /// Time allowed after healing for the zone to serve again.
    pub recovery_bound: Duration,
    /// Time the linearizability search may take before it returns "unknown".
    pub check_budget: Duration,
    pub fault_interval: Duration,
    pub fault_duration: Duration,
    /// The command line, recorded in the report.
    pub command: String,
}

/// The result of a run: its report directory and verdicts.
pub struct RunOutcome {
    pub dir: PathBuf,
    pub verdicts: Vec<Verdict>,
}

impl RunOutcome {
    pub fn valid(&self) -> bool {
        self.verdicts.iter().all(|v| v.validity == Validity::Valid)
    }
}

/// Raft settings under test: short timeouts so faults bite quickly, and a
/// small snapshot threshold with aggressive purge, so that snapshot
/// building, sending and installing happen many times in every run.
fn raft_tuning() -> RaftTuning {
    RaftTuning {
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(500),
        election_timeout_max: Duration::from_millis(1000),
        snapshot_after_entries: 200,
        keep_entries_after_snapshot: 20,
    }
}

pub async fn run(options: RunOptions) -> anyhow::Result<RunOutcome> {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir = options.store.join(format!("{}-{started_ms}", options.name));
    if dir.exists() {
        anyhow::bail!("run directory {} already exists; start the run again", dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating run directory {}", dir.display()))?;
    println!("run {}: {}", options.name, dir.display());

    let spec = cluster_spec(&options, &dir);
    let cluster = Cluster::start(spec).await.context("starting the cluster")?;
    let cluster = Arc::new(Mutex::new(cluster));
    let result = run_phases(&options, cluster.clone()).await;
    let cluster = Arc::try_unwrap(cluster)
        .map_err(|_| anyhow::anyhow!("teardown failed: a client or nemesis task still owns the cluster"))?
        .into_inner();
    if let Err(error) = cluster.teardown().await {
        eprintln!("warning: teardown failed: {error:#}");
    }
    let (verdicts, info, history) = result?;

    let report_verdicts: Vec<ReportVerdict> = verdicts.iter().map(to_report_verdict).collect();
    report::write_report(&dir, &info, &history, &report_verdicts)?;
    checker::write_lines(&mut std::io::stdout(), &verdicts)?;
    println!("report: {}", dir.join("index.html").display());
    Ok(RunOutcome { dir, verdicts })
}

fn cluster_spec(options: &RunOptions, dir: &std::path::Path) -> ClusterSpec {
    let mut controller_canary = ControllerCanary::default();
    let mut agent_canary = AgentCanary::default();
    match options.canary {
        Some(Canary::SkipFsync) => controller_canary.skip_fsync = true,
        Some(Canary::LocalReads) => controller_canary.local_reads = true,
        Some(Canary::SkipFencing) => agent_canary.skip_fencing = true,
        None => {}
    }
    let wants_power_loss = options.nemeses.contains(&NemesisKind::PowerLoss);
    ClusterSpec {
        ccs_binary: options.ccs_binary.clone(),
        run_dir: dir.to_path_buf(),
        voters: 3,
        spare_controllers: 2,
        agents: 3,
        raft: raft_tuning(),
        controller_canary,
        agent_canary,
        faketime: find_faketime(),
        lossy_fs: match (&options.lossyfs_binary, wants_power_loss) {
            (Some(binary), true) => Some(LossyFsSpec { binary: binary.clone() }),
            _ => None,
        },
    }
}

/// Returns the libfaketime library of Debian's `faketime` package, if installed.
fn find_faketime() -> Option<PathBuf> {
    let path = PathBuf::from("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    path.exists().then_some(path)
}

type Phases = (Vec<Verdict>, RunInfo, Vec<crate::history::Op>);

async fn run_phases(options: &RunOptions, cluster: Arc<Mutex<Cluster>>) -> anyhow::Result<Phases> {
    let started = Instant::now();
    let recorder = Arc::new(Recorder::new());
    let endpoints = cluster.lock().await.controller_endpoints();
    let clients = Arc::new(Clients::new(recorder.clone(), endpoints, Duration::from_secs(5), 8));

    // Phase 1: faults under load.
    let (stop_tx, stop_rx) = watch::channel(false);
    let refresher = tokio::spawn(refresh_endpoints(cluster.clone(), clients.clone(), stop_rx.clone()));
    let mut tasks = Vec::new();
    for i in 0..options.concurrency {
        let seed = options.seed.wrapping_mul(1000).wrapping_add(i as u64 + 1);
        let workload = options.workloads[i % options.workloads.len()];
        let (clients, stop) = (clients.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            match workload {
                Workload::Register => workload::register_client(clients, seed, stop).await,
                Workload::Set => workload::set_client(clients, seed, stop).await,
                Workload::Network => workload::network_client(clients, seed, stop).await,
            }
        }));
    }
    let plan = NemesisPlan {
        kinds: options.nemeses.clone(),
        interval: options.fault_interval,
        fault_duration: options.fault_duration,
        seed: options.seed,
    };
    let nemesis = tokio::spawn(nemesis::run(cluster.clone(), plan, recorder.clone(), stop_rx.clone()));
    tokio::time::sleep(options.time_limit).await;
    stop_tx.send(true).ok();
    for task in tasks {
        task.await.ok();
    }
    refresher.await.ok();
    let faults = nemesis.await.context("nemesis task panicked")??;
    let mut fault_counts: BTreeMap<String, u64> = faults.injected.clone();
    for (name, count) in &faults.failed {
        fault_counts.insert(format!("{name} (failed)"), *count);
    }

    // Phase 2: heal everything and require recovery within the bound.
    cluster.lock().await.heal_all().await?;
    let endpoints = cluster.lock().await.controller_endpoints();
    let recovery = wait_for_recovery(&endpoints, options.recovery_bound).await;
    let serving = match &recovery {
        Ok(elapsed) => {
            println!("recovered in {:.1} s", elapsed.as_secs_f64());
            endpoints.first().cloned()
        }
        Err(message) => {
            println!("no recovery: {message}");
            None
        }
    };
    if let Some(endpoint) = &serving {
        if options.workloads.contains(&Workload::Register) {
            workload::final_reads(&clients, endpoint).await;
        }
        if options.workloads.contains(&Workload::Set) {
            workload::final_listing(&clients, endpoint).await;
        }
        if options.workloads.contains(&Workload::Network) {
            workload::final_network_listing(&clients, endpoint).await;
        }
    }

    let history = recorder.snapshot();
    let ledger_paths = cluster.lock().await.ledger_paths();
    let verdicts = check(options, &history, &ledger_paths, &recovery)?;
    let info = RunInfo {
        name: options.name.clone(),
        seed: options.seed,
        command: options.command.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(started.elapsed().as_secs()),
        duration_s: started.elapsed().as_secs_f64(),
        nemeses: options.nemeses.iter().map(|k| k.name().to_string()).collect(),
        workloads: options.workloads.iter().map(|w| format!("{w:?}").to_lowercase()).collect(),
        notes: notes(options, &fault_counts),
        fault_counts,
    };
    Ok((verdicts, info, history))
}

/// Notes for the report: the canary and its expected anomaly, and every
/// selected nemesis that injected no fault, which the command also prints.
fn notes(options: &RunOptions, fault_counts: &BTreeMap<String, u64>) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some(canary) = options.canary {
        notes.push(format!("canary {canary:?}: expected anomaly {:?}", canary.expected_anomaly()));
    }
    for kind in &options.nemeses {
        if fault_counts.get(kind.name()).copied().unwrap_or(0) == 0 {
            let note = format!(
                "nemesis {} injected no fault: it found nothing to act on (order-replay needs a leader change first) or every attempt failed",
                kind.name()
            );
            println!("warning: {note}");
            notes.push(note);
        }
    }
    notes
}

fn check(
    options: &RunOptions,
    history: &[crate::history::Op],
    ledger_paths: &[PathBuf],
    recovery: &Result<Duration, String>,
) -> anyhow::Result<Vec<Verdict>> {
    let mut verdicts = Vec::new();
    if options.workloads.contains(&Workload::Register) {
        verdicts.push(checker::linearizable::check(history, options.check_budget));
    }
    if options.workloads.contains(&Workload::Set) {
        verdicts.push(checker::set::check(history));
        verdicts.push(checker::unique::check(history));
    }
    if options.workloads.contains(&Workload::Network) {
        verdicts.push(checker::networks::check(history));
    }
    let mut ledger = Vec::new();
    for path in ledger_paths {
        if path.exists() {
            ledger.extend(ccs::agent::ledger::read(path)?);
        }
    }
    verdicts.push(checker::ledger::check(&ledger));
    verdicts.push(recovery_verdict(recovery));
    Ok(verdicts)
}

/// Builds the verdict of phase 2: whether the healed zone served again within the bound.
fn recovery_verdict(recovery: &Result<Duration, String>) -> Verdict {
    match recovery {
        Ok(elapsed) => {
            let counts = checker::counts(&[("ms to recover", elapsed.as_millis() as u64)]);
            Verdict::from_anomalies("recovery", counts, Vec::new())
        }
        Err(message) => {
            let anomaly = checker::Anomaly::new("no recovery", message.clone(), Vec::new());
            Verdict::from_anomalies("recovery", Vec::new(), vec![anomaly])
        }
    }
}

fn to_report_verdict(verdict: &Verdict) -> ReportVerdict {
    ReportVerdict {
        checker: verdict.checker.clone(),
        validity: verdict.validity.as_str().to_string(),
        summary: verdict.summary.clone(),
        details: serde_json::to_value(verdict).unwrap_or(serde_json::Value::Null),
    }
}

/// Keeps the clients' controller list equal to the zone's current members,
/// which membership changes move onto spare slots.
async fn refresh_endpoints(cluster: Arc<Mutex<Cluster>>, clients: Arc<Clients>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if let Ok(cluster) = cluster.try_lock() {
            clients.set_endpoints(cluster.controller_endpoints());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Waits until every controller agrees on one leader and each serves a
/// linearizable read; returns how long that took.
async fn wait_for_recovery(endpoints: &[String], bound: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last_problem = String::from("not checked yet");
    while started.elapsed() < bound {
        match check_serving(endpoints).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(problem) => last_problem = problem,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("not recovered within {} s: {last_problem}", bound.as_secs()))
}

async fn check_serving(endpoints: &[String]) -> Result<(), String> {
    let mut leaders = BTreeMap::new();
    for endpoint in endpoints {
        let channel = ccs::client::channel(endpoint, Duration::from_secs(2)).map_err(|s| s.message().to_string())?;
        let mut client = ZoneClient::new(channel);
        let status = client
            .zone_status(ZoneStatusRequest {})
            .await
            .map_err(|s| format!("{endpoint}: zone status failed: {}", s.message()))?
            .into_inner();
        leaders.insert(endpoint.clone(), status.leader_id);
        let read = GetKeyRequest { key: "recovery-probe".into(), stale: false };
        client
            .get_key(read)
            .await
            .map_err(|s| format!("{endpoint}: linearizable read failed: {}", s.message()))?;
    }
    let distinct: std::collections::BTreeSet<u64> = leaders.values().copied().collect();
    if distinct.len() != 1 || distinct.contains(&0) {
        return Err(format!("controllers disagree on the leader: {leaders:?}"));
    }
    Ok(())
}
