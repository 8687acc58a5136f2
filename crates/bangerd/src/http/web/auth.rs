//! Who may use the web UI, and the checks every request passes before any page or API call:
//!
//! 1. the `Host` header names the address the UI listens on (`127.0.0.1:PORT`, or
//!    `localhost:PORT` on loopback): a page from another site that rebinds its DNS name to us
//!    is refused (403);
//! 2. apart from `/login` and the static assets, the request carries a session cookie
//!    (`banger_session`, HttpOnly, SameSite=Strict) made from a one-time login token that only
//!    a caller of the API socket can get (`banger web`); otherwise 401;
//! 3. a state-changing request (any method but GET and HEAD, and every websocket) carries an
//!    `Origin` equal to the UI's own and the session's CSRF token (header `x-banger-csrf`, or
//!    query `csrf` on a websocket); otherwise 403. No CORS header is ever sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::services::caller::Caller;

/// How long a login token stays valid if unused.
pub const LOGIN_TTL: Duration = Duration::from_secs(300);
/// How long a browser session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// At most this many unused login tokens or live sessions are kept (the oldest go first).
const MAX_ENTRIES: usize = 64;
/// The session cookie's name.
pub const COOKIE: &str = "banger_session";
/// The header a state-changing request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-banger-csrf";

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token state-changing requests must echo.
    pub csrf: String,
    /// The API caller who asked for the login: the browser acts with their rights.
    pub caller: Caller,
    expires: Instant,
}

/// Login tokens and sessions, in memory: a daemon restart logs every browser out.
#[derive(Debug, Default)]
pub struct Logins {
    tokens: Mutex<HashMap<String, (Instant, Caller)>>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// A fresh random token: 32 bytes from the OS, hex.
pub fn random_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Drops expired entries, then the soonest to expire while there are too many.
fn trim<V>(map: &mut HashMap<String, V>, expires: impl Fn(&V) -> Instant, now: Instant) {
    map.retain(|_, v| expires(v) > now);
    while map.len() >= MAX_ENTRIES {
        let Some(oldest) = map.iter().min_by_key(|(_, v)| expires(v)).map(|(k, _)| k.clone()) else { break };
        map.remove(&oldest);
    }
}

impl Logins {
    /// A new one-time login token for `caller`.
    pub fn issue(&self, caller: Caller) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        trim(&mut tokens, |(at, _)| *at, now);
        tokens.insert(token.clone(), (now + LOGIN_TTL, caller));
        token
    }

    /// Spends a login token: a new session's id, or `None` when the token is unknown, used or
    /// expired.
    pub fn redeem(&self, token: &str) -> Option<(String, Session)> {
        let now = Instant::now();
        let (expires, caller) = self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(token)?;
        if expires <= now {
            return None;
        }
        let session = Session { csrf: random_token(), caller, expires: now + SESSION_TTL };
        let id = random_token();
        let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        trim(&mut sessions, |s| s.expires, now);
        sessions.insert(id.clone(), session.clone());
        Some((id, session))
    }

    /// The live session of id `id`.
    pub fn session(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
    }
}

/// The `Host` values a request to the UI bound at `addr` may carry: the address itself, and
/// `localhost` with its port when it is loopback.
pub fn allowed_hosts(addr: SocketAddr) -> Vec<String> {
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        hosts.push(format!("localhost:{}", addr.port()));
    }
    hosts
}

/// The session id in a `Cookie` header.
pub fn session_cookie(header: &str) -> Option<&str> {
    header.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `Set-Cookie` value that stores session `id` in the browser.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_TTL.as_secs())
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_token_logs_in_once() {
        let logins = Logins::default();
        let token = logins.issue(Caller::UNKNOWN);
        let (id, session) = logins.redeem(&token).expect("first use");
        assert!(logins.redeem(&token).is_none(), "a token is spent by its first use");
        assert!(logins.redeem("nonsense").is_none());
        assert_eq!(logins.session(&id).map(|s| s.csrf), Some(session.csrf));
        logins.end(&id);
        assert!(logins.session(&id).is_none());
    }

    #[test]
    fn tokens_and_sessions_are_bounded() {
        let logins = Logins::default();
        let tokens: Vec<String> = (0..200).map(|_| logins.issue(Caller::UNKNOWN)).collect();
        assert!(logins.tokens.lock().expect("lock").len() <= MAX_ENTRIES);
        assert!(logins.redeem(&tokens[199]).is_some(), "the newest survive");
        assert!(logins.redeem(&tokens[0]).is_none(), "the oldest went first");
    }

    #[test]
    fn hosts_cookies_and_secrets() {
        let hosts = allowed_hosts("127.0.0.1:7777".parse().expect("addr"));
        assert_eq!(hosts, ["127.0.0.1:7777", "localhost:7777"]);
        assert_eq!(allowed_hosts("192.0.2.1:80".parse().expect("addr")), ["192.0.2.1:80"]);
        assert_eq!(session_cookie("a=b; banger_session=xyz; c=d"), Some("xyz"));
        assert_eq!(session_cookie("banger_sessionx=1"), None);
        assert!(set_cookie("x").contains("HttpOnly; SameSite=Strict"));
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
        assert_eq!(random_token().len(), 64);
    }
}
