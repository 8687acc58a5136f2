//! `banger vm ssh` and `banger ssh-config`: the system `ssh` with the installation key and the
//! pinned host keys, and an ssh_config include listing every VM. Also the caller's git identity,
//! which `vm create`, `vm start` and `vm run` send so that the guest's `~/.gitconfig` has it.

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use banger_proto::{GitIdentity, SshConfig, SshInfo};
use clap::Args;

use super::segment;
use crate::client::Client;
use crate::output;

#[derive(Debug, Args)]
pub struct SshArgs {
    /// Name, id or id prefix.
    vm: String,
    /// A command to run instead of a login shell. Like `ssh`, its words are joined with spaces
    /// and read by the guest's shell, so quote what the shell must not split.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Print JSON instead of ssh_config text.
    #[arg(long)]
    json: bool,
}

/// One `git config --get KEY` in the current directory; `None` when git or the key is missing.
fn git_config(key: &str) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["config", "--get", key])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let value = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !value.is_empty()).then_some(value)
}

/// The caller's git identity (`user.name`, `user.email` as git sees them in the current
/// directory), or `None` when neither is set.
pub fn git_identity() -> Option<GitIdentity> {
    let git = GitIdentity { name: git_config("user.name"), email: git_config("user.email") };
    (git.name.is_some() || git.email.is_some()).then_some(git)
}

/// A value for an ssh_config line or an `ssh -o` option, quoted when it holds blanks.
fn config_value(value: &str) -> String {
    if value.chars().any(char::is_whitespace) {
        format!("\"{value}\"")
    } else {
        value.to_owned()
    }
}

/// The arguments after `ssh` that reach `info` with the installation key, the pinned host key
/// and nothing from the user's agent or other keys, then run `command` (if any).
pub fn ssh_argv(info: &SshInfo, command: &[String]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        "-i".into(),
        info.identity_file.clone().into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", config_value(&info.known_hosts_file)).into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        format!("HostKeyAlias={}", info.host_key_alias).into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-p".into(),
        info.port.to_string().into(),
        "-l".into(),
        info.user.clone().into(),
        // Whatever follows is the destination and the command, never options.
        "--".into(),
        info.host.clone().into(),
    ];
    argv.extend(command.iter().map(OsString::from));
    argv
}

/// ssh_config text with one `Host NAME.vm` block per VM.
pub fn render_ssh_config(config: &SshConfig) -> String {
    let mut out = String::from(
        "# banger VMs, written by `banger ssh-config`. Use them from ~/.ssh/config with a line\n\
         #   Include ~/.ssh/banger.conf\n\
         # at its top, after `banger ssh-config > ~/.ssh/banger.conf`; then `ssh NAME.vm`.\n",
    );
    for host in &config.hosts {
        out.push_str(&format!("\nHost {}\n", host.alias));
        match &host.hostname {
            Some(address) => out.push_str(&format!("    HostName {address}\n")),
            None => out.push_str("    # no network address (--no-network): reach it with `banger vm exec`\n"),
        }
        for (key, value) in [
            ("User", host.user.clone()),
            ("Port", host.port.to_string()),
            ("IdentityFile", config_value(&config.identity_file)),
            ("IdentitiesOnly", "yes".into()),
            ("UserKnownHostsFile", config_value(&config.known_hosts_file)),
            ("StrictHostKeyChecking", "yes".into()),
            ("HostKeyAlias", host.alias.clone()),
        ] {
            out.push_str(&format!("    {key} {value}\n"));
        }
    }
    out
}

/// The `ssh` program on `PATH`.
fn find_ssh() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("ssh")).find(|p| p.is_file())
}

const NO_SSH: &str = "ssh is not installed; install openssh-client (apt-get install openssh-client)";

/// `banger vm ssh`: becomes `ssh` (exec), so its exit code and terminal pass straight through.
pub async fn vm_ssh(client: &Client, args: SshArgs) -> anyhow::Result<ExitCode> {
    let info: SshInfo = client.get(&format!("/v1/vms/{}/ssh", segment(&args.vm))).await?;
    let Some(ssh) = find_ssh() else { bail!(NO_SSH) };
    let error = std::process::Command::new(&ssh).args(ssh_argv(&info, &args.command)).exec();
    if error.kind() == std::io::ErrorKind::NotFound {
        bail!(NO_SSH);
    }
    bail!("cannot run {}: {error}", ssh.display())
}

/// `banger ssh-config`.
pub async fn ssh_config(client: &Client, args: SshConfigArgs) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    let config: SshConfig = client.get("/v1/ssh/config").await?;
    if args.json {
        output::json(&config)?;
    } else {
        print!("{}", render_ssh_config(&config));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use banger_proto::SshHost;

    use super::*;

    fn info() -> SshInfo {
        SshInfo {
            user: "root".into(),
            host: "172.16.0.2".into(),
            port: 22,
            identity_file: "/var/lib/banger/ssh/id_ed25519".into(),
            known_hosts_file: "/var/lib/banger/ssh/known_hosts".into(),
            host_key_alias: "web.vm".into(),
        }
    }

    #[test]
    fn ssh_argv_pins_the_host_key_and_keeps_the_command_after_the_destination() {
        let argv = ssh_argv(&info(), &["ls".into(), "-la".into()]);
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap_or("?")).collect();
        assert_eq!(
            argv,
            [
                "-i",
                "/var/lib/banger/ssh/id_ed25519",
                "-o",
                "UserKnownHostsFile=/var/lib/banger/ssh/known_hosts",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "HostKeyAlias=web.vm",
                "-o",
                "IdentitiesOnly=yes",
                "-p",
                "22",
                "-l",
                "root",
                "--",
                "172.16.0.2",
                "ls",
                "-la"
            ]
        );
        let spaced = SshInfo { known_hosts_file: "/a b/known_hosts".into(), ..info() };
        let argv = ssh_argv(&spaced, &[]);
        assert_eq!(argv[3], "UserKnownHostsFile=\"/a b/known_hosts\"");
        assert_eq!(argv.last().map(|a| a.as_os_str()), Some(std::ffi::OsStr::new("172.16.0.2")));
    }

    #[test]
    fn ssh_config_renders_a_block_per_vm() {
        let host = |name: &str, ip: Option<&str>| SshHost {
            name: name.into(),
            alias: format!("{name}.vm"),
            hostname: ip.map(Into::into),
            user: "root".into(),
            port: 22,
            running: ip.is_some(),
        };
        let config = SshConfig {
            identity_file: "/var/lib/banger/ssh/id_ed25519".into(),
            known_hosts_file: "/var/lib/banger/ssh/known_hosts".into(),
            hosts: vec![host("web", Some("172.16.0.2")), host("db", None)],
        };
        insta::assert_snapshot!(render_ssh_config(&config));
        let empty = SshConfig { hosts: Vec::new(), ..config };
        assert!(!render_ssh_config(&empty).contains("Host "));
    }
}
