//! `ccs bench`: load generators whose numbers go into docs/BENCHMARKS.md.
//!
//! - `creates`: committed instance creates per second and their latency,
//!   with N concurrent clients, against any zone.
//! - `failover`: kill -9 of the leader of a `ccs dev` cloud, timed to the
//!   first committed write afterwards. The killed replica is started again
//!   from its config before the next kill.
//!
//! Both clean up the instances they create.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use tokio::sync::Mutex;

use crate::client::ZoneConnector;
use crate::proto::zone::{CreateInstanceRequest, InstanceRef, ReadRequest, ZoneStatusRequest};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Measure committed creates per second and latency percentiles.
    Creates {
        /// Concurrent clients, each with one request in flight.
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// Creates per run.
        #[arg(long, default_value_t = 400)]
        count: usize,
        /// Runs; instances are deleted between runs.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Kill the leader of a `ccs dev` cloud and time the first committed write.
    Failover {
        /// The `ccs dev` data directory, which contains cloud.json.
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 5)]
        kills: usize,
    },
}

pub async fn run(connector: &ZoneConnector, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Creates { clients, count, runs } => {
            for run in 1..=runs {
                let result = creates(connector, clients, count, run).await?;
                println!("{result}");
                delete_prefix(connector, &format!("bench-{run}-")).await?;
            }
        }
        BenchCommand::Failover { data_dir, kills } => failover(connector, &data_dir, kills).await?,
    }
    Ok(())
}

struct CreatesResult {
    clients: usize,
    count: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * fraction).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl std::fmt::Display for CreatesResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        write!(
            f,
            "clients {:>3}  creates {:>5}  elapsed {:>7.2}s  rate {:>7.1}/s  p50 {:>7.2}ms  p99 {:>7.2}ms",
            self.clients,
            self.count,
            self.elapsed.as_secs_f64(),
            self.count as f64 / self.elapsed.as_secs_f64(),
            percentile(&sorted, 0.50).as_secs_f64() * 1000.0,
            percentile(&sorted, 0.99).as_secs_f64() * 1000.0,
        )
    }
}

/// Builds a create request for the smallest instance the API accepts, so that capacity lasts.
fn tiny(name: String) -> CreateInstanceRequest {
    CreateInstanceRequest {
        request_id: name.clone(),
        name,
        vcpus: 1,
        memory_mib: 64,
        disk_gib: 0,
        pod: String::new(),
        ..Default::default()
    }
}

async fn creates(connector: &ZoneConnector, clients: usize, count: usize, run: usize) -> anyhow::Result<CreatesResult> {
    let next = Arc::new(Mutex::new(0usize));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (connector, next, latencies) = (connector.clone(), next.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let index = {
                    let mut next = next.lock().await;
                    if *next >= count {
                        return Ok::<(), tonic::Status>(());
                    }
                    *next += 1;
                    *next
                };
                let request = tiny(format!("bench-{run}-{index}"));
                let sent = Instant::now();
                connector
                    .call_until(Duration::from_secs(30), |mut c| {
                        let r = request.clone();
                        async move { c.create_instance(r).await }
                    })
                    .await?;
                latencies.lock().await.push(sent.elapsed());
            }
        }));
    }
    for task in tasks {
        task.await?.context("a create failed")?;
    }
    let elapsed = started.elapsed();
    let latencies = latencies.lock().await.clone();
    Ok(CreatesResult { clients, count, elapsed, latencies })
}

async fn delete_prefix(connector: &ZoneConnector, prefix: &str) -> anyhow::Result<()> {
    let list = connector
        .call_until(Duration::from_secs(30), |mut c| async move { c.list_instances(ReadRequest { stale: false }).await })
        .await?;
    for instance in list.instances.iter().filter(|i| i.name.starts_with(prefix)) {
        let request = InstanceRef { name: instance.id.clone() };
        connector
            .call_until(Duration::from_secs(30), |mut c| {
                let r = request.clone();
                async move { c.delete_instance(r).await }
            })
            .await?;
    }
    // Wait until the reconciler has destroyed them and freed their capacity.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = connector
            .call_until(Duration::from_secs(30), |mut c| async move { c.list_instances(ReadRequest { stale: false }).await })
            .await?;
        if !list.instances.iter().any(|i| i.name.starts_with(prefix)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("instances named {prefix}* were not destroyed within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(serde::Deserialize)]
struct CloudFile {
    processes: Vec<CloudProcess>,
}

#[derive(serde::Deserialize, Clone)]
struct CloudProcess {
    role: String,
    id: String,
    pid: u32,
    grpc: String,
    config: PathBuf,
    log: PathBuf,
}

fn read_cloud(data_dir: &Path) -> anyhow::Result<Vec<CloudProcess>> {
    let path = data_dir.join("cloud.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let cloud: CloudFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(cloud.processes.into_iter().filter(|p| p.role == "controller").collect())
}

async fn failover(connector: &ZoneConnector, data_dir: &Path, kills: usize) -> anyhow::Result<()> {
    let mut controllers = read_cloud(data_dir)?;
    let mut times = Vec::new();
    for kill in 1..=kills {
        let status = connector
            .call_until(Duration::from_secs(30), |mut c| async move { c.zone_status(ZoneStatusRequest {}).await })
            .await?;
        let leader = status.leader_id.to_string();
        let Some(position) = controllers.iter().position(|p| p.id == leader) else {
            bail!("leader {leader} is not in cloud.json");
        };
        let victim = controllers[position].clone();
        // Kill -9 through the kill(1) command: this crate forbids unsafe code.
        let killed = Instant::now();
        let outcome = std::process::Command::new("kill").args(["-9", &victim.pid.to_string()]).status()?;
        if !outcome.success() {
            bail!("kill -9 {} failed", victim.pid);
        }
        let request = tiny(format!("failover-{kill}"));
        connector
            .call_until(Duration::from_secs(60), |mut c| {
                let r = request.clone();
                async move { c.create_instance(r).await }
            })
            .await?;
        let elapsed = killed.elapsed();
        println!("kill {kill}: leader {leader} killed; first committed write after {:.0} ms", elapsed.as_secs_f64() * 1000.0);
        times.push(elapsed);

        // Start the killed replica again so the zone keeps its quorum.
        // NOTE: the new process is not a child of `ccs dev`, so stopping
        // the dev cloud leaves it running; stop it by its config path.
        let log = std::fs::OpenOptions::new().append(true).create(true).open(&victim.log)?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["controller", "--config"])
            .arg(&victim.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        controllers[position].pid = child.id();
        wait_caught_up(connector, &victim.grpc).await?;
    }
    times.sort();
    println!(
        "failover over {kills} kills: p50 {:.0} ms, max {:.0} ms",
        percentile(&times, 0.5).as_secs_f64() * 1000.0,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );
    delete_prefix(connector, "failover-").await
}

/// Waits until the replica at `addr` has matched the leader's log to within 10 entries.
async fn wait_caught_up(connector: &ZoneConnector, addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(status) = connector.call(|mut c| async move { c.zone_status(ZoneStatusRequest {}).await }).await {
            let replica = status.replicas.iter().find(|r| r.addr == addr);
            if replica.is_some_and(|r| r.matched_index.is_some() && r.lag < 10) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("replica at {addr} did not catch up within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
