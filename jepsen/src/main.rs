//! `ccs-jepsen`: runs a ccs zone under faults and checks what its clients saw.
//!
//! Needs root: nodes run in network namespaces with iptables rules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use ccs_jepsen::nemesis::{self, NemesisKind};
use ccs_jepsen::run::{self, Canary, RunOptions, Workload};

#[derive(Parser, Debug)]
#[command(
    name = "ccs-jepsen",
    version,
    about = "Verify a ccs zone under faults: real nodes, nemeses, recorded histories, checkers",
    after_help = "Needs root (network namespaces, iptables, FUSE); one run per machine at a time. \
                  Exit codes: 0 every verdict as required, 1 a verdict was not, 2 the run could not be done."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// The ccs binary to run as controllers and agents. Default: `ccs` next
    /// to this binary.
    #[arg(long = "ccs")]
    ccs_binary: Option<PathBuf>,
    /// Directory that receives one report directory per run.
    #[arg(long, default_value = "store")]
    store: PathBuf,
    /// Seed of every random choice of clients and nemeses.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Time allowed after healing for one leader and linearizable reads on every node.
    #[arg(long = "recovery-bound", default_value = "60s", value_parser = humantime::parse_duration)]
    recovery_bound: Duration,
    /// Time the linearizability search may take before it returns "unknown".
    #[arg(long = "check-budget", default_value = "120s", value_parser = humantime::parse_duration)]
    check_budget: Duration,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one test: faults under load, then healing and recovery, then checks.
    Test {
        #[command(flatten)]
        common: Common,
        /// Length of the fault phase, e.g. "10m".
        #[arg(long = "time-limit", default_value = "60s", value_parser = humantime::parse_duration)]
        time_limit: Duration,
        /// Faults to inject, separated by commas: partition-one,
        /// partition-leader, partition-halves, partition-ring,
        /// partition-bridge, partition-one-way, kill, pause, clock-jump,
        /// clock-rate, membership, power-loss, order-replay; or the groups
        /// partition, clock, all, none.
        #[arg(long, default_value = "all")]
        nemesis: String,
        /// Workloads, separated by commas: register, set, network.
        #[arg(long, value_delimiter = ',', default_value = "register,set,network")]
        workload: Vec<Workload>,
        /// Client tasks, shared round-robin among the workloads; at least
        /// one per workload.
        #[arg(long, default_value_t = 10)]
        concurrency: usize,
        /// Break one safety property on purpose. The command then exits 0
        /// only if a checker reports the canary's anomaly, 1 otherwise.
        /// local-reads needs partition-leader and the register workload,
        /// skip-fsync needs power-loss and register, skip-fencing needs
        /// partition-leader and set.
        #[arg(long)]
        canary: Option<Canary>,
        /// Time between the end of one fault and the start of the next.
        #[arg(long = "fault-interval", default_value = "3s", value_parser = humantime::parse_duration)]
        fault_interval: Duration,
        /// How long each fault lasts.
        #[arg(long = "fault-duration", default_value = "5s", value_parser = humantime::parse_duration)]
        fault_duration: Duration,
    },
    /// The short suite for CI: a run with several nemeses that must pass,
    /// and a canary run that must fail with a stale read.
    Suite {
        #[command(flatten)]
        common: Common,
    },
    /// Serve a FUSE filesystem over `--backing` at `--mount` that drops
    /// unsynced writes on SIGUSR1, as a power loss would.
    Lossyfs {
        #[arg(long)]
        backing: PathBuf,
        #[arg(long)]
        mount: PathBuf,
    },
    /// Remove namespaces, rules, mounts and processes left by a crashed run.
    Cleanup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ccs::telemetry::init_tracing(false);
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    if let Command::Lossyfs { backing, mount } = &cli.command {
        return exit_code(ccs_jepsen::lossyfs::run(backing, mount).map(|()| true));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run_command(cli.command, command_line) => outcome,
            () = interrupted() => Err(anyhow::anyhow!("interrupted; removed the run's nodes, namespaces and mounts")),
        }
    });
    // Dropping the runtime drops the client and nemesis tasks and with them
    // the last reference to the cluster, whose Drop removes its processes,
    // namespaces, rules and mounts.
    drop(runtime);
    exit_code(outcome)
}

/// Completes on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => eprintln!("SIGINT received: tearing down the run"),
        _ = terminate.recv() => eprintln!("SIGTERM received: tearing down the run"),
    }
}

fn exit_code(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a command; returns whether every verdict was as required.
async fn run_command(command: Command, command_line: String) -> anyhow::Result<bool> {
    match command {
        Command::Test {
            common,
            time_limit,
            nemesis,
            workload,
            concurrency,
            canary,
            fault_interval,
            fault_duration,
        } => {
            let mut options = base_options(&common, "test", command_line)?;
            options.time_limit = time_limit;
            options.nemeses = nemesis::parse_kinds(&nemesis)?;
            for (flag, value) in [
                ("--time-limit", time_limit),
                ("--fault-interval", fault_interval),
                ("--fault-duration", fault_duration),
            ] {
                if value.is_zero() {
                    anyhow::bail!("{flag} 0s is invalid: give a duration above zero, e.g. 5s");
                }
            }
            if concurrency < workload.len().max(1) {
                anyhow::bail!(
                    "--concurrency {concurrency} is too low for {} workloads: use at least one client per workload",
                    workload.len()
                );
            }
            options.workloads = workload;
            options.concurrency = concurrency;
            options.canary = canary;
            options.fault_interval = fault_interval;
            options.fault_duration = fault_duration;
            let outcome = run::run(options).await?;
            if let Some(canary) = canary {
                return Ok(canary_caught(canary, &outcome));
            }
            Ok(outcome.valid())
        }
        Command::Suite { common } => suite(&common, command_line).await,
        Command::Cleanup => {
            ccs_jepsen::cluster::cleanup_leftovers().await?;
            Ok(true)
        }
        Command::Lossyfs { .. } => unreachable!("served before the runtime starts"),
    }
}

fn base_options(common: &Common, name: &str, command: String) -> anyhow::Result<RunOptions> {
    let ccs_binary = match &common.ccs_binary {
        Some(path) => path.clone(),
        None => sibling_binary("ccs")?,
    };
    Ok(RunOptions {
        name: name.to_string(),
        ccs_binary,
        lossyfs_binary: std::env::current_exe().ok(),
        store: common.store.clone(),
        time_limit: Duration::from_secs(60),
        nemeses: Vec::new(),
        workloads: vec![Workload::Register, Workload::Set, Workload::Network],
        seed: common.seed,
        concurrency: 10,
        canary: None,
        recovery_bound: common.recovery_bound,
        check_budget: common.check_budget,
        fault_interval: Duration::from_secs(3),
        fault_duration: Duration::from_secs(5),
        command,
    })
}

/// Finds a binary built next to this one, as cargo places workspace binaries.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating ccs-jepsen")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        anyhow::bail!("{} not found; build it with `cargo build --bins` or pass --ccs PATH", path.display());
    }
    Ok(path)
}

/// Returns whether a canary run failed with the anomaly the canary causes.
fn canary_caught(canary: Canary, outcome: &run::RunOutcome) -> bool {
    let expected = canary.expected_anomaly();
    let caught = outcome
        .verdicts
        .iter()
        .any(|v| v.validity == ccs_jepsen::checker::Validity::Invalid && v.summary.contains(expected));
    if caught {
        println!("canary {canary:?}: caught as expected ({expected})");
    } else {
        println!("canary {canary:?}: NOT caught; expected an invalid verdict naming {expected:?}");
    }
    caught
}

/// The CI suite: several nemeses against the real product must pass, and a
/// canary run must fail naming its anomaly.
async fn suite(common: &Common, command_line: String) -> anyhow::Result<bool> {
    let mut faults = base_options(common, "suite-faults", command_line.clone())?;
    faults.time_limit = Duration::from_secs(90);
    faults.nemeses = vec![
        NemesisKind::PartitionLeader,
        NemesisKind::PartitionHalves,
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::Membership,
    ];
    let faults_passed = run::run(faults).await?.valid();

    let mut canary = base_options(common, "suite-canary-local-reads", command_line)?;
    canary.time_limit = Duration::from_secs(40);
    canary.nemeses = vec![NemesisKind::PartitionLeader];
    canary.workloads = vec![Workload::Register];
    canary.canary = Some(Canary::LocalReads);
    let outcome = run::run(canary).await?;
    let canary_failed = canary_caught(Canary::LocalReads, &outcome);

    println!(
        "suite: fault run {}, canary run {}",
        if faults_passed { "valid" } else { "INVALID" },
        if canary_failed { "failed as required" } else { "DID NOT FAIL" }
    );
    let passed = u8::from(faults_passed) + u8::from(canary_failed);
    println!("suite: {passed} passed, {} failed", 2 - passed);
    Ok(faults_passed && canary_failed)
}
