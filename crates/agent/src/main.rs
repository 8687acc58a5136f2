//! `banger-agent`: the guest agent. As PID 1 (the initramfs `/init`) it boots the guest into
//! its copy-on-write root and serves the host over the virtio-serial port named `banger.agent`;
//! run by hand, `serve` serves over a given port or unix socket (that is how it is tested).
//!
//! ```text
//! banger-agent                       as PID 1: boot, then serve (see init.rs)
//! banger-agent serve --port PATH     serve on a character device (virtio-serial port)
//! banger-agent serve --port auto     find the port named banger.agent, serve on it
//! banger-agent serve --unix PATH     listen on a unix socket, one host at a time
//! banger-agent serve --connect PATH  connect to a unix socket, serve that connection
//! banger-agent serve --vsock PORT     listen on a vsock port, one host at a time
//! banger-agent --version
//! ```
//!
//! Exit codes: 0 served until `shutdown` (or the connection closed); 1 serving failed; 2 usage.

#[macro_use]
mod log;
mod channel;
mod container;
mod disks;
mod exec;
mod files;
mod fsops;
mod identity;
mod init;
mod memory;
mod mounts;
mod net;
mod ports;
mod pty;
mod serve;
mod services;
mod session;
mod tunnel;
mod workspace;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serve::Transport;

const USAGE: &str =
    "usage: banger-agent [--version] | serve (--port PATH|auto | --unix PATH | --connect PATH | --vsock PORT)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if std::process::id() == 1 {
        // The kernel passes undotted unknown parameters as arguments; none are ours.
        init::run();
    }
    match args.as_slice() {
        ["--version" | "-V"] | [] => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        ["serve", flag, path] => {
            let transport = match (*flag, *path) {
                ("--port", "auto") => match serve::find_port(Duration::from_secs(10)) {
                    Ok(port) => Transport::Port(port),
                    Err(e) => {
                        log!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
                ("--port", path) => Transport::Port(PathBuf::from(path)),
                ("--unix", path) => Transport::Listen(PathBuf::from(path)),
                ("--connect", path) => Transport::Connect(PathBuf::from(path)),
                ("--vsock", port) => match port.parse() {
                    Ok(port) => Transport::Vsock(port),
                    Err(_) => return usage(),
                },
                _ => return usage(),
            };
            exec::start_reaper();
            match serve::serve(&transport) {
                Ok(outcome) => {
                    log!("done: {outcome:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    log!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}
