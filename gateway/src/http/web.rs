//! The web client of `gateway/web/`, embedded in the binary and served at `/`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Response, StatusCode};

use super::Body;

/// The web client (`gateway/web/`), embedded in the binary: file name (`""` is `/`), content
/// type, contents. The files reference each other by these absolute paths.
const WEB_FILES: [(&str, &str, &str); 4] = [
    (
        "",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "model.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/model.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/app.css"),
    ),
];

/// The web client's policy: its own scripts, styles and connections only (WebSockets to the
/// page's own host included), never framed.
const WEB_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub(super) fn web_file(name: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    WEB_FILES.iter().find(|(file, _, _)| *file == name)
}

/// One embedded file. It is revalidated on every use (`no-cache`) against a strong `ETag` of its
/// contents, so a new binary's client is picked up at once and an unchanged one costs a 304.
pub(super) fn web_response(name: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    use sha2::{Digest, Sha256};
    use std::sync::LazyLock;

    static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
        WEB_FILES
            .iter()
            .map(|(_, _, body)| format!("\"{}\"", hex::encode(&Sha256::digest(body.as_bytes())[..12])))
            .collect()
    });
    let index = WEB_FILES.iter().position(|(file, _, _)| *file == name)?;
    let (_, content_type, body) = WEB_FILES[index];
    let etag = &ETAGS[index];
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|tag| tag.trim() == etag || tag.trim() == "*")
        });
    let mut response = if fresh {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    let h = response.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(etag) {
        h.insert(ETAG, value);
    }
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(WEB_CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Some(response)
}

/// Whether a path is one the gateway serves (with some method).
pub(super) fn known_path(segments: &[&str]) -> bool {
    if let [file] = segments {
        if web_file(file).is_some() {
            return true;
        }
    }
    matches!(
        segments,
        ["ws" | "healthz" | "readyz" | "metrics" | "users" | "login" | "logout" | "rooms"]
            | ["users" | "rooms", _]
            | ["rooms", _, "join" | "messages"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_client_files_with_types_etags_and_policy() {
        for (path, kind) in [
            ("", "text/html"),
            ("app.js", "text/javascript"),
            ("model.js", "text/javascript"),
            ("app.css", "text/css"),
        ] {
            let response = web_response(path, &HeaderMap::new()).expect("served");
            assert_eq!(response.status(), StatusCode::OK);
            let h = response.headers();
            assert!(h[CONTENT_TYPE].to_str().unwrap().starts_with(kind), "{path}");
            assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(h[CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("frame-ancestors 'none'"));
            let mut again = HeaderMap::new();
            again.insert(IF_NONE_MATCH, h[ETAG].clone());
            let cached = web_response(path, &again).expect("served");
            assert_eq!(cached.status(), StatusCode::NOT_MODIFIED, "{path}");
        }
        assert!(web_response("index.html", &HeaderMap::new()).is_none());
        assert!(known_path(&[""]) && known_path(&["app.js"]) && !known_path(&["app.map"]));
    }
}
