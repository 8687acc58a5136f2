//! The web UI's login, handed out over the API socket: `banger web` asks for it, so only a
//! caller of the API can log a browser in.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A one-time login link to the web UI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WebLogin {
    /// The link to open: the web UI's address with a one-time token; it logs one browser in.
    pub url: String,
    /// The web UI's address, without the token.
    pub base_url: String,
    /// Seconds the token stays valid if unused.
    pub expires_in_secs: u64,
}
