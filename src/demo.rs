//! Replay of the Azure 2017 VM trace against a running zone, for
//! `ccs dev --demo N`.
//!
//! The first N rows of `requests.csv` become CreateInstance calls, sent at
//! their arrival times divided by a speedup factor. A VM whose lifetime ends
//! inside the replayed window is deleted at that point, compressed the same
//! way. At the end the replay compares the zone's instances with what the
//! calls acknowledged and returns a [`DemoSummary`]. It neither starts nor
//! stops the zone. The storage and network part that follows the replay is
//! in `demo_devices`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::Future;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Code;

use crate::client::{reason, ZoneConnector};
use crate::proto::zone::zone_client::ZoneClient;
use crate::proto::zone::{CreateInstanceRequest, InstanceRef, ReadRequest};

/// Speedup at which the first 2000 requests (3051 s of arrivals) replay in
/// about 76 s.
pub const DEFAULT_SPEEDUP: f64 = 40.0;

/// Prefix of every demo instance name, followed by the trace row number.
const NAME_PREFIX: &str = "az-";
/// Disk of every demo instance, in GiB, because the trace has no disk column.
const DISK_GIB: u64 = 30;
/// Lifetime in seconds given to rows whose `lifetime_s` is 0, which the
/// trace uses for "under 5 minutes".
const SHORT_LIFETIME_S: f64 = 150.0;
/// Maximum number of create and delete calls in flight.
const MAX_IN_FLIGHT: usize = 64;
/// How long one create or delete keeps retrying while the zone is
/// unavailable or the call times out.
const RETRY_WINDOW: Duration = Duration::from_secs(60);
/// How long the replay waits at the end for instances to reach their
/// desired state.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Period of ListInstances calls while waiting for instances.
const POLL_PERIOD: Duration = Duration::from_millis(500);
/// Maximum number of per-instance warnings that one replay logs. The
/// summary counts every problem, logged or not.
const MAX_LOGGED_PROBLEMS: usize = 10;

/// Outcome of a replay, counted over the replayed requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DemoSummary {
    /// Create requests sent.
    pub requests: usize,
    /// Creates the zone acknowledged.
    pub placed: usize,
    /// Creates rejected with NO_CAPACITY.
    pub rejected_for_capacity: usize,
    /// Placed instances observed "running" at the end.
    pub running: usize,
    /// Instances deleted when their lifetime ended.
    pub deleted: usize,
    /// Creates or deletes that ended in an error other than NO_CAPACITY,
    /// plus instances still not running (or not gone) after the final wait.
    pub failed: usize,
    /// Acknowledged creates missing from ListInstances at the end although
    /// the replay never deleted them.
    pub lost: usize,
    pub speedup: f64,
    /// Wall-clock time of the whole replay, final wait included.
    pub elapsed: Duration,
}

impl DemoSummary {
    /// Returns true when no request failed and no instance was lost.
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.lost == 0
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows = [
            ("requests", self.requests),
            ("placed", self.placed),
            ("rejected for capacity", self.rejected_for_capacity),
            ("running at the end", self.running),
            ("deleted", self.deleted),
            ("failed", self.failed),
            ("lost", self.lost),
        ];
        for (label, value) in rows {
            writeln!(f, "{label:<22}{value:>8}")?;
        }
        let elapsed = format!("{:.1}s", self.elapsed.as_secs_f64());
        writeln!(f, "{:<22}{:>8}", "speedup", self.speedup)?;
        write!(f, "{:<22}{:>8}", "elapsed", elapsed)
    }
}

/// One row of `requests.csv`. The replay ignores the `tenant_batch` column.
#[derive(Debug, Deserialize)]
struct TraceRow {
    arrival_s: f64,
    vcpus: u32,
    memory_gib: f64,
    lifetime_s: f64,
    ended: u8,
}

/// One VM of the replay, with times in trace seconds.
#[derive(Clone, Debug, PartialEq)]
struct TraceVm {
    /// 1-based data row of the trace file.
    row: usize,
    arrival_s: f64,
    vcpus: u32,
    memory_mib: u64,
    /// Trace time at which the replay deletes the VM, or `None` if the VM
    /// outlives the window.
    end_s: Option<f64>,
}

/// Reads the first `count` rows of the trace and decides which VMs end
/// inside the replayed window, which closes at the last row's arrival.
fn read_trace(path: &Path, count: usize) -> anyhow::Result<Vec<TraceVm>> {
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("cannot open the trace {}", path.display()))?;
    let mut rows: Vec<(TraceVm, f64)> = Vec::new();
    for (index, record) in reader.deserialize::<TraceRow>().take(count).enumerate() {
        let row = index + 1;
        let record =
            record.with_context(|| format!("{} row {row} is malformed", path.display()))?;
        let vm = validate_row(&record, row, rows.last().map(|(vm, _)| vm.arrival_s))
            .with_context(|| format!("{} row {row} is invalid", path.display()))?;
        rows.push((vm, lifetime_in_window(&record)));
    }
    let Some(window_end) = rows.last().map(|(vm, _)| vm.arrival_s) else {
        bail!("the trace {} has no requests", path.display());
    };
    Ok(rows
        .into_iter()
        .map(|(mut vm, lifetime)| {
            let end = vm.arrival_s + lifetime;
            vm.end_s = (end <= window_end).then_some(end);
            vm
        })
        .collect())
}

fn validate_row(
    record: &TraceRow,
    row: usize,
    previous_arrival: Option<f64>,
) -> anyhow::Result<TraceVm> {
    if !(record.arrival_s.is_finite() && record.arrival_s >= 0.0) {
        bail!(
            "arrival_s {} must be a non-negative number",
            record.arrival_s
        );
    }
    if previous_arrival.is_some_and(|previous| record.arrival_s < previous) {
        bail!(
            "arrival_s {} is earlier than the previous row's, but the trace must be sorted",
            record.arrival_s
        );
    }
    if record.vcpus == 0 {
        bail!("vcpus must be at least 1");
    }
    if !(record.memory_gib.is_finite() && record.memory_gib > 0.0) {
        bail!("memory_gib {} must be a positive number", record.memory_gib);
    }
    if !(record.lifetime_s.is_finite() && record.lifetime_s >= 0.0) {
        bail!(
            "lifetime_s {} must be a non-negative number",
            record.lifetime_s
        );
    }
    Ok(TraceVm {
        row,
        arrival_s: record.arrival_s,
        vcpus: record.vcpus,
        memory_mib: (record.memory_gib * 1024.0).round() as u64,
        end_s: None,
    })
}

/// Returns how long the VM lives, or infinity for a VM that was still
/// running when the trace ended (its `lifetime_s` is only a lower bound).
fn lifetime_in_window(record: &TraceRow) -> f64 {
    if record.ended == 0 {
        f64::INFINITY
    } else if record.lifetime_s == 0.0 {
        SHORT_LIFETIME_S
    } else {
        record.lifetime_s
    }
}

/// Replays the first `count` requests of the trace at `speedup` times real
/// time and returns what the zone made of them.
///
/// Instances left by an earlier replay (names starting with `az-`) are
/// deleted first, so that every name is free. Request ids carry a tag of
/// this run, so a retried create is deduplicated but never matches a
/// request of an earlier run.
pub async fn run_demo(
    connector: &ZoneConnector,
    trace: &Path,
    count: usize,
    speedup: f64,
) -> anyhow::Result<DemoSummary> {
    if count == 0 {
        bail!("--demo 0 is invalid: the demo needs N >= 1 requests");
    }
    if !(speedup.is_finite() && speedup > 0.0) {
        bail!("speedup {speedup} is invalid: it must be a positive number");
    }
    let vms = read_trace(trace, count)?;
    let started = Instant::now();
    let leftovers = delete_replay_instances(connector).await?;
    if leftovers > 0 {
        println!("deleted {leftovers} instances left by an earlier demo");
    }

    let span_s = vms.last().map_or(0.0, |vm| vm.arrival_s) - vms[0].arrival_s;
    println!(
        "replaying {} requests ({span_s:.0} s of arrivals) at speedup {speedup}: about {:.0} s",
        vms.len(),
        span_s / speedup
    );
    let results = replay(connector, vms, speedup).await;
    let mut summary = settle(connector, &results).await?;
    summary.speedup = speedup;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Deletes every replay instance (name prefix `az-`), waits until they are
/// gone and returns how many there were.
pub(crate) async fn delete_replay_instances(connector: &ZoneConnector) -> anyhow::Result<usize> {
    let leftovers = demo_instances(connector).await?;
    if leftovers.is_empty() {
        return Ok(0);
    }
    for name in leftovers.keys() {
        let reference = InstanceRef { name: name.clone() };
        let result = with_retry(connector, |mut client| {
            let reference = reference.clone();
            async move { client.delete_instance(reference).await }
        })
        .await;
        match result {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => bail!("cannot delete replay instance {name}: {}", status.message()),
        }
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !demo_instances(connector).await?.is_empty() {
        if Instant::now() >= deadline {
            bail!("replay instances are still present after {SETTLE_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL_PERIOD).await;
    }
    Ok(leftovers.len())
}

/// Returns the observed state of every demo instance in the zone, by name.
async fn demo_instances(connector: &ZoneConnector) -> anyhow::Result<HashMap<String, String>> {
    let list = with_retry(connector, |mut client| async move {
        client.list_instances(ReadRequest { stale: false }).await
    })
    .await
    .map_err(|status| anyhow::anyhow!("listing instances failed: {}", status.message()))?;
    Ok(list
        .instances
        .into_iter()
        .filter(|instance| instance.name.starts_with(NAME_PREFIX))
        .map(|instance| (instance.name, instance.observed_state))
        .collect())
}

/// Runs `call` through the connector, retrying with the same request while
/// the zone is unavailable or the call times out, for up to `RETRY_WINDOW`.
async fn with_retry<T, F, Fut>(connector: &ZoneConnector, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut(ZoneClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let start = Instant::now();
    loop {
        let remaining = RETRY_WINDOW.saturating_sub(start.elapsed());
        match connector.call_until(remaining, &mut call).await {
            Err(status)
                if status.code() == Code::DeadlineExceeded && start.elapsed() < RETRY_WINDOW =>
            {
                tracing::debug!(message = status.message(), "retrying a call that timed out");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Outcome of one VM's create and, if due, its delete.
#[derive(Debug)]
struct VmResult {
    name: String,
    create: CreateOutcome,
    delete: DeleteOutcome,
}

#[derive(Debug, PartialEq)]
enum CreateOutcome {
    Placed,
    RejectedForCapacity,
    Failed,
}

#[derive(Debug, PartialEq)]
enum DeleteOutcome {
    /// The VM outlives the window, or was never placed.
    NotDue,
    Deleted,
    Failed,
}

/// State shared by the tasks of one replay.
struct Replay {
    connector: ZoneConnector,
    /// The instant that trace time `first_arrival_s` maps to.
    start: Instant,
    first_arrival_s: f64,
    speedup: f64,
    /// Distinguishes this run's request ids from those of earlier runs.
    run_tag: String,
    in_flight: Semaphore,
    progress: Progress,
}

impl Replay {
    /// Returns the instant at which trace time `trace_s` is replayed.
    fn instant_of(&self, trace_s: f64) -> Instant {
        let offset = ((trace_s - self.first_arrival_s) / self.speedup).max(0.0);
        self.start + Duration::from_secs_f64(offset)
    }
}

/// Sends every create and delete at its time and returns the per-VM results.
async fn replay(connector: &ZoneConnector, vms: Vec<TraceVm>, speedup: f64) -> Vec<VmResult> {
    let run_tag = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
        .to_string();
    let replay = Arc::new(Replay {
        connector: connector.clone(),
        start: Instant::now(),
        first_arrival_s: vms[0].arrival_s,
        speedup,
        run_tag,
        in_flight: Semaphore::new(MAX_IN_FLIGHT),
        progress: Progress::new(vms.len()),
    });
    let mut tasks = JoinSet::new();
    for vm in vms {
        tasks.spawn(replay_vm(replay.clone(), vm));
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(error) => tracing::error!(%error, "replay task panicked"),
        }
    }
    replay.progress.bar.finish();
    results
}

async fn replay_vm(replay: Arc<Replay>, vm: TraceVm) -> VmResult {
    let name = format!("{NAME_PREFIX}{}", vm.row);
    tokio::time::sleep_until(replay.instant_of(vm.arrival_s)).await;
    let create = create_vm(&replay, &name, &vm).await;
    replay.progress.record_create(&create);

    let mut delete = DeleteOutcome::NotDue;
    if let (CreateOutcome::Placed, Some(end_s)) = (&create, vm.end_s) {
        tokio::time::sleep_until(replay.instant_of(end_s)).await;
        delete = delete_vm(&replay, &name).await;
        replay.progress.record_delete(&delete);
    }
    VmResult {
        name,
        create,
        delete,
    }
}

async fn create_vm(replay: &Replay, name: &str, vm: &TraceVm) -> CreateOutcome {
    let request = CreateInstanceRequest {
        name: name.to_string(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: DISK_GIB,
        pod: String::new(),
        request_id: format!("demo-{}-{}", replay.run_tag, vm.row),
        ..Default::default()
    };
    let _slot = replay
        .in_flight
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let result = with_retry(&replay.connector, |mut client| {
        let request = request.clone();
        async move { client.create_instance(request).await }
    })
    .await;
    match result {
        Ok(_) => CreateOutcome::Placed,
        Err(status) if status.code() == Code::ResourceExhausted => {
            CreateOutcome::RejectedForCapacity
        }
        Err(status) => {
            log_failure(replay, name, &status, "create");
            CreateOutcome::Failed
        }
    }
}

async fn delete_vm(replay: &Replay, name: &str) -> DeleteOutcome {
    let reference = InstanceRef {
        name: name.to_string(),
    };
    let _slot = replay
        .in_flight
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let mut attempts = 0;
    let result = with_retry(&replay.connector, |mut client| {
        attempts += 1;
        let reference = reference.clone();
        async move { client.delete_instance(reference).await }
    })
    .await;
    match result {
        Ok(_) => DeleteOutcome::Deleted,
        // A retry that finds nothing means an earlier attempt deleted it.
        Err(status) if status.code() == Code::NotFound && attempts > 1 => DeleteOutcome::Deleted,
        Err(status) => {
            log_failure(replay, name, &status, "delete");
            DeleteOutcome::Failed
        }
    }
}

/// Logs a failed demo request, up to `MAX_LOGGED_PROBLEMS` of them.
fn log_failure(replay: &Replay, name: &str, status: &tonic::Status, operation: &'static str) {
    if replay.progress.failures() < MAX_LOGGED_PROBLEMS {
        tracing::warn!(
            instance = name,
            operation,
            code = ?status.code(),
            reason = reason(status),
            message = status.message(),
            "demo request failed"
        );
    }
}

/// The progress bar over create requests and the counts in its message.
struct Progress {
    bar: ProgressBar,
    placed: AtomicUsize,
    rejected: AtomicUsize,
    deleted: AtomicUsize,
    failed: AtomicUsize,
}

impl Progress {
    fn new(requests: usize) -> Progress {
        let bar = ProgressBar::new(requests as u64);
        let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("the progress template is valid")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        let progress = Progress {
            bar,
            placed: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            deleted: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        };
        progress.refresh();
        progress
    }

    fn record_create(&self, outcome: &CreateOutcome) {
        let counter = match outcome {
            CreateOutcome::Placed => &self.placed,
            CreateOutcome::RejectedForCapacity => &self.rejected,
            CreateOutcome::Failed => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.bar.inc(1);
        self.refresh();
    }

    fn record_delete(&self, outcome: &DeleteOutcome) {
        match outcome {
            DeleteOutcome::Deleted => self.deleted.fetch_add(1, Ordering::Relaxed),
            DeleteOutcome::Failed => self.failed.fetch_add(1, Ordering::Relaxed),
            DeleteOutcome::NotDue => return,
        };
        self.refresh();
    }

    fn failures(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    fn refresh(&self) {
        self.bar.set_message(format!(
            "placed {} rejected {} deleted {} failed {}",
            self.placed.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            self.deleted.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        ));
    }
}

/// The state each acknowledged instance should reach by the end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expected {
    Running,
    Gone,
}

/// Waits up to `SETTLE_TIMEOUT` until every placed instance is running and
/// every deleted one is gone, then counts the outcome.
async fn settle(connector: &ZoneConnector, results: &[VmResult]) -> anyhow::Result<DemoSummary> {
    let expected: HashMap<&str, Expected> = results
        .iter()
        .filter(|result| result.create == CreateOutcome::Placed)
        .map(|result| {
            let state = match result.delete {
                DeleteOutcome::Deleted => Expected::Gone,
                DeleteOutcome::NotDue | DeleteOutcome::Failed => Expected::Running,
            };
            (result.name.as_str(), state)
        })
        .collect();
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("waiting for instances to reach their state");
    spinner.enable_steady_tick(Duration::from_millis(200));
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let observed = loop {
        let observed = demo_instances(connector).await?;
        let pending = unsettled(&expected, &observed);
        if pending == 0 || Instant::now() >= deadline {
            break observed;
        }
        spinner.set_message(format!(
            "waiting for {pending} instances to reach their state"
        ));
        tokio::time::sleep(POLL_PERIOD).await;
    };
    spinner.finish_and_clear();
    Ok(count_outcome(results, &expected, &observed))
}

/// Counts the instances not yet in their expected state.
fn unsettled(expected: &HashMap<&str, Expected>, observed: &HashMap<String, String>) -> usize {
    expected
        .iter()
        .filter(|(name, state)| match (state, observed.get(**name)) {
            (Expected::Running, Some(observed)) => observed != "running",
            (Expected::Running, None) => true,
            (Expected::Gone, present) => present.is_some(),
        })
        .count()
}

fn count_outcome(
    results: &[VmResult],
    expected: &HashMap<&str, Expected>,
    observed: &HashMap<String, String>,
) -> DemoSummary {
    let count = |wanted: fn(&VmResult) -> bool| results.iter().filter(|r| wanted(r)).count();
    let mut summary = DemoSummary {
        requests: results.len(),
        placed: count(|r| r.create == CreateOutcome::Placed),
        rejected_for_capacity: count(|r| r.create == CreateOutcome::RejectedForCapacity),
        deleted: count(|r| r.delete == DeleteOutcome::Deleted),
        failed: count(|r| r.create == CreateOutcome::Failed || r.delete == DeleteOutcome::Failed),
        ..DemoSummary::default()
    };
    let mut problems = 0;
    for (name, state) in expected {
        let observed = observed.get(*name).map(String::as_str);
        let problem = match (state, observed) {
            (Expected::Running, Some("running")) => {
                summary.running += 1;
                None
            }
            (Expected::Running, None) => {
                summary.lost += 1;
                Some("acknowledged instance is missing")
            }
            (Expected::Running, Some(_)) => {
                summary.failed += 1;
                Some("instance did not reach running")
            }
            (Expected::Gone, None) => None,
            (Expected::Gone, Some(_)) => {
                summary.failed += 1;
                Some("deleted instance is still present")
            }
        };
        if let Some(problem) = problem {
            if problems < MAX_LOGGED_PROBLEMS {
                tracing::warn!(
                    instance = name,
                    observed,
                    problem,
                    "demo instance in the wrong state"
                );
            }
            problems += 1;
        }
    }
    if problems > MAX_LOGGED_PROBLEMS {
        tracing::warn!(
            omitted = problems - MAX_LOGGED_PROBLEMS,
            "more demo instances in the wrong state"
        );
    }
    summary
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn trace_file(rows: &[&str]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("creating a temp file");
        writeln!(
            file,
            "arrival_s,tenant_batch,vcpus,memory_gib,lifetime_s,ended"
        )
        .expect("write");
        for row in rows {
            writeln!(file, "{row}").expect("write");
        }
        file
    }

    #[test]
    fn read_trace_decides_deletes() {
        let file = trace_file(&[
            "0,1,1,1.75,300,1",   // ends at 300, inside the window
            "0,2,2,3.5,0,1",      // short-lived: ends at 150
            "10,3,4,7.0,5000,1",  // ends after the window
            "20,4,1,0.75,100,0",  // still running when the trace ended
            "400,5,8,14.0,300,1", // the last row closes the window at 400
        ]);
        let vms = read_trace(file.path(), 10).expect("valid trace");
        let ends: Vec<Option<f64>> = vms.iter().map(|vm| vm.end_s).collect();
        assert_eq!(ends, vec![Some(300.0), Some(150.0), None, None, None]);
        assert_eq!(vms[0].memory_mib, 1792);
        assert_eq!(vms[3].memory_mib, 768);
        assert_eq!(vms[4].row, 5);
    }

    #[test]
    fn read_trace_takes_count_rows() {
        let file = trace_file(&["0,1,1,1.75,300,1", "5,1,1,1.75,300,1", "9,1,1,1.75,300,1"]);
        let vms = read_trace(file.path(), 2).expect("valid trace");
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[1].arrival_s, 5.0);
    }

    #[test]
    fn read_trace_rejects_unsorted_rows() {
        let file = trace_file(&["5,1,1,1.75,300,1", "4,1,1,1.75,300,1"]);
        let error = read_trace(file.path(), 10).expect_err("unsorted trace");
        assert!(format!("{error:#}").contains("row 2"), "{error:#}");
    }

    #[test]
    fn read_trace_rejects_zero_vcpus() {
        let file = trace_file(&["0,1,0,1.75,300,1"]);
        assert!(read_trace(file.path(), 10).is_err());
    }

    #[test]
    fn count_outcome_sorts_instances() {
        let result = |name: &str, create, delete| VmResult {
            name: name.to_string(),
            create,
            delete,
        };
        let results = vec![
            result("az-1", CreateOutcome::Placed, DeleteOutcome::NotDue),
            result("az-2", CreateOutcome::Placed, DeleteOutcome::Deleted),
            result(
                "az-3",
                CreateOutcome::RejectedForCapacity,
                DeleteOutcome::NotDue,
            ),
            result("az-4", CreateOutcome::Placed, DeleteOutcome::NotDue),
            result("az-5", CreateOutcome::Placed, DeleteOutcome::NotDue),
            result("az-6", CreateOutcome::Failed, DeleteOutcome::NotDue),
        ];

        let expected: HashMap<&str, Expected> = [
            ("az-1", Expected::Running),
            ("az-2", Expected::Gone),
            ("az-4", Expected::Running),
            ("az-5", Expected::Running),
        ]
        .into_iter()
        .collect();

        let observed: HashMap<String, String> = [("az-1", "running"), ("az-5", "pending")]
            .into_iter()
            .map(|(name, state)| (name.to_string(), state.to_string()))
            .collect();

        let summary = count_outcome(&results, &expected, &observed);
        assert_eq!(summary.requests, 6);
        assert_eq!(summary.placed, 4);
        assert_eq!(summary.rejected_for_capacity, 1);
        assert_eq!(summary.deleted, 1);
        assert_eq!(summary.running, 1);
        assert_eq!(summary.lost, 1, "az-4 is missing");
        assert_eq!(summary.failed, 2, "az-6 failed to create, az-5 never ran");
        assert!(!summary.ok());
        assert_eq!(unsettled(&expected, &observed), 2);
    }

    #[test]
    fn summary_table_aligns_values() {
        let summary = DemoSummary {
            requests: 2000,
            placed: 1500,
            speedup: 40.0,
            ..Default::default()
        };
        let text = summary.to_string();
        let widths: Vec<usize> = text.lines().map(str::len).collect();
        assert!(widths.iter().all(|width| *width == widths[0]), "{text}");
        assert!(text.contains("requests                  2000"), "{text}");
        assert!(summary.ok());
    }
}
