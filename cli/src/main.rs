//! `ferry`: run the mesh (`ferry up`) and operate it.
mod audit_cmd;
mod commands;
mod disk_cmd;
mod drill_cmd;
mod failover_cmd;
mod plan_cmd;
mod points_cmd;
mod protect;
mod token_cmd;
mod unprotect_cmd;
mod vault_cmd;
mod vm_set;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry disaster recovery: run and operate the mesh"
)]
pub struct Cli {
    /// Mesh config written by `ferry up` (D/ferry.toml).
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run every component in this process (the embedded default) until Ctrl-C.
    Up {
        #[arg(long)]
        data_dir: PathBuf,
        /// Use this Redis instead of starting a redis-server child.
        #[arg(long)]
        redis: Option<String>,
        /// Object store URL (default file://DATA_DIR/store).
        #[arg(long)]
        store: Option<String>,
        /// Components not to start here, comma separated (e.g. gateway,scheduler).
        #[arg(long, value_delimiter = ',')]
        without: Vec<String>,
    },
    /// Health of every component, Redis and the store; exit 0 when all serve.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
        /// Check only this one (registry, scheduler, ingest, storage-writer, failover,
        /// gateway, redis or store): what a Kubernetes exec probe runs.
        #[arg(long)]
        component: Option<String>,
        /// Reach the component here instead of at the config's endpoint
        /// (https://127.0.0.1:7401; the gateway's host:port).
        #[arg(long, requires = "component")]
        endpoint: Option<String>,
    },
    /// The vault: registration keys for hosts.
    Vault {
        #[command(subcommand)]
        cmd: VaultCmd,
    },
    /// Hosts registered in the vault.
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
    },
    /// Virtual machines reported by hosts.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Jobs of every service.
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    },
    /// Recovery points.
    Points {
        #[command(subcommand)]
        cmd: PointsCmd,
    },
    /// Failover.
    Failover {
        #[command(subcommand)]
        cmd: FailoverCmd,
    },
    /// Recovery plans: VMs in ordered groups, with scripts and manual checks between them.
    Plan {
        #[command(subcommand)]
        cmd: plan_cmd::PlanCmd,
    },
    /// DR drills: prove a VM's point restorable (read back, started, checked, cleaned up).
    Drill {
        #[command(subcommand)]
        cmd: drill_cmd::DrillCmd,
    },
    /// Failback of a re-protected VM to its recovery host (usually its original host): phase
    /// 1 while the VM runs (checksum: only the blocks that differ), then `failback complete`
    /// (or --wait) shuts it down, ships its last writes and starts it there. Then commit.
    #[command(args_conflicts_with_subcommands = true)]
    Failback {
        #[command(subcommand)]
        cmd: Option<FailbackCmd>,
        #[command(flatten)]
        args: FailbackArgs,
    },
    /// The audit trail: every change and every refusal, with caller, target and result.
    Audit(audit_cmd::AuditArgs),
    /// Operator tokens with a role (reader, operator, contributor, admin).
    Token {
        #[command(subcommand)]
        cmd: token_cmd::TokenCmd,
    },
    /// Disk images: info, allocation map, convert.
    Disk {
        #[command(subcommand)]
        cmd: disk_cmd::DiskCmd,
    },
    /// Hyper-V Replica Logs (.hrl).
    Hrl {
        #[command(subcommand)]
        cmd: disk_cmd::HrlCmd,
    },
}

#[derive(Subcommand)]
pub enum VaultCmd {
    /// Create a one-time registration key and write it to a file for `ferry-agent`.
    RegistrationKey {
        #[arg(long)]
        out: PathBuf,
        /// Validity (e.g. 1h, 5d; whole seconds, 1s to 365d). Also `--valid`.
        #[arg(long, visible_alias = "valid", default_value = "5d")]
        ttl: humantime::Duration,
        #[arg(long, default_value = "")]
        site: String,
    },
    /// Add a new data key: chunks stored from now on are sealed with it; older ones keep
    /// theirs and stay readable (nothing is rewritten). Admin.
    RotateKey {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// The vault's key ids, when each was made and which one seals new chunks.
    Keys {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Subcommand)]
pub enum HostCmd {
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Stop accepting this host's certificate.
    Remove { host: String },
}

#[derive(Subcommand)]
pub enum VmCmd {
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    Show {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Enable protection: prerequisites, relationship, initial replication, finalize.
    Protect {
        name: String,
        /// Replication frequency (30s, 5m, 15m: whole seconds from 1s to 24h).
        #[arg(long, default_value = "5m")]
        frequency: humantime::Duration,
        /// Recovery point retention (whole hours, 1h to 8760h).
        #[arg(long, default_value = "24h")]
        retention: humantime::Duration,
        /// Every point younger than this is kept (whole seconds, 1s up to the retention).
        #[arg(long, default_value = "1h")]
        keep_all: humantime::Duration,
        /// Older points are thinned to one per this interval, plus every app-consistent point
        /// (whole seconds, 1s up to the retention).
        #[arg(long, default_value = "5m")]
        thin_to: humantime::Duration,
        /// How often a cycle is app-consistent (quiesce hooks on the host); 0 = never, else at
        /// least the frequency.
        #[arg(long, default_value = "0s")]
        app_consistent: humantime::Duration,
        /// Automatic resyncs wait for this window, host local time (START-END, HH:MM-HH:MM;
        /// equal ends: any time).
        #[arg(long, default_value = "18:30-06:00")]
        resync_window: String,
        /// The host the VM fails over to: registered, another host, with a [recovery] section
        /// in its agent.toml, connected.
        #[arg(long)]
        recovery_host: Option<String>,
        /// Wait until the job ends; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Change a protected VM's policy: only the flags given change (each checked like at
    /// protect); prints the VM.
    Set {
        name: String,
        #[command(flatten)]
        changes: vm_set::Changes,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Checksum resync now: the host compares its disks with the latest point's block hashes
    /// and ships only the blocks that differ.
    Resync {
        name: String,
        /// Wait until the resync ends; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Disable protection: replication stops, the host's change logs of the VM are removed,
    /// the recovery points stay under retention unless --delete-points.
    Unprotect {
        name: String,
        /// Also delete the VM's recovery points (their chunks go with garbage collection).
        #[arg(long)]
        delete_points: bool,
        /// The VM's host is gone: skip removing its change logs on the host.
        #[arg(long)]
        force: bool,
        /// Wait until the job ends; exit non-zero if it failed.
        #[arg(long)]
        wait: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Clear a critical VM after fixing the cause; replication resumes (with a resync when
    /// the VM needs one).
    Repair {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// After a failover (or failback) commit: replicate the VM from the host it runs on now,
    /// shipping only what it wrote since the failover; the host it left becomes its recovery
    /// host.
    Reprotect {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Subcommand)]
pub enum JobsCmd {
    List {
        /// Only jobs of this VM.
        #[arg(long)]
        vm: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    Show {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Cancel a running job. Refused (with the reason) when it has ended or is past its
    /// point of no return; otherwise the job stops at its next check, undoing what it made.
    Cancel {
        id: String,
        /// Wait until the job has stopped; exit non-zero unless it ended cancelled.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "10m")]
        timeout: humantime::Duration,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Continue a job waiting for input (a recovery plan's manual action).
    Resume {
        id: String,
        /// Kept with the job's step (who checked what).
        #[arg(long)]
        comment: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Wait until a job ends; exit non-zero if it failed.
    Wait {
        id: String,
        #[arg(long, default_value = "30m")]
        timeout: humantime::Duration,
    },
}

#[derive(Subcommand)]
pub enum PointsCmd {
    /// Recovery points of a VM, oldest first.
    List {
        vm: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Check that each point was committed by the VM's host at the time; exit 1 when one was
    /// committed by another host (do not fail over to it).
    Verify {
        vm: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Subcommand)]
pub enum FailbackCmd {
    /// Phase 2 of a checksum failback: shut the VM down, ship its last writes, apply them on
    /// the target and start the VM there (commit pending after).
    Complete {
        vm: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(clap::Args)]
pub struct FailbackArgs {
    pub vm: Option<String>,
    /// "checksum": compare the target's disks block by block, send only what differs;
    /// "full": write every block.
    #[arg(long, default_value = "checksum", value_parser = ["checksum", "full"])]
    pub sync: String,
    /// The host to fail back to (default: the VM's recovery host).
    #[arg(long)]
    pub to_host: Option<String>,
    /// An alternate folder on the target host (absolute, no `.` or `..`): the VM is made in
    /// DIR/<vm>/ and its original disks there are left untouched.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run phase 2 at once after phase 1 (`failback complete`).
    #[arg(long)]
    pub wait: bool,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Subcommand)]
pub enum FailoverCmd {
    /// Test failover: on the VM's recovery host (disks in its [recovery] folder, the VM
    /// started with the test network), or with --target an export of the point into a folder
    /// here (disks in their own format and name, plus a VM description).
    Test {
        vm: String,
        /// A point id, "latest" or "latest-app".
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        target: Option<PathBuf>,
        /// Instant recovery: start the VM at once on disks served from the store, copied to
        /// the recovery host in the background.
        #[arg(long)]
        instant: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Remove what a test failover created (on a recovery host: stop the test VM first).
    Cleanup {
        vm: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Planned failover: the source VM is shut down, its last writes shipped (no data
    /// lost), then it runs on its recovery host.
    Planned {
        vm: String,
        /// Wait for the job to end (the command always does; kept for scripts).
        #[arg(long)]
        wait: bool,
        /// Instant recovery: start the VM at once on disks served from the store, copied to
        /// the recovery host in the background.
        #[arg(long)]
        instant: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Unplanned failover: the VM's production copy comes up on its recovery host from POINT;
    /// replication from the primary is fenced first.
    Unplanned {
        vm: String,
        /// A point id, "latest" or "latest-app".
        #[arg(long)]
        point: String,
        /// Try to shut the source VM down first (carries on if it cannot).
        #[arg(long)]
        shutdown: bool,
        /// Wait for the job to end (the command always does; kept for scripts).
        #[arg(long)]
        wait: bool,
        /// Instant recovery: start the VM at once on disks served from the store, copied to
        /// the recovery host in the background.
        #[arg(long)]
        instant: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Before commit: run the failed-over VM on another point.
    ChangePoint {
        vm: String,
        #[arg(long)]
        point: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Commit the VM's failover (the point is fixed).
    Commit {
        vm: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Every failover and its state.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    ferry_mesh::init_tracing("ferry");
    // Disk and log tools work on local files: no runtime, no mesh.
    let local = match cli.cmd {
        Cmd::Disk { cmd } => disk_cmd::run_disk(cmd),
        Cmd::Hrl { cmd } => disk_cmd::run_hrl(cmd),
        cmd => {
            return run_mesh_command(Cli {
                config: cli.config,
                cmd,
            });
        }
    };
    match local {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_mesh_command(cli: Cli) -> std::process::ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
