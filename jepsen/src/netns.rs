//! The Linux plumbing of a verification run: one network namespace per
//! node on a bridge in the root namespace, packet filters inside those
//! namespaces, signals to processes, and the removal of whatever a run that
//! crashed left behind.
//!
//! Everything created here is named with the prefix `ccsj-` and the run id:
//! namespaces `ccsj-<run>-<node>`, the host ends of their veth pairs with
//! the same names, the bridge `ccsj-<run>-br`, and, when bridged traffic
//! passes through iptables (`br_netfilter`), one root FORWARD rule with the
//! comment `ccsj-<run>`. A run registers itself in
//! `/run/ccs-jepsen/<run>/owner`, and every process it starts carries the
//! environment variable `CCS_JEPSEN_RUN=<run>`, so that the next run finds
//! and removes them. Packet filters live inside the node namespaces and
//! vanish with them.
//!
//! The module runs `ip`, `iptables`, `iptables-restore`, `kill` and `umount`
//! (Debian packages iproute2, iptables, procps and mount), and needs root.
//! It touches no namespace, link, rule, mount or process that lacks the
//! prefix or the marker.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::AsyncWriteExt;

/// Prefix of every namespace, link and rule comment a run creates.
pub const PREFIX: &str = "ccsj-";
/// Environment variable that marks the processes of a run with its id.
pub const RUN_MARKER: &str = "CCS_JEPSEN_RUN";
/// Directory where each live run keeps its owner file.
pub const REGISTRY_DIR: &str = "/run/ccs-jepsen";
/// The subnet of the bridge; one run owns it at a time.
pub const SUBNET: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 0);
pub const SUBNET_PREFIX_LEN: u8 = 24;
/// The root namespace's address on the bridge, through which the harness
/// reaches every node.
pub const BRIDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// How long a killed process may take to disappear before clean-up fails.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns a new run id: 4 lower-case hex digits, short enough that
/// `ccsj-<run>-<node>` fits the 15 characters of a Linux interface name.
pub fn new_run_id() -> String {
    format!("{:04x}", rand::random::<u16>())
}

fn failure(program: &str, args: &[&str], output: &std::process::Output) -> anyhow::Error {
    anyhow!(
        "`{program} {}` failed with {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// Runs a command to completion and returns its stdout. A non-zero exit is
/// an error that names the command and its stderr.
pub async fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("failed to start `{program}`; is it installed?"))?;
    if !output.status.success() {
        return Err(failure(program, args, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `run` without the async runtime, for start-up, clean-up and `Drop`.
pub fn run_blocking(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{program}`; is it installed?"))?;
    if !output.status.success() {
        return Err(failure(program, args, &output));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Sends `signal` (a name such as "STOP", "CONT", "KILL" or "USR1") to `pid`.
pub async fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    run("kill", &["-s", signal, &pid.to_string()])
        .await
        .map(|_| ())
}

pub fn send_signal_blocking(pid: u32, signal: &str) -> anyhow::Result<()> {
    run_blocking("kill", &["-s", signal, &pid.to_string()]).map(|_| ())
}

/// Checks that the programs this module runs are installed.
pub fn check_tools() -> anyhow::Result<()> {
    let tools = [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("iptables-restore", "iptables"),
        ("kill", "procps"),
        ("umount", "mount"),
    ];
    let missing: Vec<String> = tools
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(tool, package)| format!("{tool} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {}; install them with apt-get",
            missing.join(", ")
        );
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            line.split_whitespace().nth(2).map(str::to_string)
        });
    if uid.as_deref() != Some("0") {
        bail!("ccs-jepsen needs root to create network namespaces; run it as root");
    }
    Ok(())
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The bridge and the node namespaces of one run.
pub struct Network {
    run_id: String,
    bridge: String,
    /// Arguments of the root FORWARD rule after `-I`/`-D`, when one was added.
    forward_rule: Option<Vec<String>>,
    namespaces: Vec<String>,
}

impl Network {
    /// Creates the bridge with `BRIDGE_ADDR`. When `br_netfilter` sends
    /// bridged frames through iptables, it also inserts a root FORWARD rule
    /// that accepts traffic between the run's nodes, so that a host firewall
    /// with a DROP policy cannot cut the zone.
    pub fn create(run_id: &str) -> anyhow::Result<Network> {
        let mut network = Network {
            run_id: run_id.to_string(),
            bridge: format!("{PREFIX}{run_id}-br"),
            forward_rule: None,
            namespaces: Vec::new(),
        };
        if let Err(error) = network.create_bridge() {
            network.destroy();
            return Err(error);
        }
        Ok(network)
    }

    fn create_bridge(&mut self) -> anyhow::Result<()> {
        let bridge = self.bridge.clone();
        let address = format!("{BRIDGE_ADDR}/{SUBNET_PREFIX_LEN}");
        run_blocking("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run_blocking("ip", &["addr", "add", &address, "dev", &bridge])?;
        run_blocking("ip", &["link", "set", &bridge, "up"])?;
        if bridged_frames_pass_iptables() {
            let comment = format!("{PREFIX}{}", self.run_id);
            let rule: Vec<String> = [
                "FORWARD",
                "-i",
                &bridge,
                "-o",
                &bridge,
                "-m",
                "comment",
                "--comment",
                &comment,
                "-j",
                "ACCEPT",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut args = vec!["-I"];
            args.extend(rule.iter().map(String::as_str));
            run_blocking("iptables", &args)?;
            self.forward_rule = Some(rule);
        }
        Ok(())
    }

    pub fn namespace_name(&self, node: &str) -> String {
        format!("{PREFIX}{}-{node}", self.run_id)
    }

    /// Creates the namespace of `node` with address `ip` on an `eth0` that a
    /// veth pair joins to the bridge, and returns the namespace's name.
    pub fn add_node(&mut self, node: &str, ip: Ipv4Addr) -> anyhow::Result<String> {
        let ns = self.namespace_name(node);
        if ns.len() > 15 {
            bail!("node name {node:?} is too long: {ns:?} exceeds 15 characters");
        }
        run_blocking("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        run_blocking(
            "ip",
            &[
                "link", "add", &ns, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run_blocking("ip", &["link", "set", &ns, "master", &self.bridge, "up"])?;
        let address = format!("{ip}/{SUBNET_PREFIX_LEN}");
        run_blocking("ip", &["-n", &ns, "addr", "add", &address, "dev", "eth0"])?;
        run_blocking("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run_blocking("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Replaces the INPUT filter of namespace `ns` so that it drops every
    /// packet from `sources`; an empty list accepts everything again. The
    /// replacement is atomic (one `iptables-restore`).
    pub async fn set_input_drops(&self, ns: &str, sources: &[Ipv4Addr]) -> anyhow::Result<()> {
        let mut rules = String::from("*filter\n:INPUT ACCEPT [0:0]\n");
        for source in sources {
            rules.push_str(&format!("-A INPUT -s {source}/32 -j DROP\n"));
        }
        rules.push_str("COMMIT\n");
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, "iptables-restore"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start `ip netns exec ... iptables-restore`")?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(rules.as_bytes()).await?;
        drop(stdin);
        let output = child.wait_with_output().await?;
        if !output.status.success() {
            bail!(
                "iptables-restore in {ns} failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Removes the namespaces (killing any process still inside), the
    /// bridge and the FORWARD rule. Safe to call twice. Returns the
    /// failures, one message each.
    pub fn destroy(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for ns in std::mem::take(&mut self.namespaces) {
            // The host end of the veth pair has the namespace's name.
            let removed = remove_namespace(&ns).and_then(|()| remove_link(&ns));
            if let Err(e) = removed {
                failures.push(format!("{e:#}"));
            }
        }
        if let Err(e) = remove_link(&self.bridge) {
            failures.push(format!("{e:#}"));
        }
        if let Some(rule) = self.forward_rule.take() {
            let mut args = vec!["-D"];
            args.extend(rule.iter().map(String::as_str));
            if let Err(e) = run_blocking("iptables", &args) {
                failures.push(format!("{e:#}"));
            }
        }
        failures
    }
}

fn bridged_frames_pass_iptables() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|value| value.trim() == "1")
}

fn link_exists(name: &str) -> bool {
    run_blocking("ip", &["link", "show", "dev", name]).is_ok()
}

/// Deletes a link if it exists. The kernel removes a veth pair on its own
/// some time after its namespace goes, so a link that vanishes between the
/// check and the deletion is not an error.
fn remove_link(name: &str) -> anyhow::Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    match run_blocking("ip", &["link", "del", name]) {
        Err(_) if !link_exists(name) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Kills every process inside namespace `ns`, then deletes it.
fn remove_namespace(ns: &str) -> anyhow::Result<()> {
    let pids = run_blocking("ip", &["netns", "pids", ns]).unwrap_or_default();
    let pids: Vec<u32> = pids
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    kill_and_wait(&pids)?;
    run_blocking("ip", &["netns", "del", ns])?;
    Ok(())
}

/// Sends SIGKILL to each pid and waits until none of them is still running.
fn kill_and_wait(pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        // The process may have exited meanwhile; whether it is gone is
        // checked below.
        let _ = send_signal_blocking(*pid, "KILL");
    }
    let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
    loop {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|pid| is_running(*pid))
            .collect();
        if alive.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("processes {alive:?} survived SIGKILL for {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Returns whether `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|fields| fields.first() != Some(&"Z")),
        Err(_) => false,
    }
}

/// Returns the fields of a `/proc/PID/stat` line after the command name, from the
/// state (field 3 in proc(5)) on. The name is skipped by its closing
/// parenthesis because it may contain spaces.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// Returns the start time of `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), which distinguishes a process from a later one with the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.get(19)?.parse().ok()
}

/// A live run's entry in `REGISTRY_DIR`. Removing it is the last step of
/// a teardown.
pub struct Registration {
    dir: PathBuf,
}

const OWNER_FILE: &str = "owner";
/// Pids of processes started with libfaketime, whose shared memory files
/// in /dev/shm outlive them.
const PRELOADED_FILE: &str = "faketime-pids";

impl Registration {
    /// Records the current process as the owner of run `run_id`, whose
    /// files are under `run_dir`.
    pub fn create(run_id: &str, run_dir: &Path) -> anyhow::Result<Registration> {
        let dir = Path::new(REGISTRY_DIR).join(run_id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let pid = std::process::id();
        let start = start_time(pid).context("cannot read this process's start time")?;
        let owner = format!("pid={pid}\nstart={start}\nrun_dir={}\n", run_dir.display());
        std::fs::write(dir.join(OWNER_FILE), owner)
            .with_context(|| format!("failed to write {}", dir.join(OWNER_FILE).display()))?;
        Ok(Registration { dir })
    }

    /// Notes a process started with libfaketime, so that clean-up removes
    /// its shared memory files even if this run crashes.
    pub fn note_preloaded(&self, pid: u32) -> anyhow::Result<()> {
        use std::io::Write;
        let path = self.dir.join(PRELOADED_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        writeln!(file, "{pid}")?;
        Ok(())
    }

    pub fn remove(&self) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("failed to remove {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// Removes the shared memory files libfaketime leaves in /dev/shm for
/// `pid` (`faketime_shm_<pid>` and `sem.faketime_sem_<pid>`). A new process
/// that gets the same pid fails to start while they exist.
pub fn remove_faketime_files(pid: u32) {
    for name in [
        format!("faketime_shm_{pid}"),
        format!("sem.faketime_sem_{pid}"),
    ] {
        let _ = std::fs::remove_file(Path::new("/dev/shm").join(name));
    }
}

/// A run's entry in the registry.
struct RegisteredRun {
    id: String,
    dir: PathBuf,
    owner_pid: Option<u32>,
    owner_alive: bool,
    run_dir: Option<PathBuf>,
}

fn read_registry() -> Vec<RegisteredRun> {
    let Ok(entries) = std::fs::read_dir(REGISTRY_DIR) else {
        return Vec::new();
    };
    let mut runs = Vec::new();
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE)).unwrap_or_default();
        let fields: BTreeMap<&str, &str> = owner
            .lines()
            .filter_map(|line| line.split_once('='))
            .collect();
        let owner_pid: Option<u32> = fields.get("pid").and_then(|p| p.parse().ok());
        let owner_start: Option<u64> = fields.get("start").and_then(|s| s.parse().ok());
        let owner_alive = match (owner_pid, owner_start) {
            (Some(pid), Some(start)) => is_running(pid) && start_time(pid) == Some(start),
            _ => false,
        };
        runs.push(RegisteredRun {
            id,
            dir: entry.path(),
            owner_pid,
            owner_alive,
            run_dir: fields.get("run_dir").map(PathBuf::from),
        });
    }
    runs
}

/// Removes what earlier runs whose harness is gone left behind: processes
/// carrying `RUN_MARKER`, mounts under their run directories, namespaces
/// and links named `ccsj-*`, root FORWARD rules with a `ccsj-` comment,
/// libfaketime's files and the registry entries. Fails without touching
/// anything when another run is still alive, because it owns the subnet.
/// Returns one line per removed item.
pub fn remove_leftovers() -> anyhow::Result<Vec<String>> {
    let runs = read_registry();
    let own_pid = std::process::id();
    if let Some(live) = runs
        .iter()
        .find(|r| r.owner_alive && r.owner_pid != Some(own_pid))
    {
        bail!(
            "another ccs-jepsen run {} (pid {}) is active and owns {SUBNET}/{SUBNET_PREFIX_LEN}; \
             wait for it to finish or stop it, then start again",
            live.id,
            live.owner_pid.unwrap_or(0)
        );
    }
    let live_ids: BTreeSet<&str> = runs
        .iter()
        .filter(|r| r.owner_alive)
        .map(|r| r.id.as_str())
        .collect();
    let dead: Vec<&RegisteredRun> = runs.iter().filter(|r| !r.owner_alive).collect();
    let mut removed = Vec::new();

    let marked = marked_processes(&live_ids);
    if !marked.is_empty() {
        kill_and_wait(&marked)?;
        removed.push(format!("killed leftover processes {marked:?}"));
    }
    for run in &dead {
        if let Some(run_dir) = &run.run_dir {
            for mount in mounts_under(run_dir) {
                run_blocking("umount", &["-l", &mount.to_string_lossy()])?;
                removed.push(format!("unmounted {}", mount.display()));
            }
        }
        let preloaded = std::fs::read_to_string(run.dir.join(PRELOADED_FILE)).unwrap_or_default();
        for pid in preloaded
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
        {
            if !is_running(pid) {
                remove_faketime_files(pid);
            }
        }
    }
    let is_leftover = |name: &str| {
        let run = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next());
        name.starts_with(PREFIX) && !run.is_some_and(|id| live_ids.contains(id))
    };
    for ns in list_namespaces()?.into_iter().filter(|ns| is_leftover(ns)) {
        remove_namespace(&ns)?;
        removed.push(format!("deleted network namespace {ns}"));
    }
    for link in list_links()?.into_iter().filter(|link| is_leftover(link)) {
        remove_link(&link)?;
        removed.push(format!("deleted link {link}"));
    }
    for rule in forward_rules()?
        .into_iter()
        .filter(|(comment, _)| is_leftover(comment))
    {
        let args: Vec<&str> = rule.1.iter().map(String::as_str).collect();
        run_blocking("iptables", &args)?;
        removed.push(format!("deleted iptables rule {}", rule.1.join(" ")));
    }
    for run in dead {
        std::fs::remove_dir_all(&run.dir)
            .with_context(|| format!("failed to remove {}", run.dir.display()))?;
        removed.push(format!("removed registry entry {}", run.dir.display()));
    }
    Ok(removed)
}

/// Pids of processes whose environment carries `RUN_MARKER` with a run id
/// not in `live`.
fn marked_processes(live: &BTreeSet<&str>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = format!("{RUN_MARKER}=");
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Kernel threads and processes that exit meanwhile have no readable environ.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let run = environ
            .split(|byte| *byte == 0)
            .filter_map(|var| std::str::from_utf8(var).ok())
            .find_map(|var| var.strip_prefix(prefix.as_str()).map(str::to_string));
        if let Some(run) = run {
            if !live.contains(run.as_str()) && is_running(pid) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let text = run_blocking("ip", &["netns", "list"])?;
    // Lines look like "ccsj-1a2b-n1 (id: 3)" or just "ccsj-1a2b-n1".
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

fn list_links() -> anyhow::Result<Vec<String>> {
    let text = run_blocking("ip", &["-o", "link", "show"])?;
    Ok(text.lines().filter_map(link_name).collect())
}

/// Returns the interface name in a line of `ip -o link show`, e.g. "5: ccsj-1a2b-n1@if2: <...>".
fn link_name(line: &str) -> Option<String> {
    let name = line.split(": ").nth(1)?;
    Some(name.split('@').next()?.to_string())
}

/// Root FORWARD rules with a `ccsj-` comment: (comment, arguments that delete the rule).
fn forward_rules() -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let text = run_blocking("iptables", &["-S", "FORWARD"])?;
    Ok(text.lines().filter_map(parse_forward_rule).collect())
}

fn parse_forward_rule(line: &str) -> Option<(String, Vec<String>)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&"-A") {
        return None;
    }
    let comment_at = words.iter().position(|w| *w == "--comment")?;
    let comment = words.get(comment_at + 1)?.trim_matches('"');
    if !comment.starts_with(PREFIX) {
        return None;
    }
    let mut delete: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    delete[0] = "-D".to_string();
    Some((comment.to_string(), delete))
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mount_path(point)))
        .filter(|point| point.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts
}

/// Undoes the octal escapes of /proc/self/mountinfo ("\040" for a space).
fn unescape_mount_path(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Fails when an address or route of the root namespace overlaps the
/// run's subnet, naming what overlaps.
pub fn check_subnet_free() -> anyhow::Result<()> {
    let addresses = run_blocking("ip", &["-4", "-o", "addr", "show"])?;
    for line in addresses.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "inet") else {
            continue;
        };
        let (Some(interface), Some(cidr)) = (words.get(1), words.get(at + 1)) else {
            continue;
        };
        if parse_cidr(cidr).is_some_and(overlaps_subnet) {
            bail!(
                "address {cidr} on interface {interface} overlaps the subnet \
                 {SUBNET}/{SUBNET_PREFIX_LEN} that ccs-jepsen uses; remove it and start again"
            );
        }
    }
    let routes = run_blocking("ip", &["-4", "route", "show"])?;
    for line in routes.lines() {
        let Some(destination) = line.split_whitespace().next() else {
            continue;
        };
        if destination == "default" {
            continue;
        }
        if parse_cidr(destination).is_some_and(overlaps_subnet) {
            bail!(
                "route {line:?} overlaps the subnet {SUBNET}/{SUBNET_PREFIX_LEN} that \
                 ccs-jepsen uses; remove it and start again"
            );
        }
    }
    Ok(())
}

/// Parses "a.b.c.d/len" or a bare address (a /32).
fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, length) = match text.split_once('/') {
        Some((address, length)) => (address, length.parse().ok()?),
        None => (text, 32),
    };
    (length <= 32).then_some(())?;
    Some((address.parse().ok()?, length))
}

/// Two prefixes overlap when they agree on the bits of the shorter one.
fn overlaps_subnet((address, length): (Ipv4Addr, u8)) -> bool {
    let shorter = length.min(SUBNET_PREFIX_LEN);
    let mask = if shorter == 0 {
        0
    } else {
        u32::MAX << (32 - shorter)
    };
    u32::from(address) & mask == u32::from(SUBNET) & mask
}

/// Directed pairs of nodes whose packets are dropped: `(from, to)` means
/// that `to` drops what `from` sends. Node names are the cluster's ("n1",
/// "h2").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    drops: BTreeSet<(String, String)>,
}

impl Cut {
    pub fn new() -> Cut {
        Cut::default()
    }

    /// Drops what `from` sends to `to`.
    pub fn drop_one_way(&mut self, from: &str, to: &str) {
        if from != to {
            self.drops.insert((from.to_string(), to.to_string()));
        }
    }

    /// Drops traffic between `a` and `b` in both directions.
    pub fn drop_both_ways(&mut self, a: &str, b: &str) {
        self.drop_one_way(a, b);
        self.drop_one_way(b, a);
    }

    /// Cuts every node of `left` from every node of `right`, both ways.
    pub fn split(left: &[String], right: &[String]) -> Cut {
        let mut cut = Cut::new();
        for a in left {
            for b in right {
                cut.drop_both_ways(a, b);
            }
        }
        cut
    }

    /// Cuts `node` from each of `others`, both ways.
    pub fn isolate(node: &str, others: &[String]) -> Cut {
        Cut::split(&[node.to_string()], others)
    }

    pub fn is_empty(&self) -> bool {
        self.drops.is_empty()
    }

    pub fn drops(&self) -> impl Iterator<Item = (&str, &str)> {
        self.drops
            .iter()
            .map(|(from, to)| (from.as_str(), to.as_str()))
    }

    /// Returns whether `to` drops what `from` sends.
    pub fn blocks(&self, from: &str, to: &str) -> bool {
        self.drops.contains(&(from.to_string(), to.to_string()))
    }

    /// Returns every node named in the cut.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.drops
            .iter()
            .flat_map(|(a, b)| [a.as_str(), b.as_str()])
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Returns the state letter of a `/proc/PID/stat` line, e.g. "S" or "Z".
    pub(crate) fn stat_state(stat: &str) -> Option<&str> {
        stat_fields(stat)?.first().copied()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn subnet_overlap() {
        let cases = [
            ("10.231.0.7/32", true),
            ("10.231.0.0/24", true),
            ("10.0.0.0/8", true),
            ("10.231.0.128/25", true),
            ("10.231.1.0/24", false),
            ("192.0.2.2/24", false),
            ("0.0.0.0/0", true),
        ];
        for (text, expected) in cases {
            let cidr = parse_cidr(text).expect("valid cidr");
            assert_eq!(overlaps_subnet(cidr), expected, "{text}");
        }
        assert_eq!(
            parse_cidr("10.231.0.5"),
            Some((Ipv4Addr::new(10, 231, 0, 5), 32))
        );
        assert_eq!(parse_cidr("10.231.0.5/33"), None);
    }

    #[test]
    fn forward_rule_parsing() {
        let line =
            "-A FORWARD -i ccsj-1a2b-br -o ccsj-1a2b-br -m comment --comment ccsj-1a2b -j ACCEPT";
        let (comment, delete) = parse_forward_rule(line).expect("our rule");
        assert_eq!(comment, "ccsj-1a2b");
        assert_eq!(delete[0], "-D");
        assert_eq!(delete.len(), 12);
        let other = "-A FORWARD -i docker0 -m comment --comment docker -j ACCEPT";
        assert_eq!(parse_forward_rule(other), None);
        assert_eq!(parse_forward_rule("-P FORWARD ACCEPT"), None);
    }

    #[test]
    fn link_names() {
        let veth = "7: ccsj-1a2b-n1@if2: <BROADCAST,MULTICAST,UP> mtu 1500 qdisc noqueue";
        assert_eq!(link_name(veth).as_deref(), Some("ccsj-1a2b-n1"));
        let plain = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536";
        assert_eq!(link_name(plain).as_deref(), Some("lo"));
    }

    #[test]
    fn mount_path_unescaping() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain/path"), "/plain/path");
        assert_eq!(unescape_mount_path("/odd\\"), "/odd\\");
    }

    #[test]
    fn stat_parsing_skips_command_name() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 9876 0";
        let fields = stat_fields(stat).expect("fields");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[19], "9876");
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn cut_split_and_isolate() {
        let cut = Cut::split(&names(&["n1"]), &names(&["n2", "n3"]));
        assert!(cut.blocks("n1", "n2"));
        assert!(cut.blocks("n2", "n1"));
        assert!(cut.blocks("n3", "n1"));
        assert!(!cut.blocks("n2", "n3"));
        assert_eq!(cut, Cut::isolate("n1", &names(&["n2", "n3"])));
        let mut one_way = Cut::new();
        one_way.drop_one_way("n1", "n2");
        one_way.drop_one_way("n1", "n1");
        assert!(one_way.blocks("n1", "n2"));
        assert!(!one_way.blocks("n2", "n1"));
        assert_eq!(one_way.drops().count(), 1);
    }
}
