//! The pages: one HTML shell per page, filled in the browser by `web/src/app.js` from the
//! event streams and the API; and the embedded assets (the bundle `scripts/build-web` makes
//! from npm's xterm.js and uPlot, and our own script and style).

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::auth::Session;

/// The bundled browser libraries (`scripts/build-web`; checked up to date by `scripts/test`).
const VENDOR_JS: &str = include_str!("../../../../../web/dist/vendor.js");
const VENDOR_CSS: &str = include_str!("../../../../../web/dist/vendor.css");
/// Our own script and style.
const APP_JS: &str = include_str!("../../../../../web/src/app.js");
const APP_CSS: &str = include_str!("../../../../../web/src/app.css");

/// `GET /assets/{file}`.
pub(super) async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "vendor.js" => (VENDOR_JS, "text/javascript; charset=utf-8"),
        "vendor.css" => (VENDOR_CSS, "text/css; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return message(StatusCode::NOT_FOUND, "no such asset"),
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Assets change only with the binary; a restart is the only reload that matters.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300"));
    response
}

/// Escapes text for HTML content and attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page: the common frame around `page`'s (empty) main element, which `app.js` fills.
fn shell(session: &Session, page: &str, title: &str, vm: Option<&str>) -> Response {
    let vm_attr = vm.map(|v| format!(" data-vm=\"{}\"", escape(v))).unwrap_or_default();
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf\" content=\"{csrf}\"><title>{title} · banger</title>\
         <link rel=\"stylesheet\" href=\"/assets/vendor.css\"><link rel=\"stylesheet\" href=\"/assets/app.css\">\
         </head><body data-page=\"{page}\"{vm_attr}>\
         <header><a class=\"brand\" href=\"/\">banger</a><nav>\
         <a href=\"/\">Dashboard</a><a href=\"/create\">Create</a><a href=\"/images\">Images</a>\
         <a href=\"/kernels\">Kernels</a><a href=\"/snapshots\">Snapshots</a><a href=\"/doctor\">Doctor</a>\
         </nav><button id=\"logout\" type=\"button\">Log out</button></header>\
         <main id=\"main\"><h1>{title}</h1><p class=\"loading\">Loading…</p></main>\
         <div id=\"toast\" role=\"status\"></div>\
         <script src=\"/assets/vendor.js\"></script><script src=\"/assets/app.js\"></script></body></html>\n",
        csrf = escape(&session.csrf),
        title = escape(title),
        page = escape(page),
    );
    let mut response = html.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response
}

/// A plain page with a status and one message (refusals, logout).
pub(super) fn message(status: StatusCode, text: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>banger</title></head>\
         <body><h1>banger</h1><p id=\"message\">{}</p></body></html>\n",
        escape(text)
    );
    let mut response = (status, html).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response
}

type Ext = Extension<Session>;

pub(super) async fn dashboard(Extension(s): Ext) -> Response {
    shell(&s, "dashboard", "Dashboard", None)
}

pub(super) async fn create(Extension(s): Ext) -> Response {
    shell(&s, "create", "Create a VM", None)
}

pub(super) async fn vm(Extension(s): Ext, Path(vm): Path<String>) -> Response {
    shell(&s, "vm", &vm, Some(&vm))
}

pub(super) async fn terminal(Extension(s): Ext, Path(vm): Path<String>) -> Response {
    shell(&s, "terminal", &format!("{vm}: terminal"), Some(&vm))
}

pub(super) async fn images(Extension(s): Ext) -> Response {
    shell(&s, "images", "Images", None)
}

pub(super) async fn kernels(Extension(s): Ext) -> Response {
    shell(&s, "kernels", "Kernels", None)
}

pub(super) async fn snapshots(Extension(s): Ext) -> Response {
    shell(&s, "snapshots", "Snapshots", None)
}

pub(super) async fn doctor(Extension(s): Ext) -> Response {
    shell(&s, "doctor", "Doctor", None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(super::escape("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
