//! `banger web`: prints a one-time link that logs a browser into the daemon's web UI
//! (`POST /v1/web/login`); `--open` hands it to the desktop's browser.

use std::process::ExitCode;

use banger_proto::WebLogin;
use clap::Args;

use crate::client::Client;
use crate::output;

#[derive(Debug, Args)]
pub struct WebArgs {
    /// Open the link in the desktop's browser (`xdg-open`) instead of only printing it.
    #[arg(long)]
    open: bool,
    /// Print JSON (`url`, `base_url`, `expires_in_secs`).
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: WebArgs) -> anyhow::Result<ExitCode> {
    client.ensure_daemon().await?;
    let login: WebLogin = client.call(hyper::Method::POST, "/v1/web/login", None::<&()>).await?;
    if args.json {
        output::json(&login)?;
    } else {
        println!("{}", login.url);
        eprintln!(
            "open this link to log in (once, within {} minutes); the UI is at {}",
            login.expires_in_secs / 60,
            login.base_url
        );
    }
    if args.open {
        let opened = std::process::Command::new("xdg-open")
            .arg(&login.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        match opened {
            Ok(s) if s.success() => {}
            Ok(s) => anyhow::bail!("xdg-open failed ({s}); open the link above by hand"),
            Err(e) => anyhow::bail!("cannot run xdg-open ({e}); open the link above by hand"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
