//! The web UI's refusals, against a real daemon serving it on a free loopback port: no or a
//! bad login → 401, a foreign Host → 403, a cross-origin or CSRF-less state change → 403; and
//! what a logged-in browser gets (the API in-process, one event stream for the fleet).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::Env;

/// An answer: status, lower-cased header lines, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends one request to `addr` with `Host: host` and the extra header lines `extra`.
fn send(addr: &str, host: &str, method: &str, path: &str, extra: &[String], body: &str) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect to the web UI");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer { status, headers, body: body.to_owned() }
}

/// A daemon whose web UI listens on a free port; its address and a fresh login link.
fn serving() -> (Env, String, String) {
    let env = Env::new();
    std::fs::create_dir_all(&env.state).expect("state dir");
    std::fs::write(env.state.join("config.toml"), "web_listen = \"127.0.0.1:0\"\n").expect("config");
    let login = env.banger(&["web", "--json"]).ok().json();
    let url = login["url"].as_str().expect("url").to_owned();
    let addr = url.strip_prefix("http://").and_then(|r| r.split('/').next()).expect("address").to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{url}");
    (env, addr, url)
}

/// Logs in with `url`'s token; the session cookie and the page's CSRF token.
fn log_in(addr: &str, url: &str) -> (String, String) {
    let path = &url[url.find("/login").expect("login path")..];
    let a = send(addr, addr, "GET", path, &[], "");
    assert_eq!(a.status, 303, "{}", a.body);
    let cookie = a.header("set-cookie").expect("a session cookie").to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let cookie = cookie.split(';').next().expect("name=value").to_owned();
    let page = send(addr, addr, "GET", "/", &[format!("Cookie: {cookie}")], "");
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = page
        .body
        .split("name=\"csrf\" content=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the page carries its CSRF token")
        .to_owned();
    (cookie, csrf)
}

#[test]
fn web_ui_refuses_strangers_and_forgeries() {
    let (_env, addr, url) = serving();
    // Not logged in, or with a token that is not one.
    assert_eq!(send(&addr, &addr, "GET", "/", &[], "").status, 401);
    assert_eq!(send(&addr, &addr, "GET", "/api/v1/vms", &[], "").status, 401);
    assert_eq!(send(&addr, &addr, "GET", "/login?token=00ff", &[], "").status, 401);
    assert_eq!(send(&addr, &addr, "GET", "/", &["Cookie: banger_session=forged".into()], "").status, 401);

    let (cookie, csrf) = log_in(&addr, &url);
    let path = &url[url.find("/login").expect("login path")..];
    assert_eq!(send(&addr, &addr, "GET", path, &[], "").status, 401, "a login link works once");
    let c = format!("Cookie: {cookie}");
    let origin = format!("Origin: http://{addr}");
    let token = format!("x-banger-csrf: {csrf}");

    // DNS rebinding: the right cookie, a foreign Host.
    let port = addr.rsplit(':').next().expect("port");
    let rebound = send(&addr, &format!("evil.example:{port}"), "GET", "/api/v1/vms", std::slice::from_ref(&c), "");
    assert_eq!(rebound.status, 403, "{}", rebound.body);
    assert_eq!(send(&addr, &format!("localhost:{port}"), "GET", "/", std::slice::from_ref(&c), "").status, 200);

    // State changes: another origin, no origin, no or a wrong CSRF token.
    let body = r#"{"name":"web-x"}"#;
    let post = |extra: &[String]| send(&addr, &addr, "POST", "/api/v1/vms", extra, body);
    for (why, extra) in [
        ("cross-origin", vec![c.clone(), "Origin: http://evil.example".into(), token.clone()]),
        ("no origin", vec![c.clone(), token.clone()]),
        ("no csrf token", vec![c.clone(), origin.clone()]),
        ("wrong csrf token", vec![c.clone(), origin.clone(), "x-banger-csrf: 1234".into()]),
    ] {
        let a = post(&extra);
        assert_eq!(a.status, 403, "{why}: {}", a.body);
        assert!(a.header("access-control-allow-origin").is_none(), "{why}: no CORS");
    }
    let a = send(&addr, &addr, "GET", "/ws/vms/web-x/terminal", &[c.clone(), "Upgrade: websocket".into()], "");
    assert_eq!(a.status, 403, "a websocket without Origin and CSRF token: {}", a.body);

    // The same request, done right, reaches the API as the logged-in user: nothing was made by
    // the refused ones.
    let listed = send(&addr, &addr, "GET", "/api/v1/vms", std::slice::from_ref(&c), "");
    assert_eq!((listed.status, listed.body.contains("web-x")), (200, false), "{}", listed.body);
    let bad = post(&[c.clone(), origin.clone(), token.clone()]);
    assert_ne!(bad.status, 403, "{}", bad.body);
    assert!(bad.header("content-security-policy").is_some_and(|v| v.contains("frame-ancestors 'none'")));

    // Log out: the cookie stops working.
    assert_eq!(send(&addr, &addr, "POST", "/logout", &[c.clone(), origin, token], "").status, 200);
    assert_eq!(send(&addr, &addr, "GET", "/", &[c], "").status, 401);
}

#[test]
fn the_dashboard_gets_the_fleet_in_one_event_stream() {
    let (env, addr, url) = serving();
    let (cookie, _) = log_in(&addr, &url);
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(s, "GET /events HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n").expect("write");
    let mut reader = BufReader::new(s);
    // Each `fleet` event's VM names, in order.
    let mut next_fleet = || -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut event, mut line) = (String::new(), String::new());
        while Instant::now() < deadline {
            line.clear();
            assert_ne!(reader.read_line(&mut line).expect("read the stream"), 0, "the stream ended");
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_owned();
            } else if let Some(data) = line.strip_prefix("data:").filter(|_| event == "fleet") {
                let data: serde_json::Value = serde_json::from_str(data.trim()).expect("json");
                assert!(data["operations"].is_array());
                return data["vms"]
                    .as_array()
                    .expect("vms")
                    .iter()
                    .filter_map(|v| v["name"].as_str().map(str::to_owned))
                    .collect();
            }
        }
        panic!("no fleet event within 20 s");
    };
    assert!(next_fleet().is_empty(), "the first event is sent at once");
    env.banger(&["vm", "create", "w1"]).ok();
    // Sent again on the change, on the same stream: no reload, no request per VM.
    let deadline = Instant::now() + Duration::from_secs(20);
    while next_fleet() != ["w1"] {
        assert!(Instant::now() < deadline, "w1 never appeared in the stream");
    }
}

#[test]
fn web_settings_are_checked() {
    // Off: `banger web` says so and how to turn it on.
    let env = Env::new();
    std::fs::create_dir_all(&env.state).expect("state dir");
    std::fs::write(env.state.join("config.toml"), "web = false\n").expect("config");
    env.banger(&["web"]).fails(1, "web UI is off");
    let doctor = env.banger(&["doctor", "--json"]).json();
    let web = doctor["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "web").cloned();
    assert_eq!(web.expect("a web check")["detail"], "off (web = false)");
    drop(env);

    // Beyond loopback only when asked for; doctor then warns.
    let env = Env::new();
    std::fs::create_dir_all(&env.state).expect("state dir");
    std::fs::write(env.state.join("config.toml"), "web_listen = \"0.0.0.0:0\"\n").expect("config");
    env.banger(&["web"]).fails(1, "web_allow_remote");
    std::fs::write(env.state.join("config.toml"), "web_listen = \"0.0.0.0:0\"\nweb_allow_remote = true\n")
        .expect("config");
    let doctor = env.banger(&["doctor", "--json"]).json();
    let web = doctor["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "web").cloned().expect("web");
    assert_eq!(web["status"], "warn", "{web}");
    assert!(web["detail"].as_str().is_some_and(|d| d.contains("beyond loopback")), "{web}");
}
