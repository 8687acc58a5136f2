//! `banger-agent`: the guest agent. From the boot-path issue on it runs as PID 1 in the guest's
//! initramfs and serves the host over the agent channel; until then it only reports its
//! version, so the workspace builds and ships the binary in its final place.

fn main() -> std::process::ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version" | "-V") | None => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("banger-agent: unknown argument {other:?}; this build only answers --version");
            std::process::ExitCode::from(2)
        }
    }
}
