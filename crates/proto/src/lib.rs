//! Wire types of the daemon's HTTP/JSON API (`/v1/...` on a unix socket). The daemon serves
//! them and the CLI sends them; the OpenAPI document is generated from these definitions.
//!
//! Every error answer has the body [`ApiError`] and a 4xx/5xx status. The agent channel's wire
//! format is in [`agent`].

pub mod agent;
#[cfg(feature = "api")]
mod api;
pub mod fs;
#[cfg(feature = "api")]
pub use api::*;
#[cfg(feature = "api")]
mod session_api;
#[cfg(feature = "api")]
pub use session_api::*;
#[cfg(feature = "api")]
pub mod workspace;
