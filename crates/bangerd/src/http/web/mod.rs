//! The web UI: served by the daemon on `web_listen` (TCP, loopback unless `web_allow_remote`),
//! over the same services as the API. Pages are server-rendered shells filled by a small script
//! (`web/src/app.js`, embedded with the bundled browser libraries); data comes from
//!
//! - `/api/v1/...`: the API itself, run in-process with the logged-in caller's rights;
//! - `/events` and `/events/vms/{vm}`: server-sent events, one stream per page holding the
//!   whole fleet (or one VM), pushed when it changes ([`live`]);
//! - `/ws/vms/{vm}/terminal`: a websocket to a pty exec ([`live`]).
//!
//! Every request first passes [`auth`]'s checks: Host, session cookie, Origin and CSRF.

pub mod auth;
mod live;
mod pages;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use banger_proto::{ApiError, WebLogin};
use tower::ServiceExt as _;

use self::auth::{Logins, Session};
use super::{ApiFailure, ApiResult, CallerOf, Peer, Shared};
use crate::daemon::Daemon;

/// Where the web UI stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebStatus {
    /// `web = false`.
    Off,
    /// Not bound yet.
    Starting,
    /// Serving on this address.
    Serving(SocketAddr),
    /// Could not be served; why.
    Failed(String),
}

/// The web UI's state: its logins and whether it is serving.
#[derive(Debug)]
pub struct Web {
    /// Login tokens and sessions.
    pub logins: Logins,
    status: Mutex<WebStatus>,
}

impl Web {
    /// The web UI's state for a daemon with `config`.
    pub fn new(config: &banger_core::Config) -> Self {
        let status = if config.web { WebStatus::Starting } else { WebStatus::Off };
        Self { logins: Logins::default(), status: Mutex::new(status) }
    }

    /// Where it stands now.
    pub fn status(&self) -> WebStatus {
        self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_status(&self, status: WebStatus) {
        *self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = status;
    }
}

/// What the web server's handlers reach.
struct Ctx {
    daemon: Arc<Daemon>,
    /// The API's router, run in-process for `/api/...`.
    api: Router,
    /// The address bound.
    addr: SocketAddr,
    /// `Host` values accepted.
    hosts: Vec<String>,
}

type WebState = State<Arc<Ctx>>;

/// Binds `web_listen` and serves the UI in a task of its own (ended with the runtime, or by
/// aborting the handle). A bind failure is logged and shown by `banger web` and `doctor`; the
/// API goes on without the UI.
pub async fn spawn(daemon: Arc<Daemon>) -> Option<tokio::task::JoinHandle<()>> {
    if daemon.web.status() == WebStatus::Off {
        return None;
    }
    let bound = match daemon.fleet.config.web_addr() {
        Ok(addr) => tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}")),
        Err(why) => Err(why),
    };
    let listener = match bound.and_then(|l| l.local_addr().map(|a| (l, a)).map_err(|e| e.to_string())) {
        Ok(pair) => pair,
        Err(why) => {
            tracing::error!(%why, "the web UI is not served; fix web_listen in config.toml or set web = false");
            daemon.web.set_status(WebStatus::Failed(why));
            return None;
        }
    };
    let (listener, addr) = listener;
    daemon.web.set_status(WebStatus::Serving(addr));
    tracing::info!(%addr, "serving the web UI");
    let ctx = Arc::new(Ctx { api: super::router(daemon.clone()), daemon, addr, hosts: auth::allowed_hosts(addr) });
    Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(ctx)).await {
            tracing::error!(error = %e, "the web UI stopped");
        }
    }))
}

/// The UI's routes behind the checks of [`guard`].
fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/assets/{file}", get(pages::asset))
        .route("/", get(pages::dashboard))
        .route("/create", get(pages::create))
        .route("/vms/{vm}", get(pages::vm))
        .route("/vms/{vm}/terminal", get(pages::terminal))
        .route("/images", get(pages::images))
        .route("/kernels", get(pages::kernels))
        .route("/snapshots", get(pages::snapshots))
        .route("/doctor", get(pages::doctor))
        .route("/events", get(live::fleet_events))
        .route("/events/vms/{vm}", get(live::vm_events))
        .route("/ws/vms/{vm}/terminal", get(live::terminal))
        .route("/api/{*rest}", any(proxy))
        .fallback(|| async { pages::message(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), guard))
        .with_state(ctx)
}

/// Headers every answer carries: no framing, no sniffing, no referrer (a login link holds a
/// token), scripts and connections to this origin only.
fn harden(response: &mut Response) {
    let h = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
}

/// Runs [`auth`]'s checks (see its module docs), then the route with the [`Session`] attached.
async fn guard(State(ctx): WebState, mut req: Request, next: Next) -> Response {
    let mut response = match check(&ctx, &mut req) {
        Ok(()) => next.run(req).await,
        Err((status, why)) => {
            tracing::debug!(status = status.as_u16(), %why, path = %req.uri().path(), "web request refused");
            pages::message(status, &why)
        }
    };
    harden(&mut response);
    response
}

fn check(ctx: &Ctx, req: &mut Request) -> Result<(), (StatusCode, String)> {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
    if !ctx.hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        return Err((StatusCode::FORBIDDEN, format!("Host {host:?} is not this web UI's; open http://{}/", ctx.addr)));
    }
    let path = req.uri().path();
    if path == "/login" || path.starts_with("/assets/") {
        return Ok(());
    }
    let session_id = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(auth::session_cookie)
        .map(str::to_owned);
    let Some(session) = session_id.as_deref().and_then(|id| ctx.daemon.web.logins.session(id)) else {
        return Err((StatusCode::UNAUTHORIZED, "not logged in; run `banger web` and open the link it prints".into()));
    };
    let websocket = req.headers().get(header::UPGRADE).is_some();
    if websocket || !matches!(*req.method(), Method::GET | Method::HEAD) {
        let origin = req.headers().get(header::ORIGIN).and_then(|h| h.to_str().ok()).unwrap_or_default();
        if !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
            return Err((StatusCode::FORBIDDEN, format!("cross-origin request refused (Origin {origin:?})")));
        }
        let header_token = req.headers().get(auth::CSRF_HEADER).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let query_token =
            req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("csrf=")).map(str::to_owned));
        let given = if websocket { query_token } else { header_token };
        if !given.is_some_and(|t| auth::same_secret(&t, &session.csrf)) {
            return Err((StatusCode::FORBIDDEN, "missing or wrong CSRF token; reload the page".into()));
        }
    }
    req.extensions_mut().insert(SessionId(session_id.unwrap_or_default()));
    req.extensions_mut().insert(session);
    Ok(())
}

/// The session cookie's value, for logout.
#[derive(Debug, Clone)]
struct SessionId(String);

#[derive(Debug, serde::Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// `GET /login?token=T`: spends a one-time token, sets the session cookie and goes to the
/// dashboard (so the token leaves the address bar).
async fn login(State(ctx): WebState, q: Result<Query<LoginQuery>, QueryRejection>) -> Response {
    let token = q.ok().and_then(|Query(q)| q.token).unwrap_or_default();
    let Some((id, _)) = ctx.daemon.web.logins.redeem(&token) else {
        return pages::message(
            StatusCode::UNAUTHORIZED,
            "this login link is unknown, used or expired; run `banger web` for a new one",
        );
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let h = response.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/"));
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(&id)) {
        h.insert(header::SET_COOKIE, v);
    }
    response
}

/// `POST /logout`: ends the session.
async fn logout(State(ctx): WebState, axum::Extension(id): axum::Extension<SessionId>) -> Response {
    ctx.daemon.web.logins.end(&id.0);
    let mut response = pages::message(StatusCode::OK, "logged out");
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `/api/{rest}`: the API's `/v1/...` run in-process as the session's caller. Upgrades (exec,
/// attach) are not relayed: the terminal has its own websocket.
async fn proxy(State(ctx): WebState, axum::Extension(session): axum::Extension<Session>, req: Request) -> Response {
    if req.headers().contains_key(header::UPGRADE) {
        return ApiFailure::invalid("upgrades are not relayed to the API; use /ws/vms/{vm}/terminal").into_response();
    }
    let (mut parts, body) = req.into_parts();
    let rest = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).strip_prefix("/api").unwrap_or("/");
    let Ok(uri) = rest.parse() else {
        return ApiFailure::invalid("bad request path").into_response();
    };
    parts.uri = uri;
    for name in [header::COOKIE, header::ORIGIN, header::HOST] {
        parts.headers.remove(name);
    }
    parts.extensions = axum::http::Extensions::new();
    parts.extensions.insert(axum::extract::ConnectInfo(Peer(session.caller)));
    match ctx.api.clone().oneshot(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Gives the caller a one-time link that logs a browser into the web UI with the caller's
/// rights.
#[utoipa::path(post, path = "/v1/web/login",
    responses((status = 200, body = WebLogin),
        (status = 409, body = ApiError, description = "the web UI is off or could not be served"),
        (status = 500, body = ApiError)))]
pub(super) async fn login_link(State(d): Shared, CallerOf(caller): CallerOf) -> ApiResult<WebLogin> {
    let addr = match d.web.status() {
        WebStatus::Serving(addr) => addr,
        WebStatus::Off => {
            return Err(ApiFailure::conflict("the web UI is off; set `web = true` in config.toml and restart bangerd"))
        }
        WebStatus::Starting => return Err(ApiFailure::conflict("the web UI is starting; try again")),
        WebStatus::Failed(why) => {
            return Err(ApiFailure::conflict(format!(
                "the web UI is not served: {why}; fix web_listen in config.toml and restart bangerd"
            )))
        }
    };
    let token = d.web.logins.issue(caller);
    let base_url = format!("http://{addr}/");
    Ok(Json(WebLogin {
        url: format!("{base_url}login?token={token}"),
        base_url,
        expires_in_secs: auth::LOGIN_TTL.as_secs(),
    }))
}

/// The `web` line of `banger doctor`: off, served on loopback, served beyond it (a warning:
/// anyone who reaches the address may try to log in, over plain HTTP), or not served.
pub(super) fn doctor_check(d: &Daemon) -> banger_proto::DoctorCheck {
    use banger_proto::DoctorStatus;
    let (status, detail, fix) = match d.web.status() {
        WebStatus::Off => (DoctorStatus::Ok, "off (web = false)".to_owned(), None),
        WebStatus::Starting => (DoctorStatus::Ok, "starting".to_owned(), None),
        WebStatus::Serving(addr) if addr.ip().is_loopback() => {
            (DoctorStatus::Ok, format!("serving http://{addr}/ on loopback only; `banger web` logs a browser in"), None)
        }
        WebStatus::Serving(addr) => (
            DoctorStatus::Warn,
            format!(
                "serving http://{addr}/ beyond loopback (web_allow_remote = true): anyone who reaches it may try to \
                 log in, and the traffic is plain HTTP"
            ),
            Some(
                "set web_listen = \"127.0.0.1:7777\" and reach it through an SSH tunnel (ssh -L 7777:127.0.0.1:7777)"
                    .to_owned(),
            ),
        ),
        WebStatus::Failed(why) => (
            DoctorStatus::Warn,
            format!("not served: {why}"),
            Some("pick a free web_listen in config.toml, or set web = false; then restart bangerd".to_owned()),
        ),
    };
    banger_proto::DoctorCheck { name: "web".to_owned(), status, detail, fix }
}
