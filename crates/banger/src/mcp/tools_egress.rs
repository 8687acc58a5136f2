//! The egress tools: a sandbox's network policy (read, change live) and its recent denials, so
//! an agent learns at once why a connection or a name failed.

use banger_proto::{EgressLog, EgressMode, EgressView, SetEgressRequest};
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use serde::Deserialize;
use serde_json::json;

use super::command::Line;
use super::tools_sandbox::NameArgs;
use super::{reply, Banger, ToolError};
use crate::cmd::segment;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PolicySetArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// open (anything but private and link-local ranges), allowlist (only `allow`) or closed
    /// (nothing; exec and files keep working) [default: unchanged]
    pub mode: Option<String>,
    /// Replaces the allowed hosts: api.github.com, *.pypi.org, 198.18.0.1, 10.0.0.0/8, each
    /// optionally :PORT [default: unchanged]
    pub allow: Option<Vec<String>>,
    /// Replaces the refused hosts (same forms; deny wins) [default: unchanged]
    pub deny: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct DenialsArgs {
    /// The sandbox: name, id or id prefix
    pub name: String,
    /// Only denials after this position (the previous answer's `next`) [default: 0, all kept]
    pub after: Option<u64>,
}

fn parse_mode(mode: &str) -> Result<EgressMode, ToolError> {
    mode.parse::<banger_core::egress::EgressMode>().map(Into::into).map_err(|e| ToolError::Invalid(e.to_string()))
}

#[tool_router(router = egress_router, vis = "pub(super)")]
impl Banger {
    /// Show a sandbox's network egress policy, whether it is in force, and the addresses
    /// allowed names resolved to.
    #[tool(annotations(read_only_hint = true))]
    async fn network_policy_show(&self, Parameters(a): Parameters<NameArgs>) -> CallToolResult {
        let line = Line::banger(&["vm", "network", &a.name, "show", "--json"]).text();
        let result = async {
            let view: EgressView = self.api().await?.get(&format!("/v1/vms/{}/network", segment(&a.name))).await?;
            Ok(serde_json::to_value(view).map_err(anyhow::Error::from)?)
        }
        .await;
        reply(line, result)
    }

    /// Change a sandbox's network egress policy; on a running sandbox it is in force at once
    /// (no restart).
    #[tool]
    async fn network_policy_set(&self, Parameters(a): Parameters<PolicySetArgs>) -> CallToolResult {
        let mut words = vec!["vm".to_owned(), "network".into(), a.name.clone(), "set".into()];
        if let Some(mode) = &a.mode {
            words.extend(["--mode".into(), mode.clone()]);
        }
        for (flag, list) in [("--allow-host", &a.allow), ("--deny-host", &a.deny)] {
            for host in list.iter().flatten() {
                words.extend([flag.to_owned(), host.clone()]);
            }
        }
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        let line = Line::banger(&refs).text();
        let result = async {
            let mode = a.mode.as_deref().map(parse_mode).transpose()?;
            let req = SetEgressRequest { mode, allow: a.allow, deny: a.deny };
            let path = format!("/v1/vms/{}/network", segment(&a.name));
            let view: EgressView = self.api().await?.call(hyper::Method::PUT, &path, Some(&req)).await?;
            Ok(serde_json::to_value(view).map_err(anyhow::Error::from)?)
        }
        .await;
        reply(line, result)
    }

    /// A sandbox's recent network denials (refused names and connections): time, protocol,
    /// destination, name, the rule that decided and what was done.
    #[tool(annotations(read_only_hint = true))]
    async fn network_denials(&self, Parameters(a): Parameters<DenialsArgs>) -> CallToolResult {
        let line = Line::banger(&["vm", "network", &a.name, "log", "--json"]).text();
        let result = async {
            let path = format!("/v1/vms/{}/network/log?after={}", segment(&a.name), a.after.unwrap_or(0));
            let log: EgressLog = self.api().await?.get(&path).await?;
            Ok(json!({ "denials": log.denials, "suppressed": log.suppressed, "next": log.next }))
        }
        .await;
        reply(line, result)
    }
}
