//! `banger doctor`: host checks, run locally so that they work when the daemon cannot start,
//! and what the VMM selection picks here (`vmm`).

use std::process::ExitCode;

use banger_host::doctor::{self, DoctorInput, Status};
use banger_host::LinuxProbe;
use clap::Args;

use crate::client::Client;
use crate::output;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(client: &Client, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let layout = client.layout();
    let config = layout
        .config_candidates()
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().map(|t| (t, p.display().to_string())))
        .and_then(|(text, path)| banger_core::Config::from_toml(&text, &path).ok())
        .unwrap_or_default();
    // The daemon's own selection, on this host's facts: what `auto` (or the configured
    // choice) picks, and why.
    let host = banger_vmm::HostFacts::probe_for(&config);
    let vmm_pick = banger_vmm::explain(config.vmm, &host).map_err(|e| e.to_string());
    let input = DoctorInput {
        state_dir: &layout.state_dir,
        socket: &layout.socket,
        socket_group: !config.socket_group.is_empty(),
        firecracker_bin: &config.firecracker_bin,
        vmm_pick: Some(vmm_pick),
    };
    let checks = doctor::run(&LinuxProbe, &input);
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        output::json(&serde_json::json!({ "ok": !failed, "checks": checks }))?;
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            let fix = c.fix.as_deref().map(|f| format!(" — fix: {f}")).unwrap_or_default();
            println!("{:<4}  {:<width$}  {}{fix}", c.status.as_str(), c.name, c.detail);
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
