//! Who the guest DNS server answers, and how much: with [`Clients::Guests`] only the addresses
//! of running guests; each client within a query rate (a token bucket) and a cap on its
//! forwarded questions in flight, so that one guest cannot use every upstream slot or starve
//! the others. What is refused gets no answer at all: a DNS server must not become a reflector.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Whom the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    /// Only the addresses given to [`Gate::set_guests`] (the running guests).
    Guests,
    /// Any source (tests and tools; the daemon never uses it).
    Any,
}

/// Per-client limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Questions per second a client may ask on average.
    pub rate: u32,
    /// Questions a client may ask at once after a quiet spell.
    pub burst: u32,
    /// Forwarded questions of one client in flight at once.
    pub forwards_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { rate: 100, burst: 200, forwards_in_flight: 16 }
    }
}

/// Clients tracked at once under [`Clients::Any`]; past this, idle ones are forgotten and new
/// ones refused until some are.
const MAX_CLIENTS: usize = 4096;

#[derive(Debug)]
struct Client {
    tokens: f64,
    last: Instant,
    in_flight: usize,
}

#[derive(Debug, Default)]
struct State {
    guests: BTreeSet<IpAddr>,
    clients: HashMap<IpAddr, Client>,
}

/// The admission check of the DNS server. See the module doc.
#[derive(Debug)]
pub struct Gate {
    policy: Clients,
    limits: Limits,
    state: Mutex<State>,
}

/// A forwarded question's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct ForwardSlot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        if let Some(c) = self.gate.lock().clients.get_mut(&self.ip) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}

impl Gate {
    /// A gate with `policy` and `limits`, knowing no guest yet.
    pub fn new(policy: Clients, limits: Limits) -> Self {
        Self { policy, limits, state: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The critical sections cannot panic; recover the data if one ever did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the set of guest addresses; clients that are no longer guests are forgotten.
    pub fn set_guests(&self, guests: BTreeSet<IpAddr>) {
        let mut state = self.lock();
        if self.policy == Clients::Guests {
            state.clients.retain(|ip, c| guests.contains(ip) || c.in_flight > 0);
        }
        state.guests = guests;
    }

    /// Whether a question from `ip` arriving `now` is answered: the client is allowed and has a
    /// token left.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let mut state = self.lock();
        if self.policy == Clients::Guests && !state.guests.contains(&ip) {
            return false;
        }
        if !state.clients.contains_key(&ip) && state.clients.len() >= MAX_CLIENTS {
            state.clients.retain(|_, c| c.in_flight > 0);
            if state.clients.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let burst = f64::from(self.limits.burst.max(1));
        let client = state.clients.entry(ip).or_insert(Client { tokens: burst, last: now, in_flight: 0 });
        let elapsed = now.saturating_duration_since(client.last).as_secs_f64();
        client.tokens = (client.tokens + elapsed * f64::from(self.limits.rate)).min(burst);
        client.last = now;
        if client.tokens < 1.0 {
            return false;
        }
        client.tokens -= 1.0;
        true
    }

    /// A forward slot for `ip`, or `None` when it has [`Limits::forwards_in_flight`] already.
    pub fn forward_slot(self: &Arc<Self>, ip: IpAddr) -> Option<ForwardSlot> {
        let mut state = self.lock();
        let client = state.clients.get_mut(&ip)?;
        if client.in_flight >= self.limits.forwards_in_flight {
            return None;
        }
        client.in_flight += 1;
        Some(ForwardSlot { gate: Arc::clone(self), ip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(172, 30, 0, last))
    }

    #[test]
    fn only_guests_are_admitted_under_the_guest_policy() {
        let gate = Gate::new(Clients::Guests, Limits::default());
        let now = Instant::now();
        assert!(!gate.admit(ip(2), now), "nobody is a guest yet");
        gate.set_guests([ip(2)].into());
        assert!(gate.admit(ip(2), now));
        assert!(!gate.admit(ip(3), now), "another address of the subnet");
        assert!(!gate.admit(IpAddr::V4(Ipv4Addr::LOCALHOST), now));
        gate.set_guests(BTreeSet::new());
        assert!(!gate.admit(ip(2), now), "a stopped guest");
    }

    #[test]
    fn the_rate_is_per_client_and_refills_over_time() {
        let gate = Gate::new(Clients::Any, Limits { rate: 10, burst: 5, forwards_in_flight: 2 });
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(gate.admit(ip(2), t0));
        }
        assert!(!gate.admit(ip(2), t0), "burst spent");
        assert!(gate.admit(ip(3), t0), "another client is not affected");
        assert!(!gate.admit(ip(2), t0 + Duration::from_millis(50)), "half a token");
        assert!(gate.admit(ip(2), t0 + Duration::from_millis(120)), "refilled");
    }

    #[test]
    fn forwards_in_flight_are_capped_per_client() {
        let gate = Arc::new(Gate::new(Clients::Any, Limits { rate: 10, burst: 10, forwards_in_flight: 2 }));
        let now = Instant::now();
        assert!(gate.forward_slot(ip(2)).is_none(), "a client must be admitted first");
        assert!(gate.admit(ip(2), now) && gate.admit(ip(3), now));
        let a = gate.forward_slot(ip(2)).expect("first");
        let _b = gate.forward_slot(ip(2)).expect("second");
        assert!(gate.forward_slot(ip(2)).is_none(), "at the cap");
        assert!(gate.forward_slot(ip(3)).is_some(), "others keep their slots");
        drop(a);
        assert!(gate.forward_slot(ip(2)).is_some(), "a slot given back");
    }
}
