//! The dashboard's page, style and script, compiled into the binary (no
//! CDN, nothing fetched from elsewhere), served by the daemon at
//! `/dashboard` on both transports. They hold no data: the script reads
//! everything through the API with the bearer token the page's URL carries
//! in its fragment (`crew dashboard` prints that URL).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, X_CONTENT_TYPE_OPTIONS};

use super::api::Body;

const INDEX: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");

/// Scripts and styles from this origin only, data through this origin
/// only, no frames: a job name or log shown on the page cannot load or
/// run anything.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                      frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// True for the dashboard's paths.
pub(crate) fn is_asset(path: &str) -> bool {
    matches!(path, "/dashboard" | "/dashboard/" | "/dashboard/app.js" | "/dashboard/style.css")
}

/// The asset at `path`, if it is one.
pub(crate) fn asset(path: &str) -> Option<Response<Body>> {
    let (body, kind) = match path {
        "/dashboard" | "/dashboard/" => (INDEX, "text/html; charset=utf-8"),
        "/dashboard/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/style.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut res =
        Response::new(Full::new(Bytes::from_static(body.as_bytes())).map_err(|never| match never {}).boxed_unsync());
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(res)
}
