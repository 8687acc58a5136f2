//! The DNS server's hook into egress policies: before a guest's question for a foreign name is
//! forwarded, the policy of the guest that asked decides (a refused name is answered REFUSED at
//! once), and the IPv4 addresses of an answer are opened for that guest (for the record's TTL,
//! clamped) *before* the answer is sent, so the guest's connect never races its own lookup.

use std::net::{IpAddr, Ipv4Addr};

use hickory_server::proto::op::Message;
use hickory_server::proto::rr::RData;

/// Shortest time an answered address stays open, in seconds (answers with a 0 s TTL would
/// otherwise close before the guest connects).
pub const MIN_OPEN_SECS: u32 = 30;

/// Longest time an answered address stays open, in seconds (a long TTL must not keep an address
/// open long after the name moved).
pub const MAX_OPEN_SECS: u32 = 3600;

/// What decides a guest's names (implemented by the network service).
#[async_trait::async_trait]
pub trait EgressGate: Send + Sync {
    /// Whether `client` may resolve `name`; a refusal is recorded by the gate.
    fn allows_name(&self, client: IpAddr, name: &str) -> bool;
    /// Opens the `(address, ttl)` pairs of an answer for `name` to `client`; returns when the
    /// addresses are open (or failed to open, which is logged: the guest's connect is refused).
    async fn opened(&self, client: IpAddr, name: &str, answers: Vec<(Ipv4Addr, u32)>);
}

/// The A records of an upstream answer, with their TTLs clamped to
/// [`MIN_OPEN_SECS`]..=[`MAX_OPEN_SECS`].
pub fn answered_addresses(answer: &Message) -> Vec<(Ipv4Addr, u32)> {
    answer
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some((a.0, record.ttl.clamp(MIN_OPEN_SECS, MAX_OPEN_SECS))),
            _ => None,
        })
        .collect()
}
