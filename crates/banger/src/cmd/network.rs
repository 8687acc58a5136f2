//! `banger vm network`: a VM's egress policy (show, set) and its denial log, and the
//! `--network-mode`/`--allow-host`/`--deny-host` flags that `vm create` and `vm run` share.

use std::process::ExitCode;

use banger_proto::{EgressLog, EgressMode, EgressPolicy, EgressView, SetEgressRequest};
use clap::{Args, Subcommand};
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

/// Parses a `--allow-host`/`--deny-host` value for clap (the daemon checks it again).
pub fn parse_rule(text: &str) -> Result<String, String> {
    text.parse::<banger_core::egress::HostRule>().map(|r| r.to_string()).map_err(|e| e.to_string())
}

fn parse_mode(text: &str) -> Result<EgressMode, String> {
    let mode: banger_core::egress::EgressMode =
        text.parse().map_err(|e: banger_core::egress::EgressError| e.to_string())?;
    Ok(mode.into())
}

/// Egress flags of `vm create` and `vm run`.
#[derive(Debug, Args, Default)]
pub struct EgressArgs {
    /// What the VM may reach outside the host: open, allowlist (only --allow-host) or closed
    /// (nothing; exec and files still work) [default: the config's egress_mode]
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    network_mode: Option<EgressMode>,
    /// A host the VM may reach: api.github.com, *.pypi.org (subdomains only), 198.18.0.1 or
    /// 10.0.0.0/8, each optionally :PORT. Repeatable.
    #[arg(long, value_name = "HOST", value_parser = parse_rule)]
    allow_host: Vec<String>,
    /// A host the VM may never reach (same forms; deny wins). Repeatable.
    #[arg(long, value_name = "HOST", value_parser = parse_rule)]
    deny_host: Vec<String>,
}

impl EgressArgs {
    /// The policy to send, or `None` to take the daemon's default (no flag given).
    pub fn policy(self) -> Option<EgressPolicy> {
        if self.network_mode.is_none() && self.allow_host.is_empty() && self.deny_host.is_empty() {
            return None;
        }
        let mode = self.network_mode.unwrap_or(if self.allow_host.is_empty() {
            EgressMode::Open
        } else {
            EgressMode::Allowlist
        });
        Some(EgressPolicy { mode, allow: self.allow_host, deny: self.deny_host })
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  banger vm network web show                                   the policy and what DNS opened
  banger vm network web set --mode allowlist --allow-host pypi.org --allow-host '*.pythonhosted.org'
  banger vm network web set --mode closed                      only exec and files keep working
  banger vm network web log --follow                           denials as they happen")]
pub struct NetworkArgs {
    /// Name, id or id prefix.
    vm: String,
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Show the VM's egress policy, whether it is in force and the addresses DNS opened.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the policy; on a running VM it is in force when this returns (no restart).
    Set(SetArgs),
    /// The VM's recent denials (refused names and connections).
    Log {
        /// Keep printing denials as they happen (Ctrl-C ends).
        #[arg(long)]
        follow: bool,
        /// Print JSON (one object per line with --follow).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct SetArgs {
    /// open, allowlist or closed.
    #[arg(long, value_parser = parse_mode)]
    mode: Option<EgressMode>,
    /// Replace the allow list with these hosts (repeatable).
    #[arg(long, value_name = "HOST", value_parser = parse_rule)]
    allow_host: Vec<String>,
    /// Replace the deny list with these hosts (repeatable).
    #[arg(long, value_name = "HOST", value_parser = parse_rule)]
    deny_host: Vec<String>,
    /// Empty the allow list.
    #[arg(long, conflicts_with = "allow_host")]
    clear_allow: bool,
    /// Empty the deny list.
    #[arg(long, conflicts_with = "deny_host")]
    clear_deny: bool,
    /// Print the new policy as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `banger vm network`.
pub async fn run(client: &Client, a: NetworkArgs) -> anyhow::Result<ExitCode> {
    let url = format!("/v1/vms/{}/network", segment(&a.vm));
    match a.command {
        NetworkCommand::Show { json } => {
            let view: EgressView = client.get(&url).await?;
            show(&view, json)
        }
        NetworkCommand::Set(s) => {
            let list = |hosts: Vec<String>, clear: bool| (clear || !hosts.is_empty()).then_some(hosts);
            let req = SetEgressRequest {
                mode: s.mode,
                allow: list(s.allow_host, s.clear_allow),
                deny: list(s.deny_host, s.clear_deny),
            };
            if req == SetEgressRequest::default() {
                anyhow::bail!(
                    "nothing to change; pass --mode, --allow-host, --deny-host, --clear-allow or --clear-deny"
                );
            }
            let view: EgressView = client.call(Method::PUT, &url, Some(&req)).await?;
            show(&view, s.json)
        }
        NetworkCommand::Log { follow, json } => log(client, &url, follow, json).await,
    }
}

fn mode_name(mode: EgressMode) -> &'static str {
    banger_core::egress::EgressMode::from(mode).as_str()
}

fn show(view: &EgressView, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        output::json(view)?;
        return Ok(ExitCode::SUCCESS);
    }
    let list = |l: &[String]| if l.is_empty() { "-".to_owned() } else { l.join(", ") };
    let learned: Vec<String> = view
        .learned
        .iter()
        .map(|l| match l.port {
            Some(p) => format!("{}:{p} ({}, {}s)", l.address, l.name, l.expires_in_secs),
            None => format!("{} ({}, {}s)", l.address, l.name, l.expires_in_secs),
        })
        .collect();
    output::fields(&[
        ("vm", view.vm.clone()),
        ("mode", mode_name(view.policy.mode).to_owned()),
        ("allow", list(&view.policy.allow)),
        ("deny", list(&view.policy.deny)),
        ("enforced", if view.enforced { "yes".into() } else { "no (the vm is not running)".into() }),
        ("opened by dns", list(&learned)),
    ])?;
    Ok(ExitCode::SUCCESS)
}

async fn log(client: &Client, url: &str, follow: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut after = 0;
    let mut suppressed = 0;
    loop {
        let wait = if follow { 10_000 } else { 0 };
        let page: EgressLog = client.get(&format!("{url}/log?after={after}&wait_ms={wait}")).await?;
        if !follow && json {
            output::json(&page)?;
            return Ok(ExitCode::SUCCESS);
        }
        for d in &page.denials {
            if json {
                println!("{}", serde_json::to_string(d)?);
            } else {
                let dest = match (&d.address, d.port) {
                    (Some(a), Some(p)) => format!("{a}:{p}"),
                    (Some(a), None) => a.clone(),
                    (None, _) => "-".into(),
                };
                let name = d.name.as_deref().unwrap_or("-");
                println!("{}  {:<4}  {dest:<21}  {name}  {}  ({})", d.time, d.protocol, d.decision, d.rule);
            }
        }
        if page.suppressed > suppressed {
            eprintln!("banger: {} denials were not logged (rate limit)", page.suppressed - suppressed);
            suppressed = page.suppressed;
        }
        after = page.next;
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
    }
}
