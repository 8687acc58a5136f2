//! One module per verb group; each parses its arguments and calls the daemon.

pub mod bench;
pub mod config;
pub mod cp;
pub mod daemon;
pub mod doctor;
pub mod forward;
pub mod image;
pub mod kernel;
pub mod network;
pub mod op;
pub mod session;
pub mod snapshot;
pub mod ssh;
pub mod vm;
pub mod web;
pub mod workspace;

/// Parses a size for clap: MiB, or a number with a unit (`512M`, `2G`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    banger_core::size::parse_mib(text).map_err(|e| e.to_string())
}

/// A path segment for a user-given reference (a name or id), percent-encoding anything that is
/// not unreserved so that no input can change the request's path.
pub fn segment(reference: &str) -> String {
    reference
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `--json` and `--catalog` of the artifact list commands.
#[derive(Debug, clap::Args)]
pub struct CatalogListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Also list what the catalog offers.
    #[arg(long)]
    pub catalog: bool,
}
