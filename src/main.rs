//! The `ccs` binary: controller, agent, local dev cloud and client commands.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use ccs::cli;
use ccs::client::{ZoneConnector, DEV_ENDPOINTS};

#[derive(Parser, Debug)]
#[command(name = "ccs", version, about = "Cloud control system: replicated zones that drive libvirt hosts")]
struct Cli {
    /// Controllers to call, as host:port separated by commas, tried in turn.
    /// Default: the local `ccs dev` cloud.
    #[arg(long, env = "CCS_ENDPOINT", global = true, default_value = DEV_ENDPOINTS)]
    endpoint: String,
    /// Per-call timeout, e.g. "10s".
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one controller replica of a zone.
    Controller {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the agent of one hypervisor host.
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a local cloud: 3 controllers and 4 agents on loopback, on
    /// libvirt's test driver, until interrupted.
    Dev {
        /// Directory for every process's data, configs and logs.
        #[arg(long = "data-dir", default_value = "ccs-dev")]
        data_dir: PathBuf,
        /// Replay the first N requests of the Azure VM trace and print a
        /// summary, then walk through networks, volumes and a migration,
        /// then stop.
        #[arg(long)]
        demo: Option<usize>,
        /// First port; controllers use base+1.., agents base+101...
        #[arg(long = "base-port", default_value_t = 7100)]
        base_port: u16,
        /// The Azure trace file (requests.csv).
        #[arg(long, env = "CCS_TRACE", default_value = "../shared/data/azure-2017-vms/requests.csv")]
        trace: PathBuf,
        /// Time compression of the trace replay.
        #[arg(long, default_value_t = ccs::demo::DEFAULT_SPEEDUP)]
        speedup: f64,
    },
    /// Create, list, show, delete and migrate instances; attach and detach NICs.
    #[command(subcommand)]
    Instance(cli::InstanceCommand),
    /// Inspect, drain and undrain hosts.
    #[command(subcommand)]
    Host(cli::HostCommand),
    /// Create, list, show, attach, detach and delete volumes.
    #[command(subcommand)]
    Volume(cli::VolumeCommand),
    /// Create, list and show pods.
    #[command(subcommand)]
    Pod(cli::PodCommand),
    /// Create, list, show and delete tenant networks.
    #[command(subcommand)]
    Network(cli::NetworkCommand),
    /// Read and write zone keys: small metadata values, linearizable.
    #[command(subcommand)]
    Key(cli::KeyCommand),
    /// Zone status, membership and drift between the zone and its hosts.
    #[command(subcommand)]
    Zone(cli::ZoneCommand),
    /// Load generators for docs/BENCHMARKS.md.
    #[command(subcommand)]
    Bench(ccs::bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let connect = || ZoneConnector::new(&cli.endpoint, cli.timeout).map_err(anyhow::Error::msg);
    match cli.command {
        Command::Controller { config } => ccs::controller::run(&config).await?,
        Command::Agent { config } => ccs::agent::run(&config).await?,
        Command::Dev { data_dir, demo, base_port, trace, speedup } => {
            ccs::telemetry::init_tracing(false);
            let options = ccs::dev::DevOptions { data_dir, demo, base_port, trace, speedup };
            return ccs::dev::run(options).await.map(|()| ExitCode::SUCCESS);
        }
        Command::Instance(command) => cli::instance(&connect()?, command).await?,
        Command::Host(command) => cli::host(&connect()?, command).await?,
        Command::Volume(command) => cli::volume(&connect()?, command).await?,
        Command::Pod(command) => cli::pod(&connect()?, command).await?,
        Command::Network(command) => cli::network(&connect()?, command).await?,
        Command::Zone(command) => cli::zone(&connect()?, command).await?,
        Command::Key(command) => cli::key(&connect()?, command).await?,
        Command::Bench(command) => ccs::bench::run(&connect()?, command).await?,
    }
    Ok(ExitCode::SUCCESS)
}
