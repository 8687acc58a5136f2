//! `banger vm forward`: a VM's port forwards (add, list, remove), and the `--publish` parsing
//! that `vm create` and `vm run` share.

use std::net::IpAddr;
use std::process::ExitCode;

use banger_core::forward::parse_host_port;
use banger_core::PortForward;
use banger_proto::{ForwardList, ForwardState, ForwardView};
use clap::Args;
use hyper::Method;

use super::segment;
use crate::client::Client;
use crate::output;

/// Parses a forward spec for clap.
pub fn parse_forward(text: &str) -> Result<PortForward, String> {
    PortForward::parse(text).map_err(|e| e.to_string())
}

fn parse_removal(text: &str) -> Result<(Option<IpAddr>, u16), String> {
    parse_host_port(text).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  banger vm forward web 8080:80               127.0.0.1:8080 on this host reaches port 80 in web
  banger vm forward web 0.0.0.0:8443:443      every interface of this host, port 8443
  banger vm forward web                       list web's forwards
  banger vm forward web --remove 8080         remove the forward on host port 8080")]
pub struct ForwardArgs {
    /// Name, id or id prefix.
    vm: String,
    /// Forwards to add, each [HOST_ADDR:]HOST_PORT:GUEST_PORT; HOST_ADDR defaults to 127.0.0.1
    /// (this host only), 0.0.0.0 listens on every interface, IPv6 goes in brackets ([::1]).
    #[arg(value_name = "SPEC", value_parser = parse_forward)]
    specs: Vec<PortForward>,
    /// List the VM's forwards (also what no SPEC and no --remove does).
    #[arg(long, conflicts_with_all = ["specs", "remove"])]
    list: bool,
    /// Remove the forward on [HOST_ADDR:]HOST_PORT (repeatable).
    #[arg(long, value_name = "[HOST_ADDR:]HOST_PORT", value_parser = parse_removal, conflicts_with = "specs")]
    remove: Vec<(Option<IpAddr>, u16)>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, a: ForwardArgs) -> anyhow::Result<ExitCode> {
    let base = format!("/v1/vms/{}/forwards", segment(&a.vm));
    if !a.specs.is_empty() {
        let mut added = Vec::new();
        for spec in &a.specs {
            let view: ForwardView =
                client.call(Method::POST, &base, Some(&banger_proto::PortForward::from(*spec))).await?;
            if !a.json {
                println!("{}", view.forward.describe(&view.vm));
            }
            added.push(view);
        }
        if a.json {
            let vm = added.first().map(|v| v.vm.clone()).unwrap_or_default();
            output::json(&ForwardList { vm, forwards: added })?;
        } else if let Some(v) = added.iter().find(|v| v.state == ForwardState::Inactive) {
            eprintln!("{} is not running; its forwards listen whenever it runs", v.vm);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !a.remove.is_empty() {
        let mut removed = Vec::new();
        for (addr, port) in &a.remove {
            let query = addr.map(|a| format!("?host_addr={}", segment(&a.to_string()))).unwrap_or_default();
            let view: ForwardView = client.call(Method::DELETE, &format!("{base}/{port}{query}"), None::<&()>).await?;
            if !a.json {
                println!("{}", view.forward.describe(&view.vm));
            }
            removed.push(view);
        }
        if a.json {
            let vm = removed.first().map(|v| v.vm.clone()).unwrap_or_default();
            output::json(&ForwardList { vm, forwards: removed })?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let list: ForwardList = client.get(&base).await?;
    if a.json {
        output::json(&list)?;
    } else {
        print_table(&list)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(list: &ForwardList) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = list
        .forwards
        .iter()
        .map(|f| {
            let state = match (&f.state, &f.error) {
                (ForwardState::Failed, Some(why)) => format!("failed: {why}"),
                (ForwardState::Inactive, _) => "inactive (vm not running)".to_owned(),
                (state, _) => state.as_str().to_owned(),
            };
            vec![f.forward.describe(&f.vm), f.forward.protocol.as_str().to_owned(), state]
        })
        .collect();
    output::table(&["FORWARD", "PROTO", "STATE"], &rows)
}

/// Tells on stderr about forwards of `vm` that could not listen (after a start).
pub async fn warn_failed(client: &Client, vm: &str) {
    let Ok(list) = client.get::<ForwardList>(&format!("/v1/vms/{}/forwards", segment(vm))).await else { return };
    for f in list.forwards.iter().filter(|f| f.state == ForwardState::Failed) {
        let why = f.error.as_deref().unwrap_or("unknown error");
        eprintln!("warning: forward {} is not listening: {why}", f.forward.describe(&f.vm));
    }
}
