//! `banger`: the command-line client. It parses arguments, talks to `bangerd` over its unix
//! socket (starting it when nothing answers) and prints data on stdout, progress and errors on
//! stderr.
//!
//! Exit codes: 0 ok, 1 failed, 2 usage error.

mod attach;
mod client;
mod cmd;
mod exec;
mod files;
mod mcp;
mod output;
mod progress;
mod tty;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// banger turns this host into a fleet of disposable microVMs.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true, after_help = "Exit codes: 0 ok, 1 failed, 2 usage error.")]
pub struct Cli {
    /// bangerd's state directory [default: /var/lib/banger as root, $XDG_DATA_HOME/banger otherwise]
    #[arg(long, global = true, env = "BANGER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// bangerd's API socket [default: /run/banger/bangerd.sock as root, $XDG_RUNTIME_DIR/banger/bangerd.sock otherwise]
    #[arg(long, global = true, env = "BANGER_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, inspect, change and delete VMs.
    #[command(subcommand)]
    Vm(cmd::vm::VmCommand),
    /// Supervised processes in a running VM that outlive the client and the daemon: start,
    /// list, show, logs, attach, stop, kill.
    #[command(subcommand)]
    Session(cmd::session::SessionCommand),
    /// Pull, list and delete guest kernels.
    #[command(subcommand)]
    Kernel(cmd::kernel::KernelCommand),
    /// Build, list and delete root filesystem images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Follow and cancel asynchronous operations (VM creates, image pulls).
    #[command(subcommand, name = "op")]
    Op(cmd::op::OpCommand),
    /// Start, stop and inspect the bangerd daemon.
    #[command(subcommand)]
    Daemon(cmd::daemon::DaemonCommand),
    /// List, show and delete memory snapshots (take them with `banger vm snapshot`).
    #[command(subcommand)]
    Snapshot(cmd::snapshot::SnapshotCommand),
    /// Show the configuration in force.
    #[command(subcommand)]
    Config(cmd::config::ConfigCommand),
    /// Check that this host has what banger needs, with the fix for anything missing.
    ///
    /// The checks run in bangerd, which is what runs the VMMs (with its user, config and state
    /// dir); like every command, doctor starts it when nothing answers. If bangerd cannot start,
    /// that error says why and what to fix. Exit code 1 when a check fails.
    Doctor(cmd::doctor::DoctorArgs),
    /// Time a cold `vm run`, the bare VMM boot of the same guest and concurrent creates, side
    /// by side with their ratios (needs root for nothing more than the VMs do).
    Bench(cmd::bench::BenchArgs),
    /// Print an ssh_config with a `Host NAME.vm` block per VM, to `Include` from ~/.ssh/config.
    SshConfig(cmd::ssh::SshConfigArgs),
    /// Import a git repository into a VM, and bring the guest's commits back as a branch.
    #[command(subcommand)]
    Workspace(cmd::workspace::WorkspaceCommand),
    /// Serve the Model Context Protocol on stdin/stdout, for coding agents.
    ///
    /// Tools to create sandboxes, run commands, read and write files, and drive sessions,
    /// snapshots, forwards and workspaces, as a client of bangerd with your rights (see README,
    /// "MCP"). stdout carries only the protocol; logs go to stderr. Register it in an MCP
    /// client as {"mcpServers": {"banger": {"command": "banger", "args": ["mcp"]}}}.
    Mcp,
    /// Print a one-time link that logs a browser into the web UI (dashboard, VM pages,
    /// terminal) that bangerd serves on `web_listen` (default http://127.0.0.1:7777).
    Web(cmd::web::WebArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let layout = banger_core::Layout::resolve(cli.state_dir, cli.socket);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("banger: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = client::Client::new(layout);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Vm(c) => cmd::vm::run(&client, c).await,
            Command::Session(c) => cmd::session::run(&client, c).await,
            Command::Kernel(c) => cmd::kernel::run(&client, c).await,
            Command::Image(c) => cmd::image::run(&client, c).await,
            Command::Op(c) => cmd::op::run(&client, c).await,
            Command::Daemon(c) => cmd::daemon::run(&client, c).await,
            Command::Config(c) => cmd::config::run(&client, c).await,
            Command::Snapshot(c) => cmd::snapshot::run(&client, c).await,
            Command::Doctor(a) => cmd::doctor::run(&client, a).await,
            Command::Bench(a) => cmd::bench::run(&client, a).await,
            Command::SshConfig(a) => cmd::ssh::ssh_config(&client, a).await,
            Command::Workspace(c) => cmd::workspace::run(&client, c).await,
            Command::Mcp => mcp::serve(client.clone()).await,
            Command::Web(a) => cmd::web::run(&client, a).await,
        }
    });
    // A blocking stdin read may still be pending; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            eprintln!("banger: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
